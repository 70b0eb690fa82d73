"""Equivariance loss with a random thin-plate spline (FOMM/TPSMM/CPABMM).

Keypoints are (B, N, 2), (x, y) in [-1, 1] (``grid_sample``, ``align_corners=True``). The driving
frame D is resampled with a random TPS T (``sigma_affine``, ``sigma_tps``, ``points_tps`` x
``points_tps`` control points; ``grid_sample(D, T.grid)`` with reflection padding), keypoints are
detected on the transformed frame, mapped back with T, and compared with the keypoints of D:
loss = mean |kp(D) - T(kp(T D))| over batch, keypoints and coordinates.
"""
import torch.nn.functional as F

from modules.tps import TPS


def random_transform(driving, sigma_affine, sigma_tps, points_tps, generator=None):
    """Draw one random TPS per image and apply it to ``driving`` (B, C, H, W).

    Returns (tps, transformed_frame), the frame resampled with reflection padding.
    """
    tps = TPS.random(driving.shape[0], sigma_affine=sigma_affine, sigma_tps=sigma_tps, points_tps=points_tps,
                     device=driving.device, dtype=driving.dtype, generator=generator)
    grid = tps.transform_frame(driving)
    transformed = F.grid_sample(driving, grid, padding_mode="reflection", align_corners=True)
    return tps, transformed


def equivariance_loss(kp_driving, kp_transformed, tps):
    """mean |kp_driving - tps.warp_coordinates(kp_transformed)|; both keypoint sets (B, N, 2)."""
    if kp_driving.shape != kp_transformed.shape:
        raise ValueError(f"keypoint shapes differ: {tuple(kp_driving.shape)} vs {tuple(kp_transformed.shape)}")
    return (kp_driving - tps.warp_coordinates(kp_transformed)).abs().mean()
