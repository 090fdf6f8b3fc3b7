"""resnet.model: torchvision's ResNets built by name, and the feature/head helpers."""
import pytest
import torch
import torchvision

from resnet.config import ARCHS
from resnet.model import build_model, forward_features, forward_head


def test_resnet50_parameter_count():
    model = build_model("resnet50", num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 25_557_032


@pytest.mark.parametrize("arch", ARCHS)
def test_build_model_is_torchvisions_model(arch):
    ours = build_model(arch, num_classes=10)
    theirs = getattr(torchvision.models, arch)(num_classes=10)
    assert type(ours) is type(theirs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in theirs.state_dict().items()}


def test_every_parameter_gets_a_gradient():
    model = build_model("resnet18", num_classes=5, zero_init_residual=False)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert missing == []


def test_zero_init_residual_zeroes_last_bn_of_each_block():
    model = build_model("resnet50", num_classes=3, zero_init_residual=True)
    assert torch.count_nonzero(model.layer1[0].bn3.weight) == 0
    assert torch.count_nonzero(model.layer1[0].bn1.weight) > 0
    plain = build_model("resnet18", num_classes=3, zero_init_residual=True)
    assert torch.count_nonzero(plain.layer2[1].bn2.weight) == 0
    assert torch.count_nonzero(build_model("resnet18", 3).layer2[1].bn2.weight) > 0


@pytest.mark.parametrize("arch,channels", [("resnet18", 512), ("resnet50", 2048)])
def test_features_and_head_compose_to_forward(arch, channels):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=4).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = forward_features(model, x)
        assert feats.shape == (1, channels, 2, 2)
        assert forward_head(model, feats, pre_logits=True).shape == (1, channels)
        assert torch.equal(forward_head(model, feats), model(x))


def test_helpers_take_channels_last_input():
    model = build_model("resnet18", num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    cl = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        feats = forward_features(cl, x.contiguous(memory_format=torch.channels_last))
        assert torch.allclose(forward_head(cl, feats), model(x), atol=1e-5)


def test_unknown_arch_and_bad_class_count_are_clear_errors():
    with pytest.raises(ValueError, match="resnet51"):
        build_model("resnet51")
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet18", num_classes=0)
