"""Face identity embeddings (faces' AED): OpenFace nn4.small2.v1 as thnkim/OpenFacePytorch ports it.

pose-evaluation's ``extract_face_id``: the RGB uint8 frame is flipped to BGR, resized to 96x96 by
``skimage.transform.resize`` with the defaults of scikit-image 0.14 (bilinear, no anti-aliasing,
values to [0, 1]), and the network's first output, the L2-normalised 128-d embedding, is kept. The
squared L2 distance of two such embeddings lies in [0, 4].
"""
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluation.extractors.base import EmbeddingExtractor

INPUT_SIZE = 96


class CrossMapLRN(nn.Module):
    """Torch7's SpatialCrossMapLRN as the port computes it (no parameters).

    out = x * (k + alpha / size * s_c) ** -beta, where s_c sums x^2 over the channels c - 2 ... c + 2.
    # Faithful to the official code: the port's incremental window (adapted from torch.legacy) never
    # subtracts channel 0, so for c >= 3 the sum also holds x_0^2; the published numbers used it.
    """

    def __init__(self, size=5, alpha=1e-4, beta=0.75, k=1.0):
        super().__init__()
        if size != 5:
            raise ValueError("CrossMapLRN reproduces the port's size-5 window only")
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def forward(self, x):
        squares = x * x
        padded = F.pad(squares, (0, 0, 0, 0, 2, 2))
        window = sum(padded[:, shift:shift + x.shape[1]] for shift in range(5))
        extra = torch.zeros_like(window)
        extra[:, 3:] = squares[:, :1]
        scale = self.k + self.alpha / self.size * (window + extra)
        return x * scale.pow(-self.beta)


def _conv_bn_relu(prefix, in_channels, out_channels, kernel, stride, padding):
    return [(f"{prefix[0]}_conv", nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding)),
            (f"{prefix[1]}_bn", nn.BatchNorm2d(out_channels)),
            (f"{prefix[2]}_relu", nn.ReLU())]


class Inception(nn.Module):
    """The port's inception block: branches ``seq_list.<i>`` (1x1 reduce -> kxk conv; pool [-> 1x1];
    1x1) whose outputs are zero-padded, centred, to the largest spatial size and concatenated."""

    def __init__(self, in_channels, kernels, strides, outputs, reduces, pool):
        super().__init__()
        branches = []
        # reduces may be longer than the conv branches (its extra entries belong to the pool branch)
        for kernel, stride, out_channels, reduce in zip(kernels, strides, outputs, reduces, strict=False):
            layers = _conv_bn_relu("123", in_channels, reduce, 1, 1, 0)
            layers += _conv_bn_relu("456", reduce, out_channels, kernel, stride, kernel // 2)
            branches.append(nn.Sequential(OrderedDict(layers)))
        extra = list(reduces[len(kernels):]) + [None, None]
        pool_layers = [("1_pool", pool)]
        if extra[0] is not None:
            pool_layers += _conv_bn_relu("234", in_channels, extra[0], 1, 1, 0)
        branches.append(nn.Sequential(OrderedDict(pool_layers)))
        if extra[1] is not None:
            branches.append(nn.Sequential(OrderedDict(_conv_bn_relu("123", in_channels, extra[1], 1, 1, 0))))
        self.seq_list = nn.ModuleList(branches)

    def forward(self, x):
        outputs = [branch(x) for branch in self.seq_list]
        height = max(y.shape[2] for y in outputs)
        width = max(y.shape[3] for y in outputs)
        padded = []
        for y in outputs:
            left, top = (width - y.shape[3]) // 2, (height - y.shape[2]) // 2
            padded.append(F.pad(y, (left, width - y.shape[3] - left, top, height - y.shape[2] - top)))
        return torch.cat(padded, dim=1)


def _max_pool():
    return nn.MaxPool2d(3, stride=2, padding=0)


def _lp_pool():
    return nn.LPPool2d(2, 3, stride=3)


class OpenFace(nn.Module):
    """nn4.small2.v1, layer names ``layer1`` ... ``layer25`` of the port (so ``openface.pth`` loads):
    (B, 3, 96, 96) BGR in [0, 1] -> (embedding (B, 128) with unit L2 norm, pooled features (B, 736))."""

    def __init__(self):
        super().__init__()
        self.layer1 = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        self.layer2 = nn.BatchNorm2d(64)
        self.layer3 = nn.ReLU()
        self.layer4 = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer5 = CrossMapLRN()
        self.layer6 = nn.Conv2d(64, 64, 1)
        self.layer7 = nn.BatchNorm2d(64)
        self.layer8 = nn.ReLU()
        self.layer9 = nn.Conv2d(64, 192, 3, padding=1)
        self.layer10 = nn.BatchNorm2d(192)
        self.layer11 = nn.ReLU()
        self.layer12 = CrossMapLRN()
        self.layer13 = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer14 = Inception(192, (3, 5), (1, 1), (128, 32), (96, 16, 32, 64), _max_pool())
        self.layer15 = Inception(256, (3, 5), (1, 1), (128, 64), (96, 32, 64, 64), _lp_pool())
        self.layer16 = Inception(320, (3, 5), (2, 2), (256, 64), (128, 32, None, None), _max_pool())
        self.layer17 = Inception(640, (3, 5), (1, 1), (192, 64), (96, 32, 128, 256), _lp_pool())
        self.layer18 = Inception(640, (3, 5), (2, 2), (256, 128), (160, 64, None, None), _max_pool())
        self.layer19 = Inception(1024, (3,), (1,), (384,), (96, 96, 256), _lp_pool())
        self.layer21 = Inception(736, (3,), (1,), (384,), (96, 96, 256), _max_pool())
        self.layer22 = nn.AvgPool2d(3, stride=1, padding=0)
        self.layer25 = nn.Linear(736, 128)

    def forward(self, x):
        for index in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 21, 22):
            x = getattr(self, f"layer{index}")(x)
        pooled = x.reshape(-1, 736)
        embedding = self.layer25(pooled)
        norm = torch.sqrt(torch.sum(embedding ** 2, dim=1) + 1e-6)
        return embedding / norm[:, None], pooled


def openface_input(frames):
    """(B, H, W, 3) RGB uint8 -> (B, 3, 96, 96) float64 BGR in [0, 1], like skimage 0.14's default
    ``resize`` (pixel-centre bilinear, no anti-aliasing; every sample lies inside the frame)."""
    tensor = torch.from_numpy(np.ascontiguousarray(frames[..., ::-1])).permute(0, 3, 1, 2).double() / 255.0
    return F.interpolate(tensor, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False).clamp(0, 1)


class FaceIdentityExtractor(EmbeddingExtractor):
    """128-d OpenFace embeddings (unit norm) of whole frames, pose-evaluation's face_id."""

    name = "OpenFace nn4.small2.v1 (thnkim/OpenFacePytorch)"
    input_description = "whole frame, BGR, resized to 96x96 bilinear (skimage 0.14 defaults), [0, 1]"
    dim = 128

    def __init__(self, weights=None, device="cpu", batch_size=16):
        super().__init__(device, batch_size)
        self.network = self.published("openface", OpenFace(), weights)

    @torch.inference_mode()
    def extract(self, frames):
        inputs = openface_input(frames).float().to(self.device)
        return self.network(inputs)[0].double().cpu().numpy()
