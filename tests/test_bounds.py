"""Small bounds (issue 20, item 9): a tar member's size, the errors `on_every_rank` gathers,
`write_atomic`'s temporary names, and the time one retried read may take."""
from __future__ import annotations

import io
import tarfile
import threading
import time
from pathlib import Path

import botocore.exceptions
import pytest

from resnet.data import remote
from resnet.data.shardio import ShardError, read_samples
from resnet.checkpoint.errors import CheckpointError
from resnet.checkpoint.files import write_atomic
from resnet.checkpoint.manager import CheckpointManager


def _shard_with_member_size(size: int) -> bytes:
    """A one-member tar whose header claims `size` bytes (GNU base-256 encoding), with 512."""
    info = tarfile.TarInfo("sample-0.jpg")
    info.size = size
    return info.tobuf(tarfile.GNU_FORMAT) + b"\xff" * 512 + b"\0" * 1024


class _Unseekable(io.RawIOBase):
    """A remote body: no seek, no file descriptor."""

    def __init__(self, data: bytes, offset: int) -> None:
        self.data = io.BytesIO(data[offset:])

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self.data.read(len(buffer))
        buffer[:len(chunk)] = chunk
        return len(chunk)


@pytest.mark.parametrize("where", ["local", "remote"])
def test_a_member_size_of_2_to_the_44_is_a_corrupt_shard_naming_it_and_the_byte(tmp_path, where):
    data = _shard_with_member_size(2 ** 44)
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(data)
    opener = (lambda url, offset: _Unseekable(data, offset)) if where == "remote" else \
        (lambda url, offset: open(url, "rb"))
    started = time.monotonic()
    with pytest.raises(ShardError) as caught:
        list(read_samples(str(shard), {0}, opener=opener, deadline_s=120,
                          shard_bytes=len(data)))
    assert time.monotonic() - started < 60  # at once: corrupt, not retried until the deadline
    message = str(caught.value)
    assert f"shard {shard} is corrupt at byte 0" in message
    assert f"a member of {2 ** 44} bytes" in message and f"shard's {len(data)} bytes" in message


def test_a_local_shard_is_bounded_by_its_size_without_a_manifest(tmp_path):
    data = _shard_with_member_size(2 ** 44)
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(data)
    with pytest.raises(ShardError, match="is corrupt at byte 0"):
        list(read_samples(str(shard), {0}, deadline_s=5))


class _Stub:
    is_main_process = is_local_main_process = True
    process_index = 0

    def wait_for_everyone(self) -> None:
        pass


def test_on_every_rank_gathers_any_exception_not_only_os_and_runtime_errors(tmp_path):
    """botocore's NoCredentialsError on rank 0 must reach the other ranks through the gather
    (they would wait at the next collective for a rank that is gone), named with its type."""
    gathered = []

    def gather(item):
        gathered.append(item)
        return [item, (None, None)]  # rank 1 succeeded

    manager = CheckpointManager(_Stub(), tmp_path, {}, gather=gather)

    def no_credentials():
        raise botocore.exceptions.NoCredentialsError()

    with pytest.raises(CheckpointError, match="NoCredentialsError: Unable to locate credentials"):
        manager.on_every_rank(no_credentials)
    assert gathered and "NoCredentialsError" in gathered[0][1]


def test_write_atomic_from_many_writers_of_one_pid_never_collides(tmp_path):
    """Containers on one shared run.dir often have the same pids; threads of one process
    share theirs, which is the same collision: 8 writers x 50 writes of one file."""
    target, errors = tmp_path / "latest", []

    def writer(n: int) -> None:
        for i in range(50):
            try:
                write_atomic(target, f"step-{n:03d}{i:06d}")
            except OSError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, f"{len(errors)} of 400 writes failed, e.g. {errors[0]!r}"
    assert target.read_text().startswith("step-")
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_retry_deadline_bounds_attempts_that_are_slow_to_fail():
    """The first attempt fails after 0.5 s as a read timeout would; the second hangs (a read
    timeout alone can take 70 s). With a 3 s deadline the second attempt is cut at the time
    left: two attempts, the last cause is the cut, and the retry ends long before the hanging
    attempt would (asserted by what happened, not by a tight clock on a busy machine)."""
    attempts, release = [], threading.Event()

    def slow_to_fail():
        attempts.append(time.monotonic())
        if len(attempts) > 1:
            release.wait(120)
        else:
            time.sleep(0.5)
        raise TimeoutError("read timed out")

    started = time.monotonic()
    try:
        with pytest.raises(remote.StorageError,
                           match=r"and 2 attempts .*last cause: TimeoutError: an attempt took "
                                 r"longer than the [\d.]+ s left"):
            remote.retry(slow_to_fail, what="read s3://b/k", deadline_s=3.0, base_delay=0.01)
    finally:
        release.set()
    assert len(attempts) == 2, attempts
    assert time.monotonic() - started < 60  # the hanging attempt alone: 120 s
