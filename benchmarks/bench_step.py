"""Training-step throughput of our ResNet on synthetic tensors, one figure per configuration.

    python benchmarks/bench_step.py [--arch resnet50] [--batch-size 256] [--image-size 224]
        [--steps 20] [--warmup 10] [--repeats 3] [--configs fp32,bf16_cl,...] [--compile]

No data loading: a fixed uint8 batch already on the device goes through what the trainer does
per micro-batch (normalise, forward, label-smoothed cross-entropy, backward, SGD with momentum
and its parameter groups). The engine configurations build the model, optimizer and
`resnet.train.engine.create_engine` from a `resnet.config` Config exactly as `resnet train`
does, so they measure what training runs.

Honest timing, airbench-style: warm-up steps (cuDNN autotuning, torch.compile, allocator
growth) are excluded; each repeat of `--steps` steps is bounded by CUDA events (on CPU by
perf_counter; CPU ops are synchronous); the figure is the mean img/s over the repeats, the
spread is their min..max. Each configuration runs in its own child process: Accelerate keeps
process-wide state (one Accelerator per process), and a fresh process also gives every
configuration a clean allocator and compile cache. A configuration that fails prints its error
and the others still run; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from resnet.envinfo import version as _version

CONFIGS = {
    "fp32": "plain fp32, NCHW (CUDA: cuDNN's TF32 default)",
    "bf16": "plain, bf16 autocast, NCHW",
    "bf16_cl": "plain, bf16 autocast, channels_last weights + input",
    "bf16_cl_compile": "plain, bf16 autocast, channels_last, torch.compile",
    "accelerate_ddp": "create_engine: Accelerate DDP-type, bf16, channels_last weights + input",
    "deepspeed_zero0": "create_engine: Accelerate + DeepSpeed ZeRO-0, torch_autocast bf16, "
                       "NCHW weights, channels_last input",
}
DEFAULT_CONFIGS = ["fp32", "bf16", "bf16_cl", "accelerate_ddp", "deepspeed_zero0"]
RESULT_TAG = "BENCH_STEP_RESULT "  # the child's one line of JSON on stdout


# -- the header: hardware and versions -------------------------------------------------------
def _cpu() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable)"


def header(args) -> list[str]:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = (f"{props.name}, {props.total_memory / 2**30:.0f} GiB "
                  f"(CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})")
        timer = "CUDA events"
    else:
        device = "no CUDA device: CPU"
        timer = "perf_counter"
    return [
        "# bench_step: model step on synthetic tensors (no data loading)",
        f"# device: {device}",
        f"# CPU: {_cpu()}",
        f"# python {platform.python_version()}, torch {torch.__version__}, torchvision "
        f"{_version('torchvision')}, accelerate {_version('accelerate')}, deepspeed "
        f"{_version('deepspeed')}",
        f"# {args.arch}, batch {args.batch_size}, {args.image_size} px, {args.num_classes} "
        f"classes, SGD momentum; {args.warmup} warm-up steps excluded; mean of "
        f"{args.repeats} repeats x {args.steps} steps, timed with {timer}",
    ]


# -- one configuration (in the child process) ------------------------------------------------
def _engine_config(args, name: str, run_dir: str):
    from resnet.config import load_config

    engine = {"accelerate_ddp": "ddp", "deepspeed_zero0": "deepspeed"}[name]
    return load_config(overrides=[
        f"model.arch={args.arch}", f"train.batch_size={args.batch_size}",
        f"data.image_size={args.image_size}", f"deepspeed.engine={engine}",
        "deepspeed.zero_stage=0", "train.precision=bf16", "model.channels_last=true",
        "wandb.mode=disabled", f"run.dir={run_dir}", f"seed={args.seed}",
    ])


def build_step(args, name: str, device_hint: str, run_dir: str):
    """(step function, device, setup description) for one configuration."""
    import torch
    from torch import nn

    from resnet.config import load_config
    from resnet.model import build_model
    from resnet.train.evaluate import normalize
    from resnet.train.optim import build_optimizer

    torch.manual_seed(args.seed)
    if name in ("accelerate_ddp", "deepspeed_zero0"):
        from resnet.data.plan import MicroLayout
        from resnet.train.engine import create_engine

        cfg = _engine_config(args, name, run_dir)
        engine = create_engine(cfg, MicroLayout(cfg.train.batch_size, 1, 1))
        device, acc = engine.device, engine.accelerator
        model = build_model(cfg.model.arch, args.num_classes,
                            zero_init_residual=cfg.model.zero_init_residual)
        if engine.channels_last_weights:  # as the trainer does (never under DeepSpeed)
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, cfg.optim, args.batch_size)
        model, optimizer = acc.prepare(model, optimizer)
        channels_last_input = engine.channels_last_input
        autocast = None  # Accelerate (DDP) or DeepSpeed's torch_autocast applies it
    else:
        cfg = load_config(overrides=[f"seed={args.seed}"])
        device = torch.device(device_hint)
        acc = None
        channels_last_input = name.startswith("bf16_cl")
        model = build_model(args.arch, args.num_classes,
                            zero_init_residual=cfg.model.zero_init_residual).to(device)
        if channels_last_input:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, cfg.optim, args.batch_size)
        autocast = None if name == "fp32" else torch.bfloat16
        if name.endswith("_compile"):
            model = torch.compile(model)
    model.train()
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    gen = torch.Generator().manual_seed(args.seed)
    size = (args.batch_size, 3, args.image_size, args.image_size)
    images = torch.randint(0, 256, size, dtype=torch.uint8, generator=gen).to(device)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=gen).to(device)

    def step() -> None:
        # The trainer's train_step for one micro-batch (resnet/train/trainer.py).
        x = normalize(images, channels_last_input)
        if acc is not None:
            with acc.accumulate(model):
                loss = criterion(model(x).float(), labels)
                acc.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return
        if autocast is None:
            logits = model(x)
        else:
            with torch.autocast(device.type, dtype=autocast):
                logits = model(x)
        criterion(logits.float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, device


def run_one(args, name: str) -> dict:
    import torch

    device_hint = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="bench-step-") as run_dir:
        step, device = build_step(args, name, device_hint, run_dir)
        cuda = device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step()
        sync()
        warmup_s = time.perf_counter() - t0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds = []
        for _ in range(args.repeats):
            if cuda:
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                for _ in range(args.steps):
                    step()
                end.record()
                end.synchronize()
                seconds.append(start.elapsed_time(end) / 1000)
            else:
                t = time.perf_counter()
                for _ in range(args.steps):
                    step()
                seconds.append(time.perf_counter() - t)
        rates = [args.batch_size * args.steps / s for s in seconds]
        return {
            "config": name, "img_per_s": sum(rates) / len(rates), "min": min(rates),
            "max": max(rates), "ms_per_step": 1000 * sum(seconds) / len(seconds) / args.steps,
            "warmup_s": warmup_s, "device": str(device),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        }


# -- the parent: one child per configuration, then the table ---------------------------------
def _child_command(args, name: str) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--child", name,
            "--arch", args.arch, "--batch-size", str(args.batch_size),
            "--image-size", str(args.image_size), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--repeats", str(args.repeats),
            "--num-classes", str(args.num_classes), "--seed", str(args.seed)]
    return argv


def run_child(args, name: str) -> dict:
    try:
        proc = subprocess.run(_child_command(args, name), capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"config": name, "error": f"timed out after {args.timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    return {"config": name, "error": f"exit status {proc.returncode}:\n{tail}"}


def _row(r: dict) -> str:
    if "error" in r:
        first = r["error"].strip().splitlines()[-1][:120]
        return f"| {r['config']} | error | | | | {first} |"
    peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
    return (f"| {r['config']} | {r['img_per_s']:,.1f} | {r['min']:,.1f} .. {r['max']:,.1f} | "
            f"{r['ms_per_step']:.1f} | {peak} | warm-up {r['warmup_s']:.1f} s |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help=f"comma-separated, of: {', '.join(CONFIGS)}")
    p.add_argument("--compile", action="store_true", help="add bf16_cl_compile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--child", metavar="CONFIG", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = [c for c in args.configs.split(",") if c]
    if args.compile and "bf16_cl_compile" not in names:
        names.append("bf16_cl_compile")
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    if min(args.steps, args.repeats, args.batch_size) < 1 or args.warmup < 0:
        p.error("--steps, --repeats and --batch-size must be at least 1, --warmup at least 0")
    args.names = names
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(RESULT_TAG + json.dumps(run_one(args, args.child)), flush=True)
        return 0
    print("\n".join(header(args)), flush=True)
    for name in args.names:
        print(f"#   {name}: {CONFIGS[name]}", flush=True)
    print("| config | img/s (mean) | min .. max | ms/step | peak GiB | note |\n"
          "|---|---|---|---|---|---|", flush=True)
    results = []
    for name in args.names:
        result = run_child(args, name)
        results.append(result)
        print(_row(result), flush=True)
        if "error" in result:
            print(f"# {name} failed: {result['error']}", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header(args), "results": results}, f, indent=1)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
