"""`resnet eval` / export / predict read checkpoint files as tensors only (weights_only=True):
a file that would run code when unpickled is refused, naming it, and nothing runs."""
from collections import OrderedDict

import pytest
import torch

from resnet.weights import load_weights


class Planted:
    """Unpickling this calls open(marker, "w"): stands for any code a crafted file runs."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def _checkpoint(root, extra: dict):
    folder = root / "step-000000001" / "pytorch_model"
    folder.mkdir(parents=True)
    torch.save({"module": {"fc.weight": torch.ones(2, 3)}, **extra},
               folder / "mp_rank_00_model_states.pt")
    return folder.parent


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    checkpoint = _checkpoint(tmp_path, {"ds_config": Planted(str(marker))})
    with pytest.raises(ValueError, match=r"refusing to load .*mp_rank_00_model_states\.pt: it "
                                         r"holds more than tensors"):
        load_weights(checkpoint)
    assert not marker.exists()


def test_a_deepspeed_checkpoints_tensors_and_plain_values_load(tmp_path):
    checkpoint = _checkpoint(tmp_path, {
        "param_shapes": [OrderedDict([("fc.weight", torch.Size([2, 3]))])],
        "ds_config": {"zero_optimization": {"stage": 0}}, "ds_version": "0.19.8",
        "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(2, 3)}}}})
    assert torch.equal(load_weights(checkpoint)["fc.weight"], torch.ones(2, 3))
