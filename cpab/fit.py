"""Keypoint fits: theta (B, d) such that CPAB.transform(x, theta) ~= y, for keypoints x, y (B, N, 2).

Both fits return a detached theta and work when called under `torch.no_grad()` or
`torch.inference_mode()`: inputs are cloned into normal tensors inside `torch.inference_mode(False)`,
gradients are taken with `torch.enable_grad()` + `torch.autograd.grad` on tensors created here only.
Coordinates: [-1, 1]^2, (x, y); theta has libcpab's [0, 1]-domain meaning (see `cpab.transform`).
"""
import torch

from .integrate import flow_table, integrate_table
from .kernels import resolve_backend, transform_jacobian


def _clone_inputs(*tensors):
    """Normal (non-inference, detached) copies, to be called inside torch.inference_mode(False)."""
    return tuple(t.detach().clone() for t in tensors)


def official_loss(residual):
    """The official fit loss for residuals (B, N, 2) in [-1, 1] units: a scalar for the whole batch."""
    # Faithful to the official code: ONE unsquared Frobenius norm over all residuals of the whole batch,
    # torch.norm(T(kp_d) - kp_s) after mapping T's output back to [-1, 1], so the transforms of a batch
    # are coupled through it.
    return torch.linalg.vector_norm(residual)


def fit_adam(model, x, y, iterations, lr, theta_init):
    """The official CPABMM procedure (paper Eq. 6, `CPABTransformation`): Adam from a constant theta.

    theta starts at `theta_init` in every coordinate, then `iterations` steps of torch.optim.Adam
    (learning rate `lr`, default betas) on one loss for the whole batch (see the comment below).
    The official code integrates on libcpab's [0, 1]^2 domain (u = (x + 1) / 2) and maps the result
    back to [-1, 1] before the loss; with the same theta our flow is that flow (see `cpab.transform`),
    so the loss below is the official loss exactly (`official_loss`), up to the choice of orthonormal
    basis and the integrator's (small) error.
    """
    with torch.inference_mode(False), torch.enable_grad():
        x, y = _clone_inputs(x, y)
        theta = torch.full((x.shape[0], model.dim), float(theta_init), dtype=x.dtype, device=x.device,
                           requires_grad=True)
        optimizer = torch.optim.Adam([theta], lr=lr)
        for _ in range(iterations):
            loss = official_loss(model.transform_unchecked(x, theta) - y)
            (theta.grad,) = torch.autograd.grad(loss, theta)
            optimizer.step()
        return theta.detach()


def _solve(JtJ, rhs, shift):
    """Batched (JtJ + shift I) z = rhs, JtJ (B, d, d), rhs (B, d), shift (B,)."""
    eye = torch.eye(JtJ.shape[-1], dtype=JtJ.dtype, device=JtJ.device)
    # solve_ex without error checks: no host synchronisation; a singular system gives non-finite
    # entries, which the caller refuses.
    solution, _ = torch.linalg.solve_ex(JtJ + shift.view(-1, 1, 1) * eye, rhs.unsqueeze(-1), check_errors=False)
    return solution.squeeze(-1)


def _cell_basis(model, like):
    """The per-cell parameter basis (nC, 6, d): affines[b] = (cell_basis @ theta[b]).view(nC, 2, 3)."""
    return model.basis.to(dtype=like.dtype, device=like.device).view(model.n_cells, 6, model.dim)


def transform_and_jacobian(model, x, theta, cell_basis=None):
    """(out (B, N, 2), jac (B, N, 2, d)) = (transform(x, theta), its Jacobian in theta), no autograd
    graph kept. Triton backend: the kernel's exact adjoint Jacobian with no host synchronisation;
    reference: the sensitivity `integrate_table` propagates along the path (a few percent accurate)."""
    if resolve_backend(model.backend, x.device) == "triton":
        return transform_jacobian(model, x, theta)
    if cell_basis is None:
        cell_basis = _cell_basis(model, x)
    with torch.no_grad():
        affines = model.cell_affines_unchecked(theta)
        table = flow_table(affines, model.steps, model.refine)
        return integrate_table(x, table, affines, model.nx, model.ny, model.steps, model.refine,
                               model.max_crossings, cell_basis=cell_basis)


def fit_gauss_newton(model, x, y, iterations, damping):
    """Per transform b: minimise |transform(x_b, theta) - y_b|^2 + damping |theta|^2 (Levenberg-Marquardt).

    Start: the linearised closed form. The velocity is linear in theta, v(x; theta) = G(x) theta, and
    transform(x) ~= x + v(x) for small motions, so theta_0 solves (G^T G + damping I) theta = G^T (y - x).
    Then `iterations` Gauss-Newton steps, (J^T J + (damping + mu) I) delta = -(J^T r + damping theta),
    with J = d transform(x) / d theta from `integrate_table`'s sensitivity (no autograd), batched
    solves over the B transforms, and a Levenberg-Marquardt safeguard per transform (a step that does
    not lower the objective is refused and mu grows tenfold; accepted steps shrink mu).
    """
    with torch.inference_mode(False), torch.no_grad():
        x, y = _clone_inputs(x, y)
        B, N = x.shape[:2]
        d = model.dim
        cell_basis = _cell_basis(model, x)
        lam = torch.full((B,), float(damping), dtype=x.dtype, device=x.device)

        def evaluate(theta):
            out, jac = transform_and_jacobian(model, x, theta, cell_basis)
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
