"""`resnet quickstart` output: the product's lines on the terminal, library chatter in the log."""
import io
import subprocess
import sys
import textwrap

import pytest

from resnet import quickstart

# A child like `resnet train` (its stderr a pipe, so plain progress lines): real DeepSpeed/torch
# import chatter, progress, chatter and a product line between two progress lines, the result.
CHILD = textwrap.dedent("""
    import sys
    import deepspeed  # its accelerator lines, on a CPU-only machine
    from resnet.logs import RateLimitedLogger
    from resnet.progress import ProgressBar
    bar = ProgressBar(total=4, every=1)
    bar.update(1, loss=2.0)
    print("[2026-01-01 00:00:00,000] [INFO] [engine.py:1:x] chatter beside the bar", flush=True)
    RateLimitedLogger(rank=0).info("step 2: val top-1 0.5000")
    bar.update(4, loss=1.0)
    bar.close()
    print("wandb: Run summary: 30 lines of it")
    print("final weights: /tmp/x")
""")
CHATTER = ("Setting accelerator to CPU", "chatter beside the bar", "wandb: Run summary")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(tmp_path, verbose: bool, out: io.StringIO | None = None) -> tuple[str, str]:
    out = io.StringIO() if out is None else out
    log_path = tmp_path / f"console-{verbose}.log"
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    with open(log_path, "ab") as log, pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", out)
        quickstart._run([sys.executable, str(child)], log, verbose, results="final weights: ")
    return out.getvalue(), log_path.read_text()


def test_default_output_is_the_products_lines_and_the_log_has_everything(tmp_path):
    shown, logged = _run(tmp_path, verbose=False)
    for line in CHATTER:
        assert line not in shown, shown
        assert line in logged
    assert "[rank 0] INFO: step 2: val top-1 0.5000\n" in shown
    assert "\nprogress: step 4/4 (100%), loss 1.0000" in shown  # not a terminal: plain lines
    assert "final weights: /tmp/x\n" in shown
    assert "\r" not in shown and shown.count("progress: step ") == 2, shown
    assert "\r" not in logged and logged.count("INFO: progress: step ") == 2  # line by line


def test_on_a_terminal_the_bar_is_redrawn_in_place(tmp_path):
    shown, _ = _run(tmp_path, verbose=False, out=_Terminal())
    assert "\rprogress: step 4/4 (100%), loss 1.0000" in shown
    assert "[rank 0] INFO: step 2: val top-1 0.5000\n" in shown
    for line in shown.split("\n"):  # the product line never shares the bar's line
        visible = line.rsplit("\r", 1)[-1]  # what a terminal shows after the redraws
        assert not ("step 2: val" in visible and "/4 (" in visible), shown


def test_verbose_shows_the_chatter(tmp_path):
    shown, _ = _run(tmp_path, verbose=True)
    assert all(line in shown for line in CHATTER)


def test_a_failing_step_shows_the_end_of_the_log(tmp_path, capsys):
    with open(tmp_path / "c.log", "ab") as log, pytest.raises(subprocess.CalledProcessError):
        quickstart._run([sys.executable, "-c", "raise SystemExit('boom: the cause')"], log, False)
    assert "boom: the cause" in capsys.readouterr().err


def test_product_loggers_print_product_lines(monkeypatch, capsys):
    import logging

    from resnet import logs

    logger = logging.getLogger("resnet")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", True)
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.delenv("RESNET_LOG_LEVEL", raising=False)
    logs.configure()
    logs.configure()  # idempotent: one handler
    logging.getLogger("resnet.data.shardio").warning("shard x: reopening at byte %d", 512)
    logging.getLogger("resnet.data.shardio").debug("not shown at the default level")
    err = capsys.readouterr().err
    assert err.count("[rank 3] WARNING: shard x: reopening at byte 512\n") == 1
    assert logs.is_product_line(err.splitlines()[0]) and "not shown" not in err
    assert not logs.verbose()
    monkeypatch.setenv("RESNET_LOG_LEVEL", "debug")
    assert logs.verbose()


def test_lock_free_lines_are_product_lines_too(capfd):
    """The stop-signal handler's and the liveness watchdog's lines take no lock, and still
    read as product lines: the console filter shows them."""
    from resnet import logs

    logs.write_unlocked(3, "WARNING", "signal 15: checkpointing at the end of this step")
    err = capfd.readouterr().err
    assert logs.is_product_line(err) and "[rank 3] WARNING: signal 15: checkpointing" in err
