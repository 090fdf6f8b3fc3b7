"""The audit reader: a later start's records replace a rolled-back step's, duplicates are found.

Fast: the run directories are written by hand (the training tests produce real ones).
"""
from pathlib import Path

from resnet.cli import main
from resnet.train.audit import AuditLog, epoch_usage, read_audit


def _write(run_dir: Path, start: str, rank: int, records: list[tuple[int, int, list[str]]]):
    log = AuditLog(run_dir, rank, start)
    for step, epoch, keys in records:
        log.write(step, 0, epoch, keys)
    log.close()


def test_a_later_start_replaces_the_steps_it_wrote_again_even_at_another_world_size(tmp_path):
    # Start A, two ranks, reached step 3; rolled back to step 1; start B, one rank, redid 2-3.
    _write(tmp_path, "20260101T000000.000001-restart000", 0, [(1, 0, ["a"]), (2, 0, ["c"]),
                                                             (3, 0, ["x"])])
    _write(tmp_path, "20260101T000000.000001-restart000", 1, [(1, 0, ["b"]), (2, 0, ["d"]),
                                                             (3, 0, ["y"])])
    _write(tmp_path, "20260101T000100.000000-restart001", 0, [(2, 0, ["c", "d"]),
                                                             (3, 0, ["e", "f"])])
    audit = read_audit(tmp_path)
    assert {k: r["keys"] for k, r in audit[1].items()} == {(0, 0): ["a"], (0, 1): ["b"]}
    assert {k: r["keys"] for k, r in audit[3].items()} == {(0, 0): ["e", "f"]}  # no rank-1 "y"
    [use] = epoch_usage(audit)
    assert (use.samples, use.unique, use.duplicates) == (6, 6, ())


def test_duplicates_are_reported(tmp_path):
    _write(tmp_path, "s1", 0, [(1, 0, ["a", "b"]), (2, 0, ["b", "c"]), (3, 1, ["a"])])
    uses = epoch_usage(read_audit(tmp_path))
    assert [u.duplicates for u in uses] == [("b",), ()]


def test_a_partial_last_line_from_a_killed_process_is_ignored(tmp_path):
    _write(tmp_path, "s1", 0, [(1, 0, ["a"])])
    path = next((tmp_path / "audit").glob("*.jsonl"))
    path.write_text(path.read_text() + '{"step": 2, "mic')
    assert list(read_audit(tmp_path)) == [1]


def test_resnet_audit_command_fails_on_a_duplicate(tmp_path, capsys):
    from resnet.data import synthetic
    from resnet.data.pack import PackOptions, pack

    synthetic.write_imagefolder(tmp_path / "src", 2, {"train": 3}, size=(16, 16))
    pack(str(tmp_path / "src"), str(tmp_path / "data"), "imagefolder",
         PackOptions(samples_per_shard=4, workers=1), progress=False, log=lambda *_: None)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"data:\n  train: {tmp_path / 'data'}\n")
    _write(run, "s1", 0, [(1, 0, ["k1", "k2"]), (2, 0, ["k2", "k3"])])
    assert main(["audit", str(run)]) == 1
    out = capsys.readouterr().out
    assert "epoch 0: 2 steps, 4 sample uses, 3 distinct of 6" in out
    assert "1 used twice (e.g. k2)" in out and "AUDIT FAILED" in out


def test_resnet_audit_without_records_is_a_clear_error(tmp_path, capsys):
    assert main(["audit", str(tmp_path)]) == 2
    assert "audit.sample_keys=true" in capsys.readouterr().err
