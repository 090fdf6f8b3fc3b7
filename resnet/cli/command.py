"""What a `resnet` subcommand is: a name, its arguments and a `run`.

`run(args)` does the work and returns the exit status of a result (0, or 1 where a check it
ran found problems); it raises on bad input and on failure, and `resnet.cli.main` turns what
it raised into an error line and an exit status, the same way for every command. Heavy
modules are imported inside `run`, so that `resnet --help` stays fast.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Optional


def no_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of a command that takes none."""


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None] = no_arguments
    run: Optional[Callable[[argparse.Namespace], int]] = None
    kinds: tuple["Command", ...] = ()  # subcommands (`resnet bench data`), each with a run

    def add_to(self, subparsers) -> None:
        parser = subparsers.add_parser(self.name, help=self.help)
        self.arguments(parser)
        # prog: "resnet train", "resnet bench data": the error line names the command with it
        parser.set_defaults(run=self.run, prog=parser.prog)
        if self.kinds:
            kinds = parser.add_subparsers(dest="kind", metavar="KIND")
            for kind in self.kinds:
                kind.add_to(kinds)
