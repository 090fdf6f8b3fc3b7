"""`resnet quickstart`: the whole product in about two minutes on a CPU, with no download.

Generates a small labelled image set, packs it with `resnet pack`, trains with two processes
through Accelerate + DeepSpeed (gloo on CPU), evaluates, exports the final weights, and says
where everything went. Each step is the same command a user would type, printed first.

Everything the commands print goes to ``run.dir/console.log``; the terminal shows what the
product says on purpose (progress bars, its log lines, each command's result) and not the
libraries' chatter, unless ``verbose`` (``--verbose`` or ``RESNET_LOG_LEVEL=debug``). A
failing command shows the end of the log.
"""
from __future__ import annotations

import codecs
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import IO

from resnet import logs, progress
from resnet.data import synthetic
from resnet.data.format import MANIFEST_NAME
from resnet.runfolder import CHECKPOINTS_DIR, CONSOLE_LOG, FINAL_DIR, METRICS_FILE, WEIGHTS_FILE

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
TAIL_LINES = 30  # of the log, shown when a command fails
_SEP = re.compile(r"(\r\n|\r|\n)")
_BAR_END = re.compile(r"\d+/\d+ \[[^\]]*\]")  # a tqdm bar ends at its bracket


class _Console:
    """Shows the product's lines of a child's output; on a terminal draws bars on one line, as
    tqdm does, and elsewhere (a file, a pipe: no redraws there) writes each new state of a bar
    as a line of its own."""

    def __init__(self, out: IO[str], verbose: bool, results: re.Pattern | None) -> None:
        self.out, self.verbose, self.results = out, verbose, results
        self.tty = out.isatty()
        self.pending = ""
        self.bar = ""  # the bar on the terminal's current line (never set off a terminal)
        self.last_bar = ""  # off a terminal: the bar's last line written, not written again

    def feed(self, text: str) -> None:
        if self.verbose:
            self.out.write(text)
            self.out.flush()
            return
        parts = _SEP.split(self.pending + text)
        self.pending = parts.pop()  # an unterminated tail waits for its end
        for segment, sep in zip(parts[::2], parts[1::2]):
            self._segment(segment, sep)
        bar = _BAR_END.search(self.pending)  # a bar waits for its redraw's \r: draw it now
        if bar and logs.is_product_line(self.pending[: bar.end()]):
            self._bar(self.pending[: bar.end()].strip(), closed=False)
        self.out.flush()

    def close(self) -> None:
        if self.pending:
            self._segment(self.pending, "\n")
        if self.bar:
            self.out.write("\n")
        self.pending = self.bar = ""
        self.out.flush()

    def _segment(self, text: str, sep: str) -> None:
        plain = progress.is_progress_line(text.strip())
        if plain:  # a child's progress line: drawn in place, as a bar is
            self._bar(plain, closed=False)
            return
        bar = _BAR_END.search(text)
        if bar and logs.is_product_line(text[: bar.end()]):
            self._bar(text[: bar.end()].strip(), closed=sep != "\r")
            text = text[bar.end():]  # what a library glued to the bar's line
        text = text.strip()
        if text and (logs.is_product_line(text) or self.results and self.results.match(text)):
            self._line(text)

    def _bar(self, text: str, closed: bool) -> None:
        if not self.tty:
            if text != self.last_bar:
                self.out.write(text + "\n")
            self.last_bar = "" if closed else text
            return
        pad = " " * max(0, len(self.bar) - len(text))
        self.out.write(f"\r{text}{pad}" + ("\n" if closed else ""))
        self.bar = "" if closed else text

    def _line(self, text: str) -> None:
        if self.bar:  # print above the bar, then draw it again below
            self.out.write("\r" + " " * len(self.bar) + "\r")
        self.out.write(text + "\n")
        if self.bar:
            self.out.write(self.bar)


def _child_env() -> dict[str, str]:
    # The children write to a pipe, so they print plain progress lines (resnet.progress): the
    # log file reads line by line, and the terminal redraws each as the bar (_Console).
    return dict(os.environ, PYTHONUNBUFFERED="1")


def _tail(path: str, lines: int = TAIL_LINES) -> str:
    """The last lines of a log, each as a terminal left it (the text after its last \\r)."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - (1 << 16)))
        text = f.read().decode("utf-8", "replace")
    last = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join(last[-lines - 1:]).strip("\n")


def _run(command: list[str], log: IO[bytes], verbose: bool, results: str | None = None
         ) -> None:
    """Run one step; its output goes whole to `log`, and its product lines to the terminal."""
    line = f"\n$ {shlex.join(command)}"
    print(line, flush=True)
    log.write(line.encode() + b"\n")
    log.flush()
    console = _Console(sys.stdout, verbose, re.compile(results) if results else None)
    text = codecs.getincrementaldecoder("utf-8")("replace")  # chunks split characters
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=_child_env())
    with proc:
        for chunk in iter(lambda: os.read(proc.stdout.fileno(), 1 << 16), b""):
            log.write(chunk)
            log.flush()
            console.feed(text.decode(chunk))
    console.close()
    if proc.returncode:
        if not verbose:
            print(f"--- the last lines of {log.name}:\n{_tail(log.name)}", file=sys.stderr)
        raise subprocess.CalledProcessError(proc.returncode, command)


def quickstart(out: Path, processes: int = 2, classes: int = 10, per_class: int = 120,
               overrides: list[str] = (), verbose: bool = False) -> Path:
    import torch

    gpus = torch.cuda.device_count()
    if gpus and processes > gpus:  # one process per GPU; on CPUs, as many as asked
        print(f"{gpus} GPU(s) visible: training with {gpus} process(es), one per GPU")
        processes = gpus
    verbose = verbose or logs.verbose()
    out = out.resolve()
    source, packed, run_dir = out / "source", out / "data", out / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / CONSOLE_LOG, "ab") as log:
        print(f"the commands' whole output: {log.name}" + ("" if verbose else
              " (shown here too with --verbose or RESNET_LOG_LEVEL=debug)"))
        if not (packed / MANIFEST_NAME).is_file():
            print(f"generating {classes} classes x {per_class} training images in {source}")
            synthetic.write_imagefolder(source, classes,
                                        {"train": per_class, "val": per_class // 4},
                                        size=(80, 64), seed=0)
            _run([sys.executable, "-m", "resnet", "pack", str(source), str(packed),
                  "--layout", "imagefolder", "--samples-per-shard", "200"], log, verbose,
                 results=r"packed |skipped ")
        # --use_deepspeed is what makes `accelerate launch` start N processes on a CPU-only
        # machine; the DeepSpeed settings themselves come from our config (train/engine.py).
        _run([sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed",
              "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "resnet", "train", "--config", str(CONFIG),
              f"data.train={packed}", f"data.val={packed}", f"run.dir={run_dir}", *overrides],
             log, verbose)  # the trainer's own log line names the final weights
        final = run_dir / FINAL_DIR
        _run([sys.executable, "-m", "resnet", "eval", "--weights", str(final),
              "--data", str(packed)], log, verbose, results=r"\{")
        exported = out / "export"
        _run([sys.executable, "-m", "resnet", "export", str(run_dir), str(exported)], log,
             verbose, results=r"^exported ")
    print(f"\ndone.\n  packed shards:  {packed}\n  run directory:  {run_dir}"
          f"\n  checkpoints:    {run_dir / CHECKPOINTS_DIR}\n  metrics:        "
          f"{run_dir / METRICS_FILE}\n  final weights:  {final / WEIGHTS_FILE}"
          f"\n  console log:    {run_dir / CONSOLE_LOG}"
          f"\n  report:         resnet report {run_dir}\n  exported (hf):  {exported}"
          f"\n\ntry next:\n  resnet predict {exported} {source / 'val'}\n"
          f"  resnet demo {exported}    (pip install -e \".[demo]\")")
    return final
