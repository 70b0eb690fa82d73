"""Dense motion network of CPABMM: keypoint-fitted CPAB warps mixed into one flow, plus occlusions.

Conventions: keypoints and grids are (x, y) in [-1, 1]^2 (``grid_sample``, ``align_corners=True``).
Every warp is a driving->source backward grid: ``grid_sample(source, grid)`` puts source content at
the driving positions. Warps are stacked in the order [background, K partial, global].
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from cpab import CPAB
from modules.blocks import AntiAliasInterpolation2d, Hourglass, UpBlock2d, identity_grid, kp2gaussian
from modules.tps import TPS

_KP_PER_GROUP = 5
_NUM_OCCLUSIONS = 4
_PARTITION_EPS = 1e-6


def dropout_softmax(logits, p):
    """Softmax over dim 1 of (B, W, h, w) logits, each channel but the first (background) dropped for
    the whole sample with probability ``p`` (TPSMM/CPABMM Eq. 8); the kept ones are renormalised.

    Faithful to the official code: its 1/(1-p) rescale divides the logits after the exponential was
    taken, so it never has an effect; no rescale is applied here. The partition gets + 1e-6 as upstream.
    """
    bs, num = logits.shape[:2]
    keep = torch.rand(bs, num, device=logits.device) < 1 - p
    keep[:, 0] = True
    shifted = logits - logits.amax(dim=1, keepdim=True)
    weights = shifted.exp() * keep[:, :, None, None].to(logits.dtype)
    return weights / (weights.sum(dim=1, keepdim=True) + _PARTITION_EPS)


def affine_grid(bg_param, size):
    """Background warp: (B, 3, 3) matrices applied to homogeneous identity-grid points (then divided by
    the third coordinate, as upstream) -> (B, H, W, 2)."""
    grid = identity_grid(size, bg_param.dtype, bg_param.device)
    out = torch.einsum("bij,hwj->bhwi", bg_param[:, :, :2], grid) + bg_param[:, None, None, :, 2]
    return out[..., :2] / out[..., 2:3]


class DenseMotionNetwork(nn.Module):
    """Estimates the dense driving->source flow and multi-resolution occlusion masks.

    motion='cpab' (CPABMM): K partial CPAB warps, one per group of 5 keypoint pairs, on a
    ``partial_tess_size`` tessellation, fitted with ``cpab.CPAB.fit`` (x = driving keypoints, y =
    source keypoints; ``max_iter`` Adam steps, or ``gn_iter`` Gauss-Newton steps), plus with
    ``global_cpab`` one global warp on ``global_tess_size`` fitted to all 5K pairs (Adam:
    round(max_iter * global_iter_multiplier) steps): K + 2 warps with the background affine.
    motion='tps' (TPSMM ablation): K differentiable thin-plate splines (modules/tps.py) and the
    background, K + 1 warps as in TPSMM: ``global_cpab`` and the fit settings are not used, and the
    keypoints are never detached (the TPS is a closed-form function of them, as in TPSMM).

    ``detach_keypoints`` (official: True) fits on detached keypoints, so the warps send no gradient
    into the keypoint detector; False gives the fitted theta an implicit-function gradient (see
    ``_attach``), an option of this framework.
    ``bg`` is kept for the official signature: whether a background affine is used is decided by the
    caller passing ``bg_param`` (None -> identity warp).
    """

    def __init__(self, block_expansion, num_blocks, max_features, num_cpab, num_channels,
                 scale_factor=0.25, bg=False, multi_mask=True, kp_variance=0.01, motion="cpab",
                 global_cpab=True, partial_tess_size=(4, 4), global_tess_size=(6, 6), zero_boundary=False,
                 volume_preservation=False, fit_method="adam", max_iter=100, global_iter_multiplier=1.5,
                 fit_lr=1e-2, theta_init=1e-6, gn_iter=10, gn_damping=1e-3, detach_keypoints=True):
        super().__init__()
        if motion not in ("cpab", "tps"):
            raise ValueError(f"dense_motion_params.motion must be 'cpab' or 'tps', got {motion!r}")
        if fit_method not in ("adam", "gauss_newton"):
            raise ValueError(f"dense_motion_params.fit_method must be 'adam' or 'gauss_newton', got {fit_method!r}")
        if not 0.0 < scale_factor <= 1.0:
            raise ValueError(f"dense_motion_params.scale_factor must be in (0, 1], got {scale_factor}")
        self.num_cpab = num_cpab
        self.scale_factor = scale_factor
        self.bg = bg
        self.multi_mask = multi_mask
        self.kp_variance = kp_variance
        self.motion = motion
        self.global_cpab = global_cpab and motion == "cpab"
        self.fit_method = fit_method
        self.max_iter = int(max_iter)
        self.global_iter = int(round(max_iter * global_iter_multiplier))
        self.fit_lr = fit_lr
        self.theta_init = theta_init
        self.gn_iter = int(gn_iter)
        self.gn_damping = gn_damping
        self.detach_keypoints = detach_keypoints
        self.num_warps = num_cpab + 1 + int(self.global_cpab)

        if scale_factor != 1:
            self.down = AntiAliasInterpolation2d(num_channels, scale_factor)
        if motion == "cpab":
            self.partial_cpab = CPAB(tess_size=tuple(partial_tess_size), zero_boundary=zero_boundary,
                                     volume_preservation=volume_preservation)
            if self.global_cpab:
                self.global_cpab_transform = CPAB(tess_size=tuple(global_tess_size), zero_boundary=zero_boundary,
                                                  volume_preservation=volume_preservation)

        in_features = num_channels * self.num_warps + num_cpab * _KP_PER_GROUP + 1
        self.hourglass = Hourglass(block_expansion=block_expansion, in_features=in_features,
                                   max_features=max_features, num_blocks=num_blocks)
        channels = self.hourglass.out_channels
        self.maps = nn.Conv2d(channels[-1], self.num_warps, kernel_size=(7, 7), padding=(3, 3))

        if multi_mask:
            self.up_nums = int(round(math.log2(1 / scale_factor)))
            from_decoder = _NUM_OCCLUSIONS - self.up_nums
            if not 0 <= from_decoder <= num_blocks:
                raise ValueError(f"multi_mask needs scale_factor in [1/8, 1] with enough hourglass "
                                 f"blocks, got scale_factor={scale_factor}, num_blocks={num_blocks}")
            self.up = nn.ModuleList(UpBlock2d(channels[-1] // 2 ** i, channels[-1] // 2 ** i // 2)
                                    for i in range(self.up_nums))
            occlusion_in = channels[len(channels) - from_decoder:] + [
                channels[-1] // 2 ** (i + 1) for i in range(self.up_nums)]
        else:
            self.up_nums = 0
            occlusion_in = [channels[-1]]
        self.occlusion = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=(7, 7), padding=(3, 3)) for c in occlusion_in)

    def create_heatmap_representations(self, size, kp_driving, kp_source):
        """(B, 5K + 1, h, w): a zero channel, then Gaussian(driving) - Gaussian(source) per keypoint."""
        heatmap = (kp2gaussian(kp_driving, size, self.kp_variance)
                   - kp2gaussian(kp_source, size, self.kp_variance))
        return F.pad(heatmap, (0, 0, 0, 0, 1, 0))

    def _fit(self, transform, x, y, iterations):
        if self.fit_method == "gauss_newton":
            iterations = self.gn_iter
        # cpab's fits run under no_grad / inference_mode too (they clone into normal tensors). No finiteness
        # checks (cpab's default: they would be host syncs on the GPU); non-finite keypoints surface as a
        # non-finite loss, which training reports.
        return transform.fit(x, y, method=self.fit_method, iterations=iterations, lr=self.fit_lr,
                             theta_init=self.theta_init, damping=self.gn_damping)

    def create_transformations(self, size, kp_driving, kp_source, bg_param):
        """(B, num_warps, h, w, 2) driving->source grids: [background, K partial, (global)]."""
        bs = kp_driving.shape[0]
        h, w = size
        if bg_param is None:
            background = identity_grid(size, kp_driving.dtype, kp_driving.device).expand(bs, 1, h, w, 2)
        else:
            background = affine_grid(bg_param.to(kp_driving.dtype), size)[:, None]
        if self.motion == "tps":
            partial = TPS.from_keypoints(kp_driving.reshape(bs, self.num_cpab, _KP_PER_GROUP, 2),
                                         kp_source.reshape(bs, self.num_cpab, _KP_PER_GROUP, 2)).grid(size)
            return torch.cat([background, partial], dim=1)

        theta_partial, theta_global = self.fit_cpab(kp_driving, kp_source)
        warps = [background, self.partial_cpab.grid(theta_partial, size=size).view(bs, self.num_cpab, h, w, 2)]
        if theta_global is not None:
            warps.append(self.global_cpab_transform.grid(theta_global, size=size)[:, None])
        return torch.cat(warps, dim=1)

    def fit_cpab(self, kp_driving, kp_source):
        """Fit the CPAB warps (motion='cpab') to keypoints (B, 5K, 2): x = driving, y = source.

        Returns (theta_partial (B*K, d_partial), one row per group of 5 consecutive keypoints, sample
        major; theta_global (B, d_global) or None without the global warp). Both carry no gradient unless
        detach_keypoints is False (then the implicit gradient of ``_attach``).
        """
        if self.detach_keypoints:
            # Faithful to the official code: the fitted warps send no gradient into the keypoints.
            kp_driving, kp_source = kp_driving.detach(), kp_source.detach()
        groups_d = kp_driving.reshape(-1, _KP_PER_GROUP, 2)
        groups_s = kp_source.reshape(-1, _KP_PER_GROUP, 2)
        theta_partial = self._attach(self.partial_cpab, self._fit(self.partial_cpab, groups_d, groups_s, self.max_iter),
                                     groups_d, groups_s)
        theta_global = None
        if self.global_cpab:
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
        # no finiteness checks, like the fits (no host synchronisation): non-finite keypoints surface in the loss.
        jac = transform.transform_jacobian(x.detach(), theta.detach())[1].reshape(bs, 2 * n, -1)
        normal = jac.transpose(1, 2) @ jac + self.gn_damping * torch.eye(jac.shape[2], dtype=jac.dtype,
                                                                         device=jac.device)
        residual = (transform.transform(x, theta.detach()) - y).reshape(bs, 2 * n, 1)
        step = torch.linalg.solve_ex(normal, jac.transpose(1, 2) @ residual)[0][..., 0]
        return theta - (step - step.detach())

    def create_deformed_source_image(self, source_image, transformations):
        """(B, num_warps, C, h, w): the (downscaled) source warped by every grid."""
        bs, c, h, w = source_image.shape
        num = transformations.shape[1]
        source = source_image[:, None].expand(bs, num, c, h, w).reshape(bs * num, c, h, w)
        deformed = F.grid_sample(source, transformations.reshape(bs * num, h, w, 2), align_corners=True)
        return deformed.view(bs, num, c, h, w)

    def forward(self, source_image, kp_driving, kp_source, bg_param=None, dropout_flag=False, dropout_p=0.0):
        """source_image (B, C, H, W); kp_driving / kp_source: {'fg_kp': (B, 5K, 2)}; bg_param (B, 3, 3)
        mapping driving to source coordinates, or None for the identity background warp.

        Returns 'deformed_source' (B, W, C, h, w), 'transformations' (B, W, h, w, 2),
        'contribution_maps' (B, W, h, w) summing to ~1 over W, 'deformation' (B, h, w, 2) the mixed flow,
        and 'occlusion_map': 4 maps (B, 1, .) at 1/8, 1/4, 1/2, 1 of H x W (multi_mask), else one at
        h x w. (h, w) = scale_factor * (H, W); W = K + 2 (cpab, global), K + 1 otherwise.
        """
        if self.scale_factor != 1:
            source_image = self.down(source_image)
        bs, _, h, w = source_image.shape
        kp_d, kp_s = kp_driving["fg_kp"], kp_source["fg_kp"]

        heatmap = self.create_heatmap_representations((h, w), kp_d, kp_s)
        # The keypoint fits and the warps are geometry: they run in (at least) float32 with autocast off,
        # so bf16 autocast (train_params.amp) never reaches the solves, the fits or the CPAB integrator.
        geometry = torch.promote_types(kp_d.dtype, torch.float32)
        with torch.autocast(device_type=kp_d.device.type, enabled=False):
            transformations = self.create_transformations(
                (h, w), kp_d.to(geometry), kp_s.to(geometry), None if bg_param is None else bg_param.to(geometry))
        deformed_source = self.create_deformed_source_image(source_image, transformations)
        prediction = self.hourglass(torch.cat([heatmap, deformed_source.reshape(bs, -1, h, w)], dim=1))

        logits = self.maps(prediction[-1])
        if dropout_flag:
            contribution_maps = dropout_softmax(logits, dropout_p)
        else:
            contribution_maps = F.softmax(logits, dim=1)
        deformation = torch.einsum("bkhw,bkhwc->bhwc", contribution_maps, transformations)

        if self.multi_mask:
            from_decoder = _NUM_OCCLUSIONS - self.up_nums
            features = list(prediction[len(prediction) - from_decoder:])
            out = prediction[-1]
            for up in self.up:
                out = up(out)
                features.append(out)
        else:
            features = [prediction[-1]]
        occlusion_map = [torch.sigmoid(conv(f)) for conv, f in zip(self.occlusion, features)]
        return {
            "deformed_source": deformed_source,
            "transformations": transformations,
            "contribution_maps": contribution_maps,
            "deformation": deformation,
            "occlusion_map": occlusion_map,
        }
