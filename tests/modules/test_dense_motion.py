import pytest
import torch
import torch.nn.functional as F

from modules.blocks import make_coordinate_grid
from modules.dense_motion import affine_grid, dropout_softmax

K = 2


def _kp(tensor):
    return {"fg_kp": tensor}


def test_output_shapes(make_dense_motion, make_keypoints, images):
    net = make_dense_motion(max_iter=1)
    out = net(images[0], _kp(make_keypoints(seed=1)), _kp(make_keypoints(seed=2)))
    assert out["deformed_source"].shape == (2, K + 2, 3, 16, 16)
    assert out["transformations"].shape == (2, K + 2, 16, 16, 2)
    assert out["contribution_maps"].shape == (2, K + 2, 16, 16)
    assert out["deformation"].shape == (2, 16, 16, 2)
    assert [m.shape[-1] for m in out["occlusion_map"]] == [8, 16, 32, 64]
    assert torch.allclose(out["contribution_maps"].sum(1), torch.ones(2, 16, 16), atol=1e-5)
    mixed = (out["contribution_maps"][..., None] * out["transformations"]).sum(1)
    assert torch.allclose(out["deformation"], mixed, atol=1e-6)


def test_iteration_counts_are_integers(make_dense_motion):
    motion = make_dense_motion(max_iter=3, global_iter_multiplier=1.5).motion
    assert motion.max_iter == 3 and motion.global_iter == 4 and isinstance(motion.global_iter, int)


@pytest.mark.parametrize("method", ["adam", "gauss_newton"])
def test_flow_is_identity_for_coinciding_keypoints(make_dense_motion, make_keypoints, images, method):
    net = make_dense_motion(fit_method=method, max_iter=2, gn_iter=2)
    kp = make_keypoints(seed=3)
    motion = net.motion
    theta_partial, theta_global = motion.fit(kp, kp)
    assert theta_partial.shape == (2 * K, motion.partial_cpab.dim)
    assert theta_global.shape == (2, motion.global_cpab_transform.dim)
    # Adam moves theta by about lr per step even from a zero residual (its steps are normalised).
    if method == "adam":
        assert theta_partial.abs().max() < (motion.max_iter + 0.5) * motion.fit_lr
        assert theta_global.abs().max() < (motion.global_iter + 0.5) * motion.fit_lr
    else:
        assert theta_partial.abs().max() < 1e-4 and theta_global.abs().max() < 1e-4
    out = net(images[0], _kp(kp), _kp(kp))
    identity = make_coordinate_grid((16, 16))
    tolerance = 0.05 if method == "adam" else 1e-3
    assert (out["transformations"] - identity).abs().max() < tolerance
    assert (out["deformation"] - identity).abs().max() < tolerance


def test_partial_warps_map_driving_onto_source(make_dense_motion, make_keypoints):
    net = make_dense_motion(fit_method="gauss_newton", gn_iter=3, global_cpab=False)
    kp_d = make_keypoints(seed=4, scale=0.6)
    kp_s = kp_d + 0.08 * torch.randn(kp_d.shape, generator=torch.Generator().manual_seed(5))
    theta_partial, _ = net.motion.fit(kp_d, kp_s)
    groups_d = kp_d.reshape(2 * K, 5, 2)
    groups_s = kp_s.reshape(2 * K, 5, 2)
    mapped = net.motion.transform(groups_d, theta_partial)
    residual = (mapped - groups_s).norm(dim=-1)
    assert residual.mean() < 0.5 * (groups_d - groups_s).norm(dim=-1).mean()
    # The dense grids are the fitted transforms: sampled at the driving keypoints they give T(kp_d),
    # so each partial warp maps its driving keypoints onto the source ones within the fit's residual.
    grids = net.create_transformations((64, 64), kp_d, kp_s, None)
    partial = grids[:, 1:K + 1].reshape(2 * K, 64, 64, 2).permute(0, 3, 1, 2)
    sampled = F.grid_sample(partial, groups_d[:, :, None, :], align_corners=True)[..., 0].permute(0, 2, 1)
    assert (sampled - mapped).abs().max() < 5e-3
    assert ((sampled - groups_s).norm(dim=-1) - residual).abs().max() < 5e-3


def test_keypoint_gradient_through_the_fit_when_not_detached(make_dense_motion, make_keypoints):
    net = make_dense_motion(fit_method="gauss_newton", gn_iter=3, global_cpab=False, detach_keypoints=False)
    kp_d = make_keypoints(bs=1, seed=6, scale=0.6)
    kp_s = (kp_d + 0.05 * torch.randn(kp_d.shape, generator=torch.Generator().manual_seed(7))).requires_grad_()
    theta, _ = net.motion.fit(kp_d, kp_s)
    assert theta.requires_grad
    assert torch.equal(theta.detach(), make_dense_motion(fit_method="gauss_newton", gn_iter=3, global_cpab=False)
                       .motion.fit(kp_d, kp_s.detach())[0])
    # The fit (nearly) interpolates 5 points with 58 parameters, so d T(x_i) / d y_i is close to the
    # identity (damping and an unconverged fit make it smaller).
    mapped = net.motion.transform(kp_d.reshape(K, 5, 2), theta)
    grad, = torch.autograd.grad(mapped[0, 0, 0], kp_s)
    assert 0.5 < grad[0, 0, 0].item() < 1.2
    assert grad[0, 0, 1].abs() < 0.5 * grad[0, 0, 0]
    assert grad[0, 5:].abs().max() == 0  # another group's source keypoints do not move this warp


def test_background_warp(make_dense_motion, make_keypoints):
    net = make_dense_motion(motion="tps")
    bg = torch.tensor([[1.0, 0.1, 0.2], [0.0, 0.9, -0.1], [0.0, 0.0, 1.0]]).expand(2, 3, 3)
    grids = net.create_transformations((16, 16), make_keypoints(seed=1), make_keypoints(seed=2), bg)
    identity = make_coordinate_grid((16, 16))
    expected = identity @ bg[0, :2, :2].T + bg[0, :2, 2]
    assert torch.allclose(grids[:, 0], expected.expand(2, 16, 16, 2), atol=1e-6)
    identity_bg = affine_grid(torch.eye(3).expand(2, 3, 3), (4, 5))
    assert torch.allclose(identity_bg, make_coordinate_grid((4, 5)).expand(2, 4, 5, 2))


def test_dropout_softmax_keeps_background_and_does_not_rescale():
    torch.manual_seed(0)
    logits = torch.randn(64, 4, 3, 3)
    assert torch.allclose(dropout_softmax(logits, 0.0), F.softmax(logits, 1), atol=1e-5)
    only_bg = dropout_softmax(logits, 1.0)
    e0 = (logits[:, 0] - logits.amax(1)).exp()
    assert torch.allclose(only_bg[:, 0], e0 / (e0 + 1e-6), atol=1e-6)  # upstream's + 1e-6 in the partition
    assert torch.equal(only_bg[:, 1:], torch.zeros(64, 3, 3, 3))
    out = dropout_softmax(logits, 0.5)
    kept = out.amax(dim=(2, 3)) > 0
    assert kept[:, 0].all() and not kept.all() and kept[:, 1:].any()
    assert torch.allclose(out.sum(1), torch.ones(64, 3, 3), atol=1e-3)
    # Faithful to the official code: no 1/(1-p) rescale of the logits, the kept channels keep
    # their plain softmax ratios (a rescale by 2 would double the log-ratio).
    for b in range(64):
        for c in range(1, 4):
            if kept[b, c]:
                log_ratio = (out[b, c] / out[b, 0]).log()
                assert torch.allclose(log_ratio, logits[b, c] - logits[b, 0], atol=1e-4)


def test_dropout_flag_in_forward(make_dense_motion, make_keypoints, images):
    net = make_dense_motion(motion="tps")
    torch.manual_seed(1)
    kp_d, kp_s = _kp(make_keypoints(seed=1)), _kp(make_keypoints(seed=2))
    out = net(images[0], kp_d, kp_s, dropout_flag=True, dropout_p=1.0)
    assert torch.allclose(out["contribution_maps"][:, 0], torch.ones(2, 16, 16), atol=1e-4)
    assert torch.allclose(out["deformation"], out["transformations"][:, 0], atol=1e-4)


def test_tps_motion_uses_k_plus_one_warps(make_dense_motion, make_keypoints, images):
    net = make_dense_motion(motion="tps")
    assert net.num_warps == K + 1 and net.motion.num_warps == K and not hasattr(net.motion, "partial_cpab")
    kp_d = make_keypoints(seed=1).requires_grad_()
    kp_s = make_keypoints(seed=2)
    out = net(images[0], _kp(kp_d), _kp(kp_s))
    assert out["transformations"].shape == (2, K + 1, 16, 16, 2)
    assert out["contribution_maps"].shape == (2, K + 1, 16, 16)
    # TPS warps are differentiable in the keypoints (TPSMM), unlike the detached CPAB fit.
    grad, = torch.autograd.grad(out["transformations"][:, 1:].sum(), kp_d)
    assert grad.abs().sum() > 0


def test_single_occlusion_mask(make_dense_motion, make_keypoints, images):
    net = make_dense_motion(motion="tps", multi_mask=False)
    out = net(images[0], _kp(make_keypoints(seed=1)), _kp(make_keypoints(seed=2)))
    assert [m.shape for m in out["occlusion_map"]] == [(2, 1, 16, 16)]


def test_global_cpab_off(make_dense_motion, make_keypoints):
    net = make_dense_motion(global_cpab=False, max_iter=1)
    assert net.num_warps == K + 1 and net.motion.global_cpab_transform is None
    assert net.hourglass.encoder.down_blocks[0].conv.in_channels == 3 * (K + 1) + 5 * K + 1
    kp_d = make_keypoints(seed=1).requires_grad_()
    grids = net.create_transformations((16, 16), kp_d, make_keypoints(seed=2), None)
    assert grids.shape == (2, K + 1, 16, 16, 2)
    assert not grids.requires_grad  # Faithful to the official code: keypoints detached for the fit


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_inference_without_autograd(make_dense_motion, make_keypoints, images, mode):
    net = make_dense_motion(max_iter=1, global_cpab=False).eval()
    kp_d, kp_s = _kp(make_keypoints(seed=1)), _kp(make_keypoints(seed=2))
    reference = net(images[0], kp_d, kp_s)["deformation"]
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        out = net(images[0], kp_d, kp_s)
    assert not out["deformation"].requires_grad
    assert torch.allclose(out["deformation"], reference, atol=1e-5)


def test_invalid_arguments(make_dense_motion):
    with pytest.raises(ValueError, match="motion"):
        make_dense_motion(motion="affine")
    with pytest.raises(ValueError, match="fit_method"):
        make_dense_motion(fit_method="lbfgs")


@pytest.mark.gpu
def test_dense_motion_on_cuda(make_dense_motion, make_keypoints, images):
    cpu = make_dense_motion(max_iter=1, fit_method="gauss_newton", gn_iter=2)
    gpu = make_dense_motion(max_iter=1, fit_method="gauss_newton", gn_iter=2).to("cuda")
    gpu.load_state_dict(cpu.state_dict())
    kp_d, kp_s = make_keypoints(seed=1), make_keypoints(seed=2)
    out = gpu(images[0].to("cuda"), _kp(kp_d.to("cuda")), _kp(kp_s.to("cuda")))
    assert out["deformation"].is_cuda
    expected = cpu(images[0], _kp(kp_d), _kp(kp_s))["deformation"]
    assert torch.allclose(out["deformation"].cpu(), expected, atol=1e-3)
