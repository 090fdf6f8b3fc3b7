"""train.auto_batch_size: the largest micro-batch that fits, halving on torch.OutOfMemoryError,
the smallest over ranks, the global batch kept by accumulation. A device's memory is faked by
the fault shim (RESNET_TEST_FAULT_OOM_ABOVE: a ResNet forward above N images raises
torch.OutOfMemoryError), so this runs on a CPU."""
from __future__ import annotations

import re

import pytest
import torch

import trainutil as tu
from resnet.train.autobatch import largest_that_runs
from resnet.train.engine import SetupError


def test_halves_until_a_size_runs():
    tried = []

    def try_size(n):
        tried.append(n)
        if n > 5:
            raise torch.OutOfMemoryError("CUDA out of memory")

    assert largest_that_runs(try_size, 24) == 3
    assert tried == [24, 12, 6, 3]
    assert largest_that_runs(lambda n: None, 24) == 24


def test_nothing_fits_is_a_setup_error_naming_the_key():
    def never(n):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(SetupError, match="train.auto_batch_size: even a micro-batch of 1"):
        largest_that_runs(never, 8)


def test_other_errors_are_not_taken_for_memory():
    def broken(n):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        largest_that_runs(broken, 8)


@pytest.mark.slow
def test_two_ranks_take_the_smallest_fit_and_keep_the_global_batch(tmp_path_factory, tmp_path):
    """Rank 0 fits 6 images (16 -> 8 -> 4), rank 1 fits 3 (16 -> 8 -> 4 -> 2): both train
    micro-batches of 2, and 4 accumulation steps x 2 ranks x 2 images keep the global batch of
    16 (DeepSpeed is told the same numbers, or its batch check would stop the start)."""
    data = tu.shared_data(tmp_path_factory)
    run_dir = tmp_path / "run"
    args = tu.overrides(data, run_dir, "train.batch_size=16", "train.global_batch_size=16",
                        "train.max_steps=2", "train.auto_batch_size=true",
                        "deepspeed.engine=deepspeed", "audit.sample_keys=false", val=False)
    code, out = tu.run(tu.torchrun_cmd(2, *args), tmp_path / "log.txt",
                       RESNET_TEST_FAULT_OOM_ABOVE="0:6,1:3")
    assert code == 0, out[-4000:]
    found = re.findall(r"train.auto_batch_size: micro-batch (\d+) fits at 32 px \(this rank: "
                       r"(\d+)", out)
    assert found == [("2", "4")] or sorted(found) == [("2", "2"), ("2", "4")], out[-4000:]
    assert "global batch world 2: micro-batch 2 x 4 accumulation = 16" in out
    assert "out of memory" not in out.split("train.auto_batch_size:")[-1]  # training fits
