"""The checkpoint mirror as untrusted, shared and interruptible storage (issue 20, items 1, 2, 5,
7, 8): keys that would leave the target, two nodes restoring into one shared run.dir, partial
uploads, `checkpoint.resume=false` with a mirror, and the re-upload of what the mirror lacks."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from resnet.data import remote, storage
from resnet.checkpoint.errors import CheckpointError
from resnet.checkpoint.manager import CheckpointManager
from resnet.checkpoint.mirror import MARKER, Mirror
from resnet.runfolder import checkpoint_name

REPO = Path(__file__).resolve().parents[1]


class StubAccelerator:
    """One process that is every rank: save_state writes `files` files of `size` bytes into
    pytorch_model/, as Accelerate + DeepSpeed do (so trainer_state.json is uploaded first)."""
    is_main_process = is_local_main_process = True
    process_index = 0

    def __init__(self, files: int = 1, size: int = 16) -> None:
        self.files, self.size = files, size

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, path: str) -> None:
        (Path(path) / "pytorch_model").mkdir(parents=True, exist_ok=True)
        for i in range(self.files):
            (Path(path) / "pytorch_model" / f"tensor-{i:03d}.bin").write_bytes(
                os.urandom(self.size))

    def load_state(self, path: str) -> None:
        pass


def _manager(run_dir: Path, mirror: str, keep: int = 3, resume: bool = True,
             acc: StubAccelerator | None = None) -> CheckpointManager:
    return CheckpointManager(acc or StubAccelerator(), run_dir, {}, keep=keep, mirror=mirror,
                             mirror_wait_s=30, resume=resume)


def _mirrored_run(tmp_path: Path, mirror: str, steps=(5,), acc=None) -> None:
    """A run that saved `steps` and mirrored them all (then its disk went away)."""
    ckpt = _manager(tmp_path / "first-run", mirror, acc=acc)
    ckpt.prepare()
    for step in steps:
        ckpt.save(step)
        assert ckpt.close() is True


def _files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ------------------------------------------------------------------ item 2: keys that escape

HOSTILE = ["../../../escaped.txt", "pytorch_model/../../../escaped.txt", "/escaped.txt",
           "a//escaped.txt", "./escaped.txt", "..\\..\\escaped.txt", "pytorch_model/.."]


@pytest.mark.parametrize("key", HOSTILE)
def test_a_mirror_key_that_leaves_the_target_stops_the_restore_naming_it(tmp_path, s3_server,
                                                                        key):
    """A key under the mirror's checkpoint that would resolve outside the folder it is
    restored into: the restore stops naming the key, and nothing is written anywhere."""
    mirror = f"{s3_server.url}/run"
    _mirrored_run(tmp_path, mirror)
    name = checkpoint_name(5)
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=f"run/{name}/{key}", Body=b"x")
    assert any(k.endswith(key) for k in remote.s3_listing(f"{mirror}/{name}")), \
        "the store kept the key as written"
    node = tmp_path / "deep" / "er" / "node"
    before = _files_under(tmp_path)
    with pytest.raises(CheckpointError) as caught:
        _manager(node / "run", mirror).prepare()
    assert repr(key)[1:-1][:40] in str(caught.value)
    assert "not a plain relative name" in str(caught.value)
    written = _files_under(tmp_path) - before
    assert not [w for w in written if "escaped" in w], written
    assert not [w for w in written if "tensor" in w or "trainer_state" in w], written


@pytest.mark.parametrize("key", ["..", ".", "", "a//b", "/abs", "a\\b", "a/../b", "a/"])
def test_checked_key_refuses_what_could_leave_the_folder(key):
    with pytest.raises(storage.StorageError, match="not a plain relative name"):
        storage.checked_key(key, "s3://bucket/prefix")


def test_a_local_folder_mirror_refuses_links_and_backslashes(tmp_path):
    mirror = tmp_path / "mirror"
    _mirrored_run(tmp_path, str(mirror))
    folder = mirror / checkpoint_name(5)
    outside = tmp_path / "outside"
    outside.mkdir()
    (folder / "link").symlink_to(outside)
    with pytest.raises(CheckpointError, match="'link' under it is a symbolic link"):
        _manager(tmp_path / "node", str(mirror)).prepare()
    (folder / "link").unlink()
    (folder / "a\\b").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a plain relative name"):
        _manager(tmp_path / "node", str(mirror)).prepare()
    (folder / "a\\b").unlink()
    restored = _manager(tmp_path / "node", str(mirror)).prepare()
    assert restored is not None and restored.name == checkpoint_name(5)


# ------------------------------------------------------------------ item 5: completion marker

def _killed_upload(monkeypatch, ckpt: CheckpointManager, mirror: Path, step: int, call: str,
                   dies) -> None:
    """Save `step` without handing it to the mirror, then upload it with `storage.<call>`
    killing the process (KeyboardInterrupt) at the first call whose arguments `dies` accepts."""
    monkeypatch.setattr(Mirror, "submit", lambda self, checkpoint: None)
    checkpoint = ckpt.save(step)
    monkeypatch.undo()
    real = getattr(storage, call)

    def killed(*args):
        if dies(*args):
            raise KeyboardInterrupt(f"killed in storage.{call}")
        return real(*args)

    monkeypatch.setattr(storage, call, killed)
    with pytest.raises(KeyboardInterrupt):
        Mirror(str(mirror), keep=ckpt.keep)._upload(checkpoint)
    monkeypatch.undo()


def test_a_killed_upload_is_never_latest_and_pruning_keeps_the_complete_ones(tmp_path,
                                                                          monkeypatch):
    """keep=2: steps 1 and 2 mirrored; step 3's upload is killed after its first tensor file
    (trainer_state.json goes last, so the partial cannot pass for a legacy checkpoint); step 4
    mirrored. The mirror keeps the
    complete steps 2 and 4, and `latest` never named step 3."""
    mirror = tmp_path / "mirror"
    ckpt = _manager(tmp_path / "run", str(mirror), keep=2, acc=StubAccelerator(files=3))
    ckpt.prepare()
    for step in (1, 2):
        ckpt.save(step)
        assert ckpt.close() is True
    _killed_upload(monkeypatch, ckpt, mirror, 3, "upload_file",  # dies at the second tensor
                   lambda local, url: "pytorch_model" in url and "tensor-000" not in url)
    assert (mirror / "latest").read_text() == "step-000000002"
    assert (mirror / "step-000000003" / "pytorch_model" / "tensor-000.bin").is_file()
    assert not (mirror / "step-000000003" / "trainer_state.json").exists()  # it goes up last
    ckpt.save(4)
    assert ckpt.close() is True
    assert sorted(p.name for p in mirror.glob("step-*")) == ["step-000000002", "step-000000004"]
    assert all((p / MARKER).is_file() for p in mirror.glob("step-*"))


def test_a_latest_that_names_a_partial_upload_restores_the_newest_complete(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="resnet")
    mirror = tmp_path / "mirror"
    _mirrored_run(tmp_path, str(mirror), steps=(5, 6))
    (mirror / checkpoint_name(6) / MARKER).unlink()  # as if killed before its marker
    (mirror / "latest").write_text(checkpoint_name(6))
    restored = _manager(tmp_path / "node", str(mirror)).prepare()
    assert restored is not None and restored.name == checkpoint_name(5)
    assert "whose upload never finished" in caplog.text


def test_a_restore_missing_a_file_the_marker_lists_is_refused(tmp_path):
    mirror = tmp_path / "mirror"
    _mirrored_run(tmp_path, str(mirror), acc=StubAccelerator(files=3))
    (mirror / checkpoint_name(5) / "pytorch_model" / "tensor-001.bin").unlink()
    node = tmp_path / "node"
    with pytest.raises(CheckpointError, match="did not arrive whole, e.g. pytorch_model/tensor-001"):
        _manager(node, str(mirror)).prepare()
    assert not (node / "checkpoints" / checkpoint_name(5)).exists()
    assert not list((node / "checkpoints").glob(".tmp-*"))


# ------------------------------------------------------------------ item 7: resume=false

def test_resume_false_with_a_mirror_that_holds_a_run_refuses_naming_it(tmp_path):
    mirror = tmp_path / "mirror"
    _mirrored_run(tmp_path, str(mirror))
    node = tmp_path / "node"
    with pytest.raises(CheckpointError, match=f"checkpoint.mirror={mirror} already holds "
                                              f"checkpoints and checkpoint.resume=false"):
        _manager(node, str(mirror), resume=False).prepare()
    assert not list((node / "checkpoints").glob("step-*"))  # nothing restored
    assert (mirror / "latest").read_text() == checkpoint_name(5)  # nothing pruned
    empty = tmp_path / "empty-mirror"
    assert _manager(tmp_path / "node2", str(empty), resume=False).prepare() is None


# ------------------------------------------------------------------ item 8: re-upload at start

def _mirror_cut_off_after(tmp_path: Path, monkeypatch, unmirrored: int) -> tuple[Path, Path]:
    """A run that mirrored step 4, then saved `unmirrored` and stopped before uploading it."""
    mirror, run = tmp_path / "mirror", tmp_path / "run"
    ckpt = _manager(run, str(mirror))
    ckpt.prepare()
    ckpt.save(4)
    assert ckpt.close() is True
    monkeypatch.setattr(Mirror, "submit", lambda self, checkpoint: None)  # the cut-off upload
    ckpt.save(unmirrored)
    monkeypatch.undo()
    assert (mirror / "latest").read_text() == checkpoint_name(4)
    return run, mirror


def test_a_newer_local_checkpoint_is_uploaded_at_start(tmp_path, monkeypatch):
    """Step 4 mirrored; step 5 saved but its upload cut off by the stop. The next start
    resumes from step 5 and puts it on the mirror (before the next save)."""
    run, mirror = _mirror_cut_off_after(tmp_path, monkeypatch, 5)
    restarted = _manager(run, str(mirror))
    assert restarted.prepare().name == checkpoint_name(5)
    assert restarted.close() is True
    assert (mirror / "latest").read_text() == checkpoint_name(5)
    assert (mirror / checkpoint_name(5) / MARKER).is_file()
    assert restarted.mirror_metrics()["mirror_lag_steps"] == 0


def test_the_lag_before_the_re_upload_finishes_counts_the_missing_steps(tmp_path, monkeypatch):
    run, mirror = _mirror_cut_off_after(tmp_path, monkeypatch, 9)
    monkeypatch.setattr(Mirror, "_run", lambda self: None)  # the upload has not begun
    restarted = _manager(run, str(mirror))
    restarted.prepare()
    assert restarted.mirror_metrics()["mirror_lag_steps"] == 5
    assert {p.name for p in restarted.mirror.busy()} == {checkpoint_name(9)}


# ------------------------------------------------------------------ item 1: a shared run.dir

RESTORER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_mirror_safety import StubAccelerator, _manager
go = Path({go!r})
deadline = time.monotonic() + 60
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.002)
print(_manager(Path({run!r}), {mirror!r}).prepare().name, flush=True)
"""


def test_two_processes_restoring_into_one_shared_run_dir_both_get_the_whole_checkpoint(
        tmp_path):
    """Two nodes' local main processes (real processes, started together) restore the
    mirror's checkpoint of 60 files into one shared, empty run.dir, three times over: both
    start, and the folder holds every file at its size."""
    mirror = tmp_path / "mirror"
    _mirrored_run(tmp_path, str(mirror), steps=(36,), acc=StubAccelerator(files=60, size=40_000))
    expected = json.loads((mirror / checkpoint_name(36) / MARKER).read_text())["files"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for trial in range(3):
        run, go = tmp_path / f"shared-{trial}", tmp_path / f"go-{trial}"
        script = RESTORER.format(tests=str(REPO / "tests"), go=str(go), run=str(run),
                                 mirror=str(mirror))
        procs = [subprocess.Popen([sys.executable, "-c", script], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for _ in range(2)]
        try:
            time.sleep(1.5)  # both imported and waiting
            go.touch()
            outputs = [p.communicate(timeout=120)[0] for p in procs]
        finally:
            for p in procs:
                p.kill()
        for p, out in zip(procs, outputs):
            assert p.returncode == 0 and out.strip().endswith(checkpoint_name(36)), out[-3000:]
        folder = run / "checkpoints" / checkpoint_name(36)
        sizes = {str(p.relative_to(folder)): p.stat().st_size
                 for p in folder.rglob("*") if p.is_file()}
        assert sizes == expected
        assert not list((run / "checkpoints").glob(".tmp-*"))
