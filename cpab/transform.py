"""`CPAB`: continuous piecewise-affine based transformations of the plane (2-D, libcpab-compatible).

Conventions: domain [-1, 1]^2, points (B, N, 2) in (x, y) order, the `grid_sample(align_corners=True)`
convention; theta (B, d). The velocity field of theta is continuous and affine on each of the
4 nx ny triangles of the tessellation (see `cpab.basis`), and `transform` moves points along it for
unit time. theta has libcpab's meaning: the coordinates, in libcpab's own basis (by default), of the
per-cell affine parameters on libcpab's [0, 1]^2 domain; velocities are converted to [-1, 1]^2 units
(x = 2 u - 1, so v_x(x) = 2 v_u((x + 1) / 2)). `transform(x, -theta)` inverts `transform(x, theta)`.
"""
from __future__ import annotations

import torch
from torch import nn

from . import fit as reference_fit
from . import fused
from . import integrate as reference
from .basis import null_space_basis

METHODS = ("adam", "gauss_newton")


def _check_float(name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "non-negative" if minimum == 0 else "positive"
        raise ValueError(f"{name} must be a {kind} int, got {value!r}")


class CPAB(nn.Module):
    """CPAB transformations on an nx x ny tessellation of [-1, 1]^2 (4 triangles per square).

    Args:
        tess_size: (nx, ny) squares along x and y.
        zero_boundary: False (default, CPABMM's): the field is valid (continuous) outside the domain;
            True: the normal velocity vanishes on the border, so the square maps onto itself.
        volume_preservation: every cell's field has zero divergence (Jacobian determinant 1).
        steps, refine, max_crossings: integrator settings (see `cpab.integrate`): `steps` exact in-cell
            steps per unit time, cell crossings located to 1 / (steps * 2**refine) time.
        backend: "auto" (default: the Triton kernels for CUDA tensors, the PyTorch reference otherwise),
            "reference" or "triton" (forced; on CPU tensors Triton runs through its interpreter, which
            needs TRITON_INTERPRET=1 set before triton is imported).
        check_finite: also check that inputs are finite (a host synchronisation on the GPU per call;
            default False: non-finite inputs give non-finite outputs, except on the reference backend,
            whose flow table raises ValueError for a non-finite theta). Shapes and dtypes are always checked.
        basis: "libcpab" (default: libcpab's own null-space basis, so theta and the Adam fit are the
            official code's) or "vertex" (this project's earlier basis: same fields, theta rotated);
            see `cpab.basis`.
    """

    def __init__(self, tess_size: tuple[int, int] = (4, 4), zero_boundary: bool = False,
                 volume_preservation: bool = False, steps: int = 8, refine: int = 3, max_crossings: int = 64,
                 backend: str = "auto", check_finite: bool = False, basis: str = "libcpab"):
        super().__init__()
        if backend not in fused.BACKENDS:
            raise ValueError(f"backend must be one of {fused.BACKENDS}, got {backend!r}")
        if not isinstance(tess_size, (tuple, list)) or len(tess_size) != 2:
            raise ValueError(f"tess_size must be a pair (nx, ny), got {tess_size!r}")
        _check_int("steps", steps, 1)
        _check_int("refine", refine, 0)
        _check_int("max_crossings", max_crossings, 1)
        basis01 = torch.from_numpy(null_space_basis(tess_size[0], tess_size[1], zero_boundary,
                                                     volume_preservation, basis=basis).copy())
        self.basis_kind = basis
        self.backend = backend
        self.check_finite = bool(check_finite)
        self.nx, self.ny = int(tess_size[0]), int(tess_size[1])
        self.zero_boundary = bool(zero_boundary)
        self.volume_preservation = bool(volume_preservation)
        self.steps, self.refine, self.max_crossings = steps, refine, max_crossings
        self.n_cells = 4 * self.nx * self.ny
        self.dim = basis01.shape[1]
        # Per-cell parameters on [0, 1]^2, [a11, a12, b1, a21, a22, b2], become on [-1, 1]^2
        # [a11, a12, a11 + a12 + 2 b1, a21, a22, a21 + a22 + 2 b2] (velocities double, origin moves).
        to_pm1 = torch.tensor([[1., 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [1, 1, 2, 0, 0, 0],
                               [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 1, 1, 2]], dtype=torch.float64)
        basis = (to_pm1 @ basis01.view(self.n_cells, 6, self.dim)).reshape(6 * self.n_cells, self.dim)
        self.register_buffer("basis", basis, persistent=False)  # float64; follows .to(dtype)
        self.register_buffer("basis01", basis01, persistent=False)

    def extra_repr(self) -> str:
        return (f"tess_size=({self.nx}, {self.ny}), zero_boundary={self.zero_boundary}, "
                f"volume_preservation={self.volume_preservation}, basis={self.basis_kind}, dim={self.dim}, "
                f"backend={self.backend!r}")

    # ---------------------------------------------------------------- checks (shapes and dtypes: host metadata)
    def _finite(self, name: str, tensor: torch.Tensor) -> None:
        if self.check_finite and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} contains non-finite values (nan or inf)")

    def _check_theta(self, theta) -> None:
        _check_float("theta", theta)
        if theta.dim() != 2 or theta.shape[1] != self.dim:
            raise ValueError(f"theta must have shape (B, {self.dim}), got {tuple(theta.shape)}")
        self._finite("theta", theta)

    def _check_points(self, name: str, points) -> None:
        _check_float(name, points)
        if points.dim() != 3 or points.shape[2] != 2:
            raise ValueError(f"{name} must have shape (B, N, 2), got {tuple(points.shape)}")
        self._finite(name, points)

    def _check_pair(self, points, theta) -> None:
        self._check_points("points", points)
        self._check_theta(theta)
        if points.shape[0] != theta.shape[0]:
            raise ValueError(f"batch sizes differ: points {points.shape[0]}, theta {theta.shape[0]}")
        if points.dtype != theta.dtype:
            raise TypeError(f"points ({points.dtype}) and theta ({theta.dtype}) must have the same dtype")
        if points.device != theta.device:
            raise ValueError(f"points ({points.device}) and theta ({theta.device}) must be on one device")

    def _triton(self, device: torch.device) -> bool:
        return fused.resolve_backend(self.backend, device) == "triton"

    # ---------------------------------------------------------------- fields
    def cell_affines(self, theta: torch.Tensor) -> torch.Tensor:
        """Per-cell affine matrices (B, nC, 2, 3) on [-1, 1]^2: v(x) = A[..., :2] @ x + A[..., 2]."""
        self._check_theta(theta)
        return reference.cell_affines(theta, self.basis, self.n_cells)

    def velocity(self, points: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Velocity (B, N, 2) of the field of theta (B, d) at points (B, N, 2), [-1, 1] units per unit time."""
        self._check_pair(points, theta)
        return reference.velocity(points, self.cell_affines(theta), self.nx, self.ny)

    def transform(self, points: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Points (B, N, 2) moved for unit time along the field of theta (B, d); differentiable in both."""
        self._check_pair(points, theta)
        if points.shape[0] == 0 or points.shape[1] == 0:
            return points.clone()
        if self._triton(points.device):
            return fused.transform(self, points, theta)
        return reference.integrate(points, self.cell_affines(theta), self.nx, self.ny, steps=self.steps,
                                   refine=self.refine, max_crossings=self.max_crossings)

    def transform_jacobian(self, points: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(transform(points, theta), d transform / d theta): (B, N, 2) and (B, N, 2, d), detached.

        Triton backend: the exact Jacobian of the discrete integrator (one adjoint launch for all rows).
        Reference backend: the sensitivity propagated along each path (`cpab.fit.path_jacobian`), accurate
        to a few percent; no autograd either way, so it is cheap on a CPU as well.
        """
        self._check_pair(points, theta)
        if points.shape[0] == 0 or points.shape[1] == 0:
            return points.detach().clone(), points.new_zeros(*points.shape, self.dim)
        if self._triton(points.device):
            return fused.transform_jacobian(self, points, theta)
        return reference_fit.path_jacobian(self, points.detach(), theta.detach())

    def grid(self, theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Sampling grid (B, H, W, 2) = transform of the identity grid (align_corners=True), for grid_sample."""
        self._check_theta(theta)
        if (not isinstance(size, (tuple, list)) or len(size) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
            raise ValueError(f"size must be a pair of positive ints (H, W), got {size!r}")
        H, W = size
        if theta.shape[0] > 0 and self._triton(theta.device):
            return fused.grid(self, theta, (H, W))
        ys = torch.linspace(-1.0, 1.0, H, dtype=theta.dtype, device=theta.device)
        xs = torch.linspace(-1.0, 1.0, W, dtype=theta.dtype, device=theta.device)
        identity = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(1, H * W, 2)
        points = identity.expand(theta.shape[0], -1, -1)
        if theta.shape[0] == 0:
            return points.clone().view(0, H, W, 2)
        return reference.integrate(points, self.cell_affines(theta), self.nx, self.ny, steps=self.steps,
                                   refine=self.refine, max_crossings=self.max_crossings).view(-1, H, W, 2)

    # ---------------------------------------------------------------- inference
    def fit(self, x: torch.Tensor, y: torch.Tensor, method: str = "adam", iterations: int | None = None,
            lr: float = 1e-2, theta_init: float = 1e-6, damping: float = 1e-4,
            loss: str = "batch_norm") -> torch.Tensor:
        """theta (B, d), detached, such that transform(x, theta) ~= y for keypoints x, y (B, N, 2).

        method "adam" (the official procedure, see `cpab.fit.fit_adam`): theta starts at `theta_init`
        everywhere, then `iterations` (default 100) torch.optim.Adam steps with learning rate `lr` on
        `loss`: "batch_norm" (default, CPABMM's) one unsquared Frobenius norm of all the batch's residuals,
        which couples the transforms of a batch; "least_squares" the sum of the transforms' squared
        residuals. method "gauss_newton" (`cpab.fit.fit_gauss_newton`): per transform, minimises
        |transform(x) - y|^2 + damping |theta|^2 with `iterations` (default 10) Levenberg-Marquardt steps
        from the linearised closed form (`lr`, `theta_init` and `loss` are Adam's). Works under no_grad /
        inference_mode. On the Triton backend the fits run as fused kernels (and CUDA graphs on CUDA).
        """
        for name, points in (("x", x), ("y", y)):
            self._check_points(name, points)
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.dtype != y.dtype:
            raise TypeError(f"x ({x.dtype}) and y ({y.dtype}) must have the same dtype")
        if x.device != y.device:
            raise ValueError(f"x ({x.device}) and y ({y.device}) must be on one device")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if loss not in reference_fit.LOSSES:
            raise ValueError(f"loss must be one of {reference_fit.LOSSES}, got {loss!r}")
        if iterations is None:
            iterations = 10 if method == "gauss_newton" else 100
        _check_int("iterations", iterations, 0)
        triton = self._triton(x.device)
        if method == "adam":
            if triton:
                return fused.fit_adam(self, x, y, iterations=iterations, lr=lr, theta_init=theta_init, loss=loss)
            return reference_fit.fit_adam(self, x, y, iterations=iterations, lr=lr, theta_init=theta_init,
                                          loss=loss)
        if triton:
            return fused.fit_gauss_newton(self, x, y, iterations=iterations, damping=damping)
        return reference_fit.fit_gauss_newton(self, x, y, iterations=iterations, damping=damping)
