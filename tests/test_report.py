"""`resnet report`: a PNG from metrics.jsonl, and clear errors when there is nothing to draw."""
from __future__ import annotations

import json

import pytest

from resnet.cli import main
from resnet.report import ReportError, read_metrics, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(run_dir, steps=20):
    lines = []
    for step in range(steps):
        lines.append({"step": step, "time": 1.0 + step, "loss": 7.0 - 0.1 * step, "lr": 0.01 * step,
                      "top1": 0.01 * step, "top5": 0.05 * step, "img_per_s": 1000.0 + step,
                      "img_per_s_per_device": 500.0 + step, "epoch": step / 10})
        if step % 10 == 9:
            lines.append({"step": step, "time": 1.5 + step, "val_top1": 0.2, "val_top5": 0.5,
                          "val_loss": 5.0})
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (run_dir / "metrics.jsonl").write_text(text + '{"step": 20, "loss"')  # cut by a crash
    return run_dir


def test_report_png_from_jsonl(tmp_path, capsys):
    run_dir = _write_run(tmp_path)
    assert main(["report", str(run_dir)]) == 0
    out = run_dir / "report.png"
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 10_000
    assert capsys.readouterr().out.strip() == str(out)


def test_report_custom_out(tmp_path):
    (tmp_path / "run").mkdir()
    run_dir = _write_run(tmp_path / "run")
    out = write_report(run_dir, tmp_path / "plots" / "r.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_replayed_steps_keep_the_later_value(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 5}\n{"step": 2, "loss": 4}\n{"step": 2, "loss": 3}\nx\n')
    assert read_metrics(path)["loss"] == {1: 5.0, 2: 3.0}


def test_missing_and_empty(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    assert "no metrics.jsonl in" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ReportError, match="holds no metrics"):
        write_report(tmp_path)
    with pytest.raises(ReportError, match="run directory not found"):
        write_report(tmp_path / "nope")
