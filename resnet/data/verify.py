"""`resnet verify`: read every shard of a packed data set and check it against its manifest.

Per shard: byte size and sha256 (hashed while streaming, so one read serves every check), the
number of samples, that each sample has a ``.jpg`` and a ``.cls``, that the ``.jpg`` is a JPEG
(header: format and an RGB or grayscale mode), that the label is in range, and that keys are
unique within the split. ``decode=True`` also decodes every image with PIL and with
``torchvision.io.decode_jpeg`` (the CPU path of the decoder the GPU pipeline uses), and reads
every shard a second time with webdataset's own tar reader and key grouping (the stages of
``webdataset.WebDataset``, fed by our storage streams so that s3:// and http(s):// work too) as
an independent reference: the samples it sees must be the manifest's count, each with a
``.jpg`` and a ``.cls``; this is what another WebDataset user of the shards would get.
Problems are collected, not raised, so one run names every mismatch.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import re
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from resnet.data import storage
from resnet.data.format import (
    IMAGE_EXT, INDEX_STRIDE, LABEL_EXT, SHARD_RE, Manifest, ShardInfo, load_manifest,
    split_name)
from resnet.progress import ProgressBar


@dataclass
class ShardReport:
    name: str
    keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    problems: list[str]
    warnings: list[str]
    shards: int
    samples: int

    @property
    def ok(self) -> bool:
        return not self.problems


class _HashingReader:
    """Wraps a stream; hashes and counts every byte read through it."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _decoder(decode: bool):
    """The image check: header only, or full decode with PIL and torchvision."""
    decode_jpeg = None
    if decode:
        import torch
        from torchvision.io import decode_jpeg as tv_decode

        def decode_jpeg(data: bytes) -> None:
            tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8))

    def check(data: bytes) -> str:
        if not data.startswith(b"\xff\xd8"):
            return "is not a JPEG (no start marker)"
        try:
            im = Image.open(io.BytesIO(data))
            if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                return f"is {im.format} {im.mode}, not an RGB or grayscale JPEG"
            if decode_jpeg is not None:
                im.load()
                decode_jpeg(data)
        except Exception as exc:  # noqa: BLE001  (any decoder failure is the finding)
            return f"does not decode: {exc}"
        return ""

    return check


def webdataset_samples(url: str) -> list[tuple[str, set[str]]]:
    """(key, extensions) of each sample as webdataset reads the shard: its tar expander and
    key grouping (consecutive members sharing a key), fed by our storage streams."""
    import webdataset as wds

    def opened(urls):
        for item in urls:
            with storage.open_read(item["url"]) as stream:
                yield {**item, "stream": stream}

    pipeline = wds.DataPipeline(wds.SimpleShardList([url]), opened,
                                wds.tariterators.tar_file_expander,
                                wds.tariterators.group_by_keys)
    return [(s["__key__"], {k for k in s if not k.startswith("__")}) for s in pipeline]


def _check_with_webdataset(url: str, info: ShardInfo, report: ShardReport) -> None:
    try:
        samples = webdataset_samples(url)
    except Exception as exc:  # noqa: BLE001  (whatever webdataset raises is the finding)
        report.problems.append(f"{info.name}: webdataset cannot read it: {exc}")
        return
    if len(samples) != info.samples:
        report.problems.append(f"{info.name}: webdataset reads {len(samples)} samples, manifest "
                               f"says {info.samples} (are each sample's members consecutive?)")
    incomplete = [(i, key, ext) for i, (key, exts) in enumerate(samples)
                  for ext in (IMAGE_EXT, LABEL_EXT) if ext not in exts]
    for i, key, ext in itertools.islice(incomplete, 3):
        report.problems.append(f"{info.name}: webdataset's sample #{i} {key!r} has no .{ext}")


def check_shard(url: str, info: ShardInfo, num_classes: int, labelled: bool, check_image,
                reference: bool = False) -> ShardReport:
    report = ShardReport(info.name)
    members: dict[str, set[str]] = {}
    starts: list[int] = []
    try:
        with storage.open_read(url) as raw:
            reader = _HashingReader(raw)
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
                    if member.isfile() and split_name(member.name)[0] not in members:
                        starts.append(member.offset)  # a new sample's first header
                    _check_member(tar, member, members, num_classes, labelled, check_image,
                                  report)
            reader.drain()  # tar padding after the end-of-archive blocks counts in the checksum
    except FileNotFoundError:
        report.problems.append(f"{info.name}: missing")
        return report
    except (tarfile.TarError, OSError, EOFError) as exc:
        report.problems.append(f"{info.name}: unreadable tar: {exc}")
        return report
    for key, exts in members.items():
        for ext in (IMAGE_EXT, LABEL_EXT):
            if ext not in exts:
                report.problems.append(f"{info.name}: sample {key!r} has no .{ext}")
    report.keys = list(members)
    if reader.size != info.bytes:
        report.problems.append(f"{info.name}: size {reader.size} bytes, manifest says {info.bytes}")
    if reader.sha.hexdigest() != info.sha256:
        report.problems.append(f"{info.name}: sha256 {reader.sha.hexdigest()} does not match the "
                               f"manifest's {info.sha256}")
    if info.offsets and tuple(starts[::INDEX_STRIDE]) != info.offsets:
        report.problems.append(f"{info.name}: the manifest's sample offsets do not match the "
                               f"tar's (a reader would start at a wrong byte): re-pack it")
    if len(members) != info.samples:
        report.problems.append(f"{info.name}: {len(members)} samples, manifest says "
                               f"{info.samples}")
    if reference:
        _check_with_webdataset(url, info, report)
    return report


def _check_member(tar, member, members, num_classes, labelled, check_image, report) -> None:
    if not member.isfile():
        return
    key, ext = split_name(member.name)
    if not ext or key.endswith("/") or not key:
        report.problems.append(f"{report.name}: member {member.name!r} has no key.extension name")
        return
    members.setdefault(key, set()).add(ext)
    data = tar.extractfile(member).read()
    where = f"{report.name}: {member.name}"
    if ext == IMAGE_EXT:
        problem = check_image(data)
        if problem:
            report.problems.append(f"{where} {problem}")
    elif ext == LABEL_EXT:
        text = data.decode("ascii", "replace").strip()
        if not re.fullmatch(r"-?\d+", text):
            report.problems.append(f"{where}: label {text!r} is not a decimal integer")
        elif labelled and not 0 <= int(text) < num_classes:
            report.problems.append(f"{where}: label {text} is out of range 0..{num_classes - 1}")


def verify(dest: str, decode: bool = False, workers: int = 4, progress: bool = True
           ) -> VerifyReport:
    """Check every shard of ``dest`` against ``dest/manifest.json``; see the module docstring."""
    manifest = load_manifest(dest)  # ManifestError: missing, malformed or fingerprint mismatch
    check_image = _decoder(decode)
    jobs = [(split, info) for split, s in manifest.splits.items() for info in s.shards]
    problems: list[str] = []
    keys: dict[str, Counter] = {split: Counter() for split in manifest.splits}

    def run(job):
        split, info = job
        labelled = manifest.splits[split].labelled
        return split, check_shard(storage.join(dest, info.name), info, manifest.num_classes,
                                  labelled, check_image, reference=decode)

    total = sum(info.samples for _, info in jobs)
    bar, done = ProgressBar(total, unit="img", enabled=progress), 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for split, report in pool.map(run, jobs):
            problems += report.problems
            keys[split].update(report.keys)
            done += len(report.keys)
            bar.update(done)
    bar.close()
    for split, counter in keys.items():
        repeated = [k for k, n in counter.items() if n > 1]
        if repeated:
            problems.append(f"split {split!r}: {len(repeated)} keys repeat, e.g. {repeated[:3]}")
    return VerifyReport(problems, _warnings(dest, manifest), len(jobs), total)


def _warnings(dest: str, manifest: Manifest) -> list[str]:
    listed = {info.name for s in manifest.splits.values() for info in s.shards}
    # http(s) has no listing: only the manifest's shards can be checked there.
    names = [] if dest.startswith(("http://", "https://")) else storage.listdir(dest)
    extra = [n for n in names if SHARD_RE.match(n) and n not in listed]
    warnings = [f"{len(extra)} shard file(s) not in the manifest (ignored by readers): "
                f"{extra[:5]}"] if extra else []
    if manifest.skipped:
        warnings.append(f"{len(manifest.skipped)} source file(s) were skipped when packing "
                        f"(listed in the manifest's 'skipped')")
    return warnings
