"""What reading the data costs: bytes and requests from S3, and from the node's shard cache.

Counted in the process that reads (a DataLoader worker, or the rank itself with 0 workers):
`storage` counts S3 GET requests and body bytes, `cache` counts what it serves and fills. The
loader ships each worker's counts since its previous batch with the batch (`Batch.io`), so the
rank adds them up per epoch without any shared memory between processes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class IOCounts:
    s3_bytes: int = 0  # body bytes received from S3 (shard reads and cache fills)
    s3_requests: int = 0  # GET requests sent to S3 (each open, Range reopen and retry)
    cache_bytes: int = 0  # bytes the readers took from cached shards
    cache_hits: int = 0  # shard openings served from the cache
    cache_fills: int = 0  # shards downloaded into the cache

    def __add__(self, other: "IOCounts") -> "IOCounts":
        return IOCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __sub__(self, other: "IOCounts") -> "IOCounts":
        return IOCounts(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    def as_list(self) -> list[int]:
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def from_list(cls, values) -> "IOCounts":
        return cls(*(int(v) for v in values))

    def metrics(self, prefix: str = "data_") -> dict[str, int]:
        return {prefix + name: value for name, value in asdict(self).items()}


COUNTS = IOCounts()  # this process's running totals; read them with snapshot()


def snapshot() -> IOCounts:
    return COUNTS + IOCounts()
