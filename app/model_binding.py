"""The adapter registry belongs to one base model (registration, before step 3).

Adapters are validated against the base model when they are registered; the registry (in
Redis, under ``--run-dir`` for a local cluster) outlives the process, so a restart on
another model would find adapters that no longer fit. The registry records the model it
was validated against (:class:`~cluster.state.ModelBinding`, the fingerprint of
:func:`cluster.model_info.model_fingerprint`), and the launcher checks it before Ray starts:
the same model goes on; another one is refused (``on_model_change: refuse``, the default)
or every adapter is validated again on the new model's workers, and those that do not fit
are removed (``revalidate``, ``preft up --revalidate-adapters``). Whatever the registry
says, a worker checks an adapter's shapes against its own engine's model when it loads it
(``prefill_worker/adapter_host.py``).
"""

from __future__ import annotations

import logging
from typing import Callable

from cluster.config import ConfigError
from cluster.errors import InvalidAdapter
from cluster.model_info import model_fingerprint
from cluster.state import ClusterState, ModelBinding

log = logging.getLogger(__name__)


def _names(state: ClusterState) -> list[str]:
    return sorted(state.list_adapters())


def check_binding(state: ClusterState, model: str, where: str,
                  on_change: str) -> ModelBinding | None:
    """Before any worker starts: None when the registry is bound to ``model`` (an empty,
    unbound one is bound now); the binding to record once every adapter was validated
    again (``on_change="revalidate"``); else :class:`ConfigError`, one line saying where
    the registry is and how to go on. ``where``: e.g. "run directory /x/.preft/run"."""
    new = ModelBinding(model_fingerprint(model), model)
    old = state.base_model()
    names = _names(state)
    if old is not None and old.fingerprint == new.fingerprint:
        return None
    if old is None and not names:
        state.bind_base_model(new)
        return None
    if on_change == "revalidate":
        return new
    was = (f"another base model ({old.model}, fingerprint {old.fingerprint[:12]})"
           if old is not None else "a base model it did not record (made by an older preft)")
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise ConfigError(
        f"the {where} holds {len(names)} adapter(s) ({shown}) validated against {was}, not "
        f"{model} (fingerprint {new.fingerprint[:12]}); they would not fit it. Use another "
        "run directory (--run-dir DIR), or pass --revalidate-adapters to check every adapter "
        "against this model and remove those that do not fit")


def revalidate(state: ClusterState, validate: Callable[[str, str], object],
               binding: ModelBinding, say: Callable[[str], None]) -> list[str]:
    """Validate every registered adapter again with ``validate(uri, kind)`` (a worker of
    the new model: raises :class:`InvalidAdapter` when it does not fit), remove those that
    do not fit from the registry, then bind it to ``binding``; the names removed. An
    adapter that could not be checked (its store unreachable) stays: the worker that
    loads it checks it then."""
    removed = []
    for name, rec in sorted(state.list_adapters().items()):
        try:
            validate(rec.uri, rec.kind)
        except InvalidAdapter as e:
            state.delete_adapter(name)
            removed.append(name)
            say(f"adapter {name} v{rec.version} does not fit {binding.model}: removed from "
                f"the registry ({e.message})")
        except Exception as e:   # noqa: BLE001 -- not a verdict on the adapter's shapes
            log.warning("could not validate adapter %s again (%s); kept: workers check it "
                        "when they load it", name, e)
    state.bind_base_model(binding)
    say(f"adapter registry bound to {binding.model}: {len(removed)} adapter(s) removed")
    return removed
