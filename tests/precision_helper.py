"""Run by tests/test_precision.py in a process of its own (one Accelerator per process): a few
training steps through create_engine as the trainer builds them; prints one JSON line with
the dtypes seen inside the model, of the parameters and BatchNorm buffers, and what moved.

    python tests/precision_helper.py ENGINE PRECISION STEPS RUN_DIR
"""
from __future__ import annotations

import json
import sys

import torch
from torch import nn

from resnet.config import load_config
from resnet.data.plan import MicroLayout
from resnet.model import build_model
from resnet.train.engine import SetupError, create_engine, settle
from resnet.train.optim import build_optimizer


def main(engine_name: str, precision: str, steps: str, run_dir: str) -> None:
    cfg = load_config(overrides=[
        f"deepspeed.engine={engine_name}", f"train.precision={precision}", "model.arch=resnet18",
        "train.batch_size=4", "deepspeed.zero_stage=0", "wandb.mode=disabled",
        f"run.dir={run_dir}"])
    try:
        engine = create_engine(settle(cfg), MicroLayout(4, 1, 1))
    except SetupError as exc:
        print("PRECISION " + json.dumps({"setup_error": str(exc)}), flush=True)
        return
    acc = engine.accelerator
    torch.manual_seed(0)
    model = build_model("resnet18", 4)
    if engine.channels_last_weights:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim, 4)
    model, optimizer = acc.prepare(model, optimizer)
    inner = acc.unwrap_model(model)
    seen: set[str] = set()
    inner.layer1.register_forward_hook(lambda m, i, o: seen.add(str(o.dtype).split(".")[-1]))
    weights = {n: p.detach().clone() for n, p in inner.named_parameters()}
    running = inner.bn1.running_mean.clone()
    x = torch.randn(4, 3, 32, 32).to(engine.device)
    y = torch.arange(4).to(engine.device)
    for _ in range(int(steps)):
        with acc.accumulate(model):
            loss = nn.functional.cross_entropy(model(x).float(), y)
            acc.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    scaler = getattr(model, "torch_autocast_z0_gradscaler", None) or acc.scaler
    print("PRECISION " + json.dumps({
        "inside": sorted(seen),
        "params": sorted({str(p.dtype).split(".")[-1] for p in inner.parameters()}),
        "bn_buffers": sorted({str(b.dtype).split(".")[-1] for m in inner.modules()
                              if isinstance(m, nn.BatchNorm2d)
                              for b in (m.running_mean, m.running_var)}),
        "weights_moved": sum(not torch.equal(weights[n], p) for n, p in inner.named_parameters()),
        "bn_stats_moved": not torch.equal(running, inner.bn1.running_mean),
        "loss_finite": bool(torch.isfinite(loss)),
        "loss_scale": None if scaler is None else scaler.get_scale(),
    }), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
