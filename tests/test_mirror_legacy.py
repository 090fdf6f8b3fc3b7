"""Checkpoints the previous release mirrored (no completion marker) after an upgrade: they
restore and are kept by `checkpoint.keep` like complete ones, while an upload of this version
that was cut off (no marker either) is still never restored, never `latest`, pruned first."""
from __future__ import annotations

import logging
from pathlib import Path

from resnet.checkpoint.mirror import MARKER
from resnet.runfolder import checkpoint_name
from test_mirror_safety import StubAccelerator, _killed_upload, _manager, _mirrored_run


def _legacy_mirror(tmp_path: Path, steps) -> Path:
    """A mirror as the previous release wrote it: every file, then `latest`; no marker."""
    mirror = tmp_path / "mirror"
    _mirrored_run(tmp_path, str(mirror), steps=steps, acc=StubAccelerator(files=3))
    for marker in mirror.glob(f"step-*/{MARKER}"):
        marker.unlink()
    return mirror


def _names(mirror: Path) -> list[str]:
    return sorted(p.name for p in mirror.glob("step-*"))


def test_a_legacy_mirror_restores_on_an_empty_disk_and_keep_prunes_it_in_order(tmp_path,
                                                                              caplog):
    caplog.set_level(logging.INFO, logger="resnet")
    mirror = _legacy_mirror(tmp_path, steps=(1, 2, 3))
    ckpt = _manager(tmp_path / "node", str(mirror), keep=3)
    restored = ckpt.prepare()
    assert restored is not None and restored.name == checkpoint_name(3)
    assert f"{mirror}/{checkpoint_name(3)} has no {MARKER}" in caplog.text
    ckpt.save(4)
    assert ckpt.close() is True
    # keep=3 in the order written: only the oldest legacy one goes, not all three
    assert _names(mirror) == [checkpoint_name(s) for s in (2, 3, 4)]
    ckpt.save(5)
    assert ckpt.close() is True
    assert _names(mirror) == [checkpoint_name(s) for s in (3, 4, 5)]
    assert (mirror / "latest").read_text() == checkpoint_name(5)


def test_a_cut_off_first_upload_after_the_upgrade_is_partial_not_legacy(tmp_path, monkeypatch):
    """The first upload of this version dies part-way over a legacy mirror (no marker
    anywhere): it lacks trainer_state.json, so it is not taken for a legacy checkpoint."""
    mirror = _legacy_mirror(tmp_path, steps=(1, 2))
    ckpt = _manager(tmp_path / "node", str(mirror), keep=2, acc=StubAccelerator(files=3))
    ckpt.prepare()
    _killed_upload(monkeypatch, ckpt, mirror, 3, "upload_file",  # after 2 of 3 tensor files
                   lambda local, url: "tensor-002" in url)
    assert (mirror / checkpoint_name(3) / "pytorch_model" / "tensor-001.bin").is_file()
    (mirror / "latest").write_text(checkpoint_name(3))  # even if `latest` named it
    restored = _manager(tmp_path / "other-node", str(mirror), keep=2).prepare()
    assert restored is not None and restored.name == checkpoint_name(2)


def test_an_upload_cut_before_its_marker_is_partial_once_a_marked_one_is_older(tmp_path,
                                                                              monkeypatch):
    """Killed after trainer_state.json, before the marker: it looks like the previous release's
    complete upload, but it was written after a marked checkpoint, so it is partial: never
    restored, pruned first."""
    mirror = _legacy_mirror(tmp_path, steps=(1,))
    ckpt = _manager(tmp_path / "node", str(mirror), keep=2)
    ckpt.prepare()
    ckpt.save(2)
    assert ckpt.close() is True  # step 2 is marked
    _killed_upload(monkeypatch, ckpt, mirror, 3, "write_bytes",  # before the marker
                   lambda url, data: url.endswith(MARKER))
    assert (mirror / checkpoint_name(3) / "trainer_state.json").is_file()
    (mirror / "latest").write_text(checkpoint_name(3))
    restored = _manager(tmp_path / "other-node", str(mirror), keep=2).prepare()
    assert restored is not None and restored.name == checkpoint_name(2)
    ckpt.save(4)
    assert ckpt.close() is True
    # keep=2: the partial step 3 goes first, then the oldest complete (legacy step 1)
    assert _names(mirror) == [checkpoint_name(s) for s in (2, 4)]
