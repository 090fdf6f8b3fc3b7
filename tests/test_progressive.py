"""Progressive resizing and test resolution: the size is a pure function of the epoch (so a
resumed run needs nothing saved), FFCV's ramp, and what BatchNorm and torch.compile make of a
changing input size. The kill-and-resume run with a ramp is in tests/test_train.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from resnet.config import load_config
from resnet.data.augment import AugmentParams, ramp_size, train_image_size


def _ffcv(epoch, min_res, max_res, start, end):
    """FFCV's get_resolution (ffcv-imagenet train_imagenet.py), for comparison."""
    if epoch <= start:
        return min_res
    if epoch >= end:
        return max_res
    return int(np.round(np.interp([epoch], [start, end], [min_res, max_res])[0] / 32)) * 32


@pytest.mark.parametrize("epochs,start,end", [(16, 11, 13), (24, 17, 20), (32, 23, 27),
                                              (40, 29, 34), (88, 65, 76), (10, 2, 8)])
def test_ramp_is_ffcvs_and_a_multiple_of_32(epochs, start, end):
    for lo, hi in [(160, 192), (128, 224)]:
        sizes = [ramp_size(lo, hi, start, end, e) for e in range(epochs)]
        assert sizes == [_ffcv(e, lo, hi, start, end) for e in range(epochs)]
        assert all(s % 32 == 0 for s in sizes) and sizes == sorted(sizes)
        assert sizes[0] == lo and sizes[-1] == hi


def test_sizes_from_the_config():
    cfg = load_config([], ["data.image_size=192", "data.min_image_size=160",
                           "data.resize_start_epoch=2", "data.resize_end_epoch=6",
                           "data.eval_image_size=256", "data.eval_crop_ratio=0.875"])
    assert [train_image_size(cfg.data, e) for e in range(8)] == [160] * 4 + [192] * 4
    assert AugmentParams.for_epoch(cfg.data, 0).image_size == 160
    ev = AugmentParams.for_eval(cfg.data)
    assert (ev.image_size, ev.eval_crop_ratio) == (256, 0.875)
    plain = load_config([], ["data.image_size=224"]).data  # no ramp, eval at the train size
    assert train_image_size(plain, 5) == 224 == AugmentParams.for_eval(plain).image_size


def test_batchnorm_and_compile_cope_with_a_changing_size():
    """BatchNorm normalises per channel, whatever H x W. torch.compile (automatic dynamic shapes,
    its default) compiles the first size, recompiles once with H and W symbolic at the second,
    and that graph serves every later size: no recompile per epoch of a ramp."""
    import torch._dynamo

    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    model.compile(backend=counting)
    for size in (32, 64, 96, 128, 64):
        out = model(torch.randn(4, 3, size, size))
        out.sum().backward()
        assert out.shape == (4, 4)
    assert 1 < len(graphs) <= 2, graphs
    assert model[1].running_mean.abs().sum() > 0  # BatchNorm statistics were updated
    assert all(p.grad is not None for p in model.parameters())
