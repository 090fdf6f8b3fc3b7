"""An epoch's sample order: which shard comes when, and in what order a worker emits its samples.

Pure functions of (seed, epoch, the plan's positions), like plan.py, which splits the order
over ranks and workers.

Vocabulary (plan.py has the rest)
- *order*: shards in a permutation of (seed, epoch), each shard's samples in TAR order: the
  positions of a shard are its samples 0, 1, ... as stored. Evaluation keeps the stored shard
  order and reads each worker's runs one after the other.
- *run*: a worker range cut at shard edges; each run is a contiguous stretch of one shard's tar
  (3-4 per worker at ImageNet's 64 x 8), so a worker reads exactly its bytes of each shard.
- *share*: what a logical worker emits: its runs, each in tar order, interleaved by `merge`, a
  uniformly random interleaving keyed by (seed, epoch, segment number, rank, worker). After any
  number of batches a worker has consumed a PREFIX of each run, so what is left at a re-split
  is contiguous tails of runs, which the next segment again reads byte for byte.

Randomness, the price of reading each byte once: per epoch the shard order, and with it where
every worker's ranges and runs begin, and the interleaving of a worker's runs are new. Not
shuffled: the order of samples inside a shard. Pack shuffles the whole data set across shards
once, with a seeded RNG, so every shard mixes classes; but a batch of b samples takes about
b / runs consecutive tar samples from each run of its worker (9 at 64 x 8 with b = 32), so tar
neighbours meet in a batch again in later epochs, with new partners from the other runs.
WebDataset's usual recipe (shard shuffle, then a 1,000-sample shuffle buffer per worker) mixes
more inside a worker, at the cost of memory; MosaicML Streaming's block shuffles (py1b/py1e)
permute samples within blocks of shards a node holds and download whole shards. Both read
each shard whole; neither re-splits an epoch's remainder over another world size mid-epoch.
"""
from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np

from resnet.data.intervals import Interval

# How orders are drawn; saved with the loader state, since a resume mid-epoch needs the same.
ORDER = "philox-shards-tar-runs-merged-1"


def permutation(n: int, *words: object) -> np.ndarray:
    """A permutation of range(n), a pure function of `words`, the same on every numpy.

    Philox keyed by a stable hash of `words` (Python's hash() differs per process); its raw
    64-bit output is fixed by the Philox algorithm, while NEP 19 lets numpy change how
    Generator methods such as `permutation` use it. Ranking the raw words with a stable sort
    gives a uniform permutation (ties, about n^2 / 2^65 likely, keep index order).
    """
    digest = hashlib.blake2b(repr(words).encode(), digest_size=16).digest()
    raw = np.random.Philox(key=int.from_bytes(digest, "little")).random_raw(n)
    return np.argsort(raw, kind="stable")


@dataclass(frozen=True)
class EpochOrder:
    """The global sample order of one epoch over shards of the given sizes: the shards in a
    permutation of (seed, epoch), each shard's samples in tar order."""

    sizes: tuple[int, ...]  # samples per shard, in manifest order
    seed: int
    epoch: int
    shuffle: bool = True

    @cached_property
    def shard_order(self) -> tuple[int, ...]:
        n = len(self.sizes)
        if not self.shuffle:
            return tuple(range(n))
        return tuple(permutation(n, "shards", self.seed, self.epoch).tolist())

    @cached_property
    def starts(self) -> tuple[int, ...]:
        """starts[j]: first position of the j-th shard in epoch order; starts[-1] = N."""
        return tuple(np.concatenate([[0], np.cumsum([self.sizes[s] for s in self.shard_order])])
                     .astype(int).tolist())

    @property
    def total(self) -> int:
        return self.starts[-1]

    def runs(self, iv: Sequence[Interval]) -> list[Interval]:
        """`iv` cut at shard edges: each run lies in one shard, a contiguous stretch of its tar."""
        out: list[Interval] = []
        for a, b in iv:
            j = bisect.bisect_right(self.starts, a) - 1
            while a < b:
                hi = min(b, self.starts[j + 1])
                out.append((a, hi))
                a, j = hi, j + 1
        return out

    def locate(self, run: Interval) -> tuple[int, int, int]:
        """(shard, first sample, stop sample) of a run: the tar indices it covers."""
        a, b = run
        j = bisect.bisect_right(self.starts, a) - 1
        if b > self.starts[j + 1]:
            raise ValueError(f"run {run} crosses the edge of shard {self.shard_order[j]}")
        return self.shard_order[j], a - self.starts[j], b - self.starts[j]


@dataclass(frozen=True, eq=False)  # (an array field: compare positions(), not shares)
class WorkerShare:
    """What one logical worker emits in a segment: `picks[k]` says from which run its k-th
    sample comes (the next one of that run, in tar order); `sizes` cut them into batches."""

    runs: tuple[Interval, ...]  # each inside one shard, in position order
    picks: np.ndarray  # int32, one run index per sample, in emission order
    sizes: tuple[int, ...]

    def taken(self, samples: int) -> list[Interval]:
        """The positions its first `samples` emissions used: a prefix of each run."""
        counts = np.bincount(self.picks[:samples], minlength=len(self.runs)).tolist()
        return [(a, a + n) for (a, _), n in zip(self.runs, counts) if n]

    def rest(self, batches: int) -> "WorkerShare":
        """The share after its first `batches` batches: the runs' non-empty tails, the picks
        left (renumbered to them)."""
        done = sum(self.sizes[:batches])
        counts = np.bincount(self.picks[:done], minlength=len(self.runs)).tolist()
        tails = [(a + n, b) for (a, b), n in zip(self.runs, counts)]
        left = [i for i, (a, b) in enumerate(tails) if b > a]
        renumber = np.zeros(len(tails), dtype=np.int32)
        renumber[left] = np.arange(len(left), dtype=np.int32)
        return WorkerShare(tuple(tails[i] for i in left), renumber[self.picks[done:]],
                           self.sizes[batches:])

    def positions(self) -> list[int]:
        """Its positions in emission order (for checks; a worker reads runs, not lists)."""
        nxt = [a for a, _ in self.runs]
        out = []
        for k in self.picks.tolist():
            out.append(nxt[k])
            nxt[k] += 1
        return out


def merge(lengths: Sequence[int], shuffle: bool, *key: object) -> np.ndarray:
    """Which run each emission takes: a uniformly random interleaving of runs of `lengths`
    (a permutation of the multiset of run labels), or the runs one after the other."""
    picks = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    return picks[permutation(len(picks), "merge", *key)] if shuffle else picks
