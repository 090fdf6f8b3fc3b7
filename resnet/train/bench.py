"""`resnet bench train`: training throughput, the model step alone and end to end, in one run.

    resnet bench train [--data SHARDS] [--arch resnet50] [--batch-size 256] [--image-size 224]
        [--steps 20] [--warmup 10] [--repeats 3] [--configs fp32,bf16_cl,...] [--compile]
        [--e2e cpu,device] [--workers N] [--json PATH]

Synthetic configurations: a fixed uint8 batch already on the device goes through what the
trainer does per micro-batch (normalise, forward, label-smoothed cross-entropy, backward, SGD
with momentum and its parameter groups). The engine ones (`accelerate_ddp`,
`deepspeed_zero0`, their `_compile` variants) build the model, optimizer and
`resnet.train.engine.create_engine` from a `resnet.config` Config as `resnet train` does.

End to end (`e2e_cpu`, `e2e_device`, with `--data`): the real shard loader (data.decode cpu:
workers decode and crop; device: workers hand over JPEG bytes, the device decodes) through
the trainer's DeviceFeed (pinned, copied on a side stream on CUDA) into the same engine step
as `resnet train` (`--e2e-engine`, DeepSpeed ZeRO-0 by default).

Honest timing, airbench-style: warm-up steps (cuDNN autotuning, torch.compile, allocator
growth, the loader's first prefetch) are excluded; each repeat of `--steps` steps is bounded
by CUDA events (on CPU by perf_counter; CPU ops are synchronous), one event per step for the
step-time percentiles, no sync inside the timed region; the figure is the median img/s over
the repeats. Data wait: host time spent waiting for the next batch, as a fraction of the
timed wall time. Peak memory: the CUDA allocator's peak, or on CPU the process's peak RSS.
Each configuration runs in its own child process: Accelerate keeps process-wide state (one
Accelerator per process), and a fresh process also gives every configuration a clean
allocator and compile cache. A configuration that fails prints its error and the others still
run; the exit status is then 1.
"""
from __future__ import annotations

import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from resnet.envinfo import version as _version

ENGINES = {"accelerate_ddp": "ddp", "deepspeed_zero0": "deepspeed"}
CONFIGS = {
    "fp32": "plain fp32, NCHW (CUDA: cuDNN's TF32 default)",
    "bf16": "plain, bf16 autocast, NCHW",
    "bf16_cl": "plain, bf16 autocast, channels_last weights + input",
    "bf16_cl_compile": "plain, bf16 autocast, channels_last, torch.compile",
    "accelerate_ddp": "create_engine: Accelerate DDP-type, bf16, channels_last weights + input",
    "accelerate_ddp_compile": "accelerate_ddp with train.compile=true",
    "deepspeed_zero0": "create_engine: Accelerate + DeepSpeed ZeRO-0, torch_autocast bf16, "
                       "NCHW weights, channels_last input",
    "deepspeed_zero0_compile": "deepspeed_zero0 with train.compile=true",
    "e2e_cpu": "end to end from shards, data.decode=cpu, through the e2e engine",
    "e2e_device": "end to end from shards, data.decode=device, through the e2e engine",
}
DEFAULT_CONFIGS = ["fp32", "bf16", "bf16_cl", "accelerate_ddp", "deepspeed_zero0"]
COMPILED = ["bf16_cl_compile", "deepspeed_zero0_compile"]
RESULT_TAG = "BENCH_TRAIN_RESULT "  # the child's one line of JSON on stdout


# -- the header: hardware and versions -------------------------------------------------------
def _cpu() -> str:
    from resnet.envinfo import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable)"


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else "unknown"
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "no nvidia-smi"


def header(args) -> list[str]:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, driver {_driver()} "
                  f"(CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})")
        timer, memory = "CUDA events", "CUDA allocator peak"
    else:
        device = "no CUDA device: CPU"
        timer, memory = "perf_counter", "peak RSS of the process"
    data = (f"end to end from {args.data} ({args.workers} loader workers, engine "
            f"{args.e2e_engine})" if args.data else "no --data: no end-to-end rows")
    return [
        "# bench train: the training step on synthetic tensors, and end to end from shards",
        f"# device: {device}",
        f"# CPU: {_cpu()}",
        f"# python {platform.python_version()}, torch {torch.__version__}, torchvision "
        f"{_version('torchvision')}, accelerate {_version('accelerate')}, deepspeed "
        f"{_version('deepspeed')}",
        f"# {args.arch}, batch {args.batch_size}, {args.image_size} px, SGD momentum; "
        f"{args.warmup} warm-up steps excluded; median of {args.repeats} repeats x "
        f"{args.steps} steps, timed with {timer}; memory: {memory}",
        f"# {data}",
    ]


# -- one configuration (in the child process) ------------------------------------------------
def _engine_config(args, engine: str, run_dir: str, compile_: bool):
    from resnet.config import load_config

    return load_config(overrides=[
        f"model.arch={args.arch}", f"train.batch_size={args.batch_size}",
        f"data.image_size={args.image_size}", f"deepspeed.engine={engine}",
        "deepspeed.zero_stage=0", "train.precision=bf16", "model.channels_last=true",
        f"train.compile={str(compile_).lower()}", f"train.compile_backend={args.compile_backend}",
        "wandb.mode=disabled", f"run.dir={run_dir}",
        f"seed={args.seed}",
    ])


def build_step(args, name: str, num_classes: int, run_dir: str):
    """(step(images uint8, labels) on the device, device) for one configuration."""
    import torch
    from torch import nn

    from resnet.config import load_config
    from resnet.model import build_model
    from resnet.data.device import normalize
    from resnet.train.optim import build_optimizer

    torch.manual_seed(args.seed)
    compile_ = name.endswith("_compile")
    engine_name = ENGINES.get(name.removesuffix("_compile"))
    if name.startswith("e2e_"):
        engine_name = args.e2e_engine
    if engine_name:
        from resnet.data.plan import MicroLayout
        from resnet.train.engine import create_engine, settle

        cfg = _engine_config(args, engine_name, run_dir, compile_)
        engine = create_engine(settle(cfg), MicroLayout(cfg.train.batch_size, 1, 1))
        device, acc = engine.device, engine.accelerator
        model = build_model(cfg.model.arch, num_classes,
                            zero_init_residual=cfg.model.zero_init_residual)
        if engine.channels_last_weights:  # as the trainer does (never under DeepSpeed)
            model = model.to(memory_format=torch.channels_last)
        if compile_:  # as the trainer does: in place, before the engine wraps it
            model.compile(backend=cfg.train.compile_backend)
        optimizer = build_optimizer(model, cfg.optim, args.batch_size)
        model, optimizer = acc.prepare(model, optimizer)
        channels_last_input = engine.channels_last_input
        autocast = None  # Accelerate (DDP) or DeepSpeed's torch_autocast applies it
    else:
        cfg = load_config(overrides=[f"seed={args.seed}"])
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        acc = None
        channels_last_input = name.startswith("bf16_cl")
        model = build_model(args.arch, num_classes,
                            zero_init_residual=cfg.model.zero_init_residual).to(device)
        if channels_last_input:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, cfg.optim, args.batch_size)
        autocast = None if name == "fp32" else torch.bfloat16
        if compile_:
            model = torch.compile(model, backend=args.compile_backend)
    model.train()
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)

    def step(images, labels) -> None:
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


def _synthetic_batches(args, device, num_classes: int):
    import torch

    gen = torch.Generator().manual_seed(args.seed)
    size = (args.batch_size, 3, args.image_size, args.image_size)
    images = torch.randint(0, 256, size, dtype=torch.uint8, generator=gen).to(device)
    labels = torch.randint(0, num_classes, (args.batch_size,), generator=gen).to(device)
    return itertools.repeat((images, labels))


def _shard_batches(args, name: str, device):
    """(images, labels) on the device from the real loader and the trainer's DeviceFeed,
    epoch after epoch."""
    from resnet.data.stream import AugmentParams, ShardLoader
    from resnet.data.device import DeviceFeed

    augment = AugmentParams(image_size=args.image_size)
    loader = ShardLoader(args.data, "train", rank=0, world_size=1, batch_size=args.batch_size,
                         global_batch=args.batch_size, workers=args.workers, seed=args.seed,
                         train=True, augment=augment, decode=name.removeprefix("e2e_"),
                         pin_memory=device.type == "cuda")
    if loader.batches_per_epoch == 0:
        raise ValueError(f"{args.data} has fewer train samples than one batch ({args.batch_size})")
    feed = DeviceFeed(loader, device)
    for batch in itertools.chain.from_iterable(feed for _ in range(10**6)):
        yield batch.images, batch.labels


def _num_classes(args) -> int:
    if not args.data:
        return args.num_classes
    from resnet.data.format import load_manifest

    return load_manifest(args.data).num_classes


def _peak_gib(cuda: bool) -> float:
    import torch

    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_one(args, name: str) -> dict:
    import torch

    with tempfile.TemporaryDirectory(prefix="bench-train-") as run_dir:
        num_classes = _num_classes(args)
        step, device = build_step(args, name, num_classes, run_dir)
        cuda = device.type == "cuda"
        batches = (_shard_batches(args, name, device) if name.startswith("e2e_")
                   else _synthetic_batches(args, device, num_classes))
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        t0 = time.perf_counter()
        if "compile" in name:
            print(f"bench train {name}: compiling (the warm-up steps take a while)",
                  file=sys.stderr, flush=True)
        for _ in range(args.warmup):
            step(*next(batches))
        sync()
        warmup_s = time.perf_counter() - t0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rates, waits, step_ms, images = [], [], [], 0
        for _ in range(args.repeats):
            wait, seen = 0.0, 0
            start_wall = time.perf_counter()
            marks = [_mark(cuda)]  # step i: its batch's wait and its compute
            for _ in range(args.steps):
                t = time.perf_counter()
                x, y = next(batches)
                wait += time.perf_counter() - t
                step(x, y)
                marks.append(_mark(cuda))
                seen += len(y)
            wall = time.perf_counter() - start_wall
            if cuda:
                marks[-1].synchronize()
                durations = [a.elapsed_time(b) / 1000 for a, b in zip(marks, marks[1:])]
            else:
                durations = [b - a for a, b in zip(marks, marks[1:])]
            rates.append(seen / sum(durations))
            waits.append(wait / wall)
            step_ms += [d * 1000 for d in durations]
            images = seen
        q = statistics.quantiles(step_ms, n=100, method="inclusive")
        return {
            "config": name, "img_per_s": statistics.median(rates), "min": min(rates),
            "max": max(rates), "img_per_s_per_device": statistics.median(rates),
            "devices": 1, "data_wait_frac": statistics.median(waits) if name.startswith("e2e_")
            else None, "p50_ms": q[49], "p90_ms": q[89], "p99_ms": q[98],
            "peak_gib": _peak_gib(cuda), "warmup_s": warmup_s, "images_per_repeat": images,
            "device": str(device),
        }


def _mark(cuda: bool):
    import torch

    if not cuda:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


# -- the parent: one child per configuration, then the table ---------------------------------
def _child_command(args, name: str) -> list[str]:
    argv = [sys.executable, "-m", "resnet", "bench", "train", "--child", name,
            "--arch", args.arch, "--batch-size", str(args.batch_size),
            "--image-size", str(args.image_size), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--repeats", str(args.repeats),
            "--num-classes", str(args.num_classes), "--seed", str(args.seed),
            "--workers", str(args.workers), "--e2e-engine", args.e2e_engine,
            "--compile-backend", args.compile_backend]
    return argv + (["--data", args.data] if args.data else [])


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


TABLE = ("| config | img/s (median) | img/s per device | min .. max | step ms p50 / p90 / p99 "
         "| data wait | peak GiB | warm-up s |\n|---|---|---|---|---|---|---|---|")


def _row(r: dict) -> str:
    if "error" in r:
        first = r["error"].strip().splitlines()[-1][:120]
        return f"| {r['config']} | error | {first} | | | | | |"
    wait = "-" if r["data_wait_frac"] is None else f"{r['data_wait_frac']:.1%}"
    return (f"| {r['config']} | {r['img_per_s']:,.1f} | {r['img_per_s_per_device']:,.1f} | "
            f"{r['min']:,.1f} .. {r['max']:,.1f} | {r['p50_ms']:.1f} / {r['p90_ms']:.1f} / "
            f"{r['p99_ms']:.1f} | {wait} | {r['peak_gib']:.2f} | {r['warmup_s']:.1f} |")


def chosen_configs(args) -> list[str]:
    """The configurations `args` asks for, in order; ValueError naming what is unknown or
    out of range."""
    names = [c for c in args.configs.split(",") if c]
    if args.compile:
        names += [c for c in COMPILED if c not in names]
    unknown = [c for c in names if c not in CONFIGS or c.startswith("e2e_")]
    modes = [m for m in args.e2e.split(",") if m]
    unknown += [f"e2e {m}" for m in modes if m not in ("cpu", "device")]
    if unknown:
        raise ValueError(f"unknown configuration(s) {unknown}; choose from "
                         f"{[c for c in CONFIGS if not c.startswith('e2e_')]} and --e2e "
                         f"cpu,device")
    if min(args.steps, args.repeats, args.batch_size) < 1 or args.warmup < 0:
        raise ValueError("--steps, --repeats and --batch-size must be at least 1, --warmup at "
                         "least 0")
    if args.steps * args.repeats < 2:
        raise ValueError("--steps x --repeats must be at least 2 (step-time percentiles)")
    return names + ([f"e2e_{m}" for m in modes] if args.data else [])


def run(args) -> int:
    names = chosen_configs(args)
    if args.child:
        print(RESULT_TAG + json.dumps(run_one(args, args.child)), flush=True)
        return 0
    lines = header(args)  # (asks nvidia-smi: once)
    print("\n".join(lines), flush=True)
    for name in names:
        print(f"#   {name}: {CONFIGS[name]}", flush=True)
    print(TABLE, flush=True)
    results = []
    for name in names:
        result = run_child(args, name)
        results.append(result)
        print(_row(result), flush=True)
        if "error" in result:
            print(f"# {name} failed: {result['error']}", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": lines, "results": results}, f, indent=1)
    return 1 if any("error" in r for r in results) else 0
