"""`resnet env`: what a bug report needs to know about this machine."""
from __future__ import annotations

import importlib.metadata
import platform

LIBRARIES = ("torch", "torchvision", "accelerate", "deepspeed", "transformers", "webdataset",
             "wandb", "boto3", "omegaconf")


def version(name: str) -> str:
    """The installed version of a distribution, or 'not installed'."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    """The CPU's model name (for benchmark headers)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def environment_report() -> str:
    import torch

    lines = [f"python       {platform.python_version()} ({platform.machine()})"]
    lines += [f"{name:<12} {version(name)}" for name in LIBRARIES]
    lines.append(f"cuda build   {torch.version.cuda or 'none'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i:<7} {props.name}, {props.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("devices      no CUDA device visible; training runs on CPU (gloo)")
    return "\n".join(lines)
