"""Everything that can be checked before a process group starts, checked there: the config
alone (resnet/config/validate.py), then what needs the data set and the run folder.

A mistyped key, a missing data set, an unlabelled val split or a batch the world size does
not divide must fail in seconds with one clear line, not after DeepSpeed has started.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from resnet.config import Config, validate
from resnet.data.cache import CacheSettingError, check_settings
from resnet.data.format import Manifest, ManifestError, load_manifest
from resnet.data.plan import MicroLayout
from resnet.runfolder import find_latest, read_state
from resnet.train import universal
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


def _saved_progress(cfg: Config) -> tuple[Path, dict] | None:
    """The trainer state of the newest local checkpoint the run would resume from."""
    latest = find_latest(Path(cfg.run.dir) / "checkpoints")
    if latest and not cfg.checkpoint.resume:
        # Training on would mix two runs' checkpoints, metrics and audit in one folder.
        raise SetupError(f"run.dir={cfg.run.dir} already holds checkpoints (newest: "
                         f"{latest.name}) and checkpoint.resume=false: use a new run.dir, or "
                         f"delete {latest.parent} to start this run over")
    return (latest, read_state(latest)["progress"]) if latest else None


def check_resumable(checkpoint: Path, saved: dict, *, fingerprint: str, global_batch: int,
                    world_size: int) -> bool:
    """Refuse, with what to do, a checkpoint this run cannot continue. True: it is ZeRO-1/2
    of another world size, loaded through DeepSpeed's universal checkpoint (universal.py)."""
    if saved["fingerprint"] != fingerprint:
        raise SetupError(f"{checkpoint} was trained on another data set (fingerprint "
                         f"{saved['fingerprint'][:12]}, data.train has {fingerprint[:12]}); "
                         f"use a new run.dir or the original data.train")
    if saved["global_batch"] != global_batch:
        raise SetupError(f"{checkpoint} was trained with global batch {saved['global_batch']}; "
                         f"set train.global_batch_size={saved['global_batch']}")
    if universal.needs_conversion(saved, world_size):  # ZeRO shards of another world size
        universal.check_convertible(checkpoint, saved, world_size)
        return True
    return False


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
    saved = _saved_progress(cfg)
    global_batch = ((saved and saved[1]["global_batch"]) or cfg.train.global_batch_size
                    or cfg.train.batch_size * world_size)
    layout = micro_layout(global_batch, cfg.train.batch_size, world_size)
    load_universal = bool(saved) and check_resumable(
        *saved, fingerprint=train_manifest.fingerprint, global_batch=global_batch,
        world_size=world_size)
    if global_batch > train_manifest.split("train").samples:
        raise SetupError(f"the global batch {global_batch} is larger than the training set "
                         f"({train_manifest.split('train').samples} samples)")
    return RunSetup(train_manifest, val_manifest, num_classes, world_size, global_batch, layout,
                    load_universal)
