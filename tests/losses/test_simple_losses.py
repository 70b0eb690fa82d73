"""Equivariance, warp and background losses against hand computations."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from losses.background import background_loss
from losses.equivariance import equivariance_loss, random_transform
from losses.warp import warp_loss
from modules.tps import TPS


def _tps_by_hand(tps, points):
    """f(p) = A p + b + sum_i w_i U(|p - c_i|^2), U(r) = r log r, for (B, M, 2) points."""
    theta = tps.theta[:, 0]
    ctrl = tps.control_points[0, 0]
    weights = tps.control_params[:, 0]
    out = torch.einsum("bij,bmj->bmi", theta[:, :, :2], points) + theta[:, None, :, 2]
    r2 = ((points[:, :, None, :] - ctrl[None, None]) ** 2).sum(-1)
    radial = r2 * torch.log(r2 + 1e-9)
    return out + torch.einsum("bmn,bnk->bmk", radial, weights)


def test_random_transform_resamples_with_reflection_padding():
    driving = torch.rand(2, 3, 12, 10)
    gen = torch.Generator().manual_seed(3)
    tps, frame = random_transform(driving, sigma_affine=0.3, sigma_tps=0.05, points_tps=3, generator=gen)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 12), torch.linspace(-1, 1, 10), indexing="ij")
    grid = _tps_by_hand(tps, torch.stack([xs, ys], -1).reshape(1, -1, 2).expand(2, -1, -1)).reshape(2, 12, 10, 2)
    expected = F.grid_sample(driving, grid, padding_mode="reflection", align_corners=True)
    assert grid.abs().max() > 1.0  # some samples fall outside: padding matters
    torch.testing.assert_close(frame, expected, atol=1e-5, rtol=1e-5)


def test_identity_transform_keeps_the_frame():
    driving = torch.rand(1, 3, 9, 9)
    tps, frame = random_transform(driving, sigma_affine=0.0, sigma_tps=0.0, points_tps=5)
    torch.testing.assert_close(frame, driving, atol=1e-5, rtol=0)


def test_equivariance_loss_value_and_zero():
    gen = torch.Generator().manual_seed(1)
    tps = TPS.random(2, sigma_affine=0.1, sigma_tps=0.01, points_tps=5, generator=gen)
    kp_t = torch.rand(2, 7, 2) * 2 - 1
    kp_d = torch.rand(2, 7, 2) * 2 - 1
    expected = (kp_d - _tps_by_hand(tps, kp_t)).abs().mean()
    torch.testing.assert_close(equivariance_loss(kp_d, kp_t, tps), expected)
    assert equivariance_loss(_tps_by_hand(tps, kp_t), kp_t, tps).item() < 1e-6


def test_equivariance_loss_reaches_the_detector():
    detector = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6), nn.Tanh())
    driving = torch.rand(2, 3, 16, 16)
    tps, frame = random_transform(driving, sigma_affine=0.05, sigma_tps=0.005, points_tps=5)
    value = equivariance_loss(detector(driving).view(2, 3, 2), detector(frame).view(2, 3, 2), tps)
    value.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in detector.parameters())


def test_warp_loss_pairs_level_i_with_level_minus_i_minus_1():
    shapes = [(2, 4, 8, 8), (2, 8, 4, 4), (2, 16, 2, 2)]
    encoded = [torch.rand(s) for s in shapes]
    warped = [torch.rand(s) for s in reversed(shapes)]
    expected = sum((encoded[i] - warped[2 - i]).abs().mean() for i in range(3))
    torch.testing.assert_close(warp_loss(encoded, warped), expected)
    assert warp_loss(encoded, list(reversed(encoded))).item() == 0.0
    with pytest.raises(ValueError, match="as many"):
        warp_loss(encoded, warped[:2])


def test_background_loss_by_hand():
    a = torch.eye(3).repeat(2, 1, 1)
    b = torch.diag(torch.tensor([2.0, 2.0, 1.0])).repeat(2, 1, 1)
    # A B - I = diag(1, 1, 0): two non-zero entries out of 9.
    torch.testing.assert_close(background_loss(a, b), torch.tensor(2.0 / 9.0))
    m = torch.tensor([[[1.1, 0.2, 0.1], [-0.1, 0.9, 0.05], [0.0, 0.0, 1.0]]])
    assert background_loss(m, torch.linalg.inv(m)).item() < 1e-6
