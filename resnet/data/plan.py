"""The epoch plan: sample order, partition over ranks x workers, and resume arithmetic.

Everything here is a pure function of its arguments (no I/O, no clocks, no process ids), so
every rank computes the same plan independently and a resumed run recomputes exactly the plan
of the run it continues.

Vocabulary
- *position*: an index 0..N-1 into one epoch's global sample order.
- *order* (order.py): shards in a permutation of (seed, epoch), each shard's samples in tar
  order; a worker's *runs* (its range cut at shard edges) are interleaved at random.
- *usable*: training keeps floor(N / global_batch) * global_batch positions; the dropped tail
  is the end of the last shards of a shuffled shard order, so it differs each epoch.
- *segment*: the part of an epoch run under one topology (world size, workers per rank,
  micro-batch layout). It splits the positions still unconsumed when it started into W
  contiguous rank pieces, and each rank piece into contiguous per-worker ranges of whole
  batches.
- *share*: what a logical worker emits (order.py `WorkerShare`): after any number of batches it
  has consumed a PREFIX of each of its runs, so what is left at a re-split is contiguous tails
  of runs, which the next segment again reads byte for byte.
- *micro layout* (training): each optimizer step's global batch G is split into W x A
  micro-batches that differ by at most one sample (`MicroLayout`), so any world size keeps G.
- torch's DataLoader takes batches from its workers round-robin, so rank batch k comes from
  logical worker k % K. After c batches, physical worker p plays logical worker (p + c) % K, so
  a resumed loader continues the sequence exactly.

Intervals (intervals.py) are lists of half-open (start, stop) position ranges, in order.
What an epoch shuffles, and what it does not: order.py.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Sequence

from resnet.data.intervals import Interval, length, normalise, subtract, take
from resnet.data.order import EpochOrder, WorkerShare, merge


def usable(total: int, global_batch: int, train: bool) -> int:
    """Positions an epoch keeps: training drops the tail that does not fill a global batch."""
    return (total // global_batch) * global_batch if train else total


# ----------------------------------------------------------------------------- partition


@dataclass(frozen=True)
class Segment:
    """One topology's share of an epoch; `batches` are consumed per rank (the same on all)."""

    world_size: int
    workers: int  # logical workers per rank, >= 1 (0 DataLoader workers plays 1)
    batch_size: int  # per-rank micro-batch: training's largest, evaluation's only one
    batches: int = 0
    dropped: int = 0  # positions left out at the segment start to keep whole global batches
    accumulation: int = 1  # micro-batches per optimizer step (training)

    @classmethod
    def for_training(cls, layout: "MicroLayout", workers: int) -> "Segment":
        """The topology of training ranks splitting their global batch as `layout` says."""
        return cls(layout.world_size, workers, layout.largest, accumulation=layout.accumulation)

    def same_topology(self, other: "Segment") -> bool:
        return (self.world_size, self.workers, self.batch_size, self.accumulation) == (
            other.world_size, other.workers, other.batch_size, other.accumulation)


def split_counts(total: int, parts: int) -> list[int]:
    """Near-equal counts, the first ones one larger (the round-robin needs that shape)."""
    q, m = divmod(total, parts)
    return [q + (i < m) for i in range(parts)]


@dataclass(frozen=True)
class MicroLayout:
    """How a global batch G is split over W ranks x A accumulation micro-steps.

    A is the fewest micro-steps that keep every micro-batch within `max_micro`; the G samples
    of an optimizer step are split into W x A micro-batches that differ by at most one sample
    (micro-step k of rank r takes part k * W + r). Any W from 1 to G fits, so a job keeps its
    global batch, and with it its schedule, when nodes come and go.
    """

    global_batch: int
    world_size: int
    accumulation: int

    @classmethod
    def choose(cls, global_batch: int, world_size: int, max_micro: int) -> "MicroLayout":
        if world_size > global_batch:
            raise ValueError(f"the global batch {global_batch} has fewer samples than the "
                             f"{world_size} processes: each needs at least one per step")
        return cls(global_batch, world_size, -(-global_batch // (world_size * max_micro)))

    @cached_property
    def parts(self) -> list[int]:
        return split_counts(self.global_batch, self.world_size * self.accumulation)

    @cached_property
    def _per_rank(self) -> list[list[int]]:
        return [[self.parts[k * self.world_size + rank] for k in range(self.accumulation)]
                for rank in range(self.world_size)]

    def micro_sizes(self, rank: int) -> list[int]:
        """Samples `rank` takes in each micro-step of an optimizer step."""
        return self._per_rank[rank]

    @property
    def largest(self) -> int:
        return self.parts[0]

    @property
    def loss_weight(self) -> float:
        """Per-sample weight of a summed loss: DDP/DeepSpeed average gradients over W ranks and
        Accelerate divides each micro-step's loss by A, so summed losses x W x A / G give the
        mean over exactly the G samples, however unequal the micro-batches."""
        return self.world_size * self.accumulation / self.global_batch

    def describe(self) -> str:
        low, high = self.parts[-1], self.parts[0]
        micro = f"{low}" if low == high else f"{low}/{high}"
        return (f"world {self.world_size}: micro-batch {micro} x {self.accumulation} "
                f"accumulation = {self.global_batch}")


@functools.lru_cache(maxsize=64)
def _layout(global_batch: int, world_size: int, accumulation: int) -> MicroLayout:
    """One instance per layout, so its cached sizes serve every call of a plan."""
    return MicroLayout(global_batch, world_size, accumulation)


def rank_counts(total: int, seg: Segment, train: bool, global_batch: int) -> list[int]:
    """Positions each rank reads in this segment (contiguous pieces, in rank order)."""
    if not train:
        return split_counts(total, seg.world_size)  # evaluation: near-equal
    if total % global_batch:
        raise ValueError(f"{total} positions do not split into whole global batches of "
                         f"{global_batch}")
    layout = _layout(global_batch, seg.world_size, seg.accumulation)
    return [total // global_batch * sum(layout.micro_sizes(r)) for r in range(seg.world_size)]


def rank_pieces(base: Sequence[Interval], seg: Segment, train: bool,
                global_batch: int) -> list[list[Interval]]:
    """Every rank's contiguous share of `base` in this segment, in rank order."""
    out, start = [], 0
    for count in rank_counts(length(base), seg, train, global_batch):
        out.append(take(base, start, count))
        start += count
    return out


def rank_piece(base: Sequence[Interval], seg: Segment, rank: int, train: bool,
               global_batch: int) -> list[Interval]:
    """The contiguous share of `base` that `rank` reads in this segment."""
    counts = rank_counts(length(base), seg, train, global_batch)
    return take(base, sum(counts[:rank]), counts[rank])


def worker_batches(n: int, seg: Segment, rank: int, train: bool,
                   global_batch: int) -> list[list[int]]:
    """Per logical worker, the sizes of the batches it produces from a rank piece of `n`.

    The DataLoader hands out rank batch k from logical worker k % K, so worker w's i-th batch is
    rank batch w + i * K: in training its size is the rank's micro-batch for micro-step
    (w + i * K) % A. In evaluation every batch has `batch_size` samples but the rank's last.
    """
    k_workers = seg.workers
    if train:
        micro = _layout(global_batch, seg.world_size, seg.accumulation).micro_sizes(rank)
        total = n // sum(micro) * seg.accumulation
        return [[micro[k % seg.accumulation] for k in range(w, total, k_workers)]
                for w in range(k_workers)]
    total = -(-n // seg.batch_size)
    out, start = [], 0
    for count in split_counts(total, k_workers):  # contiguous runs of whole batches
        out.append([min(seg.batch_size, n - (start + i) * seg.batch_size)
                    for i in range(count)])
        start += count
    return out


def worker_ranges(piece: Sequence[Interval], seg: Segment, rank: int, train: bool,
                  global_batch: int) -> list[tuple[list[Interval], list[int]]]:
    """(positions, batch sizes) of each logical worker: a contiguous part of the rank piece."""
    out, start = [], 0
    for sizes in worker_batches(length(piece), seg, rank, train, global_batch):
        out.append((take(piece, start, sum(sizes)), sizes))
        start += sum(sizes)
    return out


def worker_shares(order: EpochOrder, base: Sequence[Interval], seg: Segment, index: int,
                  rank: int, train: bool, global_batch: int) -> list[WorkerShare]:
    """Each logical worker's share of `rank` in segment number `index` (its merge key)."""
    piece = rank_piece(base, seg, rank, train, global_batch)
    return [_share(order, positions, sizes, (index, rank, w)) for w, (positions, sizes)
            in enumerate(worker_ranges(piece, seg, rank, train, global_batch))]


def _share(order: EpochOrder, positions: Sequence[Interval], sizes: Sequence[int],
           worker: tuple[int, int, int]) -> WorkerShare:
    """The share of a worker, named by (segment number, rank, logical worker), over `positions`."""
    runs = order.runs(positions)
    picks = merge([b - a for a, b in runs], order.shuffle, order.seed, order.epoch, *worker)
    return WorkerShare(tuple(runs), picks, tuple(sizes))


def consumed_by_worker(batches_done: int, worker: int, workers: int, count: int) -> int:
    """Batches logical `worker` produced when its rank has handed out `batches_done`."""
    return min(count, max(0, (batches_done - worker + workers - 1) // workers))


def consumed(order: EpochOrder, base: Sequence[Interval], seg: Segment, index: int,
             train: bool, global_batch: int) -> list[Interval]:
    """All positions the ranks of segment number `index` consumed, in position order. Only a
    worker stopped inside its range needs its interleaving drawn (a prefix of each run)."""
    out: list[Interval] = []
    for rank, piece in enumerate(rank_pieces(base, seg, train, global_batch)):
        for w, (positions, sizes) in enumerate(worker_ranges(piece, seg, rank, train,
                                                             global_batch)):
            done = consumed_by_worker(seg.batches, w, seg.workers, len(sizes))
            if done == len(sizes):
                out.extend(positions)
            elif done:
                share = _share(order, positions, sizes, (index, rank, w))
                out.extend(share.taken(sum(sizes[:done])))
    return normalise(out)


def consumed_count(seg: Segment, total: int, train: bool, global_batch: int) -> int:
    """How many positions of `total` the ranks of `seg` consumed (arithmetic only)."""
    count = 0
    for rank, n in enumerate(rank_counts(total, seg, train, global_batch)):
        for w, sizes in enumerate(worker_batches(n, seg, rank, train, global_batch)):
            count += sum(sizes[:consumed_by_worker(seg.batches, w, seg.workers, len(sizes))])
    return count


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
        for index, seg in enumerate(self.segments):
            if index:
                remaining = self._left_after(index - 1, out[-1])
            out.append(take(remaining, 0, length(remaining) - seg.dropped))
        return tuple(out)

    def _left_after(self, index: int, base: list[Interval]) -> list[Interval]:
        return subtract(base, consumed(self.order, base, self.segments[index], index,
                                       self.train, self.global_batch))

    def remaining(self) -> list[Interval]:
        """Positions no segment has consumed yet (after the last segment's drop)."""
        if not self.segments:
            return [(0, usable(self.order.total, self.global_batch, self.train))]
        return self._left_after(len(self.segments) - 1, self.bases[-1])

    def consumed_count(self) -> int:
        """Positions all segments consumed: what the ranks handed out, counted without drawing
        any interleaving (the loader's state asks after every batch)."""
        left = usable(self.order.total, self.global_batch, self.train)
        count = 0
        for seg in self.segments:
            done = consumed_count(seg, left - seg.dropped, self.train, self.global_batch)
            count, left = count + done, left - seg.dropped - done
        return count

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
        left = prior.remaining()
        drop = length(left) % self.global_batch if self.train else 0
        out = EpochPlan(self.order, self.global_batch, self.train,
                        segments + (replace(topology, dropped=drop),))
        # What the earlier segments consumed is known now: drawn once, not again by `out`.
        out.__dict__["bases"] = prior.bases + (take(left, 0, length(left) - drop),)
        return out

    @property
    def current(self) -> Segment:
        return self.segments[-1]

    def batches_total(self, rank: int = 0) -> int:
        """Batches per rank of the current segment (equal on all ranks when training)."""
        return sum(len(share.sizes) for share in self._shares(rank))

    def _shares(self, rank: int) -> list[WorkerShare]:
        return worker_shares(self.order, self.bases[-1], self.current, len(self.segments) - 1,
                             rank, self.train, self.global_batch)

    def batches_remaining(self, rank: int = 0) -> int:
        return self.batches_total(rank) - self.current.batches

    def advance(self, batches: int) -> "EpochPlan":
        seg = replace(self.current, batches=self.current.batches + batches)
        out = replace(self, segments=self.segments[:-1] + (seg,))
        if "bases" in self.__dict__:  # they do not depend on the last segment's progress
            out.__dict__["bases"] = self.bases
        return out

    def schedule(self, rank: int) -> list[WorkerShare]:
        """For each physical worker p: the rest of the share it produces, in order.

        Physical p plays logical worker (p + c) % K, where c batches were handed out already, so
        the round-robin over physical workers continues the rank's batch sequence exactly.
        """
        seg = self.current
        shares = self._shares(rank)
        out = []
        for p in range(seg.workers):
            w = (p + seg.batches) % seg.workers
            share = shares[w]
            out.append(share.rest(consumed_by_worker(seg.batches, w, seg.workers,
                                                     len(share.sizes))))
        return out
