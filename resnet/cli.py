"""The `resnet` command: each subcommand parses its arguments and calls one function.

Imports of heavy modules happen inside the handlers so that `resnet --help` stays fast.
To add a subcommand: write `_add_<name>(sub)` that registers its parser with
`set_defaults(handler=...)`, and list it in `COMMANDS`.
"""
from __future__ import annotations

import argparse
import sys


def _env(args: argparse.Namespace) -> int:
    from resnet.envinfo import environment_report

    print(environment_report())
    return 0


def _add_env(sub) -> None:
    p = sub.add_parser("env", help="print library versions and the visible accelerators")
    p.set_defaults(handler=_env)


COMMANDS = [_add_env]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resnet",
        description="Pack ImageNet-style data sets into shards and train ResNets on them "
        "across GPUs and nodes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
