"""Property tests of the pure epoch plan: exactly once, equal counts, resume, elastic resume,
and global batches split unequally over any world size."""
from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from resnet.data import intervals as I
from resnet.data import order as O
from resnet.data import plan as P

SETTINGS = settings(max_examples=150, deadline=None)


def positions(iv):
    return [p for a, b in iv for p in range(a, b)]


def round_robin(per_worker):
    """torch DataLoader's in-order round-robin over workers that stop at different times."""
    out = []
    for i in range(max((len(x) for x in per_worker), default=0)):
        out.extend(x[i] for x in per_worker if i < len(x))
    return out


def rank_sequence(ep: P.EpochPlan, rank: int) -> list[list[int]]:
    """The batches (as position lists) a rank yields from the plan's current state."""
    per_worker = []
    for share in ep.schedule(rank):
        flat = share.positions()
        assert len(flat) == sum(share.sizes) == I.length(share.runs)
        starts = [sum(share.sizes[:i]) for i in range(len(share.sizes))]
        per_worker.append([flat[a:a + n] for a, n in zip(starts, share.sizes)])
    return round_robin(per_worker)


def run(ep: P.EpochPlan) -> dict[int, list[list[int]]]:
    return {r: rank_sequence(ep, r) for r in range(ep.current.world_size)}


def segment(w: int, k: int, b: int, g: int) -> P.Segment:
    """The topology a training loader builds for W ranks, K workers, micro-batch <= b."""
    return P.Segment.for_training(P.MicroLayout.choose(g, w, b), k)


topologies = st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 5))  # W, K, b


@st.composite
def setups(draw):
    sizes = tuple(draw(st.lists(st.integers(1, 30), min_size=1, max_size=6)))
    w, k, b = draw(topologies)
    g = draw(st.integers(w, w * b * 3))  # any global batch from one sample per rank up
    seed, epoch = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    return sizes, w, k, b, g, seed, epoch


def fresh(sizes, w, k, b, g, seed, epoch, train=True):
    order = O.EpochOrder(sizes, seed, epoch, shuffle=train)
    seg = segment(w, k, b, g) if train else P.Segment(w, k, b)
    return P.EpochPlan(order, g, train).resume(seg)


@SETTINGS
@given(setups())
def test_exactly_once_and_equal_counts(setup):
    sizes, w, k, b, g, seed, epoch = setup
    ep = fresh(*setup)
    seqs = run(ep)
    counts = {len(s) for s in seqs.values()}
    assert len(counts) == 1, "every rank yields the same number of batches"
    assert counts.pop() == ep.batches_total()
    seen = [p for s in seqs.values() for batch in s for p in batch]
    n = sum(sizes)
    assert sorted(seen) == list(range(n // g * g))
    assert n - len(seen) < g
    batch_sizes = {len(batch) for s in seqs.values() for batch in s}
    assert batch_sizes <= {ep.current.batch_size, ep.current.batch_size - 1}
    assert max(batch_sizes, default=0) <= b  # the configured micro-batch is the most
    accum = ep.current.accumulation
    for step in range(ep.batches_total() // accum):  # every optimizer step takes exactly G
        assert sum(len(s[i]) for s in seqs.values()
                   for i in range(step * accum, (step + 1) * accum)) == g


@SETTINGS
@given(setups(), st.data())
def test_resume_same_topology_continues_exactly(setup, data):
    ep = fresh(*setup)
    full = run(ep)
    n = ep.batches_total()
    c = data.draw(st.integers(0, n))
    resumed = run(P.EpochPlan(ep.order, ep.global_batch, True, ep.segments).advance(c)
                  .resume(segment(*setup[1:5])))
    for r, seq in full.items():
        assert resumed[r] == seq[c:]


def _steps_then_switch(ep: P.EpochPlan, data) -> tuple[int, list[int]]:
    """Batches per rank of a random number of whole optimizer steps, and the positions used."""
    seg = ep.current
    steps = data.draw(st.integers(0, ep.batches_remaining() // seg.accumulation))
    c = steps * seg.accumulation  # saved at an optimizer-step boundary
    return c, [p for seq in run(ep).values() for batch in seq[:c] for p in batch]


@SETTINGS
@given(setups(), topologies, st.data())
def test_elastic_resume_exactly_once(setup, topo2, data):
    sizes, w, k, b, g, seed, epoch = setup
    w2, k2, b2 = topo2
    assume(w2 <= g)  # the loader refuses more ranks than samples per step
    ep = fresh(*setup)
    c, used = _steps_then_switch(ep, data)
    ep2 = ep.advance(c).resume(segment(w2, k2, b2, g))
    second = run(ep2)
    assert len({len(s) for s in second.values()}) == 1
    used += [p for seq in second.values() for batch in seq for p in batch]
    assert sorted(used) == list(range(sum(sizes) // g * g))
    assert ep2.current.dropped == 0


@SETTINGS
@given(setups(), topologies, topologies, st.data())
def test_two_topology_changes(setup, t2, t3, data):
    sizes, w, k, b, g, seed, epoch = setup
    assume(t2[0] <= g and t3[0] <= g)
    ep = fresh(*setup)
    used = []
    for topo in (t2, t3):
        c, more = _steps_then_switch(ep, data)
        used += more
        ep = ep.advance(c).resume(segment(*topo, g))
    used += [p for seq in run(ep).values() for batch in seq for p in batch]
    assert sorted(used) == list(range(sum(sizes) // g * g))


@pytest.mark.parametrize("g, w, b, expected", [
    (2048, 24, 256, "world 24: micro-batch 85/86 x 1 accumulation = 2048"),
    (2048, 1, 256, "world 1: micro-batch 256 x 8 accumulation = 2048"),
    (2048, 64, 256, "world 64: micro-batch 32 x 1 accumulation = 2048"),
    (24, 3, 3, "world 3: micro-batch 2/3 x 3 accumulation = 24"),
])
def test_micro_layout_splits_any_world_size(g, w, b, expected):
    layout = P.MicroLayout.choose(g, w, b)
    assert layout.describe() == expected
    sizes = [layout.micro_sizes(r) for r in range(w)]
    assert sum(map(sum, sizes)) == g
    assert max(map(max, sizes)) - min(map(min, sizes)) <= 1
    assert max(map(max, sizes)) <= b


def test_micro_layout_refuses_more_ranks_than_samples():
    with pytest.raises(ValueError, match="fewer samples than the 9 processes"):
        P.MicroLayout.choose(8, 9, 4)


@SETTINGS
@given(st.lists(st.integers(1, 30), min_size=1, max_size=6), topologies)
def test_eval_every_sample_once_in_stored_order(sizes, topo):
    w, k, b = topo
    ep = fresh(tuple(sizes), w, k, b, 1, 0, 0, train=False)
    seqs = run(ep)
    seen = [p for r in range(w) for batch in seqs[r] for p in batch]
    assert sorted(seen) == list(range(sum(sizes)))
    for r in range(w):  # each worker reads its positions in stored order
        for share in ep.schedule(r):
            assert share.positions() == positions(share.runs)
    assert ep.order.shard_order == tuple(range(len(sizes)))


def tar_sample(order: O.EpochOrder, position: int) -> tuple[int, int]:
    """(shard, sample index in its tar) at a position: what the plan's docstring defines."""
    j = max(i for i, s in enumerate(order.starts[:-1]) if s <= position)
    return order.shard_order[j], position - order.starts[j]


@SETTINGS
@given(st.lists(st.integers(1, 20), min_size=1, max_size=5), st.integers(0, 5), st.data())
def test_runs_are_contiguous_stretches_of_one_tar(sizes, seed, data):
    order = O.EpochOrder(tuple(sizes), seed, data.draw(st.integers(0, 4)))
    n = order.total
    cut = sorted(data.draw(st.lists(st.integers(0, n), min_size=2, max_size=6)))
    iv = I.normalise(list(zip(cut[::2], cut[1::2])))
    runs = order.runs(iv)
    assert I.normalise(runs) == iv
    got = []
    for run in runs:
        shard, lo, hi = order.locate(run)
        assert [tar_sample(order, p) for p in range(*run)] == [(shard, i) for i in range(lo, hi)]
        got += [(shard, i) for i in range(lo, hi)]
    assert len(got) == len(set(got)) == I.length(iv)
    assert all(0 <= i < sizes[s] for s, i in got)


def test_order_depends_on_seed_and_epoch_only():
    sizes = (10, 7, 12, 3)
    assert O.EpochOrder(sizes, 1, 2).shard_order == O.EpochOrder(sizes, 1, 2).shard_order
    assert len({O.EpochOrder(sizes, 1, e).shard_order for e in range(6)}) > 1
    picks = [fresh((10, 7, 12, 3), 1, 2, 4, 4, 1, e).schedule(0)[0].picks.tolist()
             for e in (2, 2, 3)]
    assert picks[0] == picks[1] != picks[2]


def test_dropped_tail_differs_per_epoch():
    sizes = (10, 10, 10)
    kept = []
    for epoch in range(4):
        ep = fresh(sizes, 1, 1, 4, 8, 0, epoch)
        kept.append(frozenset(tar_sample(ep.order, p) for p in range(24)))
    assert len(set(kept)) > 1


def test_interval_helpers():
    assert I.take([(0, 3), (5, 9)], 2, 3) == [(2, 3), (5, 7)]
    assert I.subtract([(0, 10)], [(2, 4), (6, 7)]) == [(0, 2), (4, 6), (7, 10)]
    assert I.normalise([(3, 5), (0, 3), (7, 7)]) == [(0, 5)]


def test_golden_order_for_a_fixed_seed():
    """The epoch order is a fixed function of (seed, epoch, shard sizes), whatever the numpy
    version: drawn from Philox's raw output (NEP 19 lets Generator.permutation change)."""
    order = O.EpochOrder((10,) * 12, seed=0, epoch=3)
    assert order.shard_order == (7, 11, 3, 10, 4, 5, 0, 6, 2, 9, 1, 8)
    big = O.permutation(1000, "samples", 7, 0, 0)
    assert big[:12].tolist() == [700, 46, 625, 445, 986, 471, 191, 325, 313, 809, 99, 43]
    assert sorted(big.tolist()) == list(range(1000))
    assert O.merge([3, 2, 4], True, 0, 3, 0, 0, 0).tolist() == GOLDEN_MERGE
    assert O.merge([3, 2, 4], False).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]


GOLDEN_MERGE = [0, 2, 0, 2, 2, 2, 1, 1, 0]


@SETTINGS
@given(setups(), st.lists(topologies, min_size=1, max_size=3), st.data())
def test_any_resplits_keep_each_sample_once_and_resume_exactly(setup, topos, data):
    """Across any sequence of re-splits every sample comes once, every rank yields as many
    batches, and a resume inside the last segment continues its sequence exactly."""
    sizes, w, k, b, g, seed, epoch = setup
    assume(all(t[0] <= g for t in topos))
    ep = fresh(*setup)
    used = []
    for topo in topos:
        c, more = _steps_then_switch(ep, data)
        used += more
        ep = ep.advance(c).resume(segment(*topo, g))
        for r in range(ep.current.world_size):
            for share in ep.schedule(r):  # what is left is whole stretches of tars
                assert all(ep.order.locate(run) for run in share.runs)
    full = run(ep)
    assert len({len(s) for s in full.values()}) == 1
    c = data.draw(st.integers(0, ep.batches_total()))
    again = P.EpochPlan(ep.order, g, True, ep.segments).advance(c).resume(segment(*topos[-1], g))
    assert run(again) == {r: seq[c:] for r, seq in full.items()}
    used += [p for seq in full.values() for batch in seq for p in batch]
    assert sorted(used) == list(range(sum(sizes) // g * g))


def stretches(ep: P.EpochPlan) -> tuple[int, int, int]:
    """(samples, stretches, (worker, shard) pairs) of the current segment over all workers.

    A stretch is a run of consecutive samples of one tar, in tar order, in what a worker
    emits: a reader that can start at a sample (local disk, the node's cache, or a Range
    request at a known offset) opens one stream per stretch and reads only what is needed,
    holding no sample back. Shuffling inside shards (the order before) made nearly every
    sample a stretch of its own: a worker had to read a shard's needed samples in one pass
    through the gaps between them, and hold them to emit them shuffled.
    """
    samples = count = pairs = 0
    for r in range(ep.current.world_size):
        for share in ep.schedule(r):
            ends: set[tuple[int, int]] = set()  # (shard, last sample) of each open stretch
            for p in share.positions():
                shard, index = tar_sample(ep.order, p)
                if (shard, index - 1) in ends:
                    ends.remove((shard, index - 1))
                else:
                    count += 1
                ends.add((shard, index))
                samples += 1
            pairs += len({shard for shard, _ in ends})
    return samples, count, pairs


@pytest.mark.parametrize("seed", range(3))
def test_workers_read_whole_stretches_of_tar_in_an_epoch_and_after_a_resplit(seed):
    """40 shards of 50, 4 ranks x 3 workers: in an epoch each worker reads every shard it
    needs in one stretch; what is left after 4 -> 3 -> 4 mid-epoch is tails of stretches.
    (Shuffled inside shards, the order before: 1,108-1,130 stretches for 51 pairs, and 523-536
    for 38 after the re-split, seeds 0-2.)"""
    g = 24
    ep = fresh((50,) * 40, 4, 3, 6, g, seed, 1)
    samples, count, pairs = stretches(ep)
    assert samples == 2000 // g * g and count == pairs
    steps = ep.batches_total() // ep.current.accumulation
    for world in (3, 4):
        ep = ep.advance(steps // 3 * ep.current.accumulation).resume(segment(world, 3, 6, g))
    samples, count, pairs = stretches(ep)
    assert samples and count <= 2 * pairs


@SETTINGS
@given(setups(), topologies, st.data())
def test_consumed_count_is_what_the_ranks_handed_out(setup, topo, data):
    sizes, w, k, b, g, seed, epoch = setup
    assume(topo[0] <= g)
    ep = fresh(*setup)
    c, used = _steps_then_switch(ep, data)
    ep = ep.advance(c).resume(segment(*topo, g))
    c2 = data.draw(st.integers(0, ep.batches_total()))
    used += [p for seq in run(ep).values() for batch in seq[:c2] for p in batch]
    ep = ep.advance(c2)
    assert ep.consumed_count() == len(used)
    kept = P.usable(ep.order.total, g, True) - sum(s.dropped for s in ep.segments)
    assert I.length(ep.remaining()) == kept - len(used)
