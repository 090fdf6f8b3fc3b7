"""ZeRO-1/2 checkpoints on another world size, through DeepSpeed's universal checkpoint.

A ZeRO-1/2 checkpoint holds each rank's slice of the flat fp32 weights and of the optimizer
state; DeepSpeed loads it only at the world size that wrote it. Its universal format holds
every parameter whole and loads at any world size (``"checkpoint": {"load_universal": true}``
at engine init). DeepSpeed's converter (``python -m deepspeed.checkpoint.ds_to_universal``)
knows only Adam's state (``exp_avg``, ``exp_avg_sq``): our SGD's ``momentum_buffer`` stops it
with ``KeyError: 'exp_avg'``. So this module writes the same layout for any per-element
optimizer state, into the checkpoint itself (it stays loadable as it was):

    step-NNNNNNNNN/pytorch_model/
        mp_rank_00_model_states.pt, zero_pp_rank_R_...  as written (ZeRO, world size N)
        zero/<param>/fp32.pt                    {"param": the whole fp32 weight}
        zero/<param>/<state>.pt                 {"param": the whole momentum_buffer, ...}
        zero/optimizer_state.pt                 the optimizer's global state and param_groups
        universal.json                          written last: the conversion is complete

Rank 0 converts once (``.tmp-zero`` renamed to ``zero``, then ``universal.json``) after the
process group exists, while the other ranks wait; with ``checkpoint.mirror`` the result is
uploaded there too (``universal.json`` last); resume.py orchestrates that and the loading.
Universal loading restores parameters and optimizer state but not the module's buffers
(BatchNorm statistics): ``restore_buffers`` restores those from the model states file.
Checkpoints declare ``universal_checkpoint_info`` (DeepSpeed's marker that the client wrote
what conversion needs; ``declare``): one without it predates this and is refused with what
works instead.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from resnet.checkpoint.errors import ResumeError
from resnet.checkpoint.files import TMP_PREFIX, fsync, fsync_tree, write_atomic
from resnet.data import storage

MODEL_DIR = "pytorch_model"  # Accelerate's tag folder for the (first) DeepSpeed model
MODEL_STATES = "mp_rank_00_model_states.pt"
DONE = "universal.json"
# deepspeed.checkpoint.constants, spelled out so that preflight need not import DeepSpeed.
INFO_KEY, VERSION_KEY, VERSION = "universal_checkpoint_info", "universal_checkpoint_version", 0.4


def declare(model: torch.nn.Module) -> None:
    """Make DeepSpeed write ``universal_checkpoint_info`` into every checkpoint of `model`.

    DeepSpeed's engine saves this attribute of the module as that client state (AutoTP sets it
    the same way). Our parameters are whole on every rank (data parallel only), so the
    default (no tensor-parallel merge patterns) describes them."""
    setattr(model, INFO_KEY, {VERSION_KEY: VERSION})


def needs_conversion(saved: dict, world_size: int) -> bool:
    """A ZeRO-1/2 checkpoint (its saved progress) written by another world size."""
    return saved["zero_stage"] > 0 and saved["world_size"] != world_size


def is_converted(checkpoint: Path) -> bool:
    return (checkpoint / MODEL_DIR / DONE).is_file()


def check_convertible(checkpoint: Path, saved: dict, world_size: int) -> None:
    """Refuse, saying why and what works, a ZeRO checkpoint that cannot be converted."""
    if is_converted(checkpoint):
        return
    old, new = saved["world_size"], world_size
    head = (f"{checkpoint} holds ZeRO-{saved['zero_stage']} optimizer shards for {old} "
            f"processes, and this run has {new}")
    fix = (f"Restart with {old} processes: it resumes there as it is (and checkpoints "
           f"written from then on convert to any world size)")
    model_dir = checkpoint / MODEL_DIR
    missing = [name for name in [MODEL_STATES] + [_shard_name(r) for r in range(old)]
               if not (model_dir / name).is_file()]
    if missing:
        raise ResumeError(f"{head}, and {len(missing)} of its files are not in this run.dir "
                          f"(e.g. {model_dir / missing[0]}), so it cannot be converted here. "
                          f"ZeRO-1/2 need a run.dir every node shares. {fix}.")
    states = torch.load(model_dir / MODEL_STATES, map_location="cpu", weights_only=False,
                        mmap=True)
    if INFO_KEY not in states:
        raise ResumeError(f"{head}. It was written before checkpoints carried DeepSpeed's "
                          f"{INFO_KEY}, so it cannot be converted to another world size "
                          f"(neither here nor with DeepSpeed's ds_to_universal). {fix}.")


def loads_universal(model: Any) -> bool:
    """Whether the prepared DeepSpeed engine `model` was started to load universal checkpoints
    (``"checkpoint": {"load_universal": true}``: decided in preflight, before it existed)."""
    return bool(getattr(model, "load_universal_checkpoint", lambda: False)())


def convert(checkpoint: Path, mirror: str = "") -> float:
    """Write DeepSpeed's universal layout into `checkpoint` (see the module docstring)."""
    started = time.perf_counter()
    model_dir = checkpoint / MODEL_DIR
    tmp, final = model_dir / f"{TMP_PREFIX}zero", model_dir / "zero"
    shutil.rmtree(tmp, ignore_errors=True)
    states = torch.load(model_dir / MODEL_STATES, map_location="cpu", weights_only=False)
    world = states["dp_world_size"]
    shards = [torch.load(model_dir / _shard_name(r), map_location="cpu",
                         weights_only=False)["optimizer_state_dict"] for r in range(world)]
    for group, shapes in enumerate(states["param_shapes"]):
        for name, shape in shapes.items():
            for key, tensor in _whole(shards, group, name, shape).items():
                (tmp / name).mkdir(parents=True, exist_ok=True)
                torch.save({"param": tensor}, tmp / name / f"{key}.pt")
    sharded = ("base_optimizer_state", "single_partition_of_fp32_groups", "param_slice_mappings")
    common = {k: v for k, v in shards[0].items() if k not in sharded}
    common["param_groups"] = shards[0]["base_optimizer_state"]["param_groups"]
    torch.save(common, tmp / "optimizer_state.pt")
    fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)  # a conversion cut short before its marker
    os.replace(tmp, final)
    seconds = time.perf_counter() - started
    done = json.dumps({"from_world_size": world, "seconds": round(seconds, 3)})
    if mirror:
        remote = storage.join(mirror, checkpoint.name, MODEL_DIR)
        storage.upload_dir(str(final), storage.join(remote, "zero"))
        storage.write_bytes(storage.join(remote, DONE), done.encode())
    write_atomic(model_dir / DONE, done)
    fsync(model_dir)
    return seconds


def _whole(shards: list, group: int, name: str, shape) -> dict[str, torch.Tensor]:
    """Parameter `name`'s fp32 weight and optimizer states, whole, from every rank's slice."""
    pieces: dict[str, list] = {}
    for rank, shard in enumerate(shards):
        where = shard["param_slice_mappings"][group].get(name)
        if where is None:  # this rank holds none of it
            continue
        flat = {"fp32": shard["single_partition_of_fp32_groups"][group],
                **shard["base_optimizer_state"]["state"].get(group, {})}
        for key, value in flat.items():
            if not (torch.is_tensor(value) and value.dim() == 1):
                raise ValueError(f"optimizer state {key!r} of rank {rank} is not per element; "
                                 f"only such states (SGD's momentum) convert")
            pieces.setdefault(key, []).append(value.narrow(0, where.start, where.numel))
    numel = torch.Size(shape).numel()
    whole = {key: torch.cat(parts).clone() for key, parts in pieces.items()}
    for key, tensor in whole.items():
        if tensor.numel() != numel:
            raise ValueError(f"{name} {key}: the ranks' slices hold {tensor.numel()} elements, "
                             f"its shape {tuple(shape)} has {numel}")
        whole[key] = tensor.view(shape)
    return whole


def restore_buffers(model: torch.nn.Module, checkpoint: Path) -> None:
    """Universal loading restores parameters only: BatchNorm statistics come from the model
    states file of `checkpoint`."""
    states_file = checkpoint / MODEL_DIR / MODEL_STATES
    states = torch.load(states_file, map_location="cpu", weights_only=False)
    buffers = {name: states["module"][name] for name in states["buffer_names"]}
    result = model.load_state_dict(buffers, strict=False)
    if result.unexpected_keys:
        raise ResumeError(f"{states_file}: buffers {result.unexpected_keys[:3]} are not in the "
                          f"model")


def _shard_name(rank: int) -> str:
    return f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"

