"""`accelerate launch`'s own settings (flags, --config_file) reach the run: used where our
config leaves a key unset, a conflict with a key it sets stops before any process group.

Two processes on the CPU through the real launcher; the mapping's corner cases in-process.
"""
from __future__ import annotations

import sys
import time

import pytest

import trainutil as tu
from resnet.config import explicit_keys, load_config
from resnet.train.engine import SetupError
from resnet.train.launcher import CONSUMED, adopt

# The tiny run, with precision left to the launcher; 2 steps, no evaluation.
TINY = [o for o in tu.TINY if not o.startswith(("train.precision", "audit."))]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tu.shared_data(tmp_path_factory)


def _launch(*launcher_args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *launcher_args,
            "--num_processes", "2", "--num_machines", "1",
            "--main_process_port", str(tu.free_port())]


def _train(data, run_dir, *more: str) -> list[str]:
    return ["-m", "resnet", "train", f"data.train={data}", "data.val=", f"run.dir={run_dir}",
            *TINY, "train.max_steps=2", *more]


@pytest.mark.slow
def test_launch_config_file_and_flags_set_stage_precision_and_accumulation(data, tmp_path):
    """A file as `accelerate config` writes it (DEEPSPEED with a deepspeed_config section,
    which Accelerate itself refuses beside a DeepSpeed config dict unless we take its fields)
    gives the ZeRO stage; flags give precision and accumulation (a flag beats the file's field,
    as in accelerate). One 2-process run proves both sources."""
    config = tmp_path / "accelerate.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
                      "deepspeed_config:\n  gradient_accumulation_steps: 1\n"
                      "  offload_optimizer_device: none\n  offload_param_device: none\n"
                      "  zero3_init_flag: false\n  zero_stage: 1\n"
                      "mixed_precision: 'no'\nnum_machines: 1\nnum_processes: 2\n"
                      "machine_rank: 0\nrdzv_backend: static\nsame_network: true\n"
                      "use_cpu: false\n")
    cmd = _launch("--config_file", str(config), "--mixed_precision", "bf16",
                  "--gradient_accumulation_steps", "2") + _train(data, tmp_path / "run")
    code, out = tu.run(cmd, tmp_path / "log.txt")
    assert code == 0, out[-4000:]
    lines = [line for line in out.splitlines() if "[rank 0] INFO:" in line]
    first = lines[0].split("INFO: ", 1)[1]
    assert first.startswith("from the launcher: "), lines[:3]
    assert "deepspeed.zero_stage=1 from accelerate launch --zero_stage 1" in first
    assert "train.precision=bf16 from accelerate launch --mixed_precision bf16" in first
    assert "train.global_batch_size=32 from accelerate launch --gradient_accumulation_steps 2" \
        in first
    assert "engine: DeepSpeed ZeRO-1, precision bf16" in out
    assert f"world 2: micro-batch {tu.BATCH} x 2 accumulation = 32" in out


def test_a_conflict_stops_both_processes_before_any_process_group(data, tmp_path):
    cmd = _launch("--use_deepspeed", "--zero_stage", "2") + _train(
        data, tmp_path / "run", "deepspeed.zero_stage=0")
    started = time.monotonic()
    code, out = tu.run(cmd, tmp_path / "log.txt")
    assert code != 0, out[-4000:]
    message = ("resnet train: error: accelerate launch --zero_stage 2 (flag or config file: "
               "ACCELERATE_DEEPSPEED_ZERO_STAGE=2) means deepspeed.zero_stage=2, but "
               "deepspeed.zero_stage=0 is set in the command line: "
               "drop --zero_stage from the launch command or its config file")
    assert out.count(message) == 2, out[-4000:]  # each process says it, neither trained
    # No engine, no traceback of ours (the launcher's own reports the exit code 2).
    assert "engine:" not in out and "resnet/" not in out.split("Traceback", 1)[-1]
    assert not (tmp_path / "run" / "checkpoints").exists()
    print(f"conflict reported in {time.monotonic() - started:.1f} s")


# ---------------------------------------------------------------- the mapping, in-process


def _adopt(env: dict, files=(), overrides=("data.train=x",)):
    cfg = load_config(files, overrides)
    return adopt(cfg, explicit_keys(files, overrides), env)


def test_the_launchers_defaults_are_not_settings():
    """`accelerate launch` always sets mixed precision and dynamo ("no" when not given)."""
    env = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO",
           "ACCELERATE_USE_CPU": "False", "ACCELERATE_DYNAMO_MODE": "default"}
    cfg, notes = _adopt(env)
    assert notes == [] and cfg.train.precision is None and cfg.train.compile is False
    assert set(env) == {"ACCELERATE_USE_CPU"}  # what Accelerate would apply again is taken


def test_a_dynamo_backend_compiles_with_it_and_an_explicit_key_wins_when_equal():
    cfg, notes = _adopt({"ACCELERATE_DYNAMO_BACKEND": "EAGER", "ACCELERATE_USE_CPU": "True"})
    assert cfg.train.compile is True and cfg.train.compile_backend == "eager"
    assert any("ACCELERATE_USE_CPU" in n for n in notes)
    cfg, notes = _adopt({"ACCELERATE_MIXED_PRECISION": "fp16"},
                        overrides=("data.train=x", "train.precision=fp16"))
    assert cfg.train.precision == "fp16" and notes == []


@pytest.mark.parametrize("env, overrides, named", [
    ({"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}, ["train.compile=false"],
     "--dynamo_backend INDUCTOR"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, ["deepspeed.engine=ddp"], "--use_deepspeed"),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, ["train.precision=fp32"], "--mixed_precision bf16"),
])
def test_explicit_keys_that_disagree_are_errors_naming_both(env, overrides, named):
    with pytest.raises(SetupError, match=f"accelerate launch {named}.*{overrides[0]}"):
        _adopt(env, overrides=["data.train=x", *overrides])


def test_accumulation_that_contradicts_the_global_batch_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    yaml = tmp_path / "run.yaml"
    yaml.write_text("train:\n  batch_size: 8\n  global_batch_size: 64\n")
    with pytest.raises(SetupError) as err:
        _adopt({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2"}, files=[yaml])
    assert str(err.value) == (
        f"accelerate launch --gradient_accumulation_steps 2 (ACCELERATE_GRADIENT_ACCUMULATION"
        f"_STEPS) contradicts train.global_batch_size=64 set in {yaml}, which takes 4 "
        f"accumulation step(s) of train.batch_size=8 on 2 process(es): drop "
        f"--gradient_accumulation_steps, or set train.global_batch_size=32")
    cfg, _ = _adopt({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, files=[yaml])
    assert cfg.train.global_batch_size == 64


@pytest.mark.parametrize("env, words", [
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "supports ZeRO stages 0, 1 and 2"),
    ({"ACCELERATE_MIXED_PRECISION": "fp8"}, "runs bf16, fp16 or fp32"),
    ({"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, "does not offload"),
])
def test_settings_this_trainer_cannot_run_are_refused(env, words):
    with pytest.raises(SetupError, match=words):
        _adopt(env)


def test_every_consumed_variable_is_one_the_installed_launcher_sets():
    """The names come from accelerate's launch code; a rename there must fail here."""
    import inspect

    from accelerate.utils import launch

    source = inspect.getsource(launch)
    assert [env for env in CONSUMED if f'"{env}"' not in source] == []
