"""Top-1/top-5 over a whole validation split, and the exported final weights.

Each rank evaluates its own share (every sample exactly once, shares may differ in size);
only sums are reduced afterwards, so unequal counts never hang a collective.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import torch
from torch import nn

from resnet.data.format import Manifest
from resnet.progress import ProgressBar

MEAN = torch.tensor([0.485, 0.456, 0.406]) * 255
STD = torch.tensor([0.229, 0.224, 0.225]) * 255
WEIGHTS_FILE = "model.safetensors"
CLASSES_FILE = "classes.json"


_ON_DEVICE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """MEAN and STD as [1,3,1,1] on `device`, copied there once per process (not per batch)."""
    if device not in _ON_DEVICE:
        _ON_DEVICE[device] = (MEAN.to(device).view(1, 3, 1, 1), STD.to(device).view(1, 3, 1, 1))
    return _ON_DEVICE[device]


def normalize(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 [N,3,H,W] on the device -> normalised float; done on the device, not in workers.
    One float tensor, in the wanted memory format, normalised in place."""
    mean, std = _mean_std(images.device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = images.to(dtype=torch.float32, memory_format=layout, copy=True)  # never the input
    return x.sub_(mean).div_(std)


def batch_images(batch, device: torch.device, params) -> tuple[torch.Tensor, list[int] | None]:
    """The batch's uint8 images on the device: copied (data.decode=cpu: workers decoded them)
    or decoded there from the JPEG bytes and crop boxes the workers handed over (=device);
    and the indices of the samples they are (None: all)."""
    from resnet.data.augment import decode_on_device

    if batch.images is not None:
        return batch.images.to(device, non_blocking=True), None
    images, kept = decode_on_device(batch, device, params)
    return images, (None if len(kept) == len(batch) else kept)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, autocast, reduce_sum,
             channels_last: bool = False, on_batch=None) -> dict:
    """`reduce_sum(tensor)` sums over ranks; `on_batch(batch, images, logits)` sees each batch
    (images: uint8 on the device, however they were decoded)."""
    was_training = model.training
    model.eval()
    from resnet.train.prefetch import DeviceFeed

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


def export_final(model: nn.Module, manifest: Manifest, out_dir: Path) -> Path:
    """torchvision-compatible weights + the class list next to them."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() if v.is_floating_point()
             else v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out_dir / f".{WEIGHTS_FILE}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt", "arch_hint": "torchvision"})
    tmp.replace(out_dir / WEIGHTS_FILE)
    classes = [{"index": c.index, "id": c.id, "name": c.name} for c in manifest.classes]
    (out_dir / CLASSES_FILE).write_text(json.dumps(classes, indent=1))
    return out_dir / WEIGHTS_FILE


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Final weights (a .safetensors file or its folder) or a training checkpoint folder."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir() and (path / WEIGHTS_FILE).is_file():
        path = path / WEIGHTS_FILE
    if path.is_file() and path.suffix == ".safetensors":
        return load_file(str(path))
    deepspeed_file = path / "pytorch_model" / "mp_rank_00_model_states.pt"
    if deepspeed_file.is_file():
        return _load_tensors_only(deepspeed_file)["module"]
    for name in ("model.safetensors", "pytorch_model.bin"):  # accelerate's DDP layout
        if (path / name).is_file():
            return load_weights(path / name) if name.endswith("safetensors") else \
                _load_tensors_only(path / name)
    raise FileNotFoundError(f"no weights at {path}: expected a .safetensors file, a run's "
                            f"final/ folder or a checkpoint folder")


def _load_tensors_only(path: Path) -> dict:
    """torch.load with weights_only=True: tensors, containers and plain values, never code.
    (Resuming training from a checkpoint is different: DeepSpeed unpickles its files in full,
    so a checkpoint folder or mirror must be as trusted as the code; docs/operations.md.)"""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"refusing to load {path}: it holds more than tensors and plain "
                         f"values, and unpickling it could run code "
                         f"({str(exc).splitlines()[-1] if str(exc) else type(exc).__name__})"
                         ) from None


def run_dir_of(weights: Path) -> Path | None:
    """A run's final/ or checkpoint folder sits under run.dir, whose config.yaml says how the
    model was built and how its images were prepared."""
    return next((folder for folder in (weights, *weights.parents)[:4]
                 if (folder / "config.yaml").is_file()), None)


def run_config(weights: Path):
    from resnet.config import load_saved_config

    folder = run_dir_of(weights)
    return load_saved_config(folder / "config.yaml") if folder else None


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
