"""`CPAB.fit`: the faithful Adam procedure and the Gauss-Newton fit."""
import pytest
import torch

from cpab import CPAB
from cpab.fit import fit_loss


def mean_residual(model, theta, x, y):
    with torch.no_grad():
        return float((model.transform(x, theta) - y).norm(dim=-1).mean())


def cpabmm_problem(batch, generator_seed=0):
    """CPABMM-shaped keypoints: 10 groups of 5 (partial, 4x4) and all 50 (global, 6x6);
    driving = source + N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(generator_seed)
    x = torch.rand(batch, 50, 2, generator=g) * 1.6 - 0.8
    y = x + 0.1 * torch.randn(x.shape, generator=g)
    return x, y


def test_gauss_newton_beats_official_adam():
    # One CPABMM sample: 10 partial fits of 5 keypoints (4x4) and one global fit of all 50 (6x6).
    partial, glob = CPAB((4, 4)), CPAB((6, 6))
    x, y = cpabmm_problem(1)
    xp, yp = x.reshape(10, 5, 2), y.reshape(10, 5, 2)
    start = float((xp - yp).norm(dim=-1).mean())
    adam_p = mean_residual(partial, partial.fit(xp, yp, method="adam", iterations=100), xp, yp)
    gn_p = mean_residual(partial, partial.fit(xp, yp, method="gauss_newton", iterations=10), xp, yp)
    adam_g = mean_residual(glob, glob.fit(x, y, method="adam", iterations=150), x, y)
    gn_g = mean_residual(glob, glob.fit(x, y, method="gauss_newton", iterations=10), x, y)
    assert adam_p < 0.5 * start and adam_g < start  # Adam does fit
    assert gn_p < adam_p and gn_g < adam_g


def test_batch_norm_loss_is_one_norm_over_the_whole_batch():
    residual = torch.randn(3, 5, 2)
    assert torch.allclose(fit_loss(residual), torch.norm(residual))  # the default: CPABMM's
    assert torch.allclose(fit_loss(residual, "batch_norm"), torch.norm(residual))
    per_item = torch.stack([torch.norm(r) for r in residual]).sum()
    assert not torch.allclose(fit_loss(residual), per_item)
    assert torch.allclose(fit_loss(residual, "least_squares"), (residual ** 2).sum())
    with pytest.raises(ValueError, match="loss"):
        fit_loss(residual, "l1")


def test_adam_couples_the_transforms_of_a_batch():
    # Faithful to the official code: the batch-wide norm makes one transform's fit depend on the others.
    model = CPAB((4, 4))
    x, y = cpabmm_problem(2)
    x, y = x[:, :5], y[:, :5]
    y_big = y.clone()
    y_big[1] = x[1] + 5 * (y[1] - x[1])  # a much larger motion for the second transform
    alone = model.fit(x[:1], y[:1], method="adam", iterations=10)
    together = model.fit(x, y, method="adam", iterations=10)
    with_big = model.fit(x, y_big, method="adam", iterations=10)
    assert (together[0] - alone[0]).abs().max() > 1e-4
    assert (with_big[0] - together[0]).abs().max() > 1e-4


def test_least_squares_loss_fits_the_transforms_independently():
    model = CPAB((4, 4))
    x, y = cpabmm_problem(2)
    x, y = x[:, :5], y[:, :5]
    y_big = y.clone()
    y_big[1] = x[1] + 5 * (y[1] - x[1])
    alone = model.fit(x[:1], y[:1], iterations=10, loss="least_squares")
    together = model.fit(x, y_big, iterations=10, loss="least_squares")
    assert torch.allclose(together[0], alone[0], atol=1e-6)
    assert mean_residual(model, together, x, y_big) < float((x - y_big).norm(dim=-1).mean())
    with pytest.raises(ValueError, match="loss"):
        model.fit(x, y, loss="batch")


def test_adam_starts_from_theta_init():
    model = CPAB((4, 4))
    x, y = cpabmm_problem(2)
    theta = model.fit(x[:, :5], y[:, :5], method="adam", iterations=0)
    assert torch.equal(theta, torch.full((2, model.dim), 1e-6))
    theta = model.fit(x[:, :5], y[:, :5], method="adam", iterations=1, lr=1e-2)
    assert (theta - 1e-6).abs().max() == pytest.approx(1e-2, rel=1e-3)  # Adam's first step is lr * sign(g)


def test_gauss_newton_closed_form_start_is_the_linearised_solution():
    model = CPAB((4, 4)).double()
    x, y = cpabmm_problem(3)
    x, y = x[:, :5].double(), y[:, :5].double()
    theta0 = model.fit(x, y, method="gauss_newton", iterations=0, damping=1e-8)
    assert (model.velocity(x, theta0) - (y - x)).abs().max() < 1e-4  # 10 equations, 58 unknowns: exact


def test_gauss_newton_recovers_a_known_transform():
    model = CPAB((4, 4)).double()
    theta_true = 0.5 * torch.randn(2, model.dim, dtype=torch.float64)
    x = torch.rand(2, 60, 2, dtype=torch.float64) * 2 - 1
    y = model.transform(x, theta_true)
    theta = model.fit(x, y, method="gauss_newton", iterations=10, damping=1e-8)
    assert mean_residual(model, theta, x, y) < 1e-4
    assert float((y - x).norm(dim=-1).mean()) > 0.05


def test_gauss_newton_is_per_transform():
    model = CPAB((4, 4)).double()
    x, y = cpabmm_problem(3)
    x, y = x[:, :5].double(), y[:, :5].double()
    together = model.fit(x, y, method="gauss_newton", iterations=4)
    alone = model.fit(x[1:2], y[1:2], method="gauss_newton", iterations=4)
    assert torch.allclose(together[1:2], alone, atol=1e-8)


@pytest.mark.parametrize("method", ["adam", "gauss_newton"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_fit_under_no_grad_and_inference_mode(method, mode):
    model = CPAB((4, 4))
    x, y = cpabmm_problem(2)
    x, y = x[:, :5], y[:, :5]
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        theta = model.fit(x, y, method=method, iterations=3)
        assert model.transform(x, theta).shape == (2, 5, 2)
    assert theta.shape == (2, model.dim) and not theta.requires_grad
    assert not theta.is_inference()
    assert mean_residual(model, theta, x, y) < float((x - y).norm(dim=-1).mean())


def test_fit_with_module_built_under_inference_mode():
    with torch.inference_mode():
        model = CPAB((4, 4))
        x, y = cpabmm_problem(1)
        theta = model.fit(x[:, :5], y[:, :5], method="adam", iterations=2)
    assert torch.isfinite(theta).all()


def test_fit_leaves_keypoint_gradients_alone():
    model = CPAB((4, 4))
    x, y = cpabmm_problem(1)
    x = x[:, :5].clone().requires_grad_()
    theta = model.fit(x, y[:, :5], method="adam", iterations=2)
    assert x.grad is None and not theta.requires_grad


def test_fit_errors():
    model = CPAB((4, 4))
    x, y = cpabmm_problem(1)
    with pytest.raises(ValueError):
        model.fit(x, y, method="lbfgs")
    with pytest.raises(ValueError):
        model.fit(x, y[:, :4])
    with pytest.raises(TypeError):
        model.fit(x, y.double())
    with pytest.raises(ValueError):
        model.fit(x, y, iterations=-1)
    with pytest.raises(ValueError, match="y contains non-finite"):
        CPAB((4, 4), check_finite=True).fit(x, torch.full_like(y, float("nan")))
    with pytest.raises(ValueError, match="theta"):  # unchecked: the reference integrator refuses a NaN theta
        model.fit(x, torch.full_like(y, float("nan")), iterations=2)


def test_gauss_newton_many_iterations_stay_finite_and_default_is_ten():
    model = CPAB((4, 4))
    x, y = cpabmm_problem(2)
    x, y = x[:, :5], y[:, :5]
    ten = model.fit(x, y, method="gauss_newton")
    assert torch.equal(ten, model.fit(x, y, method="gauss_newton", iterations=10))
    many = model.fit(x, y, method="gauss_newton", iterations=40)  # converged: LM keeps refusing steps
    assert torch.isfinite(many).all()
    assert mean_residual(model, many, x, y) <= mean_residual(model, ten, x, y) + 1e-6
