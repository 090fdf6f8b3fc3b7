import math
import random

import pytest
import torch

from resnet.config import OptimConfig
from resnet.model import build_model
from resnet.train.optim import Schedule, build_optimizer, parameter_groups, peak_lr


def test_no_weight_decay_on_batchnorm_and_biases():
    model = build_model("resnet18", num_classes=3)
    decay, no_decay = parameter_groups(model, 1e-4, bn_bias_decay=False)
    assert all(p.ndim > 1 for p in decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    bn_and_bias = sum(p.numel() for n, p in model.named_parameters() if "bn" in n or "bias" in n
                      or "downsample.1" in n)
    assert sum(p.numel() for p in no_decay["params"]) == bn_and_bias
    [everything] = parameter_groups(model, 1e-4, bn_bias_decay=True)
    assert len(everything["params"]) == len(list(model.parameters()))


def test_lr_is_per_256_images_and_scales_with_the_global_batch():
    cfg = OptimConfig(lr=0.1)
    assert peak_lr(cfg, 1024) == pytest.approx(0.4)
    opt = build_optimizer(build_model("resnet18", num_classes=2), cfg, 512)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)


def test_onecycle_matches_torch_onecyclelr():
    cfg = OptimConfig(schedule="onecycle", onecycle_pct_start=0.3)
    total = 50
    ours = Schedule(cfg, peak=2.0, total_steps=total, steps_per_epoch=10)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2.0, total_steps=total, pct_start=0.3,
                                              cycle_momentum=False)
    for step in range(total):
        assert ours(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), step
        opt.step()
        ref.step()


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_warmup_then_decay_to_the_floor(kind):
    cfg = OptimConfig(schedule=kind, warmup_epochs=1, final_lr_ratio=0.1)
    s = Schedule(cfg, peak=1.0, total_steps=100, steps_per_epoch=10)
    warm = [s(i) for i in range(10)]
    assert warm == sorted(warm) and warm[0] > 0 and warm[-1] < 1.0
    assert s(10) == pytest.approx(1.0)
    assert s(99) == pytest.approx(0.1)
    decay = [s(i) for i in range(10, 100)]
    assert decay == sorted(decay, reverse=True)
    if kind == "cosine":
        assert s(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 89)))


@pytest.mark.parametrize("kind", ["cosine", "linear", "onecycle", "constant"])
def test_schedule_is_a_pure_function_of_the_step(kind):
    """The same step gives the same rate whatever was asked before (a resumed run asks from
    the middle): one instance queried in order, backwards and shuffled, and a fresh instance
    per step, all agree; and the rate does change with the step."""
    cfg = OptimConfig(schedule=kind, warmup_epochs=2)

    def make():
        return Schedule(cfg, peak=0.5, total_steps=40, steps_per_epoch=5)

    sched = make()
    in_order = [sched(i) for i in range(40)]
    backwards = [sched(i) for i in reversed(range(40))][::-1]
    order = list(range(40))
    random.Random(0).shuffle(order)
    shuffled = dict(zip(order, (sched(i) for i in order)))
    assert backwards == in_order == [shuffled[i] for i in range(40)]
    assert [make()(i) for i in range(40)] == in_order
    assert len(set(in_order)) > 2
