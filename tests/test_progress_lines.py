"""Progress fits where it goes: plain lines in a file (no carriage returns, every log line on a
line of its own), the tqdm bar in a terminal with log lines above it."""
from __future__ import annotations

import io
import re

import pytest

import trainutil as tu
from resnet.logs import RateLimitedLogger, is_product_line
from resnet.progress import ProgressBar, is_progress_line

LOG_LINE = re.compile(r"\[rank \d+\] (INFO|WARNING|ERROR): ")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_file_gets_a_plain_line_every_n_steps_or_seconds_whichever_first():
    out, clock = io.StringIO(), Clock()
    bar = ProgressBar(100, initial=20, every=10, every_s=60.0, stream=out, clock=clock)
    clock.now = 5.0
    bar.update(25, loss=2.5, img_per_s=1234.0, epoch=0.25)
    assert out.getvalue() == ""  # neither 10 steps nor 60 s yet
    clock.now = 10.0
    bar.update(30, loss=2.0, img_per_s=1300.0, epoch=0.3)  # 10 steps since the start
    clock.now = 75.0
    bar.update(33)  # 65 s since the last line, 3 steps: the time rule
    clock.now = 80.0
    bar.update(36)
    bar.close()  # the end, where it stopped
    lines = out.getvalue().split("\n")
    assert lines[-1] == "" and "\r" not in out.getvalue()
    lines = lines[:-1]
    assert len(lines) == 3, lines
    assert all(is_product_line(line) and is_progress_line(line) for line in lines)
    assert is_progress_line(lines[0]) == ("progress: step 30/100 (30%), epoch 0.30, img/s 1,300, "
                                          "loss 2.0000, elapsed 00:10, ETA 01:10")
    assert is_progress_line(lines[1]).startswith("progress: step 33/100 (33%), epoch 0.30")
    assert is_progress_line(lines[2]).endswith("elapsed 01:20, ETA 05:20")


def test_other_ranks_and_a_closed_bar_print_nothing():
    out = io.StringIO()
    quiet = ProgressBar(10, enabled=False, every=1, stream=out)
    quiet.update(5)
    quiet.close()
    bar = ProgressBar(10, every=1, stream=out)
    bar.close()  # nothing done: nothing to say
    assert out.getvalue() == ""


def test_a_terminal_gets_the_bar_with_log_lines_above_it():
    term = Terminal()
    bar = ProgressBar(total=10, initial=4, stream=term)
    bar.update(6, loss=1.5, img_per_s=1234.0, epoch=0.6)
    RateLimitedLogger(rank=0, stream=term).info("step 6: val top-1 0.5000")
    bar.update(8)
    bar.close()
    text = term.getvalue()
    assert "\r" in text and "6/10" in text and "img/s=1,234" in text and "loss=1.5000" in text
    line = next(seg for seg in re.split(r"[\r\n]", text) if "val top-1" in seg)
    assert line.startswith(line[:8]) and LOG_LINE.search(line) and "/10" not in line
    assert not is_progress_line(line)


def test_training_with_stderr_to_a_file_writes_lines(tmp_path_factory):
    """The 2-process baseline run (shared with other tests) writes stdout and stderr to a file."""
    _, _, code, out = tu.baseline_run(tmp_path_factory)
    assert code == 0, out[-4000:]
    assert "\r" not in out
    for match in LOG_LINE.finditer(out):  # every log line starts a line
        start = out.rfind("\n", 0, match.start()) + 1
        assert re.fullmatch(r"\d\d:\d\d:\d\d ", out[start:match.start()]), \
            out[start:match.end() + 80]
    progress = [is_progress_line(line) for line in out.splitlines() if is_progress_line(line)]
    # Every train.log_every_steps=5 (a line a minute between them only on a very slow machine)
    fifth = [p for p in progress if p.startswith("progress: step 5/20 (25%), epoch 0.50, img/s ")]
    assert len(fifth) == 1 and ", loss " in fifth[0] and ", ETA " in fifth[0], progress
    assert all(", elapsed " in p for p in progress)
    assert progress[-1].startswith("progress: step 20/20 (100%)") and ", loss " in progress[-1]


def test_pack_and_verify_write_lines_where_stderr_is_not_a_terminal(tiny_imagefolder, tmp_path,
                                                                    capsys):
    from resnet import cli

    dest = str(tmp_path / "packed")
    assert cli.main(["pack", str(tiny_imagefolder), dest, "--layout", "imagefolder",
                     "--workers", "1"]) == 0
    packed = capsys.readouterr().err
    assert cli.main(["verify", dest]) == 0
    verified = capsys.readouterr().err
    for out in (packed, verified):
        assert "\r" not in out
        done = [is_progress_line(line) for line in out.splitlines() if is_progress_line(line)]
        assert done and re.match(r"progress: img (\d+)/\1 \(100%\)", done[-1]), out
