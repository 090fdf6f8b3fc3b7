"""Training end to end on CPU: DeepSpeed over gloo with 2 processes, eval, export, resume on
another world size, the non-finite-loss stop, and bad input failing fast (ZeRO-1/2 on another
world size: tests/test_zero_resume.py).

The multi-process tests share one uninterrupted 2-process run (tests/trainutil.py) on a tiny
generated set: resnet18 at 32 px, 160 train / 32 val images, 4 classes, 10 steps per epoch.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import trainutil as tu
from resnet.config import ConfigError, load_config
from resnet.train.engine import SetupError
from resnet.train.preflight import preflight

FAST_S = 180  # a hang guard: far above the 47 s measured with the 2 cores loaded 5 times over


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tu.shared_data(tmp_path_factory)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    data, run_dir, code, out = tu.baseline_run(tmp_path_factory)
    assert code == 0, out[-4000:]
    return run_dir


# ------------------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def unlabelled_val(data, tmp_path_factory) -> Path:
    """The same shards, but the manifest says the val split has no labels."""
    root = tmp_path_factory.mktemp("unlabelled") / "data"
    shutil.copytree(data, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["val"]["labelled"] = False
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _cfg(data: Path, run_dir: Path, *more: str):
    return load_config([], tu.overrides(data, run_dir, *more))


def test_preflight_accepts_the_tiny_setup(data, tmp_path):
    plan = preflight(_cfg(data, tmp_path / "run"), world_size=2)
    assert (plan.num_classes, plan.global_batch, plan.accumulation) == (tu.CLASSES, 16, 1)
    plan = preflight(_cfg(data, tmp_path / "run", "train.global_batch_size=32"), world_size=2)
    assert plan.accumulation == 2
    # 3 processes do not divide 16: ranks take 5 or 6 samples, and the global batch stays 16.
    plan = preflight(_cfg(data, tmp_path / "run", "train.global_batch_size=16"), world_size=3)
    assert plan.layout.describe() == "world 3: micro-batch 5/6 x 1 accumulation = 16"


@pytest.mark.parametrize("bad, message", [
    ("model.depth=50", "unknown config key 'model.depth'"),
    ("train.batchsize=8", "did you mean train.batch_size"),
    ("train.epochs=three", "wrong value for 'train.epochs'"),
])
def test_config_errors(data, tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        _cfg(data, tmp_path / "run", bad)


def test_preflight_errors(data, unlabelled_val, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(SetupError, match="data.train=.*/nowhere: no such directory"):
        preflight(load_config([], [f"data.train={tmp_path / 'nowhere'}"]), world_size=1)
    with pytest.raises(SetupError, match="'val' split has no labels"):
        preflight(_cfg(data, run_dir, f"data.val={unlabelled_val}"), world_size=1)
    with pytest.raises(SetupError, match="global batch 2 has fewer samples than the 3 processes"):
        preflight(_cfg(data, run_dir, "train.global_batch_size=2"), world_size=3)
    with pytest.raises(ConfigError, match="0 < data.scale_min <= data.scale_max <= 1"):
        preflight(_cfg(data, run_dir, "data.scale_min=0"), world_size=1)


def test_a_fresh_start_is_refused_where_checkpoints_exist(data, tmp_path):
    run_dir = tmp_path / "run"
    old = run_dir / "checkpoints" / "step-000000005"
    old.mkdir(parents=True)
    (old / "trainer_state.json").write_text(json.dumps({"progress": {
        "step": 5, "samples_seen": 80, "global_batch": 16, "world_size": 2, "zero_stage": 0,
        "fingerprint": "x"}}))
    with pytest.raises(SetupError, match="already holds checkpoints \\(newest: step-000000005\\) "
                                         "and checkpoint.resume=false"):
        preflight(_cfg(data, run_dir, "checkpoint.resume=false"), world_size=2)
    # Resuming it is refused too, since that checkpoint belongs to another data set.
    with pytest.raises(SetupError, match="was trained on another data set"):
        preflight(_cfg(data, run_dir), world_size=2)


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BAD_INPUT = {
    "unknown_key": (["model.depth=50"], "unknown config key 'model.depth'"),
    "mistyped_key": (["optim.momentun=0.8"], "did you mean optim.momentum"),
    "missing_data": (["data.train={tmp}/nowhere"], "no such directory"),
    "unlabelled_val": (["data.val={unlabelled}"], "'val' split has no labels"),
    "tiny_global_batch": (["train.global_batch_size=2"],
                          "global batch 2 has fewer samples than the 3 processes"),
}


def _torchrun_rank0_env() -> dict:
    """Rank 0 of 3 as torchrun starts it, at a port nobody serves: had a process group been
    started, rank 0 would wait there for two peers that never come."""
    return dict(WORLD_SIZE="3", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="3",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_unused_port()))


def _bad_input(case: str, data: Path, unlabelled_val: Path, tmp_path: Path):
    args, message = BAD_INPUT[case]
    args = [a.format(tmp=tmp_path, unlabelled=unlabelled_val) for a in args]
    return ["train", *tu.overrides(data, tmp_path / "run"), *args], message


def test_bad_input_fails_fast_from_the_command_line(data, unlabelled_val, tmp_path):
    """`resnet train` as launched by torchrun (rank 0 of 3), a real process: a clear error,
    code 2, in seconds (bounded by the subprocess timeout)."""
    argv, message = _bad_input("tiny_global_batch", data, unlabelled_val, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "resnet", *argv],
                          env=tu.env("bad-input", **_torchrun_rank0_env()), cwd=tu.REPO,
                          capture_output=True, text=True, timeout=FAST_S)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "resnet train: error:" in proc.stderr and message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("case", [c for c in BAD_INPUT if c != "tiny_global_batch"])
def test_bad_input_fails_before_any_process_group(case, data, unlabelled_val, tmp_path,
                                                  monkeypatch, capsys):
    """The same command line through the CLI's entry point in this process (the interpreter
    start is the subprocess test's): the error, code 2, no process group, no checkpoint."""
    from resnet import cli

    for key, value in _torchrun_rank0_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RESNET_IO_TIMEOUT_S", "120")  # train() sets it for its workers
    argv, message = _bad_input(case, data, unlabelled_val, tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "resnet train: error:" in err and message in err and "Traceback" not in err, err
    assert not torch_distributed_initialized()
    assert not (tmp_path / "run" / "checkpoints").exists()


def torch_distributed_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


# ------------------------------------------------------------------------------ 2 processes


@pytest.mark.slow
def test_two_deepspeed_processes_train_and_evaluate(baseline, data):
    run_dir = baseline
    audit = tu.read_audit(run_dir)
    assert list(audit) == list(range(1, 21))
    for step, records in audit.items():  # 2 ranks x 1 micro-batch of 8 per step
        assert sorted(records) == [(0, 0), (0, 1)], step
        assert all(len(r["keys"]) == tu.BATCH for r in records.values())
    everything = tu.train_keys(data)
    assert len(everything) == tu.TRAIN_SAMPLES
    for epoch in (0, 1):  # every sample exactly once per epoch, in a new order each epoch
        keys = tu.keys_of(audit, tu.epoch_steps(audit, epoch))
        assert sorted(keys) == sorted(everything), epoch
    assert tu.keys_of(audit, range(1, 11)) != tu.keys_of(audit, range(11, 21))

    # DeepSpeed wrote the checkpoints (its layout); keep=3 pruned the older ones.
    assert tu.checkpoints(run_dir) == ["step-000000012", "step-000000016", "step-000000020"]
    assert tu.latest(run_dir) == "step-000000020"
    last = run_dir / "checkpoints" / "step-000000020"
    assert (last / "pytorch_model" / "mp_rank_00_model_states.pt").is_file()
    progress = tu.trainer_state(last)["progress"]
    assert (progress["step"], progress["world_size"], progress["global_batch"]) == (20, 2, 16)
    assert progress["samples_seen"] == 2 * tu.TRAIN_SAMPLES

    # Evaluated at the end of each epoch, on every val sample, and exported.
    evals = [m for m in tu.metrics(run_dir) if "val_top1" in m]
    assert [m["step"] for m in evals] == [10, 20]
    assert all(m["val_samples"] == tu.CLASSES * tu.VAL_PER_CLASS for m in evals)
    assert (run_dir / "final" / "model.safetensors").is_file()
    classes = json.loads((run_dir / "final" / "classes.json").read_text())
    assert [c["index"] for c in classes] == list(range(tu.CLASSES))


@pytest.mark.slow
def test_final_weights_load_into_torchvision(baseline):
    import torch
    import torchvision
    from safetensors.torch import load_file

    state = load_file(str(baseline / "final" / "model.safetensors"))
    model = torchvision.models.resnet18(num_classes=tu.CLASSES)
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, tu.CLASSES)


@pytest.mark.slow
def test_resnet_eval_on_final_weights_and_on_a_checkpoint(baseline, data, tmp_path):
    trained = [m for m in tu.metrics(baseline) if "val_top1" in m][-1]
    results = []
    for weights in (baseline / "final", baseline / "checkpoints" / "step-000000020"):
        code, out = tu.run(tu.resnet_cmd("eval", "--weights", str(weights), "--data", str(data),
                                         "--workers", "0", "--batch-size", "16"),
                           tmp_path / "eval.log")
        assert code == 0, out[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert result["arch"] == "resnet18" and result["val_samples"] == 32
        results.append(result)
    # The same weights as the trainer's last evaluation: the same answers.
    assert results[0]["val_top1"] == results[1]["val_top1"] == trained["val_top1"]
    assert results[0]["val_top5"] == results[1]["val_top5"] == trained["val_top5"]
    assert results[0]["val_loss"] == pytest.approx(trained["val_loss"], rel=1e-4)
    # Several processes: each evaluates its share, the sums are reduced; same answer.
    eval_args = ("eval", "--weights", str(baseline / "final"), "--data", str(data),
                 "--workers", "0", "--batch-size", "16")
    code, out = tu.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", "2", "-m", "resnet", *eval_args],
                       tmp_path / "eval2.log")
    assert code == 0, out[-3000:]
    [line] = [x for x in out.splitlines() if x.startswith("{")]  # printed by rank 0 only
    two = json.loads(line)
    assert (two["processes"], two["val_samples"]) == (2, 32)
    assert two["val_top1"] == results[0]["val_top1"]


def _copy_run_until(run_dir: Path, dest: Path, checkpoint: str) -> Path:
    """A copy of a run as it was when `checkpoint` was its newest (no audit, no final)."""
    (dest / "checkpoints").mkdir(parents=True)
    shutil.copytree(run_dir / "checkpoints" / checkpoint, dest / "checkpoints" / checkpoint)
    (dest / "checkpoints" / "latest").write_text(checkpoint)
    return dest


@pytest.mark.slow
def test_resume_on_one_process_keeps_the_global_batch(baseline, data, tmp_path):
    """2 -> 1 process from a mid-epoch checkpoint: 2 micro-batches of 8 per step, same samples."""
    run_dir = _copy_run_until(baseline, tmp_path / "run", "step-000000016")
    code, out = tu.run(tu.resnet_cmd("train", *tu.overrides(data, run_dir, *tu.BASELINE)),
                       tmp_path / "log.txt")
    assert code == 0, out[-4000:]
    assert tu.resumed_from(out) == ["step-000000016"]
    assert "world size 1" in out
    audit = tu.read_audit(run_dir)
    assert list(audit) == [17, 18, 19, 20]
    for records in audit.values():
        assert sorted(records) == [(0, 0), (1, 0)]  # (micro, rank): accumulation 2 on rank 0
        assert all(len(r["keys"]) == tu.BATCH and r["epoch"] == 1 for r in records.values())
    # The rest of the epoch is exactly what the 2-process run had left: each sample once.
    before = tu.read_audit(baseline)
    resumed = tu.keys_of(audit, range(17, 21))
    assert sorted(resumed) == sorted(tu.keys_of(before, range(17, 21)))
    assert sorted(tu.keys_of(before, range(11, 17)) + resumed) == sorted(tu.train_keys(data))
    progress = tu.trainer_state(run_dir / "checkpoints" / "step-000000020")["progress"]
    assert (progress["step"], progress["world_size"], progress["global_batch"]) == (20, 1, 16)
    assert progress["samples_seen"] == 2 * tu.TRAIN_SAMPLES
    assert (run_dir / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(data,
                                                                                 tmp_path):
    run_dir = tmp_path / "run"
    code, out = tu.run(tu.resnet_cmd("train", *tu.overrides(
        data, run_dir, "optim.lr=1e30", "optim.schedule=constant", "train.max_steps=8",
        "checkpoint.every_steps=1", "audit.sample_keys=false", val=False)),
        tmp_path / "log.txt")
    assert code == 1, out[-4000:]
    found = [line for line in out.splitlines() if "non-finite loss at step" in line]
    assert found, out[-4000:]
    bad_step = int(found[0].split("non-finite loss at step ")[1].split(";")[0])
    assert "last good checkpoint is kept" in found[0] and "Traceback" not in out
    good = tu.checkpoints(run_dir)
    assert good and tu.latest(run_dir) == good[-1]
    assert int(good[-1].split("-")[1]) == bad_step - 1  # every step saved until the bad one
    assert not (run_dir / "final").exists()


@pytest.mark.slow
def test_nonfinite_gradients_with_a_finite_loss_stop_before_any_checkpoint_holds_them(data,
                                                                                    tmp_path):
    """Rank 1's step 3 has a finite loss and inf gradients (test shim): training stops naming
    step 3, every checkpoint left holds finite weights, the newest is step 2."""
    import torch

    run_dir = tmp_path / "run"
    code, out = tu.run(tu.torchrun_cmd(2, *tu.overrides(
        data, run_dir, "train.max_steps=6", "checkpoint.every_steps=1",
        "audit.sample_keys=false", val=False)), tmp_path / "log.txt",
        RESNET_TEST_FAULT_INF_GRAD_AT_STEP=3, RESNET_TEST_FAULT_RANK=1)
    assert code != 0, out[-4000:]
    assert "non-finite gradients at step 3 (the loss was finite" in out, out[-4000:]
    assert tu.checkpoints(run_dir)[-1] == "step-000000002" == tu.latest(run_dir)
    for name in tu.checkpoints(run_dir):
        states = list((run_dir / "checkpoints" / name).rglob("*model_states.pt"))
        assert states, name
        module = torch.load(states[0], map_location="cpu", weights_only=False)["module"]
        assert all(torch.isfinite(t).all() for t in module.values() if t.is_floating_point())
    assert not (run_dir / "final").exists()


@pytest.mark.slow
def test_compiled_model_trains_and_exports_torchvision_keys(data, tmp_path):
    """train.compile wraps nothing: checkpoints and exported weights keep torchvision's keys."""
    import torchvision
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    code, out = tu.run(tu.resnet_cmd("train", *tu.overrides(
        data, run_dir, "train.compile=true", "train.compile_backend=eager", "train.max_steps=2",
        "audit.sample_keys=false", val=False)), tmp_path / "log.txt")
    assert code == 0, out[-4000:]
    assert "model compiled (torch.compile backend eager)" in out
    # The compile warm-up is announced and its end logged (a resumed run does not stall mute).
    assert "step 1 compiles the model first" in out and "compile warm-up done" in out
    weights = load_file(str(run_dir / "final" / "model.safetensors"))
    assert not any("_orig_mod" in k for k in weights)
    torchvision.models.resnet18(num_classes=4).load_state_dict(weights, strict=True)


@pytest.mark.slow
def test_a_replacement_node_with_an_empty_disk_resumes_from_the_s3_mirror(data, tmp_path,
                                                                         s3_server):
    mirror = f"s3://{s3_server.bucket}/runs/mirrored"
    run_dir = tmp_path / "run"
    common = ["checkpoint.every_steps=3", f"checkpoint.mirror={mirror}",
              "audit.sample_keys=false"]
    code, out = tu.run(tu.resnet_cmd("train", *tu.overrides(
        data, run_dir, *common, "train.max_steps=6", val=False)), tmp_path / "a.txt")
    assert code == 0, out[-4000:]
    shutil.rmtree(run_dir)  # the spot instance and its disk are gone

    code, out = tu.run(tu.resnet_cmd("train", *tu.overrides(
        data, run_dir, *common, "train.max_steps=9", val=False)), tmp_path / "b.txt")
    assert code == 0, out[-4000:]
    assert tu.resumed_from(out) == ["step-000000006"]
    assert tu.trainer_state(run_dir / "checkpoints" / "step-000000009")["progress"]["step"] == 9


@pytest.fixture(scope="module")
def decode_on_device_by_the_clock(data, tmp_path_factory):
    """One single-process run that two tests check: data.decode=device (training and
    evaluation), and checkpoints by wall clock alone (checkpoint.every_steps=0 and a tiny
    every_minutes: one after every step)."""
    return tu.shared_run(tmp_path_factory, "decode-device-by-the-clock", lambda run_dir:
                         tu.resnet_cmd("train", *tu.overrides(
                             data, run_dir, "data.decode=device", "checkpoint.every_steps=0",
                             "checkpoint.every_minutes=0.00001", "checkpoint.keep=10",
                             "train.max_steps=3", "audit.sample_keys=false")))


@pytest.mark.slow
def test_checkpoints_by_wall_clock(decode_on_device_by_the_clock):
    """checkpoint.every_minutes alone (every_steps=0): a tiny interval saves after every step."""
    run_dir, code, out = decode_on_device_by_the_clock
    assert code == 0, out[-4000:]
    assert tu.checkpoints(run_dir) == [f"step-00000000{i}" for i in (1, 2, 3)]


@pytest.mark.slow
def test_device_decode_trains_and_evaluates(decode_on_device_by_the_clock):
    """data.decode=device: workers hand over JPEG bytes and crop boxes; the trainer decodes
    them on its device (here the CPU; nvJPEG on a GPU) for training and evaluation."""
    run_dir, code, out = decode_on_device_by_the_clock
    assert code == 0, out[-4000:]
    evals = [m for m in tu.metrics(run_dir) if "val_top1" in m]
    assert evals and evals[-1]["val_samples"] == tu.CLASSES * tu.VAL_PER_CLASS


RAMP_TRAIN, RAMP_VAL = 12, 4  # per class: 3 steps of 16 an epoch, 16 val images


@pytest.fixture(scope="module")
def ramp_data(tmp_path_factory) -> Path:
    """The tiny set at under a third of its size: the ramp's epochs at 64 and 96 px cost
    (px / 32)^2 times an epoch at 32 px, and the test needs epochs, not many steps in them."""
    made = tu.once_per_session(tmp_path_factory, "ramp-data", lambda folder: {
        "data": str(tu.make_data(folder, RAMP_TRAIN, RAMP_VAL))})
    return Path(made["data"])


@pytest.mark.slow
def test_progressive_resizing_resumes_exactly_after_a_kill(ramp_data, tmp_path):
    """Train size 32 -> 64 -> 96 px over three epochs of 3 steps (eval at 64): a run SIGKILLed
    mid-epoch 1 (after step 5; checkpoint at 4) and started again equals the uninterrupted run
    bit for bit, because the size is a function of the epoch; the size is logged as
    `image_size`."""
    data = ramp_data
    ramp = ["train.epochs=3", "train.global_batch_size=16", "checkpoint.every_steps=2",
            "data.image_size=96", "data.min_image_size=32", "data.resize_start_epoch=0",
            "data.resize_end_epoch=2", "data.eval_image_size=64",
            "train.log_every_steps=1"]  # image_size is in the step records logged
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    code, out = tu.run(tu.resnet_cmd("train", *tu.overrides(data, whole, *ramp)),
                       tmp_path / "whole.txt")
    assert code == 0, out[-4000:]
    code, out = tu.run(tu.resnet_cmd("train", *tu.overrides(data, killed, *ramp)),
                       tmp_path / "killed.txt", RESNET_TEST_FAULT_AFTER_STEP=5)
    assert code != 0 and tu.checkpoints(killed)[-1] == "step-000000004", out[-4000:]
    code, out = tu.run(tu.resnet_cmd("train", *tu.overrides(data, killed, *ramp)),
                       tmp_path / "again.txt")
    assert code == 0 and tu.resumed_from(out) == ["step-000000004"], out[-4000:]
    sizes = {m["epoch"]: m["image_size"] for m in tu.metrics(whole) if "image_size" in m}
    assert sizes == {0: 32, 1: 64, 2: 96}
    resumed = {m["epoch"]: m["image_size"] for m in tu.metrics(killed) if "image_size" in m}
    assert resumed == sizes
    tu.assert_bit_identical(tu.final_weights(killed), tu.final_weights(whole))
    evals = [m for m in tu.metrics(whole) if "val_top1" in m]
    assert evals and evals[-1]["val_samples"] == tu.CLASSES * RAMP_VAL
