"""`resnet verify`: read every shard of a packed data set and check it against its manifest.

Per shard: byte size and sha256 (hashed while streaming, so one read serves every check), the
number of samples, that each sample has a ``.jpg`` and a ``.cls``, that the ``.jpg`` is a JPEG
(header: format and an RGB or grayscale mode), that the label is in range, and that keys are
unique within the split. ``decode=True`` also decodes every image with PIL and with
``torchvision.io.decode_jpeg`` (the CPU path of the decoder the GPU pipeline uses).
Problems are collected, not raised, so one run names every mismatch.
"""
from __future__ import annotations

import hashlib
import io
import re
import sys
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from resnet.data import storage
from resnet.data.format import IMAGE_EXT, LABEL_EXT, Manifest, ShardInfo, load_manifest

_MEMBER_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset's key/extension split
_SHARD_RE = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.tar$")


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


def check_shard(url: str, info: ShardInfo, num_classes: int, labelled: bool, check_image
                ) -> ShardReport:
    report = ShardReport(info.name)
    members: dict[str, set[str]] = {}
    try:
        with storage.open_read(url) as raw:
            reader = _HashingReader(raw)
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
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
    if len(members) != info.samples:
        report.problems.append(f"{info.name}: {len(members)} samples, manifest says "
                               f"{info.samples}")
    return report


def _check_member(tar, member, members, num_classes, labelled, check_image, report) -> None:
    if not member.isfile():
        return
    m = _MEMBER_RE.match(member.name)
    if not m:
        report.problems.append(f"{report.name}: member {member.name!r} has no key.extension name")
        return
    key, ext = m.groups()
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
    from tqdm import tqdm

    manifest = load_manifest(dest)  # ManifestError: missing, malformed or fingerprint mismatch
    check_image = _decoder(decode)
    jobs = [(split, info) for split, s in manifest.splits.items() for info in s.shards]
    problems: list[str] = []
    keys: dict[str, Counter] = {split: Counter() for split in manifest.splits}

    def run(job):
        split, info = job
        labelled = manifest.splits[split].labelled
        return split, check_shard(storage.join(dest, info.name), info, manifest.num_classes,
                                  labelled, check_image)

    total = sum(info.samples for _, info in jobs)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, tqdm(
            total=total, unit="img", disable=not progress, file=sys.stderr, desc="verify") as bar:
        for split, report in pool.map(run, jobs):
            problems += report.problems
            keys[split].update(report.keys)
            bar.update(len(report.keys))
    for split, counter in keys.items():
        repeated = [k for k, n in counter.items() if n > 1]
        if repeated:
            problems.append(f"split {split!r}: {len(repeated)} keys repeat, e.g. {repeated[:3]}")
    return VerifyReport(problems, _warnings(dest, manifest), len(jobs), total)


def _warnings(dest: str, manifest: Manifest) -> list[str]:
    listed = {info.name for s in manifest.splits.values() for info in s.shards}
    # http(s) has no listing: only the manifest's shards can be checked there.
    names = [] if dest.startswith(("http://", "https://")) else storage.listdir(dest)
    extra = [n for n in names if _SHARD_RE.match(n) and n not in listed]
    warnings = [f"{len(extra)} shard file(s) not in the manifest (ignored by readers): "
                f"{extra[:5]}"] if extra else []
    if manifest.skipped:
        warnings.append(f"{len(manifest.skipped)} source file(s) were skipped when packing "
                        f"(listed in the manifest's 'skipped')")
    return warnings
