"""ZeRO-1/2 checkpoints resume on another world size through DeepSpeed's universal checkpoint.

Two processes train under ZeRO-1 (configs/deepspeed/zero1.json as shipped: bf16 autocast) or
ZeRO-2 (fp32) until a SIGTERM mid-epoch (checkpoint at step 7; tests/zerorun.py stopped_run,
once per session); the run resumes on one process (global batch 16 = 8 x 2 accumulation) or on
three (micro-batches 5, 5 and 6), converts the checkpoint once, and finishes the epoch with
every sample used once.
What the resumed ranks hold right after loading (saved by the test shim's
RESNET_TEST_SAVE_AFTER_RESUME, before any step) equals the checkpoint: fp32 weights and SGD
momentum from the ZeRO shards, module weights and BatchNorm statistics. A checkpoint written
before checkpoints declared DeepSpeed's universal_checkpoint_info is refused, saying what works.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

import trainutil as tu
import zerorun

pytestmark = pytest.mark.slow

STOPPED_AT = zerorun.STOPPED_AT


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tu.shared_data(tmp_path_factory)


def _stopped_run(tmp_path_factory, stage: int) -> Path:
    return zerorun.stopped_run(tmp_path_factory, stage)[0]


def _zero_state(model_dir: Path) -> dict:
    """{(state, parameter): whole tensor} from a ZeRO-1/2 checkpoint's per-rank shards."""
    pieces: dict = {}
    for rank in range(len(list(model_dir.glob("zero_pp_rank_*_optim_states.pt")))):
        shard = torch.load(model_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                           map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for group, mapping in enumerate(shard["param_slice_mappings"]):
            flats = {"fp32": shard["single_partition_of_fp32_groups"][group],
                     "momentum": shard["base_optimizer_state"]["state"][group]["momentum_buffer"]}
            for name, frag in mapping.items():
                for state, flat in flats.items():
                    pieces.setdefault((state, name), []).append(
                        flat[frag.start:frag.start + frag.numel])
    return {key: torch.cat(parts) for key, parts in pieces.items()}


def _module(model_dir: Path) -> dict:
    return torch.load(model_dir / "mp_rank_00_model_states.pt", map_location="cpu",
                      weights_only=False)["module"]


@pytest.mark.parametrize("stage, world", [(1, 1), (1, 3), (2, 3)])
def test_zero_checkpoint_resumes_on_another_world_size(data, tmp_path_factory, stage, world):
    root = tmp_path_factory.mktemp(f"resume{stage}-{world}")
    run_dir, probe, mirror = root / "run", root / "after-load", root / "mirror"
    shutil.copytree(_stopped_run(tmp_path_factory, stage), run_dir)
    saved = run_dir / "checkpoints" / STOPPED_AT / "pytorch_model"
    more = [f"checkpoint.mirror={mirror}"] if stage == 2 else []
    args = zerorun.args(data, run_dir, stage, *more)
    cmd = tu.torchrun_cmd(world, *args) if world > 1 else tu.resnet_cmd("train", *args)
    code, out = tu.run(cmd, root / "log.txt", RESNET_TEST_SAVE_AFTER_RESUME=probe)
    assert code == 0, out[-4000:]
    assert tu.resumed_from(out) == [STOPPED_AT] and f"world size {world}" in out
    assert len(re.findall(rf"converted {STOPPED_AT} to DeepSpeed's universal checkpoint in",
                          out)) == 1, out[-4000:]
    assert (saved / "universal.json").is_file()
    assert (saved / "zero" / "optimizer_state.pt").is_file()
    if mirror.exists():  # converted there too, its completion marker included
        remote = mirror / STOPPED_AT / "pytorch_model"
        assert (remote / "universal.json").is_file()
        assert sorted(p.name for p in (remote / "zero").iterdir()) == \
            sorted(p.name for p in (saved / "zero").iterdir())

    # Right after loading, on `world` ranks: the same optimization as when it was saved.
    assert len(list((probe / "pytorch_model").glob("zero_pp_rank_*_optim_states.pt"))) == world
    before, after = _zero_state(saved), _zero_state(probe / "pytorch_model")
    assert before.keys() == after.keys()
    assert sum(state == "momentum" for state, _ in before) == 62  # resnet18: 62 parameters
    differ = [key for key in before if not torch.equal(after[key], before[key])]
    assert not differ, f"{len(differ)} of {len(before)} differ after loading, e.g. {differ[:3]}"
    assert any(before[key].abs().sum() > 0 for key in before if key[0] == "momentum")
    tu.assert_bit_identical(_module(probe / "pytorch_model"), _module(saved))  # BN stats too

    # The run finished the epoch on `world` ranks, each sample once.
    audit = tu.read_audit(run_dir)
    assert list(audit) == list(range(1, 11))
    for step in range(8, 11):
        sizes = sorted(len(r["keys"]) for r in audit[step].values())
        assert sizes == ([8, 8] if world == 1 else [5, 5, 6]), (step, sizes)
    assert sorted(tu.keys_of(audit, range(1, 11))) == sorted(tu.train_keys(data))
    progress = tu.trainer_state(run_dir / "checkpoints" / "step-000000010")["progress"]
    assert (progress["step"], progress["world_size"], progress["zero_stage"]) == (10, world, stage)
    assert (run_dir / "final" / "model.safetensors").is_file()
    code, report = tu.audit_command(run_dir)
    assert code == 0, report
    assert f"{tu.TRAIN_SAMPLES} distinct of {tu.TRAIN_SAMPLES}, 0 left out, 0 used twice" in report


def test_a_checkpoint_without_universal_info_is_refused_saying_what_works(
        data, tmp_path_factory, tmp_path, monkeypatch, capsys):
    """A ZeRO-1 checkpoint of 2 processes written before checkpoints declared DeepSpeed's
    universal_checkpoint_info cannot be converted: 1 process is refused, naming the cause and
    the restart at 2 processes, never a conversion advice that fails. (The ZeRO-1 run is
    tests/zerorun.py's; `accelerate launch --use_deepspeed` writing ZeRO-1 on 2 processes is in
    tests/test_accelerate_settings.py.) The refusal comes before any process group, so the
    CLI's entry point runs in this process."""
    from resnet import cli

    run_dir = tmp_path / "run"
    shutil.copytree(_stopped_run(tmp_path_factory, 1), run_dir)
    model_dir = run_dir / "checkpoints" / STOPPED_AT / "pytorch_model"
    states_file = model_dir / "mp_rank_00_model_states.pt"
    states = torch.load(states_file, map_location="cpu", weights_only=False)
    del states["universal_checkpoint_info"]  # as every checkpoint before it was declared
    torch.save(states, states_file)

    monkeypatch.setenv("RESNET_IO_TIMEOUT_S", "120")  # train() sets it for its workers
    assert cli.main(["train", *zerorun.args(data, run_dir, 1)]) == 2
    out = capsys.readouterr().err
    assert ("holds ZeRO-1 optimizer shards for 2 processes, and this run has 1. It was written "
            "before checkpoints carried DeepSpeed's universal_checkpoint_info, so it cannot be "
            "converted") in out, out[-4000:]
    assert "Restart with 2 processes" in out and "Traceback" not in out
    assert not (model_dir / "zero").exists() and not (model_dir / "universal.json").exists()
