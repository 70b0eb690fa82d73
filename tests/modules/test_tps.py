import torch

from modules.blocks import make_coordinate_grid
from modules.tps import TPS


def _reference_tps(points, theta, centres, weights):
    """Plain per-point evaluation of f(p) = A p + b + sum_i w_i U(|p - c_i|^2)."""
    out = []
    for p in points:
        value = theta[:, :2] @ p + theta[:, 2]
        for c, w in zip(centres, weights, strict=True):
            r2 = ((p - c) ** 2).sum()
            value = value + w * r2 * torch.log(r2 + 1e-9)
        out.append(value)
    return torch.stack(out)


def test_random_tps_shapes_and_identity_at_zero_sigma():
    gen = torch.Generator().manual_seed(3)
    tps = TPS.random(3, 0.0, 0.0, 5, generator=gen)
    grid = tps.transform_frame(torch.zeros(3, 1, 6, 7))
    assert grid.shape == (3, 6, 7, 2)
    assert torch.equal(grid, make_coordinate_grid((6, 7)).expand(3, 6, 7, 2))


def test_random_tps_matches_formula_and_shares_the_xy_weight():
    tps = TPS.random(2, 0.05, 0.005, 3, generator=torch.Generator().manual_seed(0))
    pts = torch.rand(2, 4, 2) * 2 - 1
    out = tps.warp_coordinates(pts)
    assert out.shape == (2, 4, 2)
    for b in range(2):
        ref = _reference_tps(pts[b], tps.theta[b, 0], tps.control_points[0, 0], tps.control_params[b, 0])
        assert torch.allclose(out[b], ref, atol=1e-6)
    # Faithful to the official code: one scalar weight per control point moves x and y alike.
    assert torch.equal(tps.control_params[..., 0], tps.control_params[..., 1])
    grid = tps.transform_frame(torch.zeros(2, 1, 4, 4))
    points = make_coordinate_grid((4, 4)).reshape(1, 16, 2).expand(2, 16, 2)
    assert torch.allclose(grid.reshape(2, 16, 2), tps.warp_coordinates(points))


def test_random_tps_is_reproducible_with_a_generator():
    a = TPS.random(2, 0.05, 0.005, 5, generator=torch.Generator().manual_seed(7))
    b = TPS.random(2, 0.05, 0.005, 5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.theta, b.theta) and torch.equal(a.control_params, b.control_params)
    assert not torch.equal(a.theta[0], a.theta[1])


def test_keypoint_tps_maps_driving_onto_source():
    torch.manual_seed(0)
    kp_d = torch.rand(2, 3, 5, 2) * 1.6 - 0.8
    kp_s = kp_d + 0.1 * torch.randn_like(kp_d)
    tps = TPS.from_keypoints(kp_d, kp_s)
    grid = tps.grid((8, 8))
    assert grid.shape == (2, 3, 8, 8, 2)
    for g in range(3):
        mapped = tps.warp_coordinates(kp_d[:, g])[:, g]
        # Regularised (0.01 on the diagonal): close to, not exactly, interpolating.
        assert (mapped - kp_s[:, g]).abs().max() < 0.03
        ref = _reference_tps(kp_d[0, g], tps.theta[0, g], tps.control_points[0, g], tps.control_params[0, g])
        assert torch.allclose(mapped[0], ref, atol=1e-5)


def test_keypoint_tps_recovers_an_affine_map():
    torch.manual_seed(1)
    kp_d = torch.rand(1, 1, 5, 2) * 1.6 - 0.8
    a = torch.tensor([[1.1, 0.1], [-0.05, 0.9]])
    b = torch.tensor([0.05, -0.1])
    kp_s = kp_d @ a.T + b
    tps = TPS.from_keypoints(kp_d, kp_s)
    assert (tps.warp_coordinates(kp_d[0])[0, 0] - kp_s[0, 0]).abs().max() < 0.005
    # The 0.01 regulariser on the whole diagonal moves the affine part a little away from (a, b).
    assert torch.allclose(tps.theta[0, 0], torch.cat([a, b[:, None]], 1), atol=0.1)


def test_keypoint_tps_gradcheck():
    torch.manual_seed(2)
    kp_d = (torch.rand(1, 2, 5, 2, dtype=torch.float64) * 1.6 - 0.8).requires_grad_()
    kp_s = (kp_d.detach() + 0.1 * torch.randn_like(kp_d)).requires_grad_()
    pts = torch.rand(1, 6, 2, dtype=torch.float64) * 2 - 1
    assert torch.autograd.gradcheck(lambda d, s: TPS.from_keypoints(d, s).warp_coordinates(pts), (kp_d, kp_s))
