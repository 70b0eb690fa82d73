"""Reference (CPU/any device) integrator of continuous piecewise-affine (CPA) velocity fields.

Everything here is a pure function of tensors, so a fused GPU kernel can replace
`integrate_table` and be checked against it point by point.

Conventions
-----------
- Domain [-1, 1]^2, points (..., 2) in (x, y) order (the `grid_sample(align_corners=True)`
  convention), split into nx x ny equal squares, each split by its diagonals into 4 triangles.
- Cell numbering: c = 4 * (j * nx + i) + t, i = column (x), j = row (y), t = the triangle touching
  the square's edge at lower y (0), right x (1), upper y (2), left x (3).
- Cell of a point (`cell_index`): i = clamp(floor((x + 1) nx / 2), 0, nx - 1), same for j with y;
  with the unclamped local coordinates p = 2 ((x + 1) nx / 2 - i) - 1, q likewise (in [-1, 1]
  inside the square), a = p + q, b = p - q: t = 1 if a >= 0 and b >= 0, 2 if a >= 0 and b < 0,
  0 if a < 0 and b >= 0, 3 otherwise. Points outside the domain therefore belong to the boundary
  triangle whose side faces them (beyond a corner, split by the extended diagonal); with the
  valid-outside constraints the field is continuous on the whole plane.
- Per-cell affine matrices `affines` (B, nC, 2, 3): the velocity in cell c is
  v(x) = affines[:, c, :, :2] @ x + affines[:, c, :, 2], in [-1, 1] units per unit time.

Algorithm (`integrate`): the flow of v at time 1, T(x) = x(1) with x' = v(x), x(0) = x.
Time is split into T = steps * 2**R ticks of length 1 / T (R = `refine`). `flow_table` precomputes,
for every cell c and level l = 0..R, the exact in-cell flow over 2**l ticks,
E[c, l] = expm(2**l / T * [[A_c], [0, 0, 0]])[:2] (a 2 x 3 affine map: the exact solution of the
affine ODE while the point stays in c). Each point, with integer tick counter t = 0, level l = R,
cell c = cell_index(x), crossings n = 0 and bracket end e = -1, repeats until t == T:

    x' = E[c, l] @ [x; 1];  c' = cell_index(x')
    if c' != c and l > 0 and n < max_crossings:      # left the cell: bisect the step
        e = t + 2**l;  l = l - 1                        (x, c, t unchanged)
    else:                                              # accept the step
        if c' != c:                                    # crossed (at the finest level l = 0 unless n is exhausted)
            x' = crossing_correction(x, x', A_c, A_c', 2**l / T);  c' = cell_index(x');  n = n + 1
        t = t + 2**l;  x = x';  c = c'
        if crossed or t >= e: e = -1                   (bracket closed)
        l = l - 1 (at least 0) if e >= 0 else min(R, floor(log2(T - t)))

So a point moves with the exact in-cell flow in steps of 2**R ticks, a step that ends in another cell
is bisected down to one tick, and the tick that crosses is corrected to second order
(`crossing_correction`: the crossing fraction from the linear function that vanishes on the shared
edge, then the rest of the tick redone with the new cell's field). With the defaults (8 steps, R = 3,
ticks of 1/64) the result agrees with a float64 RK4 reference to ~1e-4 for theta ~ N(0, I) (see the
tests). A step that leaves its cell and comes back within one step is not seen (second-order effect,
included in that figure). After `max_crossings` crossings a point stops bisecting (whole steps, each
crossing corrected; only pathological paths get there).

Gradients: autograd through the accepted steps (x_{k+1} = E_k [x_k; 1]), the crossing corrections
(functions of x, A_c, A_c') and `flow_table` (scaling and squaring of a Taylor polynomial: plain
products), with the discrete decisions (cells, levels) held fixed; this passes float64 gradcheck. Because the velocity
field is continuous, the exact gradient of the true flow equals the continuous adjoint: with
lambda(1) = dL/dx(1) and lambda' = -(dv/dx)^T lambda = -A_c^T lambda along the path,
dL/dx(0) = lambda(0) and dL/dA_c = integral over the time spent in c of lambda(t) [x(t); 1]^T dt
(no jump terms at crossings). A kernel can therefore compute the backward pass by retracing the path
backwards with the inverse in-cell flows (E[c, l]^{-1}) while propagating lambda with the transposed
linear parts, lambda_k = E_k[:, :2]^T lambda_{k+1}, and accumulating dL/dE_k = lambda_{k+1} [x_k; 1]^T;
dL/dA then follows from the Frechet derivative of expm (autograd through `flow_table`); the
few corrected crossing ticks add their own (local, closed-form) terms, or a kernel may drop them
(O(tick) error in the gradient).
"""
from __future__ import annotations

import torch
from torch import Tensor


def cell_index(points: Tensor, nx: int, ny: int) -> Tensor:
    """Cell index (int64, shape points.shape[:-1]) of points (..., 2) in [-1, 1]^2 (x, y) coordinates."""
    u = (points[..., 0] + 1.0) * (0.5 * nx)
    w = (points[..., 1] + 1.0) * (0.5 * ny)
    i = torch.floor(u).clamp(0, nx - 1)
    j = torch.floor(w).clamp(0, ny - 1)
    p = 2.0 * (u - i) - 1.0
    q = 2.0 * (w - j) - 1.0
    a_pos = (p + q) >= 0
    b_pos = (p - q) >= 0
    t = torch.where(a_pos, torch.where(b_pos, 1, 2), torch.where(b_pos, 0, 3))
    return 4 * (j.long() * nx + i.long()) + t


def cell_affines(theta: Tensor, basis: Tensor, n_cells: int) -> Tensor:
    """Per-cell affine matrices (B, nC, 2, 3) = reshape(basis @ theta) for theta (B, d), basis (6 nC, d),
    computed in theta's dtype on its device."""
    basis = basis.to(device=theta.device, dtype=theta.dtype)
    if basis.is_inference() and not torch.is_inference_mode_enabled():
        basis = basis.clone()  # a module built under inference_mode, used with autograd (a fit)
    return (theta @ basis.T).view(theta.shape[0], n_cells, 2, 3)


def velocity(points: Tensor, affines: Tensor, nx: int, ny: int) -> Tensor:
    """Velocity (B, N, 2) at points (B, N, 2) of the CPA field with per-cell affines (B, nC, 2, 3)."""
    cells = cell_index(points, nx, ny)
    A = torch.gather(affines.flatten(2), 1, cells.unsqueeze(-1).expand(-1, -1, 6))
    x, y = points[..., 0], points[..., 1]
    return torch.stack([A[..., 0] * x + A[..., 1] * y + A[..., 2],
                        A[..., 3] * x + A[..., 4] * y + A[..., 5]], dim=-1)


def _compose(lin1, t1, lin2, t2):
    """Affine composition (lin1, t1) o (lin2, t2): x -> lin1 (lin2 x + t2) + t1."""
    return lin1 @ lin2, (lin1 @ t2.unsqueeze(-1)).squeeze(-1) + t1


def flow_table(affines: Tensor, steps: int, refine: int) -> Tensor:
    """Exact in-cell flows E (B, nC, refine + 1, 2, 3): E[:, c, l] = expm(2**l / T * [[A_c], [0 0 0]])[:2].

    T = steps * 2**refine ticks make up time 1. Computed in float64 by scaling and squaring (degree-10
    Taylor polynomial of the scaled homogeneous matrix, whose norm is at most 1/16: truncation error
    below 1e-16) and cast back to affines.dtype. Differentiable (autograd through plain products).
    The scaling is read on the host (a synchronisation on CUDA); non-finite affines raise ValueError.
    """
    hom = affines.to(torch.float64)
    tau = 1.0 / (steps * 2 ** refine)
    norm = hom.abs().sum(-1).amax() * tau  # >= the infinity norm of tau * [[A], [0 0 0]]
    exponent = torch.ceil(torch.log2(norm.detach() * 16.0)).clamp(min=0)
    if not bool(torch.isfinite(exponent)):  # the host reads the scaling anyway: say why it cannot
        raise ValueError("theta (its cell affines) contains non-finite values (nan or inf)")
    squarings = int(exponent)
    X = hom * (tau / 2 ** squarings)
    X_lin, X_t = X[..., :2], X[..., 2]
    eye = torch.eye(2, dtype=torch.float64, device=affines.device)
    # Horner: P = I + X / k P, from k = 10 down to 1, with homogeneous matrices whose last rows are
    # [0 0 0] (X) and [0 0 1] (P), kept as (linear part, translation).
    P_lin, P_t = eye + X_lin / 10.0, X_t / 10.0
    for k in range(9, 0, -1):
        P_lin, P_t = eye + (X_lin @ P_lin) / k, ((X_lin @ P_t.unsqueeze(-1)).squeeze(-1) + X_t) / k
    for _ in range(squarings):
        P_lin, P_t = _compose(P_lin, P_t, P_lin, P_t)
    levels = [(P_lin, P_t)]
    for _ in range(refine):
        levels.append(_compose(*levels[-1], *levels[-1]))
    table = torch.stack([torch.cat([lin, t.unsqueeze(-1)], dim=-1) for lin, t in levels], dim=2)
    return table.to(affines.dtype)


def _level_table(refine, device):
    """Lookup over r = 0 .. 2**refine - 1 remaining ticks: the largest l with 2**l <= r (0 for r = 0)."""
    return torch.tensor([max(r.bit_length() - 1, 0) for r in range(2 ** refine)], dtype=torch.long, device=device)


def _apply(A, x):
    """Affine maps A (n, 6) (row-major 2 x 3) applied to points x (n, 2)."""
    A = A.view(-1, 2, 3)
    return (A[:, :, :2] * x.unsqueeze(1)).sum(-1) + A[:, :, 2]


def _linear(A, v):
    """Linear parts of affine maps A (n, 6) applied to vectors v (n, 2)."""
    return (A.view(-1, 2, 3)[:, :, :2] * v.unsqueeze(1)).sum(-1)


def crossing_correction(x: Tensor, x_end: Tensor, A_old: Tensor, A_new: Tensor, duration: Tensor) -> Tensor:
    """Second-order correction of a step that crossed from the old into the new cell.

    x (n, 2): start of the step (old cell); x_end: its end under the old cell's exact flow over
    `duration` (n,); A_old, A_new (n, 6): the two cells' affine maps. The two fields agree on the
    shared edge line, where D = A_old - A_new vanishes, so D [x; 1] = w s(x) with s linear: the
    crossing happens at the fraction alpha = d0 . (d0 - d1) / |d0 - d1|^2 (d0 = D [x; 1],
    d1 = D [x_end; 1]) of the step. The remaining time tau = (1 - alpha) duration is undone with the
    old field and redone with the new field, both by second-order Taylor expansion
    (y -+ tau v + tau^2 / 2 A v). Local error O(duration^3).
    """
    D = A_old - A_new
    d0, d1 = _apply(D, x), _apply(D, x_end)
    diff = d0 - d1
    eps = torch.finfo(x.dtype).eps ** 2
    alpha = ((d0 * diff).sum(1) / ((diff * diff).sum(1) + eps)).clamp(0.0, 1.0)
    tau = ((1.0 - alpha) * duration).unsqueeze(1)
    v_old = _apply(A_old, x_end)
    x_cross = x_end - tau * v_old + 0.5 * tau * tau * _linear(A_old, v_old)
    v_new = _apply(A_new, x_cross)
    return x_cross + tau * v_new + 0.5 * tau * tau * _linear(A_new, v_new)


def _basis_field(cell_basis, cells, x):
    """d v / d theta (n, 2, d) at points x (n, 2) in cells (n,), from cell_basis (nC, 6, d)."""
    b = cell_basis.index_select(0, cells)
    return torch.stack([b[:, 0] * x[:, :1] + b[:, 1] * x[:, 1:] + b[:, 2],
                        b[:, 3] * x[:, :1] + b[:, 4] * x[:, 1:] + b[:, 5]], dim=1)


def integrate_table(points: Tensor, table: Tensor, affines: Tensor, nx: int, ny: int, steps: int, refine: int,
                    max_crossings: int, cell_basis: Tensor | None = None):
    """Flow at time 1 of points (B, N, 2) given the flow table (B, nC, refine + 1, 2, 3) of `flow_table`
    and the per-cell affines (B, nC, 2, 3) it was built from.

    The stepping rule is documented in the module docstring. Differentiable (autograd) with respect to
    points, table and affines. Returns (B, N, 2) in points' dtype.

    Optional (for Gauss-Newton fits, not part of the kernel contract): with cell_basis (nC, 6, d), the
    per-cell parameters' basis (affines[b] = (cell_basis @ theta[b]).view(nC, 2, 3)), also returns the
    sensitivity J = d x(1) / d theta (B, N, 2, d), propagated along the path without autograd:
    J <- E_lin J + tau / 2 (E_lin G(x_k) + G(x_k+1)) per accepted step of duration tau (trapezoid rule
    for the exact step's parameter derivative; G = d v / d theta), accurate to a few percent.
    """
    B, N = points.shape[:2]
    n_cells, n_levels = table.shape[1], table.shape[2]
    total = steps * 2 ** refine
    flat = table.reshape(B * n_cells * n_levels, 6)
    flat_affines = affines.reshape(B * n_cells, 6)
    device = points.device

    x = points.reshape(B * N, 2)
    index = torch.arange(B * N, device=device)
    cell_base = torch.arange(B, device=device).repeat_interleave(N) * n_cells
    cell = cell_index(x.detach(), nx, ny)
    tick = torch.zeros(B * N, dtype=torch.long, device=device)
    level = torch.full((B * N,), refine, dtype=torch.long, device=device)
    bracket_end = torch.full((B * N,), -1, dtype=torch.long, device=device)
    crossings = torch.zeros(B * N, dtype=torch.long, device=device)
    level_of_remaining = _level_table(refine, device)
    finished_index, finished_x, finished_jac = [], [], []
    with_jacobian = cell_basis is not None
    if with_jacobian:
        cell_basis = cell_basis.detach()
        jac = x.new_zeros(B * N, 2, cell_basis.shape[-1])
        field_start = _basis_field(cell_basis, cell, x.detach())

    while index.numel() > 0:
        E = flat.index_select(0, (cell_base + cell) * n_levels + level)
        x_new = _apply(E, x)
        cell_new = cell_index(x_new.detach(), nx, ny)
        moved = cell_new != cell
        reject = moved & (level > 0) & (crossings < max_crossings)
        crossed = moved & ~reject
        duration = (1 << level).to(x.dtype) / total
        crossed_index = crossed.nonzero().squeeze(1)
        if crossed_index.numel() > 0:  # crossing corrections on the crossing subset only
            corrected = crossing_correction(
                x.index_select(0, crossed_index), x_new.index_select(0, crossed_index),
                flat_affines.index_select(0, (cell_base + cell).index_select(0, crossed_index)),
                flat_affines.index_select(0, (cell_base + cell_new).index_select(0, crossed_index)),
                duration.index_select(0, crossed_index))
            x_new = x_new.index_copy(0, crossed_index, corrected)
            cell_new = cell_new.index_copy(0, crossed_index, cell_index(corrected.detach(), nx, ny))

        accept = ~reject
        if with_jacobian:
            E, x_end = E.detach(), x_new.detach()
            field_end = _basis_field(cell_basis, cell_new, x_end)
            lin = E[:, [0, 1, 3, 4]].view(-1, 2, 2)
            stepped = lin @ jac + (0.5 * duration).view(-1, 1, 1) * (lin @ field_start + field_end)
            jac = torch.where(accept.view(-1, 1, 1), stepped, jac)
            field_start = torch.where(accept.view(-1, 1, 1), field_end, field_start)
        bracket_end = torch.where(reject, tick + (1 << level), bracket_end)
        x = torch.where(accept.unsqueeze(1), x_new, x)
        tick = tick + torch.where(accept, 1 << level, 0)
        crossings = crossings + crossed.long()
        cell = torch.where(accept, cell_new, cell)
        bracket_end = torch.where(crossed | (tick >= bracket_end), -1, bracket_end)
        remaining = total - tick
        level = torch.where(bracket_end >= 0, (level - 1).clamp(min=0),
                            torch.where(remaining >= 2 ** refine, refine,
                                        level_of_remaining[remaining.clamp(min=0, max=2 ** refine - 1)]))

        done = remaining <= 0
        if bool(done.any()):
            finished = done.nonzero().squeeze(1)
            finished_index.append(index.index_select(0, finished))
            finished_x.append(x.index_select(0, finished))
            keep = (~done).nonzero().squeeze(1)
            if with_jacobian:
                finished_jac.append(jac.index_select(0, finished))
                jac, field_start = jac.index_select(0, keep), field_start.index_select(0, keep)
            x, index, cell_base, cell = (t.index_select(0, keep) for t in (x, index, cell_base, cell))
            tick, level, bracket_end, crossings = (t.index_select(0, keep)
                                                   for t in (tick, level, bracket_end, crossings))

    order = torch.argsort(torch.cat(finished_index))
    out = torch.cat(finished_x)[order].reshape(B, N, 2)
    if with_jacobian:
        return out, torch.cat(finished_jac)[order].reshape(B, N, 2, -1)
    return out


def integrate(points: Tensor, affines: Tensor, nx: int, ny: int, steps: int = 8, refine: int = 3,
              max_crossings: int = 64) -> Tensor:
    """Flow at time 1 of points (B, N, 2) under the CPA field with per-cell affines (B, nC, 2, 3).

    `steps` base steps per unit time, crossings located to 1 / (steps * 2**refine) time; see the
    module docstring for the exact algorithm. Differentiable with respect to points and affines.
    """
    table = flow_table(affines, steps, refine)
    return integrate_table(points, table, affines, nx, ny, steps, refine, max_crossings)


def integrate_rk4(points: Tensor, affines: Tensor, nx: int, ny: int, n_steps: int = 2000) -> Tensor:
    """Flow at time 1 by classical RK4 with ``n_steps`` fixed steps: a fine reference for checking
    integrators (run it in float64; it ignores the cell structure, so it is slow but unbiased)."""
    h = 1.0 / n_steps
    x = points.clone()
    for _ in range(n_steps):
        k1 = velocity(x, affines, nx, ny)
        k2 = velocity(x + 0.5 * h * k1, affines, nx, ny)
        k3 = velocity(x + 0.5 * h * k2, affines, nx, ny)
        k4 = velocity(x + h * k3, affines, nx, ny)
        x = x + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x
