"""Motion models: keypoints -> candidate warps, which the dense-motion network mixes into one flow.

A motion model is a module with
  * ``num_warps``: how many warps ``warps`` returns;
  * ``warps(kp_driving, kp_source, size) -> (B, num_warps, h, w, 2)``: kp_driving, kp_source (B, N, 2)
    keypoints, (x, y) in [-1, 1]; size = (h, w) of the dense motion; the result is one
    driving->source backward grid per warp (``grid_sample(source, grid, align_corners=True)`` puts
    source content at the driving positions), in the keypoints' dtype.
The background warp is NOT a motion model's: ``DenseMotionNetwork`` prepends it (the BG predictor's
affine, or the identity) as warp 0, the same for every motion model. The dense-motion network calls
``warps`` with autocast off and keypoints in (at least) float32. A motion model with parameters adds
them to the dense-motion network's state dict under ``motion.``; the two here have none.

``CPABMotion`` (CPABMM) and ``TPSMotion`` (TPSMM) are the two models; ``MOTION_MODELS`` maps the config
value ``model_params.dense_motion_params.motion`` to the class, built with ``num_groups`` (K) and the
keys of the config section of the same name as keyword arguments (see README, "Adding a motion model").
Every call into the ``cpab`` package is in this file.
"""
from typing import Protocol

import torch
from torch import nn

from cpab import CPAB
from modules.tps import TPS

KEYPOINTS_PER_GROUP = 5
FIT_METHODS = ("adam", "gauss_newton")


class MotionModel(Protocol):
    """What ``DenseMotionNetwork`` needs of a motion model (see the module docstring)."""

    num_warps: int

    def warps(self, kp_driving: torch.Tensor, kp_source: torch.Tensor, size: tuple) -> torch.Tensor: ...


def _groups(keypoints, num_groups):
    """(B, 5K, 2) -> (B, K, 5, 2): K consecutive groups of 5 keypoints."""
    if keypoints.dim() != 3 or keypoints.shape[1:] != (num_groups * KEYPOINTS_PER_GROUP, 2):
        raise ValueError(f"expected keypoints (B, {num_groups * KEYPOINTS_PER_GROUP}, 2), got {tuple(keypoints.shape)}")
    return keypoints.reshape(keypoints.shape[0], num_groups, KEYPOINTS_PER_GROUP, 2)


class TPSMotion(nn.Module):
    """TPSMM's motion: one thin-plate spline per group of 5 keypoint pairs (``modules/tps.py``), K warps.

    The TPS is a closed-form, differentiable function of the keypoints, so gradients reach the keypoint
    detector (as in TPSMM). No settings: the config section ``tps`` has no keys.
    """

    def __init__(self, num_groups):
        super().__init__()
        self.num_groups = num_groups
        self.num_warps = num_groups

    def warps(self, kp_driving, kp_source, size):
        tps = TPS.from_keypoints(_groups(kp_driving, self.num_groups), _groups(kp_source, self.num_groups))
        return tps.grid(size)


class CPABMotion(nn.Module):
    """CPABMM's motion: K partial CPAB warps, one per group of 5 keypoint pairs, on a ``partial_tess_size``
    tessellation, plus (``global_cpab``) one global warp on ``global_tess_size`` fitted to all 5K pairs;
    K + 1 warps (K without the global one). Order: [K partial, global].

    Each warp's theta is fitted so that T_theta(driving keypoints) ~= source keypoints
    (``cpab.CPAB.fit``): ``fit_method`` adam (official: theta starts at ``theta_init``, ``max_iter`` Adam
    steps of learning rate ``fit_lr`` for the partial warps, round(max_iter * global_iter_multiplier) for
    the global one, one Frobenius norm over the whole batch) or gauss_newton (``gn_iter`` damped steps,
    Tikhonov weight ``gn_damping``, for every warp). The warps are the fitted transforms of the identity
    grid. ``detach_keypoints`` (official: True) fits on detached keypoints, so the warps send no gradient
    into the keypoint detector; False gives the fitted theta an implicit-function gradient (``_attach``).
    ``basis`` (libcpab | vertex) and ``backend`` (auto | reference | triton) are passed to ``cpab.CPAB``.
    """

    def __init__(self, num_groups, global_cpab, partial_tess_size, global_tess_size, zero_boundary,
                 volume_preservation, basis, backend, fit_method, max_iter, global_iter_multiplier, fit_lr, theta_init,
                 gn_iter, gn_damping, detach_keypoints):
        super().__init__()
        if fit_method not in FIT_METHODS:
            raise ValueError(f"dense_motion_params.cpab.fit_method must be one of {', '.join(FIT_METHODS)}, "
                             f"got {fit_method!r}")
        self.num_groups = num_groups
        self.fit_method = fit_method
        self.max_iter = int(max_iter)
        self.global_iter = int(round(max_iter * global_iter_multiplier))
        self.fit_lr = fit_lr
        self.theta_init = theta_init
        self.gn_iter = int(gn_iter)
        self.gn_damping = gn_damping
        self.detach_keypoints = detach_keypoints
        self.partial_cpab = CPAB(tess_size=tuple(partial_tess_size), zero_boundary=zero_boundary,
                                 volume_preservation=volume_preservation, basis=basis,
                                 backend=backend)
        self.global_cpab_transform = None
        if global_cpab:
            self.global_cpab_transform = CPAB(tess_size=tuple(global_tess_size), zero_boundary=zero_boundary,
                                              volume_preservation=volume_preservation, basis=basis,
                                              backend=backend)
        self.num_warps = num_groups + int(global_cpab)

    def _fit(self, transform, x, y, iterations):
        if self.fit_method == "gauss_newton":
            iterations = self.gn_iter
        # cpab's fits run under no_grad / inference_mode too (they clone into normal tensors).
        # No finiteness checks (cpab's default: they would be host syncs on the GPU); non-finite keypoints
        # surface as a non-finite loss, which training reports.
        return transform.fit(x, y, method=self.fit_method, iterations=iterations, lr=self.fit_lr,
                             theta_init=self.theta_init, damping=self.gn_damping)

    def fit(self, kp_driving, kp_source):
        """Fit the CPAB warps to keypoints (B, 5K, 2): x = driving, y = source.

        Returns (theta_partial (B*K, d_partial), one row per group of 5 consecutive keypoints, sample
        major; theta_global (B, d_global) or None without the global warp). Both carry no gradient unless
        detach_keypoints is False (then the implicit gradient of ``_attach``).
        """
        if self.detach_keypoints:
            # Faithful to the official code: the fitted warps send no gradient into the keypoints.
            kp_driving, kp_source = kp_driving.detach(), kp_source.detach()
        groups_d = _groups(kp_driving, self.num_groups).reshape(-1, KEYPOINTS_PER_GROUP, 2)
        groups_s = _groups(kp_source, self.num_groups).reshape(-1, KEYPOINTS_PER_GROUP, 2)
        theta_partial = self._attach(self.partial_cpab, self._fit(self.partial_cpab, groups_d, groups_s, self.max_iter),
                                     groups_d, groups_s)
        theta_global = None
        if self.global_cpab_transform is not None:
            theta_global = self._attach(self.global_cpab_transform,
                                        self._fit(self.global_cpab_transform, kp_driving, kp_source, self.global_iter),
                                        kp_driving, kp_source)
        return theta_partial, theta_global

    def _attach(self, transform, theta, x, y):
        """With detach_keypoints=False: give the fitted (detached) theta the implicit-function gradient
        of the damped least-squares fit, d theta = -(J^T J + gn_damping I)^-1 J^T d r with r = T(x) - y
        and J = dr/dtheta at theta; the value stays theta. (Not in the official code, which detaches.)"""
        if not (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)):
            return theta
        bs, n, _ = x.shape
        # d T(x) / d theta without autograd (the integrator's sensitivity on a CPU, the exact adjoint on CUDA);
        # unchecked like the fits (no host synchronisation): non-finite keypoints surface in the loss.
        jac = transform.transform_jacobian(x.detach(), theta.detach())[1].reshape(bs, 2 * n, -1)
        normal = jac.transpose(1, 2) @ jac + self.gn_damping * torch.eye(jac.shape[2], dtype=jac.dtype,
                                                                         device=jac.device)
        residual = (transform.transform(x, theta.detach()) - y).reshape(bs, 2 * n, 1)
        step = torch.linalg.solve_ex(normal, jac.transpose(1, 2) @ residual)[0][..., 0]
        return theta - (step - step.detach())

    def transform(self, points, theta_partial):
        """The partial transforms applied to points (B*K, n, 2) with ``theta_partial`` from :meth:`fit`."""
        return self.partial_cpab.transform(points, theta_partial)

    def warps(self, kp_driving, kp_source, size):
        bs = kp_driving.shape[0]
        h, w = size
        theta_partial, theta_global = self.fit(kp_driving, kp_source)
        warps = [self.partial_cpab.grid(theta_partial, size=size).view(bs, self.num_groups, h, w, 2)]
        if theta_global is not None:
            warps.append(self.global_cpab_transform.grid(theta_global, size=size)[:, None])
        return torch.cat(warps, dim=1)


# The config value model_params.dense_motion_params.motion -> the class; the config section of the same
# name holds the class's keyword arguments (besides num_groups).
MOTION_MODELS = {"cpab": CPABMotion, "tps": TPSMotion}
