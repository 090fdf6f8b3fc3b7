"""Property tests of the pure epoch plan: exactly once, equal counts, resume, elastic resume."""
from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from resnet.data import plan as P

SETTINGS = settings(max_examples=150, deadline=None)


def positions(iv):
    return [p for a, b in iv for p in range(a, b)]


def rank_sequence(ep: P.EpochPlan, rank: int) -> list[list[int]]:
    """The batches (as position lists) a rank yields from the plan's current state."""
    per_worker = [[positions(b) for b in P.chunk(pos, ep.current.batch_size)][:count]
                  for pos, count in ep.schedule(rank)]
    for (pos, count), batches in zip(ep.schedule(rank), per_worker):
        assert len(batches) == count
    return P.interleave(per_worker)


def run(ep: P.EpochPlan) -> dict[int, list[list[int]]]:
    return {r: rank_sequence(ep, r) for r in range(ep.current.world_size)}


topologies = st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 5))  # W, K, b


@st.composite
def setups(draw):
    sizes = tuple(draw(st.lists(st.integers(1, 30), min_size=1, max_size=6)))
    w, k, b = draw(topologies)
    accum = draw(st.integers(1, 3))
    seed, epoch = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    return sizes, w, k, b, w * b * accum, seed, epoch


def fresh(sizes, w, k, b, g, seed, epoch, train=True):
    order = P.EpochOrder(sizes, seed, epoch, shuffle=train)
    return P.EpochPlan(order, g, train).resume(P.Segment(w, k, b))


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
    assert all(len(batch) == b for s in seqs.values() for batch in s)


@SETTINGS
@given(setups(), st.data())
def test_resume_same_topology_continues_exactly(setup, data):
    ep = fresh(*setup)
    full = run(ep)
    n = ep.batches_total()
    c = data.draw(st.integers(0, n))
    resumed = run(P.EpochPlan(ep.order, ep.global_batch, True, ep.segments).advance(c)
                  .resume(P.Segment(*setup[1:4])))
    for r, seq in full.items():
        assert resumed[r] == seq[c:]


@SETTINGS
@given(setups(), topologies, st.data())
def test_elastic_resume_exactly_once(setup, topo2, data):
    sizes, w, k, b, g, seed, epoch = setup
    assume(g % (topo2[0] * topo2[2]) == 0)  # the loader refuses other topologies
    ep = fresh(*setup)
    steps = data.draw(st.integers(0, ep.batches_total() * b * w // g))
    c = steps * g // (w * b)  # saved at an optimizer-step boundary
    first = run(ep)
    used = [p for seq in first.values() for batch in seq[:c] for p in batch]
    w2, k2, b2 = topo2
    ep2 = ep.advance(c).resume(P.Segment(w2, k2, b2))
    second = run(ep2)
    assert len({len(s) for s in second.values()}) == 1
    used += [p for seq in second.values() for batch in seq for p in batch]
    assert sorted(used) == list(range(sum(sizes) // g * g))
    assert ep2.current.dropped == 0


@SETTINGS
@given(setups(), topologies, topologies, st.data())
def test_two_topology_changes(setup, t2, t3, data):
    sizes, w, k, b, g, seed, epoch = setup
    assume(all(g % (topo[0] * topo[2]) == 0 for topo in (t2, t3)))  # the loader refuses others
    ep = fresh(*setup)
    used = []
    for topo in (t2, t3):
        seg = ep.current
        steps = data.draw(st.integers(0, ep.batches_remaining() * seg.batch_size
                                      * seg.world_size // g))
        c = steps * g // (seg.world_size * seg.batch_size)
        used += [p for seq in run(ep).values() for batch in seq[:c] for p in batch]
        ep = ep.advance(c).resume(P.Segment(*topo))
    used += [p for seq in run(ep).values() for batch in seq for p in batch]
    assert sorted(used) == list(range(sum(sizes) // g * g))


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
