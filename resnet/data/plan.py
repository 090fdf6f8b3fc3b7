"""The epoch plan: sample order, partition over ranks x workers, and resume arithmetic.

Everything here is a pure function of its arguments (no I/O, no clocks, no process ids), so
every rank computes the same plan independently and a resumed run recomputes exactly the plan
of the run it continues.

Vocabulary
- *position*: an index 0..N-1 into one epoch's global sample order.
- *order*: shards in a permutation of (seed, epoch); inside each shard its samples in a
  permutation of (seed, epoch, shard). Evaluation keeps the stored order.
- *usable*: training keeps floor(N / global_batch) * global_batch positions; the dropped tail
  is the end of a shuffled order, so different samples are left out each epoch.
- *segment*: the part of an epoch run under one topology (world size, workers per rank,
  per-rank micro-batch). It splits the positions still unconsumed when it started into W
  contiguous rank pieces, and each rank piece into contiguous per-worker ranges of whole
  batches. Contiguous ranges keep each worker reading whole shards sequentially.
- torch's DataLoader takes batches from its workers round-robin, so rank batch k comes from
  logical worker k % K. After c batches, physical worker p plays logical worker (p + c) % K, so
  a resumed loader continues the sequence exactly. `interleave` is that round-robin.

Intervals are lists of half-open (start, stop) position ranges, kept in position order.
"""
from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Sequence

import numpy as np

Interval = tuple[int, int]


def rng(*words: object) -> np.random.Generator:
    """A generator seeded by a stable hash of `words` (Python's hash() differs per process)."""
    digest = hashlib.blake2b(repr(words).encode(), digest_size=16).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(digest, "little")))


# ----------------------------------------------------------------------------- intervals


def length(iv: Sequence[Interval]) -> int:
    return sum(b - a for a, b in iv)


def take(iv: Sequence[Interval], start: int, count: int) -> list[Interval]:
    """Positions start..start+count-1 of the concatenation of `iv`."""
    out: list[Interval] = []
    skip, need = start, count
    for a, b in iv:
        if need <= 0:
            break
        n = b - a
        if skip >= n:
            skip -= n
            continue
        lo = a + skip
        hi = min(b, lo + need)
        out.append((lo, hi))
        need -= hi - lo
        skip = 0
    if need > 0:
        raise ValueError(f"take({start}, {count}) beyond {length(iv)} positions")
    return out


def normalise(iv: Sequence[Interval]) -> list[Interval]:
    """Sorted, merged, empty ranges removed."""
    out: list[Interval] = []
    for a, b in sorted(x for x in iv if x[1] > x[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def subtract(iv: Sequence[Interval], removed: Sequence[Interval]) -> list[Interval]:
    """Positions of `iv` not in `removed` (both sorted and disjoint), in order."""
    out: list[Interval] = []
    removed = normalise(removed)
    j = 0
    for a, b in iv:
        lo = a
        while j < len(removed) and removed[j][1] <= lo:
            j += 1
        k = j
        while k < len(removed) and removed[k][0] < b:
            ra, rb = removed[k]
            if ra > lo:
                out.append((lo, ra))
            lo = max(lo, rb)
            k += 1
        if lo < b:
            out.append((lo, b))
    return out


# ----------------------------------------------------------------------------- order


@dataclass(frozen=True)
class EpochOrder:
    """The global sample order of one epoch over shards of the given sizes."""

    sizes: tuple[int, ...]  # samples per shard, in manifest order
    seed: int
    epoch: int
    shuffle: bool = True

    @cached_property
    def shard_order(self) -> tuple[int, ...]:
        n = len(self.sizes)
        if not self.shuffle:
            return tuple(range(n))
        return tuple(int(i) for i in rng("shards", self.seed, self.epoch).permutation(n))

    @cached_property
    def starts(self) -> tuple[int, ...]:
        """starts[j]: first position of the j-th shard in epoch order; starts[-1] = N."""
        return tuple(np.concatenate([[0], np.cumsum([self.sizes[s] for s in self.shard_order])])
                     .astype(int).tolist())

    @property
    def total(self) -> int:
        return self.starts[-1]

    def shard_permutation(self, shard: int) -> np.ndarray:
        """The within-shard order: sample indices (order of appearance in the tar)."""
        n = self.sizes[shard]
        if not self.shuffle:
            return np.arange(n)
        return rng("samples", self.seed, self.epoch, shard).permutation(n)

    def reads(self, iv: Sequence[Interval]) -> list[tuple[int, np.ndarray]]:
        """(shard, sample indices in emission order) covering `iv`, in position order.

        Consecutive pieces of the same shard are merged, so a worker opens each shard once.
        """
        out: list[tuple[int, list[np.ndarray]]] = []
        for a, b in iv:
            j = bisect.bisect_right(self.starts, a) - 1
            while a < b:
                shard = self.shard_order[j]
                lo, hi = a - self.starts[j], min(b, self.starts[j + 1]) - self.starts[j]
                piece = self.shard_permutation(shard)[lo:hi]
                if out and out[-1][0] == shard:
                    out[-1][1].append(piece)
                else:
                    out.append((shard, [piece]))
                a = self.starts[j] + hi
                j += 1
        return [(shard, np.concatenate(pieces)) for shard, pieces in out]


def usable(total: int, global_batch: int, train: bool) -> int:
    """Positions an epoch keeps: training drops the tail that does not fill a global batch."""
    return (total // global_batch) * global_batch if train else total


# ----------------------------------------------------------------------------- partition


@dataclass(frozen=True)
class Segment:
    """One topology's share of an epoch; `batches` are consumed per rank (the same on all)."""

    world_size: int
    workers: int  # logical workers per rank, >= 1 (0 DataLoader workers plays 1)
    batch_size: int  # per-rank micro-batch
    batches: int = 0
    dropped: int = 0  # positions left out at the segment start to keep whole global batches

    def same_topology(self, other: "Segment") -> bool:
        return (self.world_size, self.workers, self.batch_size) == (
            other.world_size, other.workers, other.batch_size)


def split_counts(total: int, parts: int) -> list[int]:
    """Near-equal counts, the first ones one larger (the round-robin needs that shape)."""
    q, m = divmod(total, parts)
    return [q + (i < m) for i in range(parts)]


def rank_piece(base: Sequence[Interval], seg: Segment, rank: int, train: bool) -> list[Interval]:
    """The contiguous share of `base` that `rank` reads in this segment."""
    total = length(base)
    if train and total % (seg.world_size * seg.batch_size):
        raise ValueError(f"{total} positions do not split into whole batches of "
                         f"{seg.batch_size} over {seg.world_size} ranks")
    # Training totals divide exactly (checked above): equal pieces. Evaluation: near-equal.
    counts = split_counts(total, seg.world_size)
    return take(base, sum(counts[:rank]), counts[rank])


def worker_ranges(piece: Sequence[Interval], seg: Segment) -> list[tuple[list[Interval], int]]:
    """(positions, batch count) of each logical worker: contiguous runs of whole batches.

    Only the rank's very last batch may be partial (evaluation).
    """
    n = length(piece)
    batches = -(-n // seg.batch_size)
    out, start = [], 0
    for count in split_counts(batches, seg.workers):
        lo = start * seg.batch_size
        hi = min(n, (start + count) * seg.batch_size)
        out.append((take(piece, lo, hi - lo), count))
        start += count
    return out


def rank_batches(piece: Sequence[Interval], seg: Segment) -> int:
    return -(-length(piece) // seg.batch_size)


def consumed_by_worker(batches_done: int, worker: int, workers: int, count: int) -> int:
    """Batches logical `worker` produced when its rank has handed out `batches_done`."""
    return min(count, max(0, (batches_done - worker + workers - 1) // workers))


def consumed(base: Sequence[Interval], seg: Segment, train: bool) -> list[Interval]:
    """All positions the ranks of `seg` consumed, in position order."""
    out: list[Interval] = []
    for rank in range(seg.world_size):
        for w, (pos, count) in enumerate(worker_ranges(rank_piece(base, seg, rank, train), seg)):
            done = consumed_by_worker(seg.batches, w, seg.workers, count)
            out.extend(take(pos, 0, min(length(pos), done * seg.batch_size)))
    return normalise(out)


# ----------------------------------------------------------------------------- epoch plan


@dataclass(frozen=True)
class EpochPlan:
    """One epoch's order plus its segments; the last segment is the one running now."""

    order: EpochOrder
    global_batch: int
    train: bool
    segments: tuple[Segment, ...] = field(default=())

    @cached_property
    def bases(self) -> tuple[list[Interval], ...]:
        """Positions each segment splits (after its drop), in position order."""
        remaining = [(0, usable(self.order.total, self.global_batch, self.train))]
        remaining = [iv for iv in remaining if iv[1] > iv[0]]
        out = []
        for seg in self.segments:
            base = take(remaining, 0, length(remaining) - seg.dropped)
            out.append(base)
            remaining = subtract(base, consumed(base, seg, self.train))
        return tuple(out)

    def remaining(self) -> list[Interval]:
        """Positions no segment has consumed yet (after the last segment's drop)."""
        if not self.segments:
            return [(0, usable(self.order.total, self.global_batch, self.train))]
        return subtract(self.bases[-1], consumed(self.bases[-1], self.segments[-1], self.train))

    def resume(self, topology: Segment) -> "EpochPlan":
        """The plan continued under `topology`: the same segment if it matches, else a new one.

        A new segment drops the remainder beyond whole global batches (0 when the state was saved
        at an optimizer-step boundary) so later ranks still step in lockstep.
        """
        topology = replace(topology, batches=0, dropped=0)
        if self.segments and self.segments[-1].same_topology(topology):
            return self
        segments = self.segments
        if segments and segments[-1].batches == 0:
            segments = segments[:-1]  # an unused segment leaves no trace
        prior = EpochPlan(self.order, self.global_batch, self.train, segments)
        left = length(prior.remaining())
        drop = left % self.global_batch if self.train else 0
        return EpochPlan(self.order, self.global_batch, self.train,
                         segments + (replace(topology, dropped=drop),))

    @property
    def current(self) -> Segment:
        return self.segments[-1]

    def batches_total(self, rank: int = 0) -> int:
        """Batches per rank of the current segment (equal on all ranks when training)."""
        piece = rank_piece(self.bases[-1], self.current, rank, self.train)
        return rank_batches(piece, self.current)

    def batches_remaining(self, rank: int = 0) -> int:
        return self.batches_total(rank) - self.current.batches

    def advance(self, batches: int) -> "EpochPlan":
        seg = replace(self.current, batches=self.current.batches + batches)
        return replace(self, segments=self.segments[:-1] + (seg,))

    def schedule(self, rank: int) -> list[tuple[list[Interval], int]]:
        """For each physical worker p: (positions, batch count) still to produce, in order.

        Physical p plays logical worker (p + c) % K, where c batches were handed out already, so
        the round-robin over physical workers continues the rank's batch sequence exactly.
        """
        seg = self.current
        ranges = worker_ranges(rank_piece(self.bases[-1], seg, rank, self.train), seg)
        out = []
        for p in range(seg.workers):
            w = (p + seg.batches) % seg.workers
            pos, count = ranges[w]
            done = consumed_by_worker(seg.batches, w, seg.workers, count)
            skip = min(length(pos), done * seg.batch_size)
            out.append((take(pos, skip, length(pos) - skip), count - done))
        return out


def chunk(iv: Sequence[Interval], batch_size: int) -> list[list[Interval]]:
    """Split positions into consecutive batches (the last may be short)."""
    n = length(iv)
    return [take(iv, i, min(batch_size, n - i)) for i in range(0, n, batch_size)]


def interleave(per_worker: Sequence[Sequence[object]]) -> list[object]:
    """torch DataLoader's in-order round-robin over workers that stop at different times."""
    out: list[object] = []
    longest = max((len(x) for x in per_worker), default=0)
    for i in range(longest):
        out.extend(x[i] for x in per_worker if i < len(x))
    return out
