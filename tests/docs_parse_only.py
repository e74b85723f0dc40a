"""Run a program's argument parsing and nothing else (the docs-examples test's ``parse`` mode).

    docs_parse_only.py -m MODULE ARGS...      # as `python -m MODULE ARGS...`
    docs_parse_only.py --entry MOD:FUNC ARGS... # as a console script (`preft ARGS...`)

The first top-level ``ArgumentParser.parse_args`` call parses ``ARGS`` as the program
would, then the process exits 0; a flag or value the program refuses exits 2 with argparse's
own message. Subcommand parsers (``parse_known_args``) are left alone.
"""

from __future__ import annotations

import argparse
import importlib
import runpy
import sys

_orig = argparse.ArgumentParser.parse_args


def _parse_then_exit(self, args=None, namespace=None):
    ns = _orig(self, args, namespace)
    print(f"parsed: {sorted(k for k, v in vars(ns).items() if v is not None)}")
    raise SystemExit(0)


def main() -> None:
    argparse.ArgumentParser.parse_args = _parse_then_exit
    how, target, *rest = sys.argv[1:]
    if how == "-m":
        sys.argv = [target, *rest]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    elif how == "--entry":
        mod, func = target.split(":")
        sys.argv = [mod, *rest]
        sys.exit(getattr(importlib.import_module(mod), func)())
    else:
        raise SystemExit(f"usage: {__doc__}")
    raise SystemExit("the program returned without parsing arguments")


if __name__ == "__main__":
    main()
