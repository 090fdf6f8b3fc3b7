"""Accelerate + DeepSpeed (or DDP) set-up. Every CPU/GPU and engine difference lives here.

Measured on an H200 (see docs/gpu.md): DeepSpeed crashes with
channels_last *weights* and with its own bf16 module cast (BatchNorm running stats), so under
DeepSpeed precision comes from its ``torch_autocast`` section and only the *input* is
channels_last; plain DDP takes channels_last weights and input.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from resnet.config import Config
from resnet.data.plan import MicroLayout
from resnet.logs import RateLimitedLogger
from resnet.train import liveness

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
USE_CPU_ENV = "ACCELERATE_USE_CPU"  # `accelerate launch --cpu`: the CPU even where GPUs are


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


# Our keys that a DeepSpeed JSON can also set, and what runs when neither sets them.
UNSET_DEFAULTS = {"train.precision": "bf16", "train.grad_clip": 0.0, "deepspeed.zero_stage": 0}
_DTYPE_NAMES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16",
                "half": "fp16"}


def _user_json(cfg: Config) -> dict:
    if cfg.deepspeed.engine != "deepspeed" or not cfg.deepspeed.config_file:
        return {}
    path = Path(cfg.deepspeed.config_file)
    if not path.is_file():
        raise SetupError(f"deepspeed.config_file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SetupError(f"deepspeed.config_file={path}: not JSON ({exc})") from None


def _json_precision(ds: dict, path: str) -> str | None:
    """The precision a DeepSpeed JSON asks for: torch_autocast, or its bf16/fp16 module cast
    (which breaks BatchNorm, so we run that precision through torch_autocast instead)."""
    found = {}
    autocast = ds.get("torch_autocast")
    if isinstance(autocast, dict) and "enabled" in autocast:
        dtype = autocast.get("dtype", "bfloat16")
        if autocast["enabled"] and str(dtype) not in _DTYPE_NAMES:
            raise SetupError(f"{path}: torch_autocast dtype {dtype!r} is not bfloat16 or float16")
        found["torch_autocast"] = _DTYPE_NAMES[str(dtype)] if autocast["enabled"] else "fp32"
    for key in ("bf16", "fp16"):
        section = ds.get(key)
        if isinstance(section, dict) and section.get("enabled") not in (None, False, "auto"):
            found[key] = key
    if len(set(found.values())) > 1:
        raise SetupError(f"{path}: its sections ask for different precisions: {found}")
    return next(iter(found.values()), None)


def _json_settings(ds: dict, path: str) -> dict:
    """Our keys that the JSON sets ("auto" and absent leave them to us)."""
    stage = (ds.get("zero_optimization") or {}).get("stage")
    clip = ds.get("gradient_clipping")
    return {"train.precision": (_json_precision(ds, path), "torch_autocast"),
            "deepspeed.zero_stage": (None if stage == "auto" else stage,
                                     "zero_optimization.stage"),
            "train.grad_clip": (None if clip == "auto" else clip, "gradient_clipping")}


@dataclass(frozen=True)
class Settled:
    """The config with train.precision, train.grad_clip and deepspeed.zero_stage set to what
    will run, and the DeepSpeed JSON file they were settled against (read once; {} without
    one). `train()` settles once and hands this on to the engine and the batch search."""

    cfg: Config
    user_json: dict


def settle(cfg: Config) -> Settled:
    """Read the DeepSpeed JSON (deepspeed.config_file) and decide the keys both can set: a key
    set in the JSON only comes from it, one set in both places must agree (else SetupError
    naming both), one set nowhere takes UNSET_DEFAULTS."""
    ds, path = _user_json(cfg), cfg.deepspeed.config_file
    out = copy.deepcopy(cfg)
    for dotted, (theirs, json_key) in _json_settings(ds, path).items():
        group, name = dotted.split(".")
        ours = getattr(getattr(cfg, group), name)
        if ours is not None and theirs is not None and ours != theirs:
            raise SetupError(f"{dotted}={ours} but deepspeed.config_file={path} sets "
                             f"{json_key}={theirs}: set it in one place, or the same in both")
        value = ours if ours is not None else theirs
        setattr(getattr(out, group), name, UNSET_DEFAULTS[dotted] if value is None else value)
    if out.deepspeed.zero_stage not in (0, 1, 2):
        raise SetupError(f"{path}: zero_optimization.stage={out.deepspeed.zero_stage}; this "
                         f"trainer supports 0, 1 and 2")
    return Settled(out, ds)


def deepspeed_config(settled: Settled, layout: MicroLayout) -> dict:
    """The DeepSpeed JSON that runs: a user file (deepspeed.config_file) is the base, and
    `settle` decided the keys both can set; the batch bookkeeping is ours."""
    cfg, ds = settled.cfg, copy.deepcopy(settled.user_json)
    # DeepSpeed wants micro x accumulation x world == train batch. Ranks may take one sample
    # fewer than the largest micro-batch (the trainer weights each rank's loss so the gradient
    # is the mean over exactly the global batch); these numbers only size its bookkeeping.
    micro = layout.largest
    ours = dict(
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=layout.accumulation,
        train_batch_size=micro * layout.accumulation * layout.world_size,
        gradient_clipping=cfg.train.grad_clip,
        zero_allow_untested_optimizer=True,  # our SGD is a client optimizer
    )
    for key, value in ours.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise SetupError(f"deepspeed.config_file={cfg.deepspeed.config_file} sets {key}="
                             f"{ds[key]}, but this run needs {value} (from train.batch_size, "
                             f"train.global_batch_size, train.grad_clip and the world size): "
                             f"remove it or set it to \"auto\"")
    ds.update(ours)
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves
    ds.setdefault("zero_optimization", {})["stage"] = cfg.deepspeed.zero_stage
    no_device_syncs(ds, cfg.train.grad_clip)
    for key in ("bf16", "fp16"):  # its module cast breaks BatchNorm: we use torch_autocast
        ds.pop(key, None)
    autocast = ds.pop("torch_autocast", None) or {}
    if cfg.train.precision in AUTOCAST_DTYPES:
        if cfg.train.precision == "fp16" and cfg.deepspeed.zero_stage > 0:
            raise SetupError("train.precision=fp16 under DeepSpeed needs deepspeed.zero_stage=0 "
                             "(its autocast loss scaler exists only there); use bf16")
        dtype = "bfloat16" if cfg.train.precision == "bf16" else "float16"
        ds["torch_autocast"] = {**autocast, "enabled": True, "dtype": dtype}
    return ds


def no_device_syncs(ds: dict, grad_clip: float) -> None:
    """Settings that keep DeepSpeed from stalling the host on the device every step (each
    measured with tests/sync_count_helper.py); a user JSON that sets them explicitly wins.

    - Its throughput timer (on by default, it only feeds a log line we never print) calls the
      accelerator's synchronize() at each forward and each step: on CUDA a
      torch.cuda.synchronize, which also waits for our prefetch stream (3 calls a step with
      2 micro-batches). wall_clock_breakdown's timers synchronise too.
    - ZeRO-1/2 compute the global gradient norm at each step and read it on the host
      (`bool()` on a device tensor) even without clipping; with train.grad_clip=0 nobody uses
      it (non-finite losses and weights are caught by resnet/train/finite.py)."""
    ds.setdefault("timers", {}).setdefault("throughput", {}).setdefault("enabled", False)
    ds.setdefault("wall_clock_breakdown", False)
    zero = ds["zero_optimization"]
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if not grad_clip and zero["stage"] in (1, 2) and offload in (None, "none"):
        zero.setdefault("compute_grad_norm", False)


def describe_running(model, engine: "Engine") -> str:
    """What the prepared model runs, asked of DeepSpeed itself (not of our config)."""
    if not engine.uses_deepspeed:
        return f"engine: DDP, precision {engine.precision}"
    stage = model.zero_optimization_stage()
    precision = "fp32"
    if model.torch_autocast_enabled():
        precision = {dtype: name for name, dtype in AUTOCAST_DTYPES.items()}[
            model.torch_autocast_dtype()]
    if precision != engine.precision:  # settle() and deepspeed_config() disagree: our bug
        raise SetupError(f"DeepSpeed runs precision {precision}, but the run was set up for "
                         f"{engine.precision}")
    return f"engine: DeepSpeed ZeRO-{stage}, precision {precision}"


@dataclass
class Engine:
    accelerator: object
    device: torch.device
    uses_deepspeed: bool
    channels_last_weights: bool
    channels_last_input: bool
    precision: str
    control_group: object  # a gloo group for small CPU-side agreements (no GPU sync)
    membership: liveness.Membership | None = None  # heartbeat and fence (several processes)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def fence(self, what: str) -> None:
        """Before any write a newer group could own (checkpoint, latest, final/, metrics,
        W&B, mirror): return only if this rank still belongs to the current group."""
        if self.membership is not None:
            self.membership.check(what)

    def finish(self) -> None:
        """Training ended normally on this rank: its peers stop watching it."""
        if self.membership is not None:
            self.membership.finish()

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


def make_accelerator(*, use_deepspeed: bool = False, collective_timeout_s: float = 1800.0,
                     **kwargs):
    """The one place an Accelerator is made (training and `resnet eval`): a rendezvous for a
    plain process, the backend, the per-restart process group under torchrun, the CPU flag."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    on_gpu = torch.cuda.is_available() and os.environ.get(USE_CPU_ENV, "").lower() != "true"
    if use_deepspeed and os.environ.get(USE_CPU_ENV, "").lower() == "true":
        if torch.cuda.is_available():
            raise SetupError("accelerate launch --cpu with deepspeed.engine=deepspeed on a "
                             "machine with CUDA devices: DeepSpeed would use them; set "
                             "deepspeed.engine=ddp to train on the CPU, or drop --cpu")
        # Accelerate's own CPU flag drops DeepSpeed; on a CPU we run it over gloo ourselves.
        del os.environ[USE_CPU_ENV]
    ensure_single_process_env()
    backend, timeout = ("nccl" if on_gpu else "gloo"), timedelta(seconds=collective_timeout_s)
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


def create_engine(settled: Settled, layout: MicroLayout, load_universal: bool = False) -> Engine:
    from accelerate.utils import DeepSpeedPlugin

    cfg = settled.cfg
    use_ds = cfg.deepspeed.engine == "deepspeed"
    plugin = None
    mixed = "no"
    if use_ds:
        ds = deepspeed_config(settled, layout)
        if load_universal:  # ZeRO shards of another world size (resnet/checkpoint/universal.py)
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
        collective_timeout_s=cfg.dist.collective_timeout_s,
        deepspeed_plugin=plugin,
        mixed_precision=mixed,
        gradient_accumulation_steps=layout.accumulation,
        log_with=_tracker(cfg),
        project_dir=cfg.run.dir,
        step_scheduler_with_optimizer=False,
    )
    tune_cudnn()
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
        membership=liveness.join(cfg.dist, accelerator.process_index,
                                 accelerator.num_processes, control),
    )


def tune_cudnn() -> None:
    """cuDNN autotuning (it times the convolution algorithms once per input shape and keeps the
    fastest), except where deterministic algorithms are asked for: it may pick another
    algorithm from run to run."""
    torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()


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
        RateLimitedLogger(0).warning("a multi-node torchrun job without "
                                     "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in every agent's "
                                     "environment cannot admit a node that joins later; "
                                     "launch/elastic.sh sets it")
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
