"""Everything that can be checked before a process group starts, checked there: the config
alone (resnet/config/validate.py), then what needs the data set and the run folder.

A mistyped key, a missing data set, an unlabelled val split or a batch the world size does
not divide must fail in seconds with one clear line, not after DeepSpeed has started.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from resnet.checkpoint.errors import ResumeError
from resnet.checkpoint.resume import LocalResume, local_resume_point
from resnet.config import Config, validate
from resnet.data.cache import CacheSettingError, check_settings
from resnet.data.format import Manifest, ManifestError, load_manifest
from resnet.data.plan import MicroLayout
from resnet.train.engine import SetupError, launched_world_size, micro_layout


@dataclass(frozen=True)
class RunSetup:
    """What preflight found: the data sets, the world and the batch layout the run starts with."""

    train_manifest: Manifest
    val_manifest: Manifest | None
    num_classes: int
    world_size: int
    global_batch: int
    layout: MicroLayout  # the global batch over this world size: micro-batches, accumulation
    load_universal: bool = False  # resume a ZeRO-1/2 checkpoint of another world size

    @property
    def accumulation(self) -> int:
        return self.layout.accumulation


def _manifest(source: str, split: str, key: str) -> Manifest:
    if not source:
        raise SetupError(f"{key} is empty: give the DEST of `resnet pack` (a path or s3://...)")
    if "://" not in source and not Path(source).exists():
        raise SetupError(f"{key}={source}: no such directory")
    try:
        manifest = load_manifest(source)
        info = manifest.split(split)
    except (ManifestError, OSError) as exc:
        raise SetupError(f"{key}={source}: {exc}") from None
    if not info.labelled:
        raise SetupError(f"{key}={source}: its {split!r} split has no labels and cannot be used "
                         f"for {'training' if split == 'train' else 'evaluation'}")
    if info.samples == 0:
        raise SetupError(f"{key}={source}: its {split!r} split is empty")
    return manifest


def _check_cache(directory: str, limit_gb: float, manifests) -> None:
    largest = max(s.bytes for m in manifests if m for info in m.splits.values()
                  for s in info.shards)
    try:
        check_settings(directory, limit_gb, largest)
    except CacheSettingError as exc:
        raise SetupError(str(exc)) from None


def _local_resume(cfg: Config, fingerprint: str, global_batch: int,
                  world_size: int) -> LocalResume | None:
    """The newest local checkpoint the run would continue, checked (resnet.checkpoint.resume)."""
    try:
        return local_resume_point(cfg.run.dir, resume=cfg.checkpoint.resume,
                                  fingerprint=fingerprint, global_batch=global_batch,
                                  world_size=world_size)
    except ResumeError as exc:
        raise SetupError(str(exc)) from None


def preflight(cfg: Config, world_size: int | None = None) -> RunSetup:
    validate(cfg)  # every key's range: the config alone, before anything else
    world_size = world_size or launched_world_size()
    d = cfg.data
    train_manifest = _manifest(cfg.data.train, "train", "data.train")
    val_manifest = _manifest(cfg.data.val, "val", "data.val") if cfg.data.val else None
    if d.cache_dir:
        _check_cache(d.cache_dir, d.cache_limit_gb, [train_manifest, val_manifest])
    if val_manifest and val_manifest.fingerprint != train_manifest.fingerprint:
        if [c.id for c in val_manifest.classes] != [c.id for c in train_manifest.classes]:
            raise SetupError("data.train and data.val have different class lists")
    num_classes = cfg.model.num_classes or train_manifest.num_classes
    if num_classes < train_manifest.num_classes:
        raise SetupError(f"model.num_classes={num_classes} is smaller than the data set's "
                         f"{train_manifest.num_classes} classes")
    # An elastic restart keeps the global batch it started with (the schedule depends on it).
    configured = cfg.train.global_batch_size or cfg.train.batch_size * world_size
    saved = _local_resume(cfg, train_manifest.fingerprint, configured, world_size)
    global_batch = saved.global_batch if saved else configured
    layout = micro_layout(global_batch, cfg.train.batch_size, world_size)
    load_universal = bool(saved) and saved.load_universal
    if global_batch > train_manifest.split("train").samples:
        raise SetupError(f"the global batch {global_batch} is larger than the training set "
                         f"({train_manifest.split('train').samples} samples)")
    return RunSetup(train_manifest, val_manifest, num_classes, world_size, global_batch, layout,
                    load_universal)
