"""`cpab.CPAB` velocity / transform / grid: accuracy against a fine ODE reference, properties, errors."""
import pytest
import torch
import torch.nn.functional as F

from cpab import CPAB
from cpab.integrate import cell_index, integrate, integrate_rk4


def rk4_reference(model, points, theta, n_steps=2000):
    """Float64 classical RK4 on the field of theta (the reference: `cpab.integrate.integrate_rk4`)."""
    return integrate_rk4(points, model.cell_affines(theta), model.nx, model.ny, n_steps)


@pytest.mark.parametrize("n", [4, 6])
def test_matches_rk4_reference(n):
    model = CPAB((n, n)).double()
    theta = torch.randn(2, model.dim, dtype=torch.float64)
    points = torch.rand(2, 600, 2, dtype=torch.float64) * 2 - 1  # 1200 points
    ref = rk4_reference(model, points, theta)
    out = model.transform(points, theta)
    assert (ref - points).norm(dim=-1).mean() > 0.15  # the motion is not trivial
    assert (out - ref).abs().max() < 1e-3


def test_identity_and_inverse():
    model = CPAB((4, 4)).double()
    points = torch.rand(3, 200, 2, dtype=torch.float64) * 2 - 1
    zero = torch.zeros(3, model.dim, dtype=torch.float64)
    assert torch.equal(model.transform(points, zero), points)
    theta = torch.randn(3, model.dim, dtype=torch.float64)
    moved = model.transform(points, theta)
    assert (moved - points).abs().max() > 0.1
    assert (model.transform(moved, -theta) - points).abs().max() < 1e-4


def test_volume_preserving_jacobian_determinant_is_one():
    model = CPAB((4, 4), volume_preservation=True).double()
    theta = torch.randn(1, model.dim, dtype=torch.float64)
    points = torch.rand(1, 50, 2, dtype=torch.float64) * 1.6 - 0.8
    jac = torch.autograd.functional.jacobian(lambda p: model.transform(p, theta).sum(1), points)  # (1, 2, 1, N, 2)
    dets = torch.stack([torch.linalg.det(jac[0, :, 0, k, :]) for k in range(points.shape[1])])
    assert (dets - 1).abs().max() < 1e-3
    # The non-volume-preserving variant really changes areas (the check above can fail).
    plain = CPAB((4, 4)).double()
    theta = torch.randn(1, plain.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    jac = torch.autograd.functional.jacobian(lambda p: plain.transform(p, theta).sum(1), points)
    dets = torch.stack([torch.linalg.det(jac[0, :, 0, k, :]) for k in range(points.shape[1])])
    assert (dets - 1).abs().max() > 0.05


def test_zero_boundary_keeps_the_square():
    model = CPAB((4, 4), zero_boundary=True).double()
    theta = 2 * torch.randn(2, model.dim, dtype=torch.float64)
    inside = torch.rand(2, 300, 2, dtype=torch.float64) * 2 - 1
    out = model.transform(inside, theta)
    assert out.abs().max() <= 1 + 1e-6
    s = torch.rand(2, 50, dtype=torch.float64) * 2 - 1
    border = torch.stack([torch.full_like(s, -1.0), s], -1)  # left side: x stays -1
    assert (model.transform(border, theta)[..., 0] + 1).abs().max() < 1e-9
    corners = torch.tensor([[[-1.0, -1.0], [1.0, 1.0]]], dtype=torch.float64).expand(2, -1, -1)
    assert (model.transform(corners, theta) - corners).abs().max() < 1e-9


def test_finite_for_large_theta_and_points_outside():
    model = CPAB((6, 6))
    theta = 10 * torch.randn(2, model.dim)
    points = torch.rand(2, 300, 2) * 6 - 3
    out = model.transform(points, theta)
    assert torch.isfinite(out).all()
    assert (out - points).abs().max() > 0.1


def test_float32_matches_float64():
    model = CPAB((4, 4))
    theta = torch.randn(2, model.dim)
    points = torch.rand(2, 300, 2) * 2 - 1
    out32 = model.transform(points, theta)
    out64 = model.double().transform(points.double(), theta.double())
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64
    assert (out32.double() - out64).abs().max() < 1e-4


def test_batch_items_are_independent():
    model = CPAB((4, 4)).double()
    theta = torch.randn(3, model.dim, dtype=torch.float64)
    points = torch.rand(3, 40, 2, dtype=torch.float64) * 2 - 1
    together = model.transform(points, theta)
    for b in range(3):
        assert torch.allclose(model.transform(points[b:b + 1], theta[b:b + 1]), together[b:b + 1], atol=1e-12)


def test_gradcheck_theta_and_points():
    model = CPAB((2, 2)).double()
    theta = (0.5 * torch.randn(1, model.dim, dtype=torch.float64)).requires_grad_()
    points = (torch.rand(1, 3, 2, dtype=torch.float64) * 1.8 - 0.9).requires_grad_()
    moved = model.transform(points, theta)
    assert (cell_index(moved, 2, 2) != cell_index(points, 2, 2)).any()  # the path crosses cells
    assert torch.autograd.gradcheck(lambda p, t: model.transform(p, t), (points, theta), eps=1e-6, atol=1e-5)


def test_gradient_matches_finite_difference_of_reference():
    # Autograd through the discrete integrator approximates the gradient of the exact flow.
    model = CPAB((4, 4)).double()
    theta = torch.randn(1, model.dim, dtype=torch.float64, requires_grad=True)
    points = torch.rand(1, 30, 2, dtype=torch.float64) * 2 - 1
    direction = torch.randn(1, model.dim, dtype=torch.float64)
    (grad,) = torch.autograd.grad(model.transform(points, theta).sum(), theta)
    eps = 1e-4
    with torch.no_grad():
        fd = (rk4_reference(model, points, theta + eps * direction, 500).sum()
              - rk4_reference(model, points, theta - eps * direction, 500).sum()) / (2 * eps)
    assert abs(float((grad * direction).sum()) - float(fd)) < 1e-2 * max(1.0, abs(float(fd)))


def test_transform_jacobian_matches_autograd_on_the_reference_backend():
    # CPAB.transform_jacobian on a CPU: the sensitivity propagated along the path, no autograd; a few
    # percent at worst (here 0.1 %) of the autograd Jacobian of the same discrete integrator.
    model = CPAB((4, 4), backend="reference").double()
    theta = 0.5 * torch.randn(3, model.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    points = torch.rand(3, 7, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 1.8 - 0.9
    out, jac = model.transform_jacobian(points, theta)
    full = torch.autograd.functional.jacobian(lambda t: model.transform(points, t), theta)  # (3, 7, 2, 3, d)
    expected = torch.stack([full[b, :, :, b] for b in range(3)])
    assert jac.shape == (3, 7, 2, model.dim) and not jac.requires_grad
    assert torch.allclose(out, model.transform(points, theta), atol=1e-12)
    assert (jac - expected).norm() < 0.01 * expected.norm()
    assert expected.norm() > 1.0


def test_velocity_is_linear_in_theta_and_matches_cell_affines():
    model = CPAB((4, 4)).double()
    a, b = torch.randn(2, 1, model.dim, dtype=torch.float64)
    points = torch.rand(1, 100, 2, dtype=torch.float64) * 2 - 1
    assert torch.allclose(model.velocity(points, a + 2 * b),
                          model.velocity(points, a) + 2 * model.velocity(points, b), atol=1e-12)
    # A tiny flow moves points by ~velocity * time.
    small = 1e-4 * a
    assert torch.allclose(model.transform(points, small) - points, model.velocity(points, small), atol=1e-7)


def test_grid_convention():
    model = CPAB((4, 4))
    zero = torch.zeros(2, model.dim)
    grid = model.grid(zero, size=(5, 7))
    identity = F.affine_grid(torch.eye(2, 3).expand(2, 2, 3), (2, 1, 5, 7), align_corners=True)
    assert grid.shape == (2, 5, 7, 2)
    assert torch.allclose(grid, identity, atol=1e-6)
    theta = torch.randn(2, model.dim)
    grid = model.grid(theta, size=(5, 7))
    assert torch.allclose(grid.view(2, -1, 2), model.transform(identity.reshape(2, -1, 2), theta), atol=1e-6)


def test_integrate_pure_function_matches_module():
    model = CPAB((4, 4)).double()
    theta = torch.randn(2, model.dim, dtype=torch.float64)
    points = torch.rand(2, 50, 2, dtype=torch.float64) * 2 - 1
    out = integrate(points, model.cell_affines(theta), 4, 4)
    assert torch.equal(out, model.transform(points, theta))


def test_empty_point_set():
    model = CPAB((4, 4))
    assert model.transform(torch.zeros(2, 0, 2), torch.randn(2, model.dim)).shape == (2, 0, 2)
    assert model.transform(torch.zeros(0, 3, 2), torch.randn(0, model.dim)).shape == (0, 3, 2)


@pytest.mark.parametrize("bad_points, bad_theta, error", [
    ("shape", None, ValueError), ("last", None, ValueError), ("batch", None, ValueError),
    (None, "dim", ValueError), (None, "ndim", ValueError), ("nan", None, ValueError),
    (None, "inf", ValueError), ("int", None, TypeError), ("list", None, TypeError), ("dtype", None, TypeError),
])
def test_clear_errors(bad_points, bad_theta, error):
    model = CPAB((4, 4), check_finite=True)
    points, theta = torch.rand(2, 5, 2), torch.randn(2, model.dim)
    points = {"shape": torch.rand(5, 2), "last": torch.rand(2, 5, 3), "batch": torch.rand(3, 5, 2),
              "nan": torch.full((2, 5, 2), float("nan")), "int": torch.zeros(2, 5, 2, dtype=torch.long),
              "list": [[0.0, 0.0]], "dtype": points.double(), None: points}[bad_points]
    theta = {"dim": torch.randn(2, model.dim + 1), "ndim": torch.randn(model.dim),
             "inf": torch.full((2, model.dim), float("inf")), None: theta}[bad_theta]
    with pytest.raises(error) as info:
        model.transform(points, theta)
    assert "\n" not in str(info.value) and len(str(info.value)) > 10


def test_constructor_and_grid_errors():
    with pytest.raises(ValueError):
        CPAB((4,))
    with pytest.raises(ValueError):
        CPAB((0, 4))
    with pytest.raises(ValueError):
        CPAB((4, 4), steps=0)
    model = CPAB((4, 4))
    with pytest.raises(ValueError):
        model.grid(torch.randn(1, model.dim), size=(0, 4))
    with pytest.raises(ValueError):
        model.grid(torch.randn(1, model.dim + 2), size=(4, 4))


def test_finiteness_checks_are_opt_in_and_the_reference_names_a_non_finite_theta():
    model = CPAB((4, 4))
    points, theta = torch.rand(2, 5, 2) * 2 - 1, torch.randn(2, model.dim)
    nan_points = points.clone()
    nan_points[0, 0, 0] = float("nan")
    out = model.transform(nan_points, theta)  # unchecked by default: NaN in, NaN out, nothing raised
    assert torch.isnan(out[0, 0]).any() and torch.isfinite(out[1]).all()
    bad_theta = theta.clone()
    bad_theta[1, 2] = float("nan")
    with pytest.raises(ValueError, match="theta .*non-finite"):  # was "cannot convert float NaN to integer"
        model.transform(points, bad_theta)
    with pytest.raises(ValueError, match="theta"):
        model.grid(torch.full((1, model.dim), float("inf")), (4, 4))
    with pytest.raises(ValueError, match="points contains non-finite"):
        CPAB((4, 4), check_finite=True).transform(nan_points, theta)
