"""Accelerate + DeepSpeed (or DDP) set-up. Every CPU/GPU and engine difference lives here.

Measured on an H200 (see docs/gpu.md): DeepSpeed crashes with
channels_last *weights* and with its own bf16 module cast (BatchNorm running stats), so under
DeepSpeed precision comes from its ``torch_autocast`` section and only the *input* is
channels_last; plain DDP takes channels_last weights and input.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from resnet.config import Config
from resnet.data.plan import MicroLayout

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class SetupError(ValueError):
    """The run cannot start as configured; raised before any process group exists."""


def launched_world_size() -> int:
    """World size from the launcher's environment (1 when started as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def ensure_single_process_env() -> None:
    """A plain `resnet train` (no launcher) still needs a rendezvous for DeepSpeed and gloo."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                      LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")


def micro_layout(global_batch: int, batch_size: int, world_size: int) -> MicroLayout:
    """The global batch over this world size: micro-batches of at most train.batch_size."""
    try:
        return MicroLayout.choose(global_batch, world_size, batch_size)
    except ValueError as exc:
        raise SetupError(f"{exc}; set train.global_batch_size to at least {world_size}") from None


def deepspeed_config(cfg: Config, layout: MicroLayout) -> dict:
    """Our config keys fill a DeepSpeed JSON; a user file (deepspeed.config_file) is the base."""
    ds: dict = {}
    if cfg.deepspeed.config_file:
        path = Path(cfg.deepspeed.config_file)
        if not path.is_file():
            raise SetupError(f"deepspeed.config_file not found: {path}")
        ds = json.loads(path.read_text())
    # DeepSpeed wants micro x accumulation x world == train batch. Ranks may take one sample
    # fewer than the largest micro-batch (the trainer weights each rank's loss so the gradient
    # is the mean over exactly the global batch); these numbers only size its bookkeeping.
    micro = layout.largest
    ds.update(
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=layout.accumulation,
        train_batch_size=micro * layout.accumulation * layout.world_size,
        gradient_clipping=cfg.train.grad_clip,
        zero_allow_untested_optimizer=True,  # our SGD is a client optimizer
        steps_per_print=10**9,  # we log ourselves
    )
    ds.setdefault("zero_optimization", {})["stage"] = cfg.deepspeed.zero_stage
    for key in ("bf16", "fp16"):  # its module cast breaks BatchNorm: we use torch_autocast
        ds.pop(key, None)
    if cfg.train.precision in AUTOCAST_DTYPES:
        if cfg.train.precision == "fp16" and cfg.deepspeed.zero_stage > 0:
            raise SetupError("train.precision=fp16 under DeepSpeed needs deepspeed.zero_stage=0 "
                             "(its autocast loss scaler exists only there); use bf16")
        dtype = "bfloat16" if cfg.train.precision == "bf16" else "float16"
        ds["torch_autocast"] = {"enabled": True, "dtype": dtype}
    return ds


@dataclass
class Engine:
    accelerator: object
    device: torch.device
    uses_deepspeed: bool
    channels_last_weights: bool
    channels_last_input: bool
    precision: str
    control_group: object  # a gloo group for small CPU-side agreements (no GPU sync)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def autocast(self):
        """Autocast for the DDP engine's eval path and for eval of the unwrapped model."""
        dtype = AUTOCAST_DTYPES.get(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def gather(self, item) -> list:
        """Every rank's small picklable `item`, in rank order, over the CPU group."""
        if self.world_size == 1:
            return [item]
        out: list = [None] * self.world_size
        torch.distributed.all_gather_object(out, item, group=self.control_group)
        return out

    def agree(self, *flags: float) -> list[float]:
        """Max of each flag over all ranks, on the CPU: ranks stop or save at the same step."""
        values = torch.tensor(flags, dtype=torch.float64)
        if self.world_size > 1:
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX,
                                         group=self.control_group)
        return values.tolist()


def make_accelerator(*, use_deepspeed: bool = False, **kwargs):
    """The one place an Accelerator is made (training and `resnet eval`): a rendezvous for a
    plain process, the backend, the per-restart process group under torchrun, the CPU flag."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    ensure_single_process_env()
    on_gpu = torch.cuda.is_available()
    backend, timeout = ("nccl" if on_gpu else "gloo"), timedelta(minutes=30)
    _init_elastic_process_group(backend, timeout)
    accelerator = Accelerator(
        # Without cpu=True Accelerate leaves several CPU processes undistributed (type NO: no
        # gradient sync); with it, it drops DeepSpeed, which on CPU finds gloo by itself.
        cpu=not on_gpu and not use_deepspeed,
        # Without the explicit gloo kwarg on CPU, Accelerate reports one process (measured).
        kwargs_handlers=[InitProcessGroupKwargs(backend=backend, timeout=timeout)],
        **kwargs,
    )
    check_distributed(accelerator)
    return accelerator


def create_engine(cfg: Config, layout: MicroLayout, load_universal: bool = False) -> Engine:
    from accelerate.utils import DeepSpeedPlugin

    use_ds = cfg.deepspeed.engine == "deepspeed"
    plugin = None
    mixed = "no"
    if use_ds:
        ds = deepspeed_config(cfg, layout)
        if load_universal:  # ZeRO shards of another world size (resnet/train/universal.py)
            ds.setdefault("checkpoint", {})["load_universal"] = True
        plugin = DeepSpeedPlugin(hf_ds_config=ds)
    elif cfg.train.precision in AUTOCAST_DTYPES:
        if cfg.train.precision == "fp16" and not torch.cuda.is_available():
            # Accelerate would run it as plain fp32 (no autocast, no loss scaler) without a word.
            raise SetupError("train.precision=fp16 with deepspeed.engine=ddp needs CUDA "
                             "(Accelerate has no fp16 autocast or loss scaler on a CPU); use "
                             "bf16, or fp16 under deepspeed.engine=deepspeed with zero_stage=0")
        mixed = cfg.train.precision
    accelerator = make_accelerator(
        use_deepspeed=use_ds,
        deepspeed_plugin=plugin,
        mixed_precision=mixed,
        gradient_accumulation_steps=layout.accumulation,
        log_with=_tracker(cfg),
        project_dir=cfg.run.dir,
        step_scheduler_with_optimizer=False,
    )
    control = None
    if accelerator.num_processes > 1:
        control = torch.distributed.new_group(backend="gloo")
    return Engine(
        accelerator=accelerator,
        device=accelerator.device,
        uses_deepspeed=use_ds,
        channels_last_weights=cfg.model.channels_last and not use_ds,
        channels_last_input=cfg.model.channels_last,
        precision=cfg.train.precision,
        control_group=control,
    )


def check_distributed(accelerator) -> None:
    """Several processes that Accelerate did not distribute would each train alone."""
    from accelerate.utils import DistributedType

    if accelerator.num_processes > 1 and accelerator.distributed_type == DistributedType.NO:
        raise SetupError(f"{accelerator.num_processes} processes, but Accelerate set up no "
                         f"distributed backend; run `resnet env` and report this with it")


def _init_elastic_process_group(backend: str, timeout: timedelta) -> None:
    """Under torchrun, open the default group in a key space of its own per restart.

    torch 2.14's elastic agent keeps one shared TCPStore across restarts
    (TORCHELASTIC_USE_AGENT_STORE=True) and env:// hands workers its raw keys, so a restarted
    gloo group reads the dead attempt's peer addresses ("Gloo connectFullMesh failed ...
    Connection refused"). Accelerate and DeepSpeed use an initialised group as it is.
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on the agents (launch/elastic.sh) avoids the shared
    store altogether: each rendezvous round then gets a fresh store, and this is skipped.
    """
    import torch.distributed as dist

    if dist.is_initialized() or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    if int(os.environ["WORLD_SIZE"]) > int(os.environ.get("LOCAL_WORLD_SIZE", "0")) and \
            os.environ.get("RANK") == "0":
        # Several agents: a node joining later makes every agent exit in its own rendezvous
        # (torch 2.14; docs/operations.md), and each agent counts restarts on its own.
        print("[resnet] warning: a multi-node torchrun job without "
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in every agent's environment cannot "
              "admit a node that joins later; launch/elastic.sh sets it", flush=True)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=timeout)
    from resnet.train.metrics import restart_count

    attempt = restart_count()
    dist.init_process_group(backend, store=dist.PrefixStore(f"resnet/attempt_{attempt}", store),
                            rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)


def _tracker(cfg: Config):
    from resnet.train.metrics import tracker_for

    return tracker_for(cfg)
