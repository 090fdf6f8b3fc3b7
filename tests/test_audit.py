"""The audit reader: a later start's records replace a rolled-back step's, duplicates are found.

Fast: the run directories are written by hand (the training tests produce real ones).
"""
from pathlib import Path

from resnet.cli import main
from resnet.train.audit import AuditLog, epoch_usage, new_start_id, read_audit, stream_usage


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


def test_streaming_epoch_by_epoch_matches_the_whole_read_across_rollbacks(tmp_path):
    # Start 1: steps 1-6 over epochs 0-1 (3 steps each), two ranks. Rolled back to step 2;
    # start 2, one rank, redid 3-6 with other keys and went on to 8 (epoch 2).
    for rank in (0, 1):
        _write(tmp_path, "000001-20260101T000000.000000Z-restart000", rank,
               [(s, (s - 1) // 3, [f"k{s}-{rank}", "shared" if s == 4 else f"u{s}-{rank}"])
                for s in range(1, 7)])
    _write(tmp_path, "000002-20260101T000100.000000Z-restart001", 0,
           [(s, (s - 1) // 3, [f"r{s}", f"r{s}b"]) for s in range(3, 9)])
    streamed = list(stream_usage(tmp_path, all_keys={"k1-0", "zz"}))
    assert streamed == epoch_usage(read_audit(tmp_path), all_keys={"k1-0", "zz"})
    assert [(u.epoch, u.steps, u.samples) for u in streamed] == [(0, 3, 10), (1, 3, 6),
                                                                 (2, 2, 4)]


def test_streaming_holds_one_epoch_not_the_run(tmp_path):
    import tracemalloc

    for rank in (0, 1):
        log = AuditLog(tmp_path, rank, "000001-20260101T000000.000000Z-restart000")
        for step in range(1, 301):  # 30 epochs of 10 steps, 200 keys per record
            log.write(step, 0, (step - 1) // 10, [f"n{step:05d}_{rank}_{i:04d}" for i in range(200)])
        log.close()

    def peak(fn):
        tracemalloc.start()
        result = fn()
        size = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return size, result

    whole, expected = peak(lambda: epoch_usage(read_audit(tmp_path)))
    streamed, got = peak(lambda: list(stream_usage(tmp_path)))
    assert got == expected and len(got) == 30
    assert streamed < whole / 8, (streamed, whole)


def test_start_ids_are_utc_and_ordered_by_a_counter_not_the_clock(tmp_path):
    _write(tmp_path, "000001-20991231T235959.000000Z-restart000", 0, [(1, 0, ["a"])])  # a clock
    later = new_start_id(0, tmp_path)  # ahead, or another zone: the counter still orders
    assert later.startswith("000002-") and later.split("-")[1].endswith("Z")
    assert sorted([later, "000001-20991231T235959.000000Z-restart000"])[-1] == later
