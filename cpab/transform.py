"""`CPAB`: continuous piecewise-affine based transformations of the plane (2-D, libcpab-compatible).

Conventions: domain [-1, 1]^2, points (B, N, 2) in (x, y) order, the `grid_sample(align_corners=True)`
convention; theta (B, d). The velocity field of theta is continuous and affine on each of the
4 nx ny triangles of the tessellation (see `cpab.basis`), and `transform` moves points along it for
unit time. theta has libcpab's meaning: the coordinates, in libcpab's own basis (by default), of the
per-cell affine parameters on libcpab's [0, 1]^2 domain; velocities are converted to [-1, 1]^2 units
(x = 2 u - 1, so v_x(x) = 2 v_u((x + 1) / 2)). `transform(x, -theta)` inverts `transform(x, theta)`.
"""
import torch
from torch import nn

from .basis import null_space_basis
from .fit import fit_adam, fit_gauss_newton, transform_and_jacobian
from .integrate import velocity
from .kernels import BACKENDS, adam_fit_cuda_graph, integrate, resolve_backend


def _check_float(name, tensor):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")


def _check_finite(name, tensor):
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")


class CPAB(nn.Module):
    """CPAB transformations on an nx x ny tessellation of [-1, 1]^2 (4 triangles per square).

    Args:
        tess_size: (nx, ny) squares along x and y.
        zero_boundary: False (default, CPABMM's): the field is valid (continuous) outside the domain;
            True: the normal velocity vanishes on the border, so the square maps onto itself.
        volume_preservation: every cell's field has zero divergence (Jacobian determinant 1).
        steps, refine, max_crossings: integrator settings (see `cpab.integrate`): `steps` exact in-cell
            steps per unit time, cell crossings located to 1 / (steps * 2**refine) time.
        backend: "auto" (default: the Triton kernel for CUDA tensors, the reference otherwise),
            "reference" or "triton" (forced; see `cpab.kernels`).
        basis: "libcpab" (default: libcpab's own null-space basis, so theta and the Adam fit are the
            official code's) or "vertex" (this project's earlier basis: same fields, theta rotated);
            see `cpab.basis`.
    """

    def __init__(self, tess_size=(4, 4), zero_boundary=False, volume_preservation=False,
                 steps=8, refine=3, max_crossings=64, backend="auto", basis="libcpab"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        if not isinstance(tess_size, (tuple, list)) or len(tess_size) != 2:
            raise ValueError(f"tess_size must be a pair (nx, ny), got {tess_size!r}")
        for name, value in (("steps", steps), ("refine", refine), ("max_crossings", max_crossings)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "refine" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'refine' else 'positive'} int, got {value!r}")
        basis01 = torch.from_numpy(null_space_basis(tess_size[0], tess_size[1], zero_boundary,
                                                     volume_preservation, basis=basis).copy())
        self.basis_kind = basis
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

    def extra_repr(self):
        return (f"tess_size=({self.nx}, {self.ny}), zero_boundary={self.zero_boundary}, "
                f"volume_preservation={self.volume_preservation}, basis={self.basis_kind}, dim={self.dim}")

    # ---------------------------------------------------------------- checks
    def _check_theta(self, theta):
        _check_float("theta", theta)
        if theta.dim() != 2 or theta.shape[1] != self.dim:
            raise ValueError(f"theta must have shape (B, {self.dim}), got {tuple(theta.shape)}")
        _check_finite("theta", theta)

    def _check_points(self, name, points):
        _check_float(name, points)
        if points.dim() != 3 or points.shape[2] != 2:
            raise ValueError(f"{name} must have shape (B, N, 2), got {tuple(points.shape)}")
        _check_finite(name, points)

    def _check_pair(self, points, theta):
        self._check_points("points", points)
        self._check_theta(theta)
        if points.shape[0] != theta.shape[0]:
            raise ValueError(f"batch sizes differ: points {points.shape[0]}, theta {theta.shape[0]}")
        if points.dtype != theta.dtype:
            raise TypeError(f"points ({points.dtype}) and theta ({theta.dtype}) must have the same dtype")

    # ---------------------------------------------------------------- fields
    def cell_affines(self, theta):
        """Per-cell affine matrices (B, nC, 2, 3) on [-1, 1]^2: v(x) = A[..., :2] @ x + A[..., 2]."""
        self._check_theta(theta)
        return self.cell_affines_unchecked(theta)

    def cell_affines_unchecked(self, theta):
        """`cell_affines` without argument checks (which synchronise with the GPU): for inner loops."""
        basis = self.basis.to(device=theta.device, dtype=theta.dtype)
        if basis.is_inference() and not torch.is_inference_mode_enabled():
            basis = basis.clone()  # a module built under inference_mode, used with autograd (fit)
        return (theta @ basis.T).view(theta.shape[0], self.n_cells, 2, 3)

    def velocity(self, points, theta):
        """Velocity (B, N, 2) of the field of theta (B, d) at points (B, N, 2), [-1, 1] units per unit time."""
        self._check_pair(points, theta)
        return velocity(points, self.cell_affines(theta), self.nx, self.ny)

    def transform(self, points, theta):
        """Points (B, N, 2) moved for unit time along the field of theta (B, d); differentiable in both."""
        self._check_pair(points, theta)
        if points.shape[0] == 0 or points.shape[1] == 0:
            return points.clone()
        return self.transform_unchecked(points, theta)

    def transform_unchecked(self, points, theta):
        """`transform` without argument checks (which synchronise with the GPU): for inner loops (fits)."""
        affines = self.cell_affines_unchecked(theta)
        return integrate(points, affines, self.nx, self.ny, steps=self.steps, refine=self.refine,
                         max_crossings=self.max_crossings, backend=self.backend)

    def transform_jacobian(self, points, theta, check=True):
        """(transform(points, theta), d transform / d theta): (B, N, 2) and (B, N, 2, d), detached.

        CUDA (Triton backend): the exact Jacobian of the discrete integrator from one adjoint pass.
        Reference backend: the sensitivity propagated along each path (`cpab.integrate.integrate_table`),
        accurate to a few percent; no autograd either way, so it is cheap on a CPU as well.
        check=False skips the argument checks (their finiteness tests synchronise with the GPU).
        """
        if check:
            self._check_pair(points, theta)
        return transform_and_jacobian(self, points.detach(), theta.detach())

    def grid(self, theta, size, check=True):
        """Sampling grid (B, H, W, 2) = transform of the identity grid (align_corners=True), for grid_sample.

        check=False skips the finiteness check of theta (a host synchronisation on the GPU); shapes and
        types are still checked.
        """
        if check:
            self._check_theta(theta)
        else:
            _check_float("theta", theta)
            if theta.dim() != 2 or theta.shape[1] != self.dim:
                raise ValueError(f"theta must have shape (B, {self.dim}), got {tuple(theta.shape)}")
        if (not isinstance(size, (tuple, list)) or len(size) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
            raise ValueError(f"size must be a pair of positive ints (H, W), got {size!r}")
        H, W = size
        ys = torch.linspace(-1.0, 1.0, H, dtype=theta.dtype, device=theta.device)
        xs = torch.linspace(-1.0, 1.0, W, dtype=theta.dtype, device=theta.device)
        identity = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(1, H * W, 2)
        points = identity.expand(theta.shape[0], -1, -1)
        if theta.shape[0] == 0:
            return points.clone().view(0, H, W, 2)
        return self.transform_unchecked(points, theta).view(theta.shape[0], H, W, 2)

    # ---------------------------------------------------------------- inference
    def fit(self, x, y, method="adam", iterations=None, lr=1e-2, theta_init=1e-6, damping=1e-4, check=True):
        """theta (B, d), detached, such that transform(x, theta) ~= y for keypoints x, y (B, N, 2).

        method "adam" (the official procedure, see `cpab.fit.fit_adam`): theta starts at `theta_init`
        everywhere, `iterations` (default 100) Adam steps with learning rate `lr` on one Frobenius norm
        of all the batch's residuals. method "gauss_newton" (`cpab.fit.fit_gauss_newton`): per
        transform, minimises |transform(x) - y|^2 + damping |theta|^2 with `iterations` (default 10)
        Gauss-Newton steps from the linearised closed form. Works under no_grad / inference_mode.
        check=False skips the finiteness checks of x and y (host synchronisations on the GPU).
        """
        for name, points in (("x", x), ("y", y)):
            if check:
                self._check_points(name, points)
            else:
                _check_float(name, points)
                if points.dim() != 3 or points.shape[2] != 2:
                    raise ValueError(f"{name} must have shape (B, N, 2), got {tuple(points.shape)}")
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.dtype != y.dtype:
            raise TypeError(f"x ({x.dtype}) and y ({y.dtype}) must have the same dtype")
        if iterations is None:
            iterations = 10 if method == "gauss_newton" else 100
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"iterations must be a non-negative int, got {iterations!r}")
        if method == "adam":
            if x.is_cuda and resolve_backend(self.backend, x.device) == "triton":
                return adam_fit_cuda_graph(self, x, y, iterations=iterations, lr=lr, theta_init=theta_init)
            return fit_adam(self, x, y, iterations=iterations, lr=lr, theta_init=theta_init)
        if method == "gauss_newton":
            return fit_gauss_newton(self, x, y, iterations=iterations, damping=damping)
        raise ValueError(f"method must be 'adam' or 'gauss_newton', got {method!r}")
