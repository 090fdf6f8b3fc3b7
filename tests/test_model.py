import pytest
import torch
import torchvision

from resnet.model import ARCHS, build_model, resnet18, resnet50


def test_resnet50_parameter_count():
    model = resnet50(num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 25_557_032


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_state_dict_matches_torchvision_keys_and_shapes(arch):
    ours = build_model(arch, num_classes=10).state_dict()
    theirs = getattr(torchvision.models, arch)(num_classes=10).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_weights_move_both_ways_with_identical_outputs():
    torch.manual_seed(0)
    ours = resnet50(num_classes=7).eval()
    theirs = torchvision.models.resnet50(num_classes=7).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    back = resnet50(num_classes=7).eval()
    back.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(back(x), theirs(x))


def test_every_parameter_gets_a_gradient():
    model = resnet18(num_classes=5, zero_init_residual=False)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert missing == []


def test_zero_init_residual_zeroes_last_bn_of_each_block():
    model = resnet50(num_classes=3, zero_init_residual=True)
    assert torch.count_nonzero(model.layer1[0].bn3.weight) == 0
    assert torch.count_nonzero(model.layer1[0].bn1.weight) > 0
    plain = resnet18(num_classes=3, zero_init_residual=True)
    assert torch.count_nonzero(plain.layer2[1].bn2.weight) == 0


def test_features_and_head_compose_to_forward():
    model = resnet18(num_classes=4).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (1, 512, 2, 2)
        assert model.forward_head(feats, pre_logits=True).shape == (1, 512)
        assert torch.equal(model.forward_head(feats), model(x))


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="resnet51"):
        build_model("resnet51")
