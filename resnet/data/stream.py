"""Streaming packed shards on every rank, with exact and elastic mid-epoch resume.

    loader = ShardLoader(source, "train", rank=r, world_size=W, batch_size=b, global_batch=G,
                         workers=K, seed=s, train=True, augment=AugmentParams())
    while loader.epoch < epochs:
        for batch in loader:          # the REST of the current epoch
            ...
            state = loader.state_dict()   # after the optimizer step

Who calls what: every rank builds its own loader and reads only its own part of each epoch
(`plan.py` says which). The position part of the state is identical on all ranks, so the
trainer saves rank 0's `state_dict()` in the checkpoint, and on restart every rank calls
`load_state_dict` with that same dict before iterating. `skipped` in the state is the count of
corrupt samples the saving rank met (informational; it does not move positions).

A loader iterates one epoch per `for`: a torch DataLoader whose workers each produce the
batches `plan.EpochPlan.schedule` gives them, so the DataLoader's round-robin yields the rank's
batch sequence. Workers collate: a batch is built from one worker's samples. Resume is
"regenerate the plan, skip the consumed positions": consumed samples are never fetched,
decoded or augmented.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from resnet.data import augment as A
from resnet.data import format as fmt
from resnet.data import iostats
from resnet.data import order as O
from resnet.data import plan as P
from resnet.data import storage
from resnet.data.augment import AugmentParams
from resnet.data.cache import ShardCache
from resnet.data.shardio import ShardError, read_samples
from resnet.data.workers import init_worker, named_timeouts, worker_context
from resnet.logs import RateLimitedLogger, rank_from_env

log = logging.getLogger(__name__)

STATE_VERSION = 1
__all__ = ["ShardLoader", "Batch", "AugmentParams", "ShardError", "STATE_VERSION"]


@dataclass
class Batch:
    labels: torch.Tensor  # int64 [n]; -1 for unlabelled splits
    keys: list[str]
    skipped: int = 0  # corrupt samples left out of this batch
    images: Optional[torch.Tensor] = None  # uint8 [n, 3, S, S] (decode="cpu")
    jpegs: Optional[torch.Tensor] = None  # decode="device": uint8, the JPEGs end to end ...
    boxes: Optional[torch.Tensor] = None  # ... float [n, 4] x0, y0, x1, y1 in source pixels
    flips: Optional[torch.Tensor] = None  # ... bool [n]
    jpeg_offsets: Optional[torch.Tensor] = None  # ... int64 [n + 1]: jpeg i is [o[i], o[i+1])
    io: Optional[iostats.IOCounts] = None  # what its worker read since its previous batch

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> "Batch":  # called by DataLoader(pin_memory=True)
        """What is copied to the device, pinned. Not the JPEG bytes, boxes and flips: nvJPEG
        and the crop planning read them on the host (pinning would copy ~28 MB a batch of
        256 for nothing)."""
        pin = lambda t: t.pin_memory() if t is not None else None  # noqa: E731
        return Batch(pin(self.labels), self.keys, self.skipped, pin(self.images),
                     self.jpegs, self.boxes, self.flips, self.jpeg_offsets, self.io)


class CorruptSample(ValueError):
    pass


@dataclass(frozen=True)
class _Job:
    """What one rank's workers need for one epoch (pickled into each worker)."""

    root: str
    shards: tuple[fmt.ShardInfo, ...]
    order: O.EpochOrder
    schedule: tuple[O.WorkerShare, ...]  # per physical worker: its runs, picks and batches
    train: bool
    labelled: bool
    num_classes: int
    decode: str
    augment: AugmentParams = field(default_factory=AugmentParams)
    cache: Optional[ShardCache] = None  # remote sources only


def _label(files: dict[str, bytes], job: _Job) -> int:
    raw = files.get(fmt.LABEL_EXT)
    if raw is None:
        if job.labelled:
            raise CorruptSample(f"no .{fmt.LABEL_EXT}")
        return -1
    try:
        label = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise CorruptSample(f"bad .{fmt.LABEL_EXT} {raw[:20]!r}") from None
    if not 0 <= label < job.num_classes:
        raise CorruptSample(f"label {label} outside 0..{job.num_classes - 1}")
    return label


def _prepare(key: str, files: dict[str, bytes], job: _Job):
    """(payload, label): an augmented uint8 image, or (jpeg, box, flip) for device decoding."""
    label = _label(files, job)
    data = files.get(fmt.IMAGE_EXT)
    if data is None:
        raise CorruptSample(f"no .{fmt.IMAGE_EXT}")
    p, seed, epoch = job.augment, job.order.seed, job.order.epoch
    try:
        if job.decode == "device":
            jpeg, w, h = A.for_device(data)
            box, flip = A.train_view(w, h, p, seed, epoch, key) if job.train else (
                A.eval_box(w, h, p), False)
            return (jpeg, box, flip), label
        if job.train:
            return A.train_image(data, p, seed, epoch, key), label
        return A.eval_image(data, p), label
    except A.DecodeError as exc:
        raise CorruptSample(str(exc)) from None


def _samples(job: _Job, share: O.WorkerShare,
             log_: RateLimitedLogger) -> Iterator[tuple[str, object]]:
    """(key, (payload, label) or None for a corrupt/missing sample), in the share's emission
    order: each pick takes the next sample of its run, from one open reader per run."""
    left = [b - a for a, b in share.runs]
    open_runs: dict[int, Iterator] = {}
    for k in share.picks.tolist():
        if k not in open_runs:
            open_runs[k] = _run_samples(job, *job.order.locate(share.runs[k]), log_)
        yield next(open_runs[k])
        left[k] -= 1
        if not left[k]:  # its stream closes now, not when the worker's last run ends
            open_runs.pop(k).close()


def _run_samples(job: _Job, shard: int, lo: int, hi: int,
                 log_: RateLimitedLogger) -> Iterator[tuple[str, object]]:
    """Samples lo..hi-1 of a shard, in tar order, read from the manifest's nearest offset at or
    before lo; a sample the tar lacks (it is shorter than its manifest says) is yielded as
    missing, so every position still yields one item."""
    info = job.shards[shard]
    url = storage.join(job.root, info.name)
    opener = job.cache.opener(info) if job.cache else storage.open_read
    expected = lo
    for index, key, files in read_samples(url, set(range(lo, hi)), opener=opener,
                                          shard_bytes=info.bytes, start=info.start(lo)):
        while expected < index:
            yield _missing(info, url, expected, log_)
            expected += 1
        yield _one(url, index, key, files, job, log_)
        expected += 1
    while expected < hi:
        yield _missing(info, url, expected, log_)
        expected += 1


def _missing(info: fmt.ShardInfo, url: str, index: int, log_: RateLimitedLogger):
    log_.warning(f"shard {url}: sample {index} is missing (the shard is shorter than "
                 f"its manifest says); skipped", key="sample")
    return f"{info.name}#{index}", None


def _one(url, index, key, files, job, log_):
    try:
        return key, _prepare(key, files, job)
    except CorruptSample as exc:
        log_.warning(f"shard {url}: corrupt sample {key} (#{index}): {exc}; skipped",
                     key="sample")
        return key, None


def _collate(items: list[tuple[str, object]], job: _Job) -> Batch:
    good = [(k, v) for k, v in items if v is not None]
    keys = [k for k, _ in good]
    labels = torch.tensor([v[1] for _, v in good], dtype=torch.int64)
    skipped = len(items) - len(good)
    if job.decode == "device":
        payload = [v[0] for _, v in good]
        jpegs, offsets = A.pack_jpegs([x[0] for x in payload])
        return Batch(labels, keys, skipped, jpegs=jpegs, jpeg_offsets=offsets,
                     boxes=torch.tensor([x[1] for x in payload],
                                        dtype=torch.float32).reshape(-1, 4),
                     flips=torch.tensor([x[2] for x in payload], dtype=torch.bool))
    images = [v[0] for _, v in good]
    if images:
        stacked = torch.stack(images)
    else:
        size = job.augment.image_size  # an all-corrupt batch still counts: equal batch counts
        stacked = torch.empty(0, 3, size, size, dtype=torch.uint8)
    return Batch(labels, keys, skipped, images=stacked)


class _EpochStream(IterableDataset):
    def __init__(self, job: _Job):
        self.job = job

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        yield from _batches(self.job, self.job.schedule[info.id if info else 0])


def _batches(job: _Job, share: O.WorkerShare) -> Iterator[Batch]:
    log_ = RateLimitedLogger(rank_from_env(), every_s=10.0)  # one key: at most 1 line / 10 s
    items: list = []
    produced = 0
    counted = iostats.snapshot()
    sizes = share.sizes
    for item in _samples(job, share, log_):
        items.append(item)
        if produced < len(sizes) and len(items) == sizes[produced]:
            batch = _collate(items, job)
            now = iostats.snapshot()
            batch.io, counted = now - counted, now
            yield batch
            produced, items = produced + 1, []
    if items or produced != len(sizes):  # the plan and the reader disagree: never hand out
        raise RuntimeError(f"worker produced {produced} batches (and {len(items)} samples "
                           f"over), the plan says {len(sizes)}")  # a wrong epoch


class ShardLoader:
    """The rank's stream over a packed split; see the module docstring for the protocol."""

    def __init__(self, source: str, split: str, *, rank: int, world_size: int,
                 batch_size: int, global_batch: int, workers: int, seed: int, train: bool,
                 augment: AugmentParams = AugmentParams(), decode: str = "cpu",
                 prefetch_factor: int = 2, pin_memory: bool = False,
                 worker_timeout_s: float = 0.0, cache: Optional[ShardCache] = None):
        if decode not in ("cpu", "device"):
            raise ValueError(f"decode must be 'cpu' or 'device', got {decode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if batch_size < 1 or workers < 0:
            raise ValueError(f"batch_size must be >= 1 and workers >= 0 "
                             f"(got {batch_size}, {workers})")
        self.source, self.split, self.rank = source, split, rank
        self.train, self.seed, self.decode = train, seed, decode
        self.global_batch = global_batch if train else max(1, global_batch)
        self.workers, self.prefetch_factor, self.pin_memory = workers, prefetch_factor, pin_memory
        self.worker_timeout_s = worker_timeout_s  # 0: wait for a worker's batch forever
        self.augment = augment
        self.cache = cache if storage.is_remote(source) else None  # local shards: no copy
        self.manifest = fmt.load_manifest(source)
        self._split = self.manifest.split(split)
        self._sizes = tuple(s.samples for s in self._split.shards)
        # Training splits each global batch over ranks x micro-steps (at most batch_size each);
        # evaluation reads near-equal rank pieces in batches of batch_size.
        self.layout = (P.MicroLayout.choose(self.global_batch, world_size, batch_size)
                       if train else None)
        self._topology = (P.Segment.for_training(self.layout, max(1, workers)) if train else
                          P.Segment(world_size, max(1, workers), batch_size))
        self.skipped = 0
        self.io_total = iostats.IOCounts()  # read by this rank's loader since it was built
        self.io_finished: Optional[iostats.IOCounts] = None  # ... in its last finished epoch
        self._start(0, ())

    # ------------------------------------------------------------------ plan bookkeeping
    def _start(self, epoch: int, segments: tuple[P.Segment, ...]) -> None:
        order = O.EpochOrder(self._sizes, self.seed, epoch, shuffle=self.train)
        self._plan = P.EpochPlan(order, self.global_batch, self.train, segments).resume(
            self._topology)
        self.epoch = epoch
        self.io = iostats.IOCounts()  # read in this epoch (since the resume, if resumed)

    @property
    def batches_per_epoch(self) -> int:
        order = O.EpochOrder(self._sizes, self.seed, self.epoch, shuffle=self.train)
        fresh = P.EpochPlan(order, self.global_batch, self.train).resume(self._topology)
        return fresh.batches_total(self.rank)

    @property
    def batches_remaining(self) -> int:
        return self._plan.batches_remaining(self.rank)

    @property
    def samples_consumed(self) -> int:
        """Positions of the current epoch consumed by all ranks together."""
        return self._plan.consumed_count()

    # ------------------------------------------------------------------ iteration
    def _job(self) -> _Job:
        return _Job(self.source, self._split.shards, self._plan.order,
                    tuple(self._plan.schedule(self.rank)),
                    self.train, self._split.labelled,
                    self.manifest.num_classes, self.decode, self.augment, self.cache)

    def __iter__(self) -> Iterator[Batch]:
        expected = self.batches_remaining
        if expected:
            job = self._job()
            if self.workers == 0:
                batches = _batches(job, job.schedule[0])
            else:
                batches = named_timeouts(iter(DataLoader(
                    _EpochStream(job), batch_size=None, num_workers=self.workers,
                    prefetch_factor=self.prefetch_factor,
                    worker_init_fn=functools.partial(init_worker, environ=dict(os.environ),
                                                     trainer_pid=os.getpid()),
                    pin_memory=self.pin_memory, persistent_workers=False,
                    multiprocessing_context=worker_context(),
                    timeout=self.worker_timeout_s)),
                    self.workers, self.worker_timeout_s, f"rank {self.rank}, epoch {self.epoch}")
            try:
                for batch in batches:
                    self._plan = self._plan.advance(1)
                    self.skipped += batch.skipped
                    if batch.io is not None:
                        self.io, self.io_total = self.io + batch.io, self.io_total + batch.io
                    yield batch
            finally:
                del batches  # shuts the workers down when the caller stops early
        if self._plan.batches_remaining(self.rank) == 0:
            self.io_finished = self.io
            self._start(self.epoch + 1, ())

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Small, JSON-serialisable; reflects the batches handed out so far."""
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "train": self.train,
            "epoch": self.epoch,
            "seed": self.seed,
            "order": O.ORDER,
            "fingerprint": self.manifest.fingerprint,
            "global_batch": self.global_batch,
            "samples_consumed": self.samples_consumed,
            "skipped": self.skipped,
            "segments": [asdict(s) for s in self._plan.segments if s.batches or s.dropped],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: exactly at the same topology, elastically at another."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not "
                             f"{STATE_VERSION}; it was written by another resnet version")
        if state["fingerprint"] != self.manifest.fingerprint:
            raise ValueError(
                f"the checkpoint's data loader state belongs to another data set (fingerprint "
                f"{state['fingerprint'][:12]}...), not {self.source} "
                f"({self.manifest.fingerprint[:12]}...); resume with the data set it was "
                f"trained on, or start a new run")
        for name in ("seed", "split", "train"):
            if state[name] != getattr(self, name):
                raise ValueError(f"the loader state has {name}={state[name]!r} but this "
                                 f"loader has {name}={getattr(self, name)!r}; the epoch order "
                                 f"would differ")
        # A state from before the order (and unequal micro-batches) came is refused mid-epoch
        # just below, so every segment that is used carries its accumulation.
        segments = tuple(P.Segment(**s) for s in state["segments"])
        order = state.get("order", "numpy Generator.permutation")  # before it was saved
        if order != O.ORDER and segments:
            raise ValueError(f"the loader state was saved mid-epoch with the sample order "
                             f"{order!r} of an earlier resnet; this one draws {O.ORDER!r}. "
                             f"Resume from a checkpoint at an epoch boundary, or finish the "
                             f"epoch with the earlier version")
        if state["global_batch"] != self.global_batch and segments:
            raise ValueError(
                f"the loader state was saved mid-epoch with global_batch {state['global_batch']}"
                f", this loader has {self.global_batch}; keep the global batch (the trainer "
                f"accumulates gradients to do so) or resume from an epoch boundary")
        self.skipped = int(state.get("skipped", 0))
        self._start(int(state["epoch"]), segments)
        if self._plan.current.dropped:
            log.warning("the loader state was not saved at an optimizer-step boundary: resuming "
                        "under a new topology leaves %d samples of this epoch out",
                        self._plan.current.dropped)


def eval_loader(source: str, split: str = "val", *, batch_size: int, workers: int = 2,
                rank: int = 0, world_size: int = 1, augment: AugmentParams = AugmentParams(),
                decode: str = "cpu", cache: Optional[ShardCache] = None) -> ShardLoader:
    """A standalone validation loader: stored order, every sample once across ranks."""
    return ShardLoader(source, split, rank=rank, world_size=world_size, batch_size=batch_size,
                       global_batch=1, workers=workers, seed=0, train=False, augment=augment,
                       decode=decode, cache=cache)
