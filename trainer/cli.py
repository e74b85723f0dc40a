"""``preft train``: the trainer as a subcommand of the ``preft`` CLI (see trainer.train).

Hook-up in app/cli.py's ``make_parser``: ``from trainer.cli import add_train_parser;
add_train_parser(sub)``. The subcommand sets ``fn`` so ``main`` runs it like the others.
"""

from __future__ import annotations

import argparse


def add_train_parser(sub) -> argparse.ArgumentParser:
    """Add ``train`` to an argparse subparsers object; returns the new parser."""
    from trainer.train import __doc__ as doc, add_args, run_args

    p = sub.add_parser("train", help="fine-tune a lora_p / reft_p / lora adapter on a JSONL",
                       description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    p.set_defaults(fn=run_args)
    return p
