"""Sets of sample positions as lists of half-open (start, stop) ranges, kept in position order.

The epoch plan (plan.py) never holds a list of samples: what a rank, a worker or a finished
segment covers is a few such ranges, whatever the data set's size.
"""
from __future__ import annotations

from typing import Sequence

Interval = tuple[int, int]


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
