"""Pyramid perceptual loss on VGG-19 features (FOMM/TPSMM/CPABMM).

Images are (B, 3, H, W) in [0, 1]. Both images go through an anti-aliased pyramid at
``train_params.scales``; at each scale, ImageNet-normalised images go through VGG-19's
relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 (``torchvision.models.vgg19().features`` slices
[0:2], [2:7], [7:12], [12:21], [21:30]) and the L1 distance (mean over all elements) is taken
against the target's features, which carry no gradient.

Weights: the official code multiplies each layer's L1 by ``loss_weights.perceptual[i]`` inside
the loss. Here the loss returns the UNWEIGHTED per-layer values (a (5,) tensor, each summed over
the scales) and the full model applies the per-layer weights, the one place where every loss is
weighted: ``sum_i w_i * values[i]`` is exactly the official value.
"""
import torch
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from losses.pretrained import IMAGENET_MEAN, IMAGENET_STD, FrozenEncoderLoss, freeze, load_state_dict_file
from modules.blocks import AntiAliasInterpolation2d

VGG19_SLICES = ((0, 2), (2, 7), (7, 12), (12, 21), (21, 30))
NUM_LAYERS = len(VGG19_SLICES)


def build_vgg19_features(weights_path=None):
    """``torchvision.models.vgg19().features`` (no classifier), loaded from a torchvision
    ``vgg19-*.pth`` state dict (its ``features.*`` entries, strictly) when a path is given;
    random init (torchvision's) otherwise. Frozen."""
    features = make_layers(cfgs["E"], batch_norm=False)
    if weights_path is not None:
        state = load_state_dict_file(weights_path)
        state = {name[len("features."):]: value for name, value in state.items() if name.startswith("features.")}
        features.load_state_dict(state, strict=True)
    return freeze(features)


class ImagePyramid(nn.Module):
    """Anti-aliased pyramid: image (B, C, H, W) -> list of images, one per scale, in ``scales`` order."""

    def __init__(self, scales, num_channels):
        super().__init__()
        self.downs = nn.ModuleList(AntiAliasInterpolation2d(num_channels, float(scale)) for scale in scales)

    def forward(self, image):
        return [down(image) for down in self.downs]


class PerceptualLoss(FrozenEncoderLoss):
    """Unweighted pyramid perceptual loss, per VGG-19 layer (see the module docstring).

    features: the first 30 (or more) layers of ``vgg19().features`` (``build_vgg19_features``); the
    ``encoder`` holds its 5 (or ``num_layers``) slices, frozen, in float32 (under ``train_params.amp``
    autocast runs them in bf16 like the rest of the forward).
    forward(prediction, target) -> (5,) tensor: values[i] = sum over scales of
    mean |relu_i(prediction_s) - relu_i(target_s)|, gradient only towards ``prediction``.
    num_layers: compute only the first ``num_layers`` relu outputs (the deeper VGG blocks are not run,
    their values are 0): for per-layer weights whose tail is 0, which then cost nothing.
    """

    def __init__(self, features, scales, num_channels, num_layers=NUM_LAYERS):
        if num_channels != 3:
            raise ValueError(f"the VGG-19 perceptual loss needs 3-channel images, got num_channels={num_channels}")
        if not 1 <= num_layers <= len(VGG19_SLICES):
            raise ValueError(f"num_layers must be in 1..{len(VGG19_SLICES)}, got {num_layers}")
        slices = nn.ModuleList(nn.Sequential(*features[start:stop]) for start, stop in VGG19_SLICES[:num_layers])
        super().__init__(slices, IMAGENET_MEAN, IMAGENET_STD, torch.float32)
        self.num_layers = num_layers
        self.pyramid = ImagePyramid(scales, num_channels)

    def vgg_features(self, image):
        """List of the 5 relu feature maps of an image in [0, 1]."""
        out = self.normalise(image)
        feats = []
        for block in self.encoder:
            out = block(out)
            feats.append(out)
        return feats

    def forward(self, prediction, target):
        values = []
        for pred_s, target_s in zip(self.pyramid(prediction), self.pyramid(target), strict=True):
            with torch.no_grad():
                target_feats = self.vgg_features(target_s)
            pred_feats = self.vgg_features(pred_s)
            values.append(torch.stack([(p - t).abs().mean() for p, t in zip(pred_feats, target_feats, strict=True)]))
        values = torch.stack(values).sum(dim=0)
        return torch.cat([values, values.new_zeros(len(VGG19_SLICES) - self.num_layers)])
