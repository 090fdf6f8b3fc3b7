"""Read back what wandb wrote to a run directory, without a server: the `run-<id>.wandb` files.

wandb 0.31 no longer ships a Python reader for its transaction log, so this is a small one:
the file is a 7-byte header (":W&B", magic, version) followed by LevelDB-log style blocks of
32 KiB, each record with a 7-byte header (crc32c, length, type) and a protobuf `Record` body.
The CRC is not checked: tests only need the records wandb itself wrote.
"""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Iterator

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _chunks(path: Path) -> Iterator[bytes]:
    buf = Path(path).read_bytes()
    if buf[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb transaction log")
    pos, parts = _HEADER, []
    while pos + _HEADER <= len(buf):
        space = _BLOCK - pos % _BLOCK
        if space < _HEADER:  # block trailer padding
            pos += space
            continue
        _crc, length, kind = struct.unpack("<IHB", buf[pos:pos + _HEADER])
        if kind == 0:  # zero fill up to the end of the block
            pos += space
            continue
        data = buf[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            yield data
        elif kind == _FIRST:
            parts = [data]
        elif kind == _MIDDLE:
            parts.append(data)
        elif kind == _LAST:
            parts.append(data)
            yield b"".join(parts)


def records(path: Path) -> Iterator[pb.Record]:
    for data in _chunks(path):
        record = pb.Record()
        record.ParseFromString(data)
        yield record


def read_run(path: Path, timeout_s: float = 20.0) -> dict:
    """{"run_id", "config": {key: value}, "history": [{key: value}, ...]} of one .wandb file.

    wandb-core may still be flushing the file when `finish()` has returned: wait for the
    exit record (up to timeout_s) before reading.
    """
    deadline = time.monotonic() + timeout_s
    while not any(r.WhichOneof("record_type") == "exit" for r in records(path)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} has no exit record after {timeout_s} s")
        time.sleep(0.1)
    out: dict = {"run_id": None, "config": {}, "history": []}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run_id"] = record.run.run_id
            out["config"].update(_items(record.run.config.update))
        elif kind == "config":
            out["config"].update(_items(record.config.update))
        elif kind == "history":
            out["history"].append(_items(record.history.item))
    return out


def _items(items) -> dict:
    return {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in items}


def run_files(run_dir: Path) -> list[Path]:
    """Every run-*.wandb under run_dir/wandb, oldest segment first."""
    return sorted(Path(run_dir).glob("wandb/*run-*/run-*.wandb"))
