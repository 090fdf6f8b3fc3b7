"""The typed configuration tree: every key, its type and default, and the closed choices.

OmegaConf structured configs (resnet/config/load.py) refuse unknown keys and wrong types from
these dataclasses; resnet/config/validate.py checks each value's range.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class DataConfig:
    train: str = ""  # a packed data set (DEST of `resnet pack`): local path, s3:// or http(s)://
    val: str = ""  # a packed data set whose "val" split is evaluated; may equal `train`
    image_size: int = 224  # the training size (at the end of a progressive ramp)
    eval_crop_ratio: float = 0.875  # eval resizes the shorter side to eval_image_size / ratio
    eval_image_size: int = 0  # 0: image_size (FFCV evaluates at 256 after training at 192)
    # Progressive resizing: the train size ramps linearly from min_image_size (at
    # resize_start_epoch) to image_size (at resize_end_epoch), rounded to a multiple of 32 and
    # constant within an epoch; min_image_size 0 keeps image_size throughout.
    min_image_size: int = 0
    resize_start_epoch: int = 0
    resize_end_epoch: int = 0
    scale_min: float = 0.08  # RandomResizedCrop area range
    scale_max: float = 1.0
    ratio_min: float = 0.75  # RandomResizedCrop aspect-ratio range
    ratio_max: float = 1.3333333333333333
    hflip: float = 0.5
    workers: int = 4  # DataLoader worker processes per rank
    decode: str = "cpu"  # cpu: workers decode; device: workers hand over bytes + crop boxes
    prefetch_factor: int = 2
    io_timeout_s: float = 120.0  # a read failing this long (backoff included) stops with its URL
    worker_timeout_s: float = 600.0  # a DataLoader worker silent this long is named; 0: wait
    cache_dir: str = ""  # node-local shard cache for remote data sets (NVMe); empty: off
    cache_limit_gb: float = 0.0  # the cache's size limit in GB (10^9 bytes); 0: the disk's


@dataclass
class ModelConfig:
    arch: str = "resnet50"
    num_classes: int = 0  # 0: take it from the packed data set's manifest
    zero_init_residual: bool = True
    channels_last: bool = True  # applied only where the engine supports it


@dataclass
class TrainConfig:
    epochs: int = 90
    batch_size: int = 256  # per device, per micro-step
    global_batch_size: int = 0  # 0: batch_size x world size; else kept across elastic restarts
    # bf16, fp16, fp32. Unset: a DeepSpeed JSON's (deepspeed.config_file), else bf16
    precision: Optional[str] = None
    label_smoothing: float = 0.1
    grad_clip: Optional[float] = None  # max global grad norm; 0 disables; unset: the JSON's, else 0
    max_steps: int = 0  # stop after this many optimizer steps in total; 0: run all epochs
    eval_every_steps: int = 0  # 0: evaluate at each epoch end only
    log_every_steps: int = 10
    compile: bool = False  # torch.compile the model (in place: checkpoint keys unchanged)
    compile_backend: str = "inductor"  # any torch.compile backend (eager: to debug)
    # At start, the largest micro-batch up to batch_size that fits the device (halving on out
    # of memory; the ranks take the smallest); the global batch is kept by accumulation
    auto_batch_size: bool = False


@dataclass
class OptimConfig:
    lr: float = 0.1  # per 256 images; scaled linearly to the global batch
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-5
    bn_bias_decay: bool = False  # apply weight decay to BatchNorm and bias parameters too
    schedule: str = "cosine"  # onecycle, cosine, linear, constant
    warmup_epochs: float = 5.0  # cosine / linear warmup
    final_lr_ratio: float = 0.0  # cosine / linear end, as a fraction of the peak
    onecycle_pct_start: float = 0.25
    onecycle_div_factor: float = 25.0
    onecycle_final_div_factor: float = 1e4


@dataclass
class DeepSpeedConfig:
    engine: str = "deepspeed"  # deepspeed or ddp
    zero_stage: Optional[int] = None  # 0 resumes on any world size; 1/2 partition optimizer
    # state. Unset: the JSON's, else 0
    config_file: str = ""  # a DeepSpeed JSON: what it sets runs; a key set differently here is
    # an error naming both; ours fill what it leaves out or "auto"


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: not by step count
    every_minutes: float = 30.0  # 0: not by time
    keep: int = 3
    mirror: str = ""  # s3://bucket/prefix: every checkpoint is copied there; restarts read it
    mirror_wait_s: float = 60.0  # at the end (and on SIGTERM), wait at most this for the upload
    resume: bool = True  # resume from the newest complete checkpoint in run.dir; false:
    # refuse to start where checkpoints exist, in run.dir or on the mirror (never mix two runs)


@dataclass
class AuditConfig:
    sample_keys: bool = False  # write every sample key of every step to run.dir/audit/


@dataclass
class WandbConfig:
    mode: str = "offline"  # online, offline, disabled
    project: str = "resnet"
    entity: str = ""
    name: str = ""
    val_table_rows: int = 32


@dataclass
class DistConfig:
    # Silent-node detection (resnet/train/liveness.py; docs/operations.md has the reasoning):
    # a beat through the job's store every period; a peer or the store silent for the
    # timeout makes the rank leave so torchrun re-forms the group without it.
    heartbeat_period_s: float = 2.0
    heartbeat_timeout_s: float = 30.0  # at least 5 periods
    collective_timeout_s: float = 1800.0  # the process group's timeout (a hung collective)


@dataclass
class RunConfig:
    dir: str = "runs/default"
    name: str = ""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    run: RunConfig = field(default_factory=RunConfig)
    seed: int = 0


# The torchvision ResNets resnet/model.py builds.
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")

CHOICES = {
    "model.arch": ARCHS,
    "data.decode": ("cpu", "device"),
    "train.precision": ("bf16", "fp16", "fp32"),
    "optim.schedule": ("onecycle", "cosine", "linear", "constant"),
    "deepspeed.engine": ("deepspeed", "ddp"),
    "deepspeed.zero_stage": (0, 1, 2),
    "wandb.mode": ("online", "offline", "disabled"),
}


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message names the key."""
