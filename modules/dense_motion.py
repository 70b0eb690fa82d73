"""Dense motion network (TPSMM/CPABMM): the warps of a motion model mixed into one flow, plus occlusions.

Conventions: keypoints and grids are (x, y) in [-1, 1]^2 (``grid_sample``, ``align_corners=True``).
Every warp is a driving->source backward grid: ``grid_sample(source, grid)`` puts source content at
the driving positions. Warps are stacked in the order [background, the motion model's warps] (for
CPAB: [background, K partial, global]; for TPS: [background, K splines]).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from modules.blocks import AntiAliasInterpolation2d, Hourglass, UpBlock2d, identity_grid, kp2gaussian

_NUM_OCCLUSIONS = 4
_PARTITION_EPS = 1e-6


def dropout_softmax(logits, p):
    """Softmax over dim 1 of (B, W, h, w) logits, each channel but the first (background) dropped for
    the whole sample with probability ``p`` (TPSMM/CPABMM Eq. 8); the kept ones are renormalised.

    Faithful to the official code: its 1/(1-p) rescale divides the logits after the exponential was
    taken, so it never has an effect; no rescale is applied here. The partition gets + 1e-6 as upstream.
    """
    bs, num = logits.shape[:2]
    keep = torch.rand(bs, num, device=logits.device) < 1 - p
    keep[:, 0] = True
    shifted = logits - logits.amax(dim=1, keepdim=True)
    weights = shifted.exp() * keep[:, :, None, None].to(logits.dtype)
    return weights / (weights.sum(dim=1, keepdim=True) + _PARTITION_EPS)


def affine_grid(bg_param, size):
    """Background warp: (B, 3, 3) matrices applied to homogeneous identity-grid points (then divided by
    the third coordinate, as upstream) -> (B, H, W, 2)."""
    grid = identity_grid(size, bg_param.dtype, bg_param.device)
    out = torch.einsum("bij,hwj->bhwi", bg_param[:, :, :2], grid) + bg_param[:, None, None, :, 2]
    return out[..., :2] / out[..., 2:3]


class DenseMotionNetwork(nn.Module):
    """Estimates the dense driving->source flow and multi-resolution occlusion masks from the warps of an
    injected motion model (``modules/motion.py``: CPAB for CPABMM, TPS for TPSMM, or any other).

    The warps are [background, the motion model's num_warps]: 1 + motion.num_warps in all (K + 2 for
    CPAB with its global warp, K + 1 for TPS). The background warp is the BG predictor's affine
    (``bg_param``) or the identity. The network never asks which motion model it holds.

    Args:
        motion: the motion model (``num_warps``, ``warps(kp_driving, kp_source, size)``).
        num_keypoints: N, keypoints per image (5K): one heatmap channel each.
        num_channels: image channels.
        block_expansion, num_blocks, max_features: the hourglass.
        scale_factor: resolution of the dense motion relative to the input, in (0, 1].
        multi_mask: 4 occlusion masks at 1/8, 1/4, 1/2, 1 of the input (else one at the motion size).
        kp_variance: variance of the Gaussian keypoint heatmaps.
    """

    def __init__(self, motion, num_keypoints, num_channels, block_expansion, num_blocks, max_features,
                 scale_factor, multi_mask, kp_variance):
        super().__init__()
        if not 0.0 < scale_factor <= 1.0:
            raise ValueError(f"dense_motion_params.scale_factor must be in (0, 1], got {scale_factor}")
        self.motion = motion
        self.num_keypoints = num_keypoints
        self.scale_factor = scale_factor
        self.multi_mask = multi_mask
        self.kp_variance = kp_variance
        self.num_warps = 1 + motion.num_warps

        if scale_factor != 1:
            self.down = AntiAliasInterpolation2d(num_channels, scale_factor)

        in_features = num_channels * self.num_warps + num_keypoints + 1
        self.hourglass = Hourglass(block_expansion=block_expansion, in_features=in_features,
                                   max_features=max_features, num_blocks=num_blocks)
        channels = self.hourglass.out_channels
        self.maps = nn.Conv2d(channels[-1], self.num_warps, kernel_size=(7, 7), padding=(3, 3))

        if multi_mask:
            self.up_nums = int(round(math.log2(1 / scale_factor)))
            from_decoder = _NUM_OCCLUSIONS - self.up_nums
            if not 0 <= from_decoder <= num_blocks:
                raise ValueError(f"multi_mask needs scale_factor in [1/8, 1] with enough hourglass "
                                 f"blocks, got scale_factor={scale_factor}, num_blocks={num_blocks}")
            self.up = nn.ModuleList(UpBlock2d(channels[-1] // 2 ** i, channels[-1] // 2 ** i // 2)
                                    for i in range(self.up_nums))
            occlusion_in = channels[len(channels) - from_decoder:] + [
                channels[-1] // 2 ** (i + 1) for i in range(self.up_nums)]
        else:
            self.up_nums = 0
            occlusion_in = [channels[-1]]
        self.occlusion = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=(7, 7), padding=(3, 3)) for c in occlusion_in)

    def create_heatmap_representations(self, size, kp_driving, kp_source):
        """(B, N + 1, h, w): a zero channel, then Gaussian(driving) - Gaussian(source) per keypoint."""
        heatmap = (kp2gaussian(kp_driving, size, self.kp_variance)
                   - kp2gaussian(kp_source, size, self.kp_variance))
        return F.pad(heatmap, (0, 0, 0, 0, 1, 0))

    def create_transformations(self, size, kp_driving, kp_source, bg_param):
        """(B, num_warps, h, w, 2) driving->source grids: [background, the motion model's warps]."""
        bs = kp_driving.shape[0]
        h, w = size
        if bg_param is None:
            background = identity_grid(size, kp_driving.dtype, kp_driving.device).expand(bs, 1, h, w, 2)
        else:
            background = affine_grid(bg_param.to(kp_driving.dtype), size)[:, None]
        warps = self.motion.warps(kp_driving, kp_source, (h, w))
        if warps.shape != (bs, self.num_warps - 1, h, w, 2):
            raise ValueError(f"{type(self.motion).__name__}.warps returned {tuple(warps.shape)}, expected "
                             f"{(bs, self.num_warps - 1, h, w, 2)} (B, num_warps, h, w, 2)")
        return torch.cat([background, warps.to(background.dtype)], dim=1)

    def create_deformed_source_image(self, source_image, transformations):
        """(B, num_warps, C, h, w): the (downscaled) source warped by every grid."""
        bs, c, h, w = source_image.shape
        num = transformations.shape[1]
        source = source_image[:, None].expand(bs, num, c, h, w).reshape(bs * num, c, h, w)
        deformed = F.grid_sample(source, transformations.reshape(bs * num, h, w, 2), align_corners=True)
        return deformed.view(bs, num, c, h, w)

    def forward(self, source_image, kp_driving, kp_source, bg_param=None, dropout_flag=False, dropout_p=0.0):
        """source_image (B, C, H, W); kp_driving / kp_source: {'fg_kp': (B, 5K, 2)}; bg_param (B, 3, 3)
        mapping driving to source coordinates, or None for the identity background warp.

        Returns 'deformed_source' (B, W, C, h, w), 'transformations' (B, W, h, w, 2),
        'contribution_maps' (B, W, h, w) summing to ~1 over W, 'deformation' (B, h, w, 2) the mixed flow,
        and 'occlusion_map': 4 maps (B, 1, .) at 1/8, 1/4, 1/2, 1 of H x W (multi_mask), else one at
        h x w. (h, w) = scale_factor * (H, W); W = num_warps = 1 + motion.num_warps.
        """
        if self.scale_factor != 1:
            source_image = self.down(source_image)
        bs, _, h, w = source_image.shape
        kp_d, kp_s = kp_driving["fg_kp"], kp_source["fg_kp"]

        heatmap = self.create_heatmap_representations((h, w), kp_d, kp_s)
        # The keypoint fits and the warps are geometry: they run in (at least) float32 with autocast off,
        # so bf16 autocast (train_params.amp) never reaches the solves, the fits or the CPAB integrator.
        geometry = torch.promote_types(kp_d.dtype, torch.float32)
        with torch.autocast(device_type=kp_d.device.type, enabled=False):
            transformations = self.create_transformations(
                (h, w), kp_d.to(geometry), kp_s.to(geometry), None if bg_param is None else bg_param.to(geometry))
        deformed_source = self.create_deformed_source_image(source_image, transformations)
        prediction = self.hourglass(torch.cat([heatmap, deformed_source.reshape(bs, -1, h, w)], dim=1))

        logits = self.maps(prediction[-1])
        if dropout_flag:
            contribution_maps = dropout_softmax(logits, dropout_p)
        else:
            contribution_maps = F.softmax(logits, dim=1)
        deformation = torch.einsum("bkhw,bkhwc->bhwc", contribution_maps, transformations)

        if self.multi_mask:
            from_decoder = _NUM_OCCLUSIONS - self.up_nums
            features = list(prediction[len(prediction) - from_decoder:])
            out = prediction[-1]
            for up in self.up:
                out = up(out)
                features.append(out)
        else:
            features = [prediction[-1]]
        occlusion_map = [torch.sigmoid(conv(f)) for conv, f in zip(self.occlusion, features, strict=True)]
        return {
            "deformed_source": deformed_source,
            "transformations": transformations,
            "contribution_maps": contribution_maps,
            "deformation": deformation,
            "occlusion_map": occlusion_map,
        }
