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


# Each row: the exceptions a command may raise, named by their defining module, and the exit
# status; the first row that matches decides (README.md, "Exit status"). They are looked up in
# sys.modules, never imported: an exception whose module was never loaded cannot have been
# raised, and importing them here would load torch (engine, trainer) on every failing
# command, where an ImportError would then hide the error being reported.
EXIT_TABLE = [
    ((("resnet.config.tree", "ConfigError"), ("resnet.train.engine", "SetupError"),
      ("resnet.checkpoint.errors", "ResumeError"), ("resnet.data.format", "ManifestError"),
      ("resnet.data.layouts", "LayoutError"), ("builtins", "FileNotFoundError")),
     BAD_INPUT),  # (before CheckpointError: a ResumeError is one)
    ((("resnet.data.remote", "StorageError"), ("resnet.train.trainer", "TrainingError"),
      ("resnet.checkpoint.errors", "CheckpointError"),
      ("resnet.checkpoint.diskspace", "CheckpointSpaceError"), ("resnet.report", "ReportError"),
      ("resnet.data.pack", "PackError"), ("resnet.deliver.hub", "PushError"),
      ("subprocess", "CalledProcessError")), FAILURE),
    # A bad argument (after the rows above: some of them are ValueErrors).
    ((("builtins", "ValueError"),), BAD_INPUT),
]


def _loaded(names: tuple[tuple[str, str], ...]) -> tuple[type[BaseException], ...]:
    return tuple(getattr(sys.modules[module], name) for module, name in names
                 if module in sys.modules)


def exit_status(exc: BaseException) -> int | None:
    """The exit status for what a command raised; None: not a product error (it propagates,
    with its traceback)."""
    if isinstance(exc, KeyboardInterrupt):
        return 128 + signal.SIGINT
    return next((status for names, status in EXIT_TABLE
                 if isinstance(exc, _loaded(names))), None)


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
        return BAD_INPUT
    try:
        return int(args.run(args) or 0)
    except (Exception, KeyboardInterrupt) as exc:
        status = exit_status(exc)
        if status is None:
            raise
        print(f"{args.prog}: error: {_message(exc)}", file=sys.stderr)
        return status
