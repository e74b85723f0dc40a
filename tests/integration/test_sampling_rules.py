"""vLLM's sampling rules on the prefill/decode path (router -> prefill -> KV -> decode),
against one in-process vLLM engine with the same knobs (tests/sampling_rules.py):

- ``min_tokens`` with stop strings: stop strings count only once the completion has
  ``min_tokens`` tokens, the first (from prefill) included;
- a seeded request (temperature 1) draws from one generator seeded once: the decode engine
  goes on from the prefill engine's generator state after the first token, so the text is
  one engine's; with ``n = 4`` each sample is one engine's sample ``i``.

The colocated path runs the same checks in tests/integration/test_colocated.py.
"""

from __future__ import annotations

import pytest

from sampling_rules import (check_min_tokens_with_stop_strings, check_n_seeded_samples,
                            check_seeded_sampling)

pytestmark = pytest.mark.integration


def test_min_tokens_with_stop_strings_equal_one_engine(cluster, client, single_engine):
    check_min_tokens_with_stop_strings(client, single_engine)


def test_seeded_sampling_equals_one_engine(cluster, client, single_engine):
    check_seeded_sampling(client, single_engine)


def test_n_seeded_samples_equal_one_engine(cluster, client, single_engine):
    check_n_seeded_samples(client, single_engine)
