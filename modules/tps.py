"""Thin-plate-spline (TPS) transformations, as used by TPSMM (random mode and keypoint mode).

A TPS maps a point p = (x, y) in [-1, 1]^2 (``grid_sample`` convention, ``align_corners=True``) to

    f(p) = A p + b + sum_i w_i U(|p - c_i|^2),    U(r2) = r2 * log(r2 + 1e-9),

with an affine part ``theta = [A | b]`` (2x3), control points c_i (N, 2) and weights w_i (N, 2).
Transformations are batched as (B, G, ...): B samples, G independent TPS per sample.

* :meth:`TPS.random` draws the random TPS of the equivariance loss (G = 1; results without the
  group axis).
* :meth:`TPS.from_keypoints` solves, for each group of n keypoint pairs, the TPS that maps the
  driving keypoints onto the source keypoints (a driving->source backward warp: ``grid_sample(source,
  grid)`` moves the source content to the driving positions). Differentiable in the keypoints.
"""
import torch

from modules.blocks import identity_grid

_LOG_EPS = 1e-9
# Faithful to the official code: TPSMM adds 0.01 to the WHOLE diagonal of the (n+3)x(n+3) system,
# including the zero block of the affine constraints (a mild regulariser, not pure interpolation).
_KP_REGULARISER = 0.01


def _radial(r2):
    return r2 * torch.log(r2 + _LOG_EPS)


class TPS:
    """Batched thin-plate splines (see the module docstring for the conventions).

    theta: (B, G, 2, 3) affine part; control_points: (B or 1, G, N, 2); control_params: (B, G, N, 2).
    ``squeeze_group`` drops the group axis from results (random mode, G = 1).
    """

    def __init__(self, theta, control_points, control_params, squeeze_group=False):
        if theta.dim() != 4 or theta.shape[-2:] != (2, 3):
            raise ValueError(f"TPS theta must be (B, G, 2, 3), got {tuple(theta.shape)}")
        if control_points.dim() != 4 or control_params.dim() != 4:
            raise ValueError("TPS control_points and control_params must be (B, G, N, 2)")
        self.theta = theta
        self.control_points = control_points
        self.control_params = control_params
        self.squeeze_group = squeeze_group
        self.bs = theta.shape[0]
        self.groups = theta.shape[1]

    @classmethod
    def random(cls, bs, sigma_affine, sigma_tps, points_tps, device=None, dtype=torch.float32,
               generator=None):
        """Random TPS of TPSMM's equivariance loss (B transformations, no group axis).

        theta = [I | 0] + N(0, sigma_affine^2) per entry; ``points_tps`` x ``points_tps`` control
        points on the regular [-1, 1] grid; one weight per control point ~ N(0, sigma_tps^2).
        Faithful to the official code: the same scalar weight displaces x and y (TPSMM's random TPS).
        Random numbers are drawn on the generator's device (``device`` when no generator), then moved.
        """
        device = torch.get_default_device() if device is None else torch.device(device)
        draw_device = generator.device if generator is not None else device
        noise = torch.randn(bs, 1, 2, 3, generator=generator, device=draw_device)
        weights = torch.randn(bs, 1, points_tps ** 2, 1, generator=generator, device=draw_device)
        theta = (noise * sigma_affine).to(device=device, dtype=dtype)
        theta = theta + torch.eye(2, 3, device=device, dtype=dtype)
        control_params = (weights * sigma_tps).to(device=device, dtype=dtype).expand(-1, -1, -1, 2)
        control_points = identity_grid((points_tps, points_tps), dtype, device).reshape(1, 1, -1, 2)
        return cls(theta, control_points, control_params, squeeze_group=True)

    @classmethod
    def from_keypoints(cls, kp_driving, kp_source):
        """TPS per group mapping driving keypoints onto source keypoints (TPSMM Eq. 2).

        kp_driving, kp_source: (B, G, n, 2), (x, y) in [-1, 1]. Solves the regularised TPS system
        [[U(|c_i - c_j|^2), P], [P^T, 0]] + 0.01 I for the weights and the affine part (control
        points = driving keypoints). Differentiable in both keypoint sets.
        """
        if kp_driving.shape != kp_source.shape or kp_driving.dim() != 4 or kp_driving.shape[-1] != 2:
            raise ValueError(f"TPS.from_keypoints needs two (B, G, n, 2) tensors, got "
                             f"{tuple(kp_driving.shape)} and {tuple(kp_source.shape)}")
        bs, groups, n, _ = kp_driving.shape
        r2 = (kp_driving[..., :, None, :] - kp_driving[..., None, :, :]).pow(2).sum(-1)
        ones = kp_driving.new_ones(bs, groups, n, 1)
        p = torch.cat([kp_driving, ones], dim=-1)
        top = torch.cat([_radial(r2), p], dim=-1)
        bottom = torch.cat([p.transpose(-1, -2), kp_driving.new_zeros(bs, groups, 3, 3)], dim=-1)
        system = torch.cat([top, bottom], dim=-2)
        system = system + _KP_REGULARISER * torch.eye(n + 3, dtype=system.dtype, device=system.device)
        rhs = torch.cat([kp_source, kp_source.new_zeros(bs, groups, 3, 2)], dim=-2)
        # solve_ex: no singularity check, hence no host synchronisation on CUDA (the system is regularised).
        params = torch.linalg.solve_ex(system, rhs)[0]
        theta = params[..., n:, :].transpose(-1, -2)
        return cls(theta, kp_driving, params[..., :n, :])

    def warp_coordinates(self, coordinates):
        """Transform points. coordinates: (B or 1, M, 2) -> (B, M, 2) (random) or (B, G, M, 2)."""
        coords = coordinates.to(self.theta.dtype)
        if coords.dim() != 3 or coords.shape[-1] != 2:
            raise ValueError(f"TPS.warp_coordinates needs (B, M, 2), got {tuple(coordinates.shape)}")
        pts = coords[:, None]
        affine = pts @ self.theta[..., :2].transpose(-1, -2) + self.theta[..., 2][..., None, :]
        r2 = (pts[..., :, None, :] - self.control_points[..., None, :, :]).pow(2).sum(-1)
        out = affine + _radial(r2) @ self.control_params
        return out[:, 0] if self.squeeze_group else out

    def grid(self, size):
        """Warped identity grid of ``size = (H, W)``: (B, H, W, 2) (random) or (B, G, H, W, 2)."""
        h, w = int(size[0]), int(size[1])
        base = identity_grid((h, w), self.theta.dtype, self.theta.device).reshape(1, h * w, 2)
        out = self.warp_coordinates(base)
        return out.reshape(*out.shape[:-2], h, w, 2)

    def transform_frame(self, frame):
        """Sampling grid for ``frame`` (B, C, H, W): ``grid_sample(frame, grid, align_corners=True)``
        gives the transformed frame. Returns (B, H, W, 2) (random) or (B, G, H, W, 2)."""
        return self.grid(frame.shape[2:])
