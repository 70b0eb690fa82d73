"""Perceptual loss: VGG-19 slices, ImageNet normalisation, anti-aliased pyramid, per-layer values."""
import torch
from torchvision.models.vgg import cfgs, make_layers

from losses.perceptual import PerceptualLoss, build_vgg19_features
from modules.blocks import AntiAliasInterpolation2d

RELU_INDICES = (1, 6, 11, 20, 29)  # relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 in vgg19().features
# VGG-19's layer sequence (same indices) with 16x fewer channels: fast on a CPU.
TINY_VGG19_CFG = [4, 4, "M", 8, 8, "M", 16, 16, 16, 16, "M", 32, 32, 32, 32, "M", 32, 32, 32, 32, "M"]


def tiny_vgg19_features():
    features = make_layers(TINY_VGG19_CFG)
    assert [type(a) for a in features] == [type(b) for b in make_layers(cfgs["E"])]
    return features.requires_grad_(False)


def relu_features_by_hand(features, image):
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    x = (image - mean) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    out = []
    for index, layer in enumerate(features[:30]):
        x = layer(x)
        if index in RELU_INDICES:
            out.append(x.clone())
    return out


def test_per_layer_values_match_hand_computation():
    features = tiny_vgg19_features()
    loss = PerceptualLoss(features, scales=[1, 0.5], num_channels=3)
    pred, target = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    expected = torch.zeros(5)
    for scale in (1.0, 0.5):
        down = AntiAliasInterpolation2d(3, scale)
        with torch.no_grad():
            fp, ft = relu_features_by_hand(features, down(pred)), relu_features_by_hand(features, down(target))
        expected += torch.stack([(a - b).abs().mean() for a, b in zip(fp, ft, strict=True)])
    values = loss(pred, target)
    assert values.shape == (5,)
    torch.testing.assert_close(values, expected, atol=1e-6, rtol=1e-5)
    assert (values > 0).all()
    assert loss(target, target).abs().max().item() == 0.0


def test_gradient_reaches_the_prediction_only():
    loss = PerceptualLoss(tiny_vgg19_features(), scales=[1, 0.5], num_channels=3)
    pred = torch.rand(1, 3, 32, 32, requires_grad=True)
    target = torch.rand(1, 3, 32, 32, requires_grad=True)
    loss(pred, target).sum().backward()
    assert pred.grad.abs().sum() > 0 and target.grad is None
    assert all(p.grad is None and not p.requires_grad for p in loss.parameters())
    loss.train()
    assert not loss.encoder.training


def test_torchvision_vgg19_checkpoint_loads(tmp_path):
    reference = make_layers(cfgs["E"])
    state = {f"features.{k}": v for k, v in reference.state_dict().items()}
    state["classifier.6.bias"] = torch.zeros(1000)  # the classifier of the torchvision file is ignored
    path = tmp_path / "vgg19-dcbb9e9d.pth"
    torch.save(state, path)
    features = build_vgg19_features(str(path))
    torch.testing.assert_close(features[34].weight, reference[34].weight)
    assert len(features) == 37 and features[28].out_channels == 512
    assert not any(p.requires_grad for p in features.parameters())


def test_num_layers_skips_the_deeper_blocks_and_keeps_the_first_values():
    """num_layers=2 runs only relu1_1 and relu2_1: same first two values as the full loss, zeros after."""
    torch.manual_seed(0)
    features = build_vgg19_features()
    full = PerceptualLoss(features, scales=[1, 0.5], num_channels=3)
    short = PerceptualLoss(features, scales=[1, 0.5], num_channels=3, num_layers=2)
    prediction, target = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    expected, got = full(prediction, target), short(prediction, target)
    assert len(short.encoder) == 2
    assert torch.allclose(got[:2], expected[:2])
    assert torch.equal(got[2:], torch.zeros(3))
    assert expected[2:].abs().sum() > 0
