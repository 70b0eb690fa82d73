"""Reference keypoint fits (PyTorch): theta (B, d) such that the transform of x is close to y, x, y (B, N, 2).

These are the fits of the reference backend and the references the Triton fits (`cpab.fused`) are
tested against. Both return a detached theta and work when called under `torch.no_grad()` or
`torch.inference_mode()`: inputs are cloned into normal tensors inside `torch.inference_mode(False)`,
gradients are taken with `torch.enable_grad()` + `torch.autograd.grad` on tensors created here only.
Coordinates: [-1, 1]^2, (x, y); theta has libcpab's [0, 1]-domain meaning (see `cpab.transform`).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .integrate import cell_affines, flow_table, integrate, integrate_table

LOSSES = ("batch_norm", "least_squares")


def _clone_inputs(*tensors):
    """Normal (non-inference, detached) copies, to be called inside torch.inference_mode(False)."""
    return tuple(t.detach().clone() for t in tensors)


def fit_loss(residual: torch.Tensor, loss: str = "batch_norm") -> torch.Tensor:
    """The Adam fit's objective for residuals (B, N, 2) in [-1, 1] units, a scalar.

    "batch_norm": ONE unsquared Frobenius norm over all residuals of the whole batch, which couples the
    transforms of a batch (CPABMM's choice). "least_squares": the sum over transforms of their squared
    residual norms (independent transforms).
    """
    if loss == "batch_norm":
        # Faithful to the official code: torch.norm(T(kp_d) - kp_s) over the whole batch, after mapping T's
        # output back to [-1, 1].
        return torch.linalg.vector_norm(residual)
    if loss == "least_squares":
        return residual.square().sum()
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def _transform(model, x, theta):
    """The reference integrator's transform of x (B, N, 2) by theta (B, d), differentiable."""
    return integrate(x, cell_affines(theta, model.basis, model.n_cells), model.nx, model.ny, steps=model.steps,
                     refine=model.refine, max_crossings=model.max_crossings)


def fit_adam(model, x: torch.Tensor, y: torch.Tensor, iterations: int, lr: float, theta_init: float,
             loss: str = "batch_norm") -> torch.Tensor:
    """The official CPABMM procedure (paper Eq. 6, `CPABTransformation`): Adam from a constant theta.

    theta starts at `theta_init` in every coordinate, then `iterations` steps of torch.optim.Adam
    (learning rate `lr`, default betas) on `fit_loss(transform(x) - y, loss)`. The official code
    integrates on libcpab's [0, 1]^2 domain (u = (x + 1) / 2) and maps the result back to [-1, 1] before
    the loss; with the same theta our flow is that flow (see `cpab.transform`), so with loss="batch_norm"
    this is the official loss exactly, up to the choice of orthonormal basis and the integrator's (small)
    error.
    """
    with torch.inference_mode(False), torch.enable_grad():
        x, y = _clone_inputs(x, y)
        theta = torch.full((x.shape[0], model.dim), float(theta_init), dtype=x.dtype, device=x.device,
                           requires_grad=True)
        optimizer = torch.optim.Adam([theta], lr=lr)
        for _ in range(iterations):
            objective = fit_loss(_transform(model, x, theta) - y, loss)
            (theta.grad,) = torch.autograd.grad(objective, theta)
            optimizer.step()
        return theta.detach()


def _solve(JtJ, rhs, shift):
    """Batched (JtJ + shift I) z = rhs, JtJ (B, d, d), rhs (B, d), shift (B,)."""
    eye = torch.eye(JtJ.shape[-1], dtype=JtJ.dtype, device=JtJ.device)
    # solve_ex without error checks: no host synchronisation; a singular system gives non-finite
    # entries, which the caller refuses.
    solution, _ = torch.linalg.solve_ex(JtJ + shift.view(-1, 1, 1) * eye, rhs.unsqueeze(-1), check_errors=False)
    return solution.squeeze(-1)


def path_jacobian(model, x: torch.Tensor, theta: torch.Tensor):
    """(transform(x, theta), d transform / d theta) (B, N, 2), (B, N, 2, d) of the reference integrator: the
    sensitivity `integrate_table` propagates along each path, accurate to a few percent, no autograd."""
    cell_basis = model.basis.to(dtype=x.dtype, device=x.device).view(model.n_cells, 6, model.dim)
    with torch.no_grad():
        affines = cell_affines(theta, model.basis, model.n_cells)
        table = flow_table(affines, model.steps, model.refine)
        return integrate_table(x, table, affines, model.nx, model.ny, model.steps, model.refine,
                               model.max_crossings, cell_basis=cell_basis)


def exact_jacobian(model, x: torch.Tensor, theta: torch.Tensor):
    """(transform(x, theta), d transform / d theta) of the reference integrator by autograd, exact for the
    discrete integrator: every (transform, point, output coordinate) becomes its own one-point problem, so
    one backward pass gives all 2 N rows. Slow; the reference for the Triton Jacobian."""
    B, N = x.shape[:2]
    with torch.inference_mode(False), torch.enable_grad():
        single = x.detach().reshape(B * N, 1, 1, 2).expand(B * N, 2, 1, 2).reshape(2 * B * N, 1, 2)
        thetas = theta.detach().repeat_interleave(2 * N, dim=0).requires_grad_(True)
        out = _transform(model, single, thetas).reshape(B * N, 2, 2)
        (grad,) = torch.autograd.grad(out.diagonal(dim1=1, dim2=2).sum(), thetas)
    return out.detach()[:, 0].reshape(B, N, 2), grad.reshape(B, N, 2, theta.shape[1])


def fit_gauss_newton(model, x: torch.Tensor, y: torch.Tensor, iterations: int, damping: float,
                     jacobian: Callable = path_jacobian) -> torch.Tensor:
    """Per transform b: minimise |transform(x_b, theta) - y_b|^2 + damping |theta|^2 (Levenberg-Marquardt).

    Start: the linearised closed form. The velocity is linear in theta, v(x; theta) = G(x) theta, and
    transform(x) ~= x + v(x) for small motions, so theta_0 solves (G^T G + damping I) theta = G^T (y - x).
    Then `iterations` Gauss-Newton steps, (J^T J + (damping + mu) I) delta = -(J^T r + damping theta),
    with J = d transform(x) / d theta from `jacobian(model, x, theta)` (default: the path sensitivity),
    batched solves over the B transforms, and a Levenberg-Marquardt safeguard per transform (a step that
    does not lower the objective is refused and mu grows tenfold; accepted steps shrink mu).
    """
    with torch.inference_mode(False), torch.no_grad():
        x, y = _clone_inputs(x, y)
        B, N = x.shape[:2]
        d = model.dim
        lam = torch.full((B,), float(damping), dtype=x.dtype, device=x.device)

        def evaluate(theta):
            out, jac = jacobian(model, x, theta)
            residual = (out - y).reshape(B, 2 * N)
            return residual, jac.reshape(B, 2 * N, d), (residual ** 2).sum(1) + lam * (theta ** 2).sum(1)

        _, G, _ = evaluate(torch.zeros(B, d, dtype=x.dtype, device=x.device))  # at theta = 0, J = G(x)
        theta = _solve(G.transpose(1, 2) @ G, (G.transpose(1, 2) @ (y - x).reshape(B, 2 * N, 1)).squeeze(-1), lam)
        residual, jac, objective = evaluate(theta)
        mu = torch.zeros(B, dtype=x.dtype, device=x.device)
        for _ in range(iterations):
            JtJ = jac.transpose(1, 2) @ jac
            gradient = (jac.transpose(1, 2) @ residual.unsqueeze(-1)).squeeze(-1) + lam.view(-1, 1) * theta
            candidate = theta + _solve(JtJ, -gradient, lam + mu)
            candidate = torch.where(torch.isfinite(candidate), candidate, theta)
            new_residual, new_jac, new_objective = evaluate(candidate)
            better = new_objective < objective
            keep = better.view(-1, 1)
            theta = torch.where(keep, candidate, theta)
            residual = torch.where(keep, new_residual, residual)
            jac = torch.where(keep.unsqueeze(-1), new_jac, jac)
            objective = torch.where(better, new_objective, objective)
            scale = JtJ.diagonal(dim1=1, dim2=2).mean(1)
            mu = torch.where(better, mu / 3.0, torch.maximum(10.0 * mu, 1e-3 * scale)).clamp(max=1e6 * scale.max())
        return theta
