"""The commands about the product as a whole: `resnet env` and `resnet quickstart`."""
from __future__ import annotations

import argparse
from pathlib import Path

from resnet.cli.command import Command


def _env(args: argparse.Namespace) -> int:
    from resnet.envinfo import environment_report

    print(environment_report())
    return 0


def _quickstart_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default="runs/quickstart", help="where everything goes")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--verbose", action="store_true", help="show the libraries' output too "
                   "(also RESNET_LOG_LEVEL=debug); it always goes to RUN_DIR/console.log")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training overrides")


def _quickstart(args: argparse.Namespace) -> int:
    from resnet.quickstart import quickstart

    quickstart(Path(args.dir), processes=args.processes, overrides=args.overrides,
               verbose=args.verbose)
    return 0


ENV = Command("env", "print library versions and the visible accelerators", run=_env)
QUICKSTART = Command("quickstart", "generate data, pack, train 2 processes (DeepSpeed on CPU), "
                     "evaluate: the whole product in ~2 minutes", _quickstart_arguments,
                     _quickstart)
