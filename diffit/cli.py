"""`python -m diffit <command>`: a registry of subcommands, one module per command.

Each module in COMMANDS exposes `add_parser(subparsers)`, which adds its subparser and sets
`func=<callable(args) -> int>` as the parser default. Modules are imported when the parser is
built, so they keep heavy imports (torch models, diffusers) inside their run functions.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# add a command: append its module here ("diffit.training.train", "diffit.training.demo", ...)
COMMANDS: List[str] = [
    "diffit.sample",
    "diffit.training.train",
    "diffit.training.encode",
    "diffit.training.demo",
    "diffit.check",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m diffit",
                                     description="DiffiT on the diffit_kernels fused ops")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
