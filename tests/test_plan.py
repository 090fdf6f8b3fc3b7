"""Property tests of the pure epoch plan: exactly once, equal counts, resume, elastic resume,
and global batches split unequally over any world size."""
from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

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
    for pos, sizes in ep.schedule(rank):
        flat = positions(pos)
        assert len(flat) == sum(sizes)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        per_worker.append([flat[a:a + n] for a, n in zip(starts, sizes)])
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
    order = P.EpochOrder(sizes, seed, epoch, shuffle=train)
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
    reads = [ep.order.reads([(0, sum(sizes))])]
    assert [s for s, _ in reads[0]] == list(range(len(sizes)))


@SETTINGS
@given(st.lists(st.integers(1, 20), min_size=1, max_size=5), st.integers(0, 5), st.data())
def test_reads_cover_each_sample_once(sizes, seed, data):
    order = P.EpochOrder(tuple(sizes), seed, data.draw(st.integers(0, 4)))
    n = order.total
    cut = sorted(data.draw(st.lists(st.integers(0, n), min_size=2, max_size=6)))
    iv = P.normalise(list(zip(cut[::2], cut[1::2])))
    got = [(s, int(i)) for s, idx in order.reads(iv) for i in idx]
    assert len(got) == len(set(got)) == P.length(iv)
    assert all(0 <= i < sizes[s] for s, i in got)


def test_order_depends_on_seed_and_epoch_only():
    sizes = (10, 7, 12, 3)
    a = P.EpochOrder(sizes, 1, 2)
    b = P.EpochOrder(sizes, 1, 2)
    assert a.shard_order == b.shard_order
    assert (a.shard_permutation(2) == b.shard_permutation(2)).all()
    orders = {P.EpochOrder(sizes, 1, e).shard_order + tuple(P.EpochOrder(sizes, 1, e)
              .shard_permutation(0)) for e in range(6)}
    assert len(orders) > 1


def test_dropped_tail_differs_per_epoch():
    sizes = (10, 10, 10)
    kept = []
    for epoch in range(4):
        ep = fresh(sizes, 1, 1, 4, 8, 0, epoch)
        reads = ep.order.reads([(0, 24)])
        kept.append(frozenset((s, int(i)) for s, idx in reads for i in idx))
    assert len(set(kept)) > 1


def test_interval_helpers():
    assert P.take([(0, 3), (5, 9)], 2, 3) == [(2, 3), (5, 7)]
    assert P.subtract([(0, 10)], [(2, 4), (6, 7)]) == [(0, 2), (4, 6), (7, 10)]
    assert P.normalise([(3, 5), (0, 3), (7, 7)]) == [(0, 5)]


def test_golden_order_for_a_fixed_seed():
    """The epoch order is a fixed function of (seed, epoch, shard sizes), whatever the numpy
    version: drawn from Philox's raw output (NEP 19 lets Generator.permutation change)."""
    order = P.EpochOrder((10,) * 12, seed=0, epoch=3)
    assert order.shard_order == (7, 11, 3, 10, 4, 5, 0, 6, 2, 9, 1, 8)
    assert order.shard_permutation(5).tolist() == [1, 7, 3, 4, 0, 5, 8, 6, 2, 9]
    big = P.EpochOrder((1000,), seed=7, epoch=0).shard_permutation(0)
    assert big[:12].tolist() == [700, 46, 625, 445, 986, 471, 191, 325, 313, 809, 99, 43]
    assert sorted(big.tolist()) == list(range(1000))
