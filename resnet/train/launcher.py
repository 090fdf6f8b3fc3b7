"""What a user gave `accelerate launch` (its flags, --config_file, or the default config file
that `accelerate config` writes), taken into our config.

The launcher hands its settings to the processes as ``ACCELERATE_*`` variables
(accelerate/utils/launch.py). Each fills our matching key where the YAML and the ``key=value``
overrides leave it unset; a key set there with another value stops the run, before any process
group, naming both. The variables read here are then removed from the environment: Accelerate
would otherwise apply them a second time on its own (an accumulation count overriding ours,
a second torch.compile, a DeepSpeed plugin built from the environment, `--cpu` dropping
DeepSpeed), and the config is the one place that says what runs.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Callable, MutableMapping

from resnet.config import Config
from resnet.train.engine import USE_CPU_ENV, SetupError, launched_world_size, micro_layout


@dataclass(frozen=True)
class LauncherSetting:
    """One launcher setting, as our key and value."""

    flag: str  # the `accelerate launch` flag (the config file's field has the same name)
    env: str
    raw: str  # the variable's text
    key: str  # our dotted key
    value: Any  # our value for it

    def describe(self) -> str:
        shown = "" if self.raw.lower() == "true" else f" {self.raw}"
        return f"accelerate launch {self.flag}{shown} (flag or config file: {self.env}={self.raw})"


def _bool(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes")


def _stage(text: str) -> int:
    stage = int(text)
    if stage not in (0, 1, 2):
        raise ValueError("this trainer supports ZeRO stages 0, 1 and 2")
    return stage


def _precision(text: str) -> str | None:
    # The launcher always sets this variable, "no" when the user gave nothing, so "no" cannot
    # mean fp32 (that is train.precision=fp32).
    value = text.strip().lower()
    if value == "fp8":
        raise ValueError("this trainer runs bf16, fp16 or fp32 (train.precision)")
    return None if value == "no" else value


def _dynamo(text: str) -> str | None:
    value = text.strip().lower()  # always set too: "no" when the user gave nothing
    return None if value == "no" else value


# (variable, flag, our key, parser; a parser returning None means "not given")
_MAPPING: tuple[tuple[str, str, str, Callable[[str], Any]], ...] = (
    ("ACCELERATE_USE_DEEPSPEED", "--use_deepspeed", "deepspeed.engine",
     lambda t: "deepspeed" if _bool(t) else None),
    ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "--zero_stage", "deepspeed.zero_stage", _stage),
    ("ACCELERATE_DEEPSPEED_CONFIG_FILE", "--deepspeed_config_file", "deepspeed.config_file",
     lambda t: None if t in ("", "none") else t),
    ("ACCELERATE_MIXED_PRECISION", "--mixed_precision", "train.precision", _precision),
    ("ACCELERATE_GRADIENT_CLIPPING", "--gradient_clipping", "train.grad_clip", float),
    ("ACCELERATE_DYNAMO_BACKEND", "--dynamo_backend", "train.compile_backend", _dynamo),
)
ACCUMULATION_ENV = "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"
# Read by Accelerate itself; ours decide instead (see the module docstring).
CONSUMED = tuple(env for env, *_ in _MAPPING) + (
    ACCUMULATION_ENV, "ACCELERATE_CONFIG_DS_FIELDS", "ACCELERATE_DYNAMO_MODE",
    "ACCELERATE_DYNAMO_USE_FULLGRAPH", "ACCELERATE_DYNAMO_USE_DYNAMIC")
_UNSUPPORTED = ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
                "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")


def read_settings(environ: MutableMapping[str, str]) -> list[LauncherSetting]:
    """The launcher's settings that map to our keys (the launcher's defaults left out)."""
    for env in _UNSUPPORTED:
        if environ.get(env, "none").lower() != "none":
            flag = "--" + env.removeprefix("ACCELERATE_DEEPSPEED_").lower()
            raise SetupError(f"accelerate launch {flag} {environ[env]} ({env}): this trainer "
                             f"does not offload; drop it from the flags or the accelerate config")
    found = []
    for env, flag, key, parse in _MAPPING:
        if env not in environ:
            continue
        try:
            value = parse(environ[env])
        except ValueError as exc:
            raise SetupError(f"accelerate launch {flag} {environ[env]} ({env}): {exc}") from None
        if value is not None:
            found.append(LauncherSetting(flag, env, environ[env], key, value))
    if any(s.key == "train.compile_backend" for s in found):  # a dynamo backend means compile
        backend = next(s for s in found if s.key == "train.compile_backend")
        found.append(LauncherSetting(backend.flag, backend.env, backend.raw, "train.compile", True))
    return found


def _text(value: Any) -> str:
    """A value as it is written in YAML and key=value."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _conflict(setting: LauncherSetting, ours: Any, where: str) -> SetupError:
    return SetupError(f"{setting.describe()} means {setting.key}={_text(setting.value)}, but "
                      f"{setting.key}={_text(ours)} is set in {where}: drop {setting.flag} from the "
                      f"launch command or its config file, or {setting.key} from {where}, or "
                      f"make them the same")


def _accumulation(cfg: Config, environ, explicit: dict[str, str]) -> LauncherSetting | None:
    """The launcher's accumulation count as a global batch (ours is derived from it), or a
    conflict with train.global_batch_size."""
    raw = environ.get(ACCUMULATION_ENV)
    if raw is None:
        return None
    flag = "--gradient_accumulation_steps"
    if not raw.isdigit() or int(raw) < 1:
        raise SetupError(f"accelerate launch {flag} {raw} ({ACCUMULATION_ENV}): not a count >= 1")
    steps, world = int(raw), launched_world_size()
    wanted = cfg.train.batch_size * world * steps
    if cfg.train.global_batch_size:
        layout = micro_layout(cfg.train.global_batch_size, cfg.train.batch_size, world)
        if layout.accumulation != steps:
            where = explicit.get("train.global_batch_size", "the config")
            raise SetupError(
                f"accelerate launch {flag} {raw} ({ACCUMULATION_ENV}) contradicts "
                f"train.global_batch_size={cfg.train.global_batch_size} set in {where}, which "
                f"takes {layout.accumulation} accumulation step(s) of train.batch_size="
                f"{cfg.train.batch_size} on {world} process(es): drop {flag}, or set "
                f"train.global_batch_size={wanted}")
        return None
    return LauncherSetting(flag, ACCUMULATION_ENV, raw, "train.global_batch_size", wanted)


def adopt(cfg: Config, explicit: dict[str, str],
          environ: MutableMapping[str, str] | None = None) -> tuple[Config, list[str]]:
    """A copy of cfg with the launcher's settings where `explicit` (config.explicit_keys)
    leaves a key unset, and one note per setting taken, for the first log line. Raises
    SetupError on a real conflict. Removes the variables it read from `environ`."""
    environ = os.environ if environ is None else environ
    out, notes = copy.deepcopy(cfg), []
    settings = read_settings(environ)
    accumulation = _accumulation(cfg, environ, explicit)
    for setting in settings + ([accumulation] if accumulation else []):
        group, name = setting.key.split(".")
        ours = getattr(getattr(cfg, group), name)
        if setting.key in explicit and ours != setting.value:
            raise _conflict(setting, ours, explicit[setting.key])
        if setting.key not in explicit:
            setattr(getattr(out, group), name, setting.value)
            notes.append(f"{setting.key}={_text(setting.value)} from {setting.describe()}")
    if _bool(environ.get(USE_CPU_ENV, "")):  # engine.make_accelerator acts on it
        notes.append(f"the CPU from accelerate launch --cpu ({USE_CPU_ENV})")
    for env in CONSUMED:
        environ.pop(env, None)
    return out, notes
