"""The DeepSpeed JSON we build keeps DeepSpeed from synchronising the device every step
(issue 21): its throughput timer off, ZeRO-1/2's unused gradient norm not computed. The
counts in whole steps are in tests/test_sync_free.py; these check the JSON in milliseconds."""
from __future__ import annotations

import json

import pytest

from resnet.config import load_config
from resnet.data.plan import MicroLayout
from resnet.train.engine import deepspeed_config, settle

LAYOUT = MicroLayout(16, 1, 2)


def _ds(*overrides: str) -> dict:
    return deepspeed_config(settle(load_config([], list(overrides))), LAYOUT)


def test_throughput_timer_and_wall_clock_breakdown_are_off():
    ds = _ds()
    assert ds["timers"] == {"throughput": {"enabled": False}}
    assert ds["wall_clock_breakdown"] is False


@pytest.mark.parametrize("stage,clip,computed", [
    (1, 0.0, False), (2, 0.0, False), (1, 1.0, True), (0, 0.0, True)])
def test_grad_norm_is_computed_only_where_clipping_uses_it(stage, clip, computed):
    ds = _ds(f"deepspeed.zero_stage={stage}", f"train.grad_clip={clip}")
    assert ds["zero_optimization"].get("compute_grad_norm", True) is computed


def test_a_user_json_that_asks_for_them_keeps_them(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"timers": {"throughput": {"enabled": True}},
                                "zero_optimization": {"stage": 1, "compute_grad_norm": True,
                                                      "offload_optimizer": {"device": "cpu"}}}))
    ds = _ds(f"deepspeed.config_file={path}")
    assert ds["timers"]["throughput"]["enabled"] is True
    assert ds["zero_optimization"]["compute_grad_norm"] is True
    path.write_text(json.dumps({"zero_optimization": {"stage": 1,
                                                      "offload_optimizer": {"device": "cpu"}}}))
    # DeepSpeed refuses compute_grad_norm=false with optimizer offload: left as it is
    assert "compute_grad_norm" not in _ds(f"deepspeed.config_file={path}")["zero_optimization"]
