"""`resnet pack`: a source layout -> WebDataset shards and a manifest, local or on S3.

Design, chosen so that a rerun after a crash is always correct:

- Shards are a pure function of (source listing, seed, options). Samples of a split are sorted
  by key, shuffled with a seeded RNG (so every shard mixes classes), and cut into consecutive
  shards; tar members carry a fixed mtime, so the same inputs give byte-identical shards.
- A shard is written under a temporary name (local: ``DEST/.{name}.partial``; S3: a local
  staging file, uploaded as one object, which S3 makes visible whole or not at all) and only
  then renamed/uploaded to ``DEST/{split}-NNNNNN.tar``. After that a small record
  ``DEST/.pack-state/{name}.json`` notes the shard's plan id (a hash of its sample keys,
  labels, source paths and the options), size, checksum and skipped files.
- A run first deletes ``manifest.json`` (so a half-redone pack never looks complete), removes
  stale temporaries and shards of the packed splits that the plan no longer has, then keeps each
  shard whose record matches its plan id and whose size matches, and (re)writes the others.
  The manifest is written last. Rerunning after an interruption therefore only redoes the
  shards that were not finished; ``--fresh`` ignores the records and rewrites everything. A kept
  shard is checked by size, not re-hashed: it was only renamed once whole; `resnet verify`
  re-hashes everything.
- A run that packs some splits (``--splits val``) into a DEST that holds others keeps those
  others in the new manifest, unchanged (their shards are not touched), and says so. The
  manifest it started from is saved in ``.pack-state/`` first, so an interrupted partial
  re-pack still knows them when rerun. The splits it re-packs are noted there too: until a run
  finishes them, a run that does not pack them refuses to start (their shards match neither
  manifest), instead of keeping them from the earlier manifest.
- Source files are assumed unchanged between runs (the plan id does not stat 1.28 M files);
  after editing the source, use ``--fresh``.

Per image, only the header is read (PIL: format, mode, size) plus a check that a JPEG ends with
its end-of-image marker FFD9 (a truncated JPEG has a valid header, but its last bytes are
entropy-coded data where FFD9 cannot occur). RGB and grayscale JPEGs are copied byte for byte;
CMYK/YCCK JPEGs, other formats (a PNG named .JPEG) and JPEGs with data after the marker are
converted to JPEG at ``quality``; ``max_side`` downscales larger images. Files that cannot be
read are skipped and reported in the manifest. With ``strict`` the first skipped file stops the
run (no manifest is written; finished shards are kept for the next run).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field

from PIL import Image

from resnet.data import storage
from resnet.data.format import (
    FORMAT_VERSION, IMAGE_EXT, INDEX_STRIDE, LABEL_EXT, MANIFEST_NAME, META_EXT, SHARD_RE,
    Manifest, ManifestError, ShardInfo, SplitInfo, shard_name)
from resnet.data.layouts import Listing, Sample, list_source
from resnet.progress import ProgressBar

STATE_DIR = ".pack-state"
EARLIER_MANIFEST = "manifest-before-repack.json"  # in STATE_DIR, while a partial re-pack runs
# In STATE_DIR beside it: the splits partial re-packs began and did not finish. Their shards no
# longer match the earlier manifest, so a later run may never keep them from it.
REPACKING = "splits-being-repacked.json"
PACKER_VERSION = 1  # bump when the bytes written for the same input change
_EOI_TAIL = 4096  # bytes at the end of a JPEG searched for the end-of-image marker


class PackError(RuntimeError):
    """The pack cannot finish as asked (e.g. --strict and a file was skipped)."""


class BadImage(ValueError):
    """One source file cannot be packed; the message is the reason recorded in the manifest."""


@dataclass(frozen=True)
class PackOptions:
    samples_per_shard: int = 1000
    max_side: int = 0  # 0: keep the size
    quality: int = 95  # for converted or resized images
    workers: int = 0  # 0: one per CPU
    seed: int = 0
    splits: tuple[str, ...] = ()  # empty: the layout's default
    strict: bool = False
    fresh: bool = False  # ignore the records of an earlier run and rewrite every shard

    def check(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if self.max_side < 0:
            raise ValueError(f"--max-side must be >= 0, got {self.max_side}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be in 1..100, got {self.quality}")


@dataclass(frozen=True)
class ShardPlan:
    split: str
    name: str
    samples: tuple[Sample, ...]
    plan_id: str


@dataclass
class ShardResult:
    info: ShardInfo
    skipped: list[dict] = field(default_factory=list)
    plan_id: str = ""
    files: int = 0
    in_bytes: int = 0
    kept: bool = False


@dataclass
class PackResult:
    manifest: Manifest
    files: int
    in_bytes: int
    seconds: float
    shards_written: int
    shards_kept: int


# ----------------------------------------------------------------------------- planning


def plan_shards(listing: Listing, opts: PackOptions) -> list[ShardPlan]:
    """Seeded shuffle of each split, cut into shards; pure function of listing and options."""
    plans = []
    for split, samples in listing.splits.items():
        order = sorted(samples, key=lambda s: s.key)
        random.Random(f"{opts.seed}/{split}").shuffle(order)
        for index, start in enumerate(range(0, len(order), opts.samples_per_shard)):
            chunk = tuple(order[start:start + opts.samples_per_shard])
            name = shard_name(split, index)
            plans.append(ShardPlan(split, name, chunk, _plan_id(listing.root, name, chunk, opts)))
    return plans


def _plan_id(root: str, name: str, samples: tuple[Sample, ...], opts: PackOptions) -> str:
    content = [FORMAT_VERSION, PACKER_VERSION, name, opts.max_side, opts.quality,
               [(s.key, s.label, os.path.relpath(s.path, root)) for s in samples]]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


# ----------------------------------------------------------------------------- one image


def _has_eoi(data: bytes) -> bool:
    return data.find(b"\xff\xd9", max(0, len(data) - _EOI_TAIL)) != -1


def prepare_image(data: bytes, max_side: int = 0, quality: int = 95) -> tuple[bytes, str]:
    """JPEG bytes every decoder (PIL, nvJPEG) takes, and what was done: "" (copied) or a note."""
    try:
        im = Image.open(io.BytesIO(data))
        fmt, mode, (w, h) = im.format, im.mode, im.size
    except Exception as exc:  # noqa: BLE001  (PIL raises many types for junk)
        raise BadImage(f"not an image PIL can read: {exc}") from None
    too_big = bool(max_side) and max(w, h) > max_side
    if fmt == "JPEG" and mode in ("RGB", "L") and not too_big:
        if _has_eoi(data):
            return data, ""
        note = "JPEG with data after its end marker, re-encoded"
    else:
        note = f"{fmt} {mode} re-encoded as JPEG" if not too_big else f"resized from {w}x{h}"
    try:
        return _reencode(im, max_side if too_big else 0, quality), note
    except Exception as exc:  # noqa: BLE001
        reason = "truncated or corrupt" if fmt == "JPEG" and not _has_eoi(data) else "corrupt"
        raise BadImage(f"{reason} {fmt} file: {exc}") from None


def _reencode(im: Image.Image, max_side: int, quality: int) -> bytes:
    out_mode = "L" if im.mode in ("L", "1", "I;16", "I", "F") else "RGB"
    if max_side:
        scale = max_side / max(im.size)
        target = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        im.draft(out_mode if im.format == "JPEG" else None, target)  # DCT scaling: much faster
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    im = im.convert(out_mode)
    if max_side and max(im.size) > max_side:
        im = im.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=quality)
    return out.getvalue()


# ----------------------------------------------------------------------------- one shard


class _TarWriter:
    """A minimal streaming tar writer that hashes and counts every byte it writes.

    Headers come from the stdlib (`tarfile.TarInfo.tobuf`, USTAR), the data is written as is:
    three C-level writes per member instead of tarfile's 10 KiB chunked copies, which matters at
    1,000+ images/s. Not webdataset's TarWriter: importing webdataset imports torch, which costs
    each pack worker seconds and hundreds of MB. Members are mode 0444 with mtime 0, so equal
    inputs give byte-identical shards.
    """

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def _write(self, data: bytes) -> None:
        self.sha.update(data)
        self.size += len(data)
        self.f.write(data)

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        info.uname = info.gname = "bigdata"
        self._write(info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict"))
        self._write(data)
        self._write(bytes(-len(data) % tarfile.BLOCKSIZE))

    def close(self) -> None:
        # End of archive: two zero blocks, then padding to a whole record, as tarfile does.
        end = self.size + 2 * tarfile.BLOCKSIZE
        self._write(bytes(2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))


def write_shard(plan: ShardPlan, root: str, dest: str, staging: str, opts: PackOptions
                ) -> ShardResult:
    """Write one shard under a temporary name, then make it final at ``dest/name``."""
    final = storage.join(dest, plan.name)
    tmp = os.path.join(staging, f".{plan.name}.partial")
    result = ShardResult(ShardInfo(plan.name, 0, 0, ""), plan_id=plan.plan_id)
    written, offsets = 0, []
    with open(tmp, "wb") as f:
        tar = _TarWriter(f)
        for sample in plan.samples:
            start = tar.size
            if _add_sample(tar, sample, root, plan.split, opts, result):
                if written % INDEX_STRIDE == 0:
                    offsets.append(start)
                written += 1
        tar.close()
    result.info = ShardInfo(plan.name, written, tar.size, tar.sha.hexdigest(), tuple(offsets))
    if storage.is_remote(dest):
        storage.upload_file(tmp, final)
        os.remove(tmp)
    else:
        os.replace(tmp, final)
    record = {"plan_id": plan.plan_id, "shard": asdict(result.info), "skipped": result.skipped,
              "files": result.files, "in_bytes": result.in_bytes}
    storage.write_bytes(storage.join(dest, STATE_DIR, plan.name + ".json"),
                        json.dumps(record).encode())
    return result


def _add_sample(tar: _TarWriter, sample: Sample, root: str, split: str, opts: PackOptions,
                result: ShardResult) -> bool:
    """Add one sample to ``tar``; False (and a skipped entry in ``result``) if it is bad."""
    rel = sample.path[len(root) + 1:] if sample.path.startswith(root) else sample.path
    result.files += 1
    try:
        with open(sample.path, "rb") as f:
            data = f.read()
        result.in_bytes += len(data)
        jpeg, note = prepare_image(data, opts.max_side, opts.quality)
    except (OSError, BadImage) as exc:
        result.skipped.append({"split": split, "path": rel, "key": sample.key, "reason": str(exc)})
        return False
    members = [(IMAGE_EXT, jpeg), (LABEL_EXT, str(sample.label).encode())]
    if note:  # why the stored bytes differ from the source file
        members.append((META_EXT, json.dumps({"source": rel, "note": note}).encode()))
    for ext, data in members:
        tar.add(f"{sample.key}.{ext}", data)
    return True


def _write_shard_task(args) -> ShardResult:
    return write_shard(*args)


# ----------------------------------------------------------------------------- resume


def _prepare_dest(dest: str, plans: list[ShardPlan], splits: list[str]) -> None:
    """Remove the manifest, temporaries and shards of the packed splits the plan lacks."""
    storage.remove(storage.join(dest, MANIFEST_NAME))
    if not storage.is_remote(dest):
        os.makedirs(dest, exist_ok=True)
    planned = {p.name for p in plans}
    for name in storage.listdir(dest) if storage.exists(dest) else []:
        m = SHARD_RE.match(name)
        stale_shard = m and m.group("split") in splits and name not in planned
        if stale_shard or (name.startswith(".") and name.endswith(".partial")):
            storage.remove(storage.join(dest, name))


def _kept_results(dest: str, plans: list[ShardPlan]) -> dict[str, ShardResult]:
    """Shards of an earlier run that match their plan: recorded, present, right size."""
    state = storage.join(dest, STATE_DIR)
    recorded = set(storage.listdir(state)) if storage.exists(state) else set()
    candidates = [p for p in plans if p.name + ".json" in recorded]

    def check(plan: ShardPlan) -> ShardResult | None:
        try:
            rec = json.loads(storage.read_bytes(storage.join(state, plan.name + ".json")))
            info = ShardInfo.from_dict(rec["shard"])
            if rec["plan_id"] != plan.plan_id or storage.size(
                    storage.join(dest, plan.name)) != info.bytes:
                return None
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None
        return ShardResult(info, rec["skipped"], plan.plan_id, rec["files"], rec["in_bytes"], True)

    with ThreadPoolExecutor(max_workers=16) as pool:  # S3 round trips: overlap them
        found = list(pool.map(check, candidates))
    return {p.name: r for p, r in zip(candidates, found) if r is not None}


# ----------------------------------------------------------------------------- the run


def pack(src: str, dest: str, layout: str, opts: PackOptions = PackOptions(),
         progress: bool = True, log=print) -> PackResult:
    """Pack ``src`` (read as ``layout``) into ``dest``; see the module docstring."""
    opts.check()
    listing = list_source(src, layout, list(opts.splits) or None)  # LayoutError before writing
    plans = plan_shards(listing, opts)
    earlier = _other_splits(dest, listing, src)  # saved before the manifest is removed
    _prepare_dest(dest, plans, list(listing.splits))
    kept = {} if opts.fresh else _kept_results(dest, plans)
    todo = [p for p in plans if p.name not in kept]
    if kept:
        log(f"resuming: {len(kept)} of {len(plans)} shards already complete, {len(todo)} to write")
    results = dict(kept)
    _fail_if_strict(opts, list(kept.values()))
    start = time.perf_counter()
    staging = tempfile.mkdtemp(prefix="resnet-pack-") if storage.is_remote(dest) else dest
    try:
        with contextlib.closing(_run(todo, listing.root, dest, staging, opts, progress)) as run:
            for result in run:
                results[result.info.name] = result
                _fail_if_strict(opts, [result])
    finally:
        if staging != dest:
            shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - start
    manifest = _manifest(listing, plans, results, opts, src, earlier)
    storage.write_bytes(storage.join(dest, MANIFEST_NAME), manifest.to_json().encode())
    storage.remove(storage.join(dest, STATE_DIR, EARLIER_MANIFEST))
    storage.remove(storage.join(dest, STATE_DIR, REPACKING))
    if earlier is not None:
        kept_splits = [s for s in earlier.splits if s not in listing.splits]
        log(f"kept split(s) {', '.join(kept_splits)} of the earlier manifest unchanged "
            f"({sum(len(earlier.splits[s].shards) for s in kept_splits)} shards); packed "
            f"{', '.join(listing.splits)}")
    done = [results[p.name] for p in todo]
    return PackResult(manifest, sum(r.files for r in done), sum(r.in_bytes for r in done),
                      seconds, len(todo), len(kept))


def _fail_if_strict(opts: PackOptions, results: list[ShardResult]) -> None:
    skipped = [s for r in results for s in r.skipped]
    if opts.strict and skipped:
        names = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:5])
        raise PackError(f"--strict: {len(skipped)} file(s) cannot be packed: {names}")


def _run(todo: list[ShardPlan], root: str, dest: str, staging: str, opts: PackOptions,
         progress: bool):
    """Yield each shard's result as it completes, in worker processes when workers > 1."""
    workers = opts.workers or os.cpu_count() or 1
    total = sum(len(p.samples) for p in todo)
    tasks = [(p, root, dest, staging, opts) for p in todo]
    pool = None
    if workers > 1 and len(tasks) > 1:
        # Made before the progress bar starts its monitor thread: fork with live threads is risky.
        pool = ProcessPoolExecutor(max_workers=min(workers, len(tasks)))
        results = (f.result() for f in as_completed([pool.submit(_write_shard_task, t)
                                                     for t in tasks]))
    else:
        results = map(_write_shard_task, tasks)
    bar = ProgressBar(total, unit="img", enabled=progress and bool(todo))
    in_bytes, done, start = 0, 0, time.perf_counter()
    try:
        for result in results:
            in_bytes += result.in_bytes
            done += result.files
            mbps = in_bytes / 1e6 / max(time.perf_counter() - start, 1e-9)
            bar.update(done, **{"MB/s": f"{mbps:.1f}"})
            yield result
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _other_splits(dest: str, listing: Listing, src: str) -> Manifest | None:
    """The manifest this run replaces, where it has splits this run does not pack (else None):
    DEST's own, or the copy an interrupted partial re-pack saved. Saved in STATE_DIR before
    DEST's manifest is removed; its classes must be the listing's."""
    saved = storage.join(dest, STATE_DIR, EARLIER_MANIFEST)
    for url in (storage.join(dest, MANIFEST_NAME), saved):
        try:
            earlier = Manifest.from_json(storage.read_bytes(url).decode(), url)
        except (FileNotFoundError, ManifestError):
            continue
        others = sorted(set(earlier.splits) - set(listing.splits))
        if not others:
            return None
        if [(c.index, c.id) for c in earlier.classes] != \
                [(c.index, c.id) for c in listing.classes]:
            raise PackError(f"{dest} holds split(s) {', '.join(others)} packed with other "
                            f"classes than {src} has: pack them too (--splits), or pack into "
                            f"a new DEST")
        _note_repacking(dest, others, list(listing.splits))
        if url != saved:
            storage.write_bytes(saved, earlier.to_json().encode())
        return earlier
    return None


def _note_repacking(dest: str, others: list[str], packing: list[str]) -> None:
    """Refuse to keep a split an interrupted re-pack left half done; else note `packing` as
    being re-packed (until this run writes the manifest)."""
    url = storage.join(dest, STATE_DIR, REPACKING)
    try:
        begun = set(json.loads(storage.read_bytes(url)))
    except FileNotFoundError:
        begun = set()
    unfinished = sorted(begun & set(others))
    if unfinished:
        raise PackError(f"split(s) {', '.join(unfinished)} of {dest} were being re-packed when "
                        f"an earlier run stopped: their shards no longer match the earlier "
                        f"manifest. Pack them again too (--splits "
                        f"{','.join(sorted(set(packing) | set(unfinished)))})")
    storage.write_bytes(url, json.dumps(sorted(begun | set(packing))).encode())


def _manifest(listing: Listing, plans: list[ShardPlan], results: dict[str, ShardResult],
              opts: PackOptions, src: str, earlier: Manifest | None = None) -> Manifest:
    splits = {}
    for split in listing.splits:
        shards = tuple(results[p.name].info for p in plans if p.split == split)
        splits[split] = SplitInfo(shards=shards, labelled=listing.labelled[split])
    skipped = tuple(s for p in plans for s in results[p.name].skipped)
    if earlier is not None:  # the splits this run did not pack, as they were
        kept = {s: info for s, info in earlier.splits.items() if s not in splits}
        splits = {**kept, **splits}
        skipped = tuple(s for s in earlier.skipped if s.get("split") in kept) + skipped
    options = {"samples_per_shard": opts.samples_per_shard, "seed": opts.seed,
               "max_side": opts.max_side, "quality": opts.quality,
               "splits": list(listing.splits), "source": str(src),
               "packer_version": PACKER_VERSION}
    return Manifest(layout=listing.layout, classes=listing.classes, splits=splits,
                    options=options, skipped=skipped)
