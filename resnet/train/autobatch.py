"""train.auto_batch_size: the largest per-device micro-batch that trains, found at start.

Each rank runs forward and backward of the run's model at its largest training image size
(data.image_size, where a progressive-resizing ramp ends) with micro-batches of
train.batch_size, halving on torch.OutOfMemoryError; the ranks take the smallest size any of
them fits, and the global batch stays exactly what it was through gradient accumulation
(resnet/data/plan.py's MicroLayout). The search runs after the process group exists (the ranks
must agree) and before the engine wraps the model, so DeepSpeed and Accelerate are told the new
micro-batch and accumulation before they use them.

Why not Accelerate's find_executable_batch_size: it recognises out-of-memory errors by their
message text and shrinks by 10 % a try by default; here the type decides and each try halves.
"""
from __future__ import annotations

import copy
import dataclasses
import gc

import torch
from torch.nn import functional as F

from resnet.config import Config
from resnet.data.device import normalize
from resnet.model import build_model
from resnet.train.engine import Engine, SetupError, Settled, deepspeed_config, micro_layout
from resnet.train.preflight import RunSetup

BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "train_batch_size")


def largest_that_runs(try_size, start: int) -> int:
    """The largest of start, start/2, start/4, ... 1 at which `try_size(size)` raises no
    torch.OutOfMemoryError."""
    size = start
    while True:
        try:
            try_size(size)
            return size
        except torch.OutOfMemoryError:
            if size == 1:
                raise SetupError("train.auto_batch_size: even a micro-batch of 1 runs out of "
                                 "memory; use a smaller model.arch or data.image_size") from None
        gc.collect()  # the failed try's tensors, before the next one allocates
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        size //= 2


def _probe(cfg: Config, plan: RunSetup, engine: Engine):
    """try_size(n): one forward + backward of the run's model at n images of the largest size."""
    device, size = engine.device, cfg.data.image_size
    model = build_model(cfg.model.arch, plan.num_classes,
                        zero_init_residual=cfg.model.zero_init_residual).to(device)
    if engine.channels_last_weights:
        model = model.to(memory_format=torch.channels_last)
    model.train()

    def try_size(n: int) -> None:
        images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=device)
        labels = torch.zeros(n, dtype=torch.int64, device=device)
        with engine.autocast():
            logits = model(normalize(images, engine.channels_last_input))
        F.cross_entropy(logits.float(), labels).backward()
        model.zero_grad(set_to_none=True)

    return try_size


def fit(settled: Settled, plan: RunSetup, engine: Engine, log) -> tuple[Settled, RunSetup]:
    """(settled, plan) with train.batch_size and the layout at the micro-batch every rank
    fits; Accelerate's accumulation and DeepSpeed's batch keys follow."""
    cfg = settled.cfg
    local = largest_that_runs(_probe(cfg, plan, engine), cfg.train.batch_size)
    found = min(engine.gather(local))
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the probe's memory goes back before training allocates
    cfg = copy.deepcopy(cfg)
    cfg.train.batch_size = found
    settled = dataclasses.replace(settled, cfg=cfg)
    layout = micro_layout(plan.global_batch, found, engine.world_size)
    plan = dataclasses.replace(plan, layout=layout)
    engine.accelerator.gradient_accumulation_steps = layout.accumulation
    if engine.uses_deepspeed:
        ds = deepspeed_config(settled, layout)
        engine.accelerator.state.deepspeed_plugin.deepspeed_config.update(
            {key: ds[key] for key in BATCH_KEYS})
    log.info(f"train.auto_batch_size: micro-batch {found} fits at {cfg.data.image_size} px "
             f"(this rank: {local}, the smallest over ranks taken); global batch "
             f"{layout.describe()}")
    return settled, plan
