"""Fuzzing (issue 20, item 10): the tar reader on random and mutated shards, and checkpoint
restores from random mirror layouts. Every case ends in the clear error (ShardError,
CheckpointError) or a correct read: never a hang, another exception, or a file outside the
target."""
from __future__ import annotations

import io
import json
import tarfile
import time
import uuid
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resnet.data.shardio import ShardError, read_samples
from resnet.checkpoint.errors import CheckpointError
from resnet.checkpoint.manager import CheckpointManager
from resnet.checkpoint.mirror import MARKER

SAMPLES = {f"s{i:03d}": {"jpg": bytes([i]) * (300 + 200 * i), "cls": str(i).encode()}
           for i in range(4)}


def _shard(fmt: int = tarfile.USTAR_FORMAT, long_names: bool = False) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for key, files in SAMPLES.items():
            for ext, data in files.items():
                name = ("d" * 120 + "/" if long_names else "") + f"{key}.{ext}"
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


SHARDS = [_shard(), _shard(tarfile.PAX_FORMAT, True), _shard(tarfile.GNU_FORMAT, True)]


def _read(data: bytes, tmp: Path) -> list | ShardError:
    path = tmp / "train-000000.tar"
    path.write_bytes(data)
    started = time.monotonic()
    try:
        result = list(read_samples(str(path), set(range(len(SAMPLES))), deadline_s=0.05,
                                   shard_bytes=len(data)))
    except ShardError as exc:
        assert str(path) in str(exc)  # the clear error names the shard
        result = exc
    assert time.monotonic() - started < 10  # bounded: no hang
    return result


def _correct(result: list) -> bool:
    keys = {key.rsplit("/", 1)[-1]: files for _, key, files in result}
    return keys == SAMPLES


def test_the_unmutated_shards_read_correctly(tmp_path):
    for data in SHARDS:
        assert _correct(_read(data, tmp_path))


fuzz = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@fuzz
@given(which=st.integers(0, len(SHARDS) - 1),
       flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 10_000)))
def test_mutated_shards_end_in_the_clear_error_or_a_read(tmp_path_factory, which, flips, cut):
    data = bytearray(SHARDS[which])
    for position, value in flips:
        data[position % len(data)] = value
    if cut is not None:
        data = data[:cut]
    result = _read(bytes(data), tmp_path_factory.mktemp("shard"))
    if isinstance(result, list):  # every needed sample read once, each a dict of bytes
        indices = [i for i, _, _ in result]
        assert len(indices) == len(set(indices)) and set(indices) <= set(range(len(SAMPLES)))
        assert all(isinstance(v, bytes) for _, _, files in result for v in files.values())


@fuzz
@given(which=st.integers(0, len(SHARDS) - 1), member=st.integers(0, 7),
       size=st.one_of(st.integers(0, 2 ** 33), st.integers(2 ** 33, 2 ** 63),
                      st.integers(-2 ** 63, -1)))
def test_any_size_field_ends_in_the_clear_error_or_a_read(tmp_path_factory, which, member, size):
    """A member's size field rewritten (GNU base-256, any value, negative too)."""
    data = bytearray(SHARDS[which])
    headers = [i for i in range(0, len(data) - 512, 512) if data[i + 257:i + 262] == b"ustar"
               and data[i + 156:i + 157] in (b"0", b"\0")]
    at = headers[member % len(headers)]
    field = bytearray(size.to_bytes(12, "big", signed=True))
    field[0] = 0x80 if size >= 0 else 0xFF
    data[at + 124:at + 136] = field
    data[at + 148:at + 156] = b" " * 8
    data[at + 148:at + 156] = b"%06o\0 " % sum(data[at:at + 512])
    _read(bytes(data), tmp_path_factory.mktemp("shard"))


@fuzz
@given(st.binary(min_size=0, max_size=3000))
def test_random_bytes_end_in_the_clear_error(tmp_path_factory, data):
    result = _read(data, tmp_path_factory.mktemp("shard"))
    assert isinstance(result, (list, ShardError))


# ----------------------------------------------------------------------- mirror layouts

class _Stub:
    is_main_process = is_local_main_process = True
    process_index = 0

    def wait_for_everyone(self) -> None:
        pass


NAME = "step-000000005"
# "#0.bin" sorts before "..": the folder exists when a hostile key's turn comes (S3 lists in
# byte order), so a key that climbs out of it would land outside on a download that allowed it.
PLAIN = ["#0.bin", "trainer_state.json", "pytorch_model/a.bin", "pytorch_model/b.bin"]
HOSTILE = ["..", "../x", "a/../../x", "/abs", "//x", "a//b", "./x", "a\\..\\x", "a/", ".",
           "pytorch_model/..", "x/./y", "../../../../x", "zz/../../../../../../x"]


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plain=st.lists(st.sampled_from(PLAIN[2:]), max_size=2, unique=True),
       hostile=st.lists(st.sampled_from(HOSTILE), min_size=1, max_size=3, unique=True),
       marker=st.sampled_from(["exact", "exact", "missing", "lists-more", "wrong-size",
                               "garbage", "none"]),
       latest=st.sampled_from([NAME, NAME, "step-000000009", "../x", "", "step-5"]))
def test_random_mirror_layouts_restore_correctly_or_stop_clearly(tmp_path_factory, s3_server,
                                                                 plain, hostile, marker,
                                                                 latest):
    """A mirror on S3 (moto, where any key can exist) holding a random mix of plain and
    hostile keys, a marker that is right, missing, short of files, wrong in a size, not JSON or
    absent, and a `latest` that may name nothing sensible."""
    client, bucket = s3_server.client(), s3_server.bucket
    prefix = f"fuzz-{uuid.uuid4().hex}"  # a mirror of its own per example
    sizes = {key: 1 + i for i, key in enumerate(PLAIN[:2] + plain + hostile)}
    for key, size in sizes.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{NAME}/{key}", Body=b"x" * size)
    listed = {
        "exact": sizes, "lists-more": {**sizes, "pytorch_model/c.bin": 3},
        "wrong-size": {k: v + 1 for k, v in sizes.items()}, "missing": None, "none": None,
    }.get(marker, {})
    if marker == "garbage":
        client.put_object(Bucket=bucket, Key=f"{prefix}/{NAME}/{MARKER}", Body=b"{not json")
    elif listed is not None:
        client.put_object(Bucket=bucket, Key=f"{prefix}/{NAME}/{MARKER}",
                          Body=json.dumps({"files": listed, "written": 1}).encode())
    client.put_object(Bucket=bucket, Key=f"{prefix}/latest", Body=latest.encode())
    root = tmp_path_factory.mktemp("layout")
    node = root / "a" / "b" / "node"
    manager = CheckpointManager(_Stub(), node, {}, mirror=f"{s3_server.url}/{prefix}")
    try:
        restored = manager.prepare()
    except CheckpointError:
        restored = None
    outside = [p for p in root.rglob("*") if node not in (p, *p.parents)
               and p not in (root / "a", root / "a" / "b")]
    assert outside == []  # nothing written outside the node's run.dir
    if restored is not None:  # a correct read: exactly the files the marker lists, their sizes;
        got = {str(p.relative_to(restored)): p.stat().st_size
               for p in restored.rglob("*") if p.is_file()}
        # no marker: a legacy checkpoint (trainer_state.json, none marked), restored whole
        assert got == (sizes if listed is None else listed) and "trainer_state.json" in got
