"""The `resnet` command: each subcommand declares its arguments and a `run`
(resnet/cli/command.py), grouped by room (data.py, train.py, deliver.py, general.py), and
`main` turns what a run raised into an exit status through one table (`exit_status`).

To add a subcommand: write its `Command` in the room's module and list it in `COMMANDS`.
"""
from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys

from resnet.cli.command import Command
from resnet.cli.data import BENCH_DATA, PACK, VERIFY
from resnet.cli.deliver import DEMO, EXPORT, PREDICT
from resnet.cli.general import ENV, QUICKSTART
from resnet.cli.train import AUDIT, BENCH_TRAIN, EVAL, REPORT, TRAIN

BENCH = Command("bench", "benchmarks (`resnet bench data SHARDS`, "
                "`resnet bench train [--data SHARDS]`)", kinds=(BENCH_TRAIN, BENCH_DATA))
COMMANDS = [ENV, REPORT, PACK, VERIFY, TRAIN, EVAL, QUICKSTART, BENCH, AUDIT, EXPORT, PREDICT,
            DEMO]

BAD_INPUT = 2  # the command line, a config, a data set or a run folder is wrong: fix it
FAILURE = 1  # the work itself failed (storage, training, a checkpoint, a report, a push)


def exit_table() -> list[tuple[tuple[type[BaseException], ...], int]]:
    """Each exception a command may raise and its exit status; the first row that matches
    decides (README.md, "Exit status"). The types are imported here, once a command has
    failed: the modules that define them import torch, which `resnet --help` should not."""
    from resnet.config import ConfigError
    from resnet.data.format import ManifestError
    from resnet.data.layouts import LayoutError
    from resnet.data.pack import PackError
    from resnet.data.storage import StorageError
    from resnet.deliver.hub import PushError
    from resnet.report import ReportError
    from resnet.checkpoint.diskspace import CheckpointSpaceError
    from resnet.checkpoint.errors import CheckpointError, ResumeError
    from resnet.train.engine import SetupError
    from resnet.train.trainer import TrainingError

    return [
        ((ConfigError, SetupError, ResumeError, ManifestError, LayoutError, FileNotFoundError),
         BAD_INPUT),  # (before CheckpointError: a ResumeError is one)
        ((StorageError, TrainingError, CheckpointError, CheckpointSpaceError, ReportError,
          PackError, PushError, subprocess.CalledProcessError), FAILURE),
        ((ValueError,), BAD_INPUT),  # a bad argument (after the rows above: some are ValueErrors)
    ]


def exit_status(exc: BaseException) -> int | None:
    """The exit status for what a command raised; None: not a product error (it propagates,
    with its traceback)."""
    if isinstance(exc, KeyboardInterrupt):
        return 128 + signal.SIGINT
    return next((status for types, status in exit_table() if isinstance(exc, types)), None)


def _message(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, subprocess.CalledProcessError):  # quickstart's steps
        return f"`{shlex.join(map(str, exc.cmd))}` failed (exit status {exc.returncode})"
    return str(exc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resnet",
        description="Pack ImageNet-style data sets into shards and train ResNets on them "
        "across GPUs and nodes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_to(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from resnet.logs import configure

    configure()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except (Exception, KeyboardInterrupt) as exc:
        status = exit_status(exc)
        if status is None:
            raise
        print(f"{args.prog}: error: {_message(exc)}", file=sys.stderr)
        return status
