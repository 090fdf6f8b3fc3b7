"""`validate(cfg)`: every key's range, checked once, before anything starts.

What can be judged from the config alone is judged here (preflight runs it before any
process group exists); what needs the data set (its manifests, the largest shard against
data.cache_limit_gb) or the DeepSpeed JSON stays in resnet/train/preflight.py and
resnet/train/engine.py. Each refusal names the key, its value and what it must be.
"""
from __future__ import annotations

from typing import Any

from resnet.config.tree import CHOICES, Config, ConfigError

# A heartbeat timeout of fewer periods than this mistakes jitter for a lost node
# (resnet/train/liveness.py; docs/operations.md has the reasoning).
MIN_PERIODS_PER_TIMEOUT = 5


def _value(cfg: Config, dotted: str) -> Any:
    node = cfg
    for name in dotted.split("."):
        node = getattr(node, name)
    return node


def _require(cfg: Config, dotted: str, ok, what: str) -> None:
    """Refuse `dotted` unless ok(its value); `what` says what it must be."""
    value = _value(cfg, dotted)
    if value is not None and not ok(value):  # None: an Optional key left unset
        raise ConfigError(f"{dotted}={value}: must be {what}")


def _at_least(cfg: Config, minimum: float, *keys: str) -> None:
    for dotted in keys:
        _require(cfg, dotted, lambda v: v >= minimum, f"at least {minimum}")


def _positive(cfg: Config, *keys: str) -> None:
    for dotted in keys:
        _require(cfg, dotted, lambda v: v > 0, "more than 0")


def _fraction(cfg: Config, *keys: str) -> None:
    for dotted in keys:
        _require(cfg, dotted, lambda v: 0 <= v <= 1, "between 0 and 1")


def check_choices(cfg: Config) -> None:
    """Each closed-choice key is one of CHOICES (also run on a loading OmegaConf tree)."""
    for dotted, allowed in CHOICES.items():
        value = _value(cfg, dotted)
        if value is not None and value not in allowed:  # None: unset (Optional keys only)
            raise ConfigError(f"{dotted}={value!r} is not one of {list(allowed)}")


def _check_crops(cfg: Config) -> None:
    d = cfg.data
    if not 0 < d.scale_min <= d.scale_max <= 1:
        raise ConfigError(f"data.scale_min={d.scale_min}, data.scale_max={d.scale_max}: "
                          f"must satisfy 0 < data.scale_min <= data.scale_max <= 1")
    if not 0 < d.ratio_min <= d.ratio_max:
        raise ConfigError(f"data.ratio_min={d.ratio_min}, data.ratio_max={d.ratio_max}: "
                          f"must satisfy 0 < data.ratio_min <= data.ratio_max")
    _require(cfg, "data.eval_crop_ratio", lambda v: 0 < v <= 1, "in (0, 1]")


def _check_resizing(cfg: Config) -> None:
    d = cfg.data
    _at_least(cfg, 1, "data.image_size")
    _at_least(cfg, 0, "data.eval_image_size", "data.min_image_size", "data.resize_start_epoch",
              "data.resize_end_epoch")
    if d.min_image_size and not (32 <= d.min_image_size <= d.image_size
                                 and 0 <= d.resize_start_epoch <= d.resize_end_epoch):
        raise ConfigError(f"progressive resizing needs 32 <= data.min_image_size <= "
                          f"data.image_size and 0 <= data.resize_start_epoch <= "
                          f"data.resize_end_epoch (got {d.min_image_size}, {d.image_size}, "
                          f"{d.resize_start_epoch}, {d.resize_end_epoch})")


def _check_data(cfg: Config) -> None:
    _check_crops(cfg)
    _check_resizing(cfg)
    _fraction(cfg, "data.hflip")
    _at_least(cfg, 0, "data.workers", "data.worker_timeout_s")
    _at_least(cfg, 1, "data.prefetch_factor")
    _positive(cfg, "data.io_timeout_s")
    if cfg.data.cache_limit_gb < 0:
        raise ConfigError(f"data.cache_limit_gb={cfg.data.cache_limit_gb:g} is negative; 0 "
                          f"means no limit but the disk's")


def _check_train(cfg: Config) -> None:
    _at_least(cfg, 1, "train.epochs", "train.batch_size", "train.log_every_steps")
    _at_least(cfg, 0, "train.global_batch_size", "train.max_steps", "train.eval_every_steps",
              "train.grad_clip", "model.num_classes")
    _fraction(cfg, "train.label_smoothing")
    _require(cfg, "train.compile_backend", bool, "a torch.compile backend's name")


def _check_optim(cfg: Config) -> None:
    _at_least(cfg, 0, "optim.lr", "optim.weight_decay", "optim.warmup_epochs")
    _fraction(cfg, "optim.momentum", "optim.final_lr_ratio", "optim.onecycle_pct_start")
    _positive(cfg, "optim.onecycle_div_factor", "optim.onecycle_final_div_factor")


def _check_checkpoint(cfg: Config) -> None:
    _at_least(cfg, 1, "checkpoint.keep")
    _at_least(cfg, 0, "checkpoint.every_steps", "checkpoint.every_minutes",
              "checkpoint.mirror_wait_s", "wandb.val_table_rows")
    _require(cfg, "run.dir", bool, "a directory")


def _check_dist(cfg: Config) -> None:
    for key in ("heartbeat_period_s", "heartbeat_timeout_s", "collective_timeout_s"):
        _require(cfg, f"dist.{key}", lambda v: v > 0, "more than 0 seconds")
    d = cfg.dist
    if d.heartbeat_timeout_s < MIN_PERIODS_PER_TIMEOUT * d.heartbeat_period_s:
        raise ConfigError(
            f"dist.heartbeat_timeout_s={d.heartbeat_timeout_s} is shorter than "
            f"{MIN_PERIODS_PER_TIMEOUT} heartbeat periods (dist.heartbeat_period_s="
            f"{d.heartbeat_period_s}): one late beat would read as a lost node")


def validate(cfg: Config) -> None:
    """Refuse, naming the key, any value outside its range (ConfigError)."""
    check_choices(cfg)
    _check_data(cfg)
    _check_train(cfg)
    _check_optim(cfg)
    _check_checkpoint(cfg)
    _check_dist(cfg)
