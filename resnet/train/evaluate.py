"""Top-1/top-5 over a whole validation split: in training (`evaluate`) and for `resnet eval`
(`evaluate_weights`, any weights `resnet.weights` reads).

Each rank evaluates its own share (every sample exactly once, shares may differ in size);
only sums are reduced afterwards, so unequal counts never hang a collective.
"""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import torch
from torch import nn

from resnet.data.device import DeviceFeed, normalize
from resnet.progress import ProgressBar
from resnet.weights import load_weights, run_config


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, autocast, reduce_sum,
             channels_last: bool = False, on_batch=None) -> dict:
    """`reduce_sum(tensor)` sums over ranks; `on_batch(batch, images, logits)` sees each batch
    (images: uint8 on the device, however they were decoded)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    for batch in DeviceFeed(loader, device):  # (no host-device sync per batch)
        labels, images = batch.labels, batch.images
        if labels.numel() == 0:
            continue
        with autocast():
            logits = model(normalize(images, channels_last)).float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        totals[:3] += torch.stack([
            nn.functional.cross_entropy(logits, labels, reduction="sum").double(),
            hits[:, 0].sum().double(), hits.any(dim=1).sum().double()])
        totals[3] += labels.numel()
        if on_batch is not None:
            on_batch(batch, images, logits)
    totals = reduce_sum(totals)
    model.train(was_training)
    loss, top1, top5, count = totals.tolist()
    count = max(count, 1.0)
    return {"val_loss": loss / count, "val_top1": top1 / count, "val_top5": top5 / count,
            "val_samples": int(count)}


def evaluate_weights(weights: str, data: str, *, arch: str = "", image_size: int = 0,
                     batch_size: int = 64, workers: int = 2, split: str = "val") -> dict:
    """`resnet eval`: one process, or several under a launcher (each evaluates its share)."""
    from resnet.data.stream import AugmentParams, ShardLoader
    from resnet.model import build_model
    from resnet.train.engine import make_accelerator

    path = Path(weights)
    if not path.exists():
        raise FileNotFoundError(f"--weights {weights}: no such file or folder")
    cfg = run_config(path.resolve() if path.is_dir() else path.resolve().parent)
    arch = arch or (cfg.model.arch if cfg else "resnet50")
    augment = AugmentParams.for_eval(cfg.data) if cfg else AugmentParams()
    if image_size:
        augment = dataclasses.replace(augment, image_size=image_size)
    state = load_weights(path)
    acc = make_accelerator()
    loader = ShardLoader(data, split, rank=acc.process_index, world_size=acc.num_processes,
                         batch_size=batch_size, global_batch=batch_size, workers=workers,
                         seed=0, train=False, augment=augment)
    num_classes = state["fc.weight"].shape[0]
    if num_classes < loader.manifest.num_classes:
        raise ValueError(f"the weights have {num_classes} classes, the data set "
                         f"{loader.manifest.num_classes}")
    model = build_model(arch, num_classes)
    model.load_state_dict(state, strict=True)
    model.to(acc.device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if acc.device.type == "cuda" \
        else (lambda: torch.autocast("cpu", enabled=False))
    bar = ProgressBar(loader.batches_per_epoch, unit="batch", enabled=acc.is_main_process)
    seen = itertools.count(1)
    result = evaluate(model, loader, acc.device, autocast, lambda t: acc.reduce(t, "sum"),
                      on_batch=lambda *_: bar.update(next(seen)))
    bar.close()
    result.update(arch=arch, weights=str(path), data=data, processes=acc.num_processes)
    return result
