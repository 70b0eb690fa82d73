"""Shared building blocks of the CPABMM networks (shapes as in TPSMM/CPABMM's ``modules/util.py``).

Coordinate convention used everywhere in ``modules/``: points are (x, y) in [-1, 1]^2, x along the
width and y along the height, -1/1 the centres of the first/last pixels (``grid_sample`` with
``align_corners=True``). Grids are (H, W, 2) or (B, ..., H, W, 2) in that order.
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn


def make_coordinate_grid(spatial_size, dtype=torch.float32, device=None):
    """Identity sampling grid of ``spatial_size = (H, W)``: a new (H, W, 2) tensor of (x, y) in [-1, 1].

    ``grid[i, j] = (x_j, y_i)`` with ``x_j = 2 j / (W - 1) - 1`` and ``y_i = 2 i / (H - 1) - 1``.
    """
    h, w = int(spatial_size[0]), int(spatial_size[1])
    if h < 2 or w < 2:
        raise ValueError(f"make_coordinate_grid needs H, W >= 2, got {(h, w)}")
    x = torch.linspace(-1.0, 1.0, w, dtype=dtype, device=device)
    y = torch.linspace(-1.0, 1.0, h, dtype=dtype, device=device)
    return torch.stack([x.view(1, w).expand(h, w), y.view(h, 1).expand(h, w)], dim=-1)


@functools.lru_cache(maxsize=64)
def _cached_grid(h, w, device, dtype):
    with torch.inference_mode(False), torch.no_grad():
        return make_coordinate_grid((h, w), dtype=dtype, device=device).contiguous()


def identity_grid(spatial_size, dtype, device):
    """Cached (H, W, 2) identity grid (see :func:`make_coordinate_grid`), one per (size, device, dtype).

    The returned tensor is shared: never modify it in place. It is a normal tensor (not an inference
    tensor) even when first built under ``torch.inference_mode()``, so autograd may use it later.
    """
    return _cached_grid(int(spatial_size[0]), int(spatial_size[1]), torch.device(device), dtype)


def kp2gaussian(kp, spatial_size, kp_variance):
    """Gaussian heatmaps of keypoints: ``exp(-|z - p|^2 / (2 kp_variance))`` on the (H, W) grid.

    kp: (..., N, 2) points (x, y) in [-1, 1]. Returns (..., N, H, W), peak value 1 at each point.
    """
    grid = identity_grid(spatial_size, kp.dtype, kp.device)
    diff = grid - kp[..., None, None, :]
    return torch.exp(-0.5 * diff.pow(2).sum(-1) / kp_variance)


class ResBlock2d(nn.Module):
    """Pre-activation residual block (norm-relu-conv twice, plus the input); keeps shape (B, C, H, W)."""

    def __init__(self, in_features, kernel_size=3, padding=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_features, in_features, kernel_size=kernel_size, padding=padding)
        self.conv2 = nn.Conv2d(in_features, in_features, kernel_size=kernel_size, padding=padding)
        self.norm1 = nn.InstanceNorm2d(in_features, affine=True)
        self.norm2 = nn.InstanceNorm2d(in_features, affine=True)

    def forward(self, x):
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return out + x


class UpBlock2d(nn.Module):
    """Nearest 2x upsampling, conv, instance norm, ReLU: (B, C_in, H, W) -> (B, C_out, 2H, 2W)."""

    def __init__(self, in_features, out_features, kernel_size=3, padding=1, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=kernel_size, padding=padding,
                              groups=groups)
        self.norm = nn.InstanceNorm2d(out_features, affine=True)

    def forward(self, x):
        out = F.interpolate(x, scale_factor=2.0)
        return F.relu(self.norm(self.conv(out)))


class DownBlock2d(nn.Module):
    """Conv, instance norm, ReLU, 2x2 average pooling: (B, C_in, H, W) -> (B, C_out, H/2, W/2)."""

    def __init__(self, in_features, out_features, kernel_size=3, padding=1, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=kernel_size, padding=padding,
                              groups=groups)
        self.norm = nn.InstanceNorm2d(out_features, affine=True)
        self.pool = nn.AvgPool2d(kernel_size=(2, 2))

    def forward(self, x):
        return self.pool(F.relu(self.norm(self.conv(x))))


class SameBlock2d(nn.Module):
    """Conv, instance norm, ReLU at the same resolution: (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, in_features, out_features, groups=1, kernel_size=3, padding=1):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=kernel_size, padding=padding,
                              groups=groups)
        self.norm = nn.InstanceNorm2d(out_features, affine=True)

    def forward(self, x):
        return F.relu(self.norm(self.conv(x)))


def _level_features(level, in_features, block_expansion, max_features):
    """Channels of encoder level ``level`` (0 = the input itself)."""
    if level == 0:
        return in_features
    return min(max_features, block_expansion * (2 ** level))


class Encoder(nn.Module):
    """Hourglass encoder: ``num_blocks`` DownBlock2d; returns [input, level 1, ..., level num_blocks].

    Level i has min(max_features, block_expansion * 2^i) channels at 1/2^i of the input resolution.
    """

    def __init__(self, block_expansion, in_features, num_blocks=3, max_features=256):
        super().__init__()
        self.down_blocks = nn.ModuleList(
            DownBlock2d(_level_features(i, in_features, block_expansion, max_features),
                        _level_features(i + 1, in_features, block_expansion, max_features))
            for i in range(num_blocks))

    def forward(self, x):
        outs = [x]
        for block in self.down_blocks:
            outs.append(block(outs[-1]))
        return outs


class Decoder(nn.Module):
    """Hourglass decoder with skip connections; returns EVERY decoder level, coarsest first.

    Output i (i = 0..num_blocks-1) is the concatenation of an UpBlock2d output and the encoder skip
    at 1/2^(num_blocks-1-i) of the input resolution; ``out_channels[i]`` is its channel count (the
    last one is ``block_expansion + in_features``, at the input resolution).
    """

    def __init__(self, block_expansion, in_features, num_blocks=3, max_features=256):
        super().__init__()
        up_blocks = []
        self.out_channels = []
        in_filters = _level_features(num_blocks, in_features, block_expansion, max_features)
        for level in range(num_blocks - 1, -1, -1):
            out_filters = min(max_features, block_expansion * (2 ** level))
            up_blocks.append(UpBlock2d(in_filters, out_filters))
            in_filters = out_filters + _level_features(level, in_features, block_expansion, max_features)
            self.out_channels.append(in_filters)
        self.up_blocks = nn.ModuleList(up_blocks)

    def forward(self, encoder_outputs):
        """encoder_outputs: the list returned by :class:`Encoder` (not modified)."""
        out = encoder_outputs[-1]
        outs = []
        for i, block in enumerate(self.up_blocks):
            out = torch.cat([block(out), encoder_outputs[-(i + 2)]], dim=1)
            outs.append(out)
        return outs


class Hourglass(nn.Module):
    """U-Net style hourglass: (B, in_features, H, W) -> list of every decoder level, coarsest first.

    H and W must be divisible by 2^num_blocks. ``out_channels`` lists the channels of each level.
    """

    def __init__(self, block_expansion, in_features, num_blocks=3, max_features=256):
        super().__init__()
        self.encoder = Encoder(block_expansion, in_features, num_blocks, max_features)
        self.decoder = Decoder(block_expansion, in_features, num_blocks, max_features)
        self.out_channels = list(self.decoder.out_channels)

    def forward(self, x):
        return self.decoder(self.encoder(x))


class AntiAliasInterpolation2d(nn.Module):
    """Band-limited downsampling: Gaussian blur (sigma = (1/scale - 1)/2) then nearest resize by ``scale``.

    (B, channels, H, W) -> (B, channels, floor(H*scale), floor(W*scale)); identity when scale == 1.
    The blur kernel is a persistent buffer ``weight`` (state-dict compatible with the official code).
    """

    def __init__(self, channels, scale):
        super().__init__()
        if not 0.0 < scale <= 1.0:
            raise ValueError(f"AntiAliasInterpolation2d scale must be in (0, 1], got {scale}")
        sigma = (1.0 / scale - 1.0) / 2.0
        kernel_size = 2 * round(sigma * 4) + 1
        self.ka = kernel_size // 2
        self.kb = self.ka
        coords = torch.arange(kernel_size, dtype=torch.float32) - (kernel_size - 1) / 2.0
        gauss = torch.exp(-coords ** 2 / (2.0 * sigma ** 2)) if sigma > 0 else torch.ones(1)
        kernel = gauss[:, None] * gauss[None, :]
        kernel = kernel / kernel.sum()
        self.register_buffer("weight", kernel.expand(channels, 1, kernel_size, kernel_size).clone())
        self.groups = channels
        self.scale = scale

    def forward(self, x):
        if self.scale == 1.0:
            return x
        out = F.pad(x, (self.ka, self.kb, self.ka, self.kb))
        out = F.conv2d(out, weight=self.weight.to(dtype=out.dtype), groups=self.groups)
        return F.interpolate(out, scale_factor=(self.scale, self.scale))
