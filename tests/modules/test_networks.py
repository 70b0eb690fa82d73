import torch

from configuration import load_config
from modules import AVDNetwork, BGMotionPredictor, CPABMotion, InpaintingNetwork, KPDetector, TPSMotion, build_networks
from modules.blocks import make_coordinate_grid

K = 2
TINY = ["model_params.common_params.num_cpab=2",
        "model_params.generator_params.block_expansion=8",
        "model_params.generator_params.max_features=32",
        "model_params.dense_motion_params.block_expansion=8",
        "model_params.dense_motion_params.max_features=32",
        "model_params.dense_motion_params.num_blocks=3",
        "model_params.dense_motion_params.cpab.max_iter=2",
        "model_params.avd_network_params.id_bottle_size=16",
        "model_params.avd_network_params.pose_bottle_size=16"]


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_vox256_parameter_counts_equal_the_official_ones():
    nets = build_networks(load_config("config/vox-256.yaml"))
    assert {name: _count(net) for name, net in nets.items()} == {
        "kp_detector": 11_227_812,
        "dense_motion_network": 37_957_759,
        "inpainting_network": 24_737_283,
        "bg_predictor": 11_188_998,
        "avd_network": 2_583_652,
    }
    dense = nets["dense_motion_network"]
    assert dense.motion.partial_cpab.dim == 58 and dense.motion.global_cpab_transform.dim == 130
    assert dense.motion.max_iter == 100 and dense.motion.global_iter == 150
    # State-dict names of the official checkpoints (the CPAB bases are not saved).
    keys = set(dense.state_dict())
    assert {"down.weight", "maps.weight", "up.1.norm.bias", "occlusion.3.weight",
            "hourglass.decoder.up_blocks.4.conv.weight"} <= keys
    assert not any("cpab" in k for k in keys)
    inpainting_keys = set(nets["inpainting_network"].state_dict())
    assert {"first.conv.weight", "resblock.5.norm2.weight", "final.bias"} <= inpainting_keys
    assert {"id_encoder.9.weight", "decoder.9.bias"} <= set(nets["avd_network"].state_dict())


def test_builder_switches():
    dm = "model_params.dense_motion_params."
    cpab = dm + "cpab."
    cfg = load_config("config/vox-256.yaml", overrides=TINY + [
        "model_params.common_params.bg=false", cpab + "fit_method=gauss_newton", cpab + "gn_iter=3",
        cpab + "gn_damping=0.02", cpab + "fit_lr=0.05", cpab + "theta_init=0.0", cpab + "global_iter_multiplier=2.0",
        dm + "kp_variance=0.02", cpab + "detach_keypoints=false"])
    nets = build_networks(cfg)
    assert nets["bg_predictor"] is None
    net = nets["dense_motion_network"]
    motion = net.motion
    assert isinstance(motion, CPABMotion) and net.num_warps == K + 2
    assert (motion.fit_method, motion.gn_iter, motion.gn_damping, motion.fit_lr, motion.theta_init, motion.global_iter,
            net.kp_variance, motion.detach_keypoints) == ("gauss_newton", 3, 0.02, 0.05, 0.0, 4, 0.02, False)
    assert set(nets) == {"kp_detector", "dense_motion_network", "inpainting_network", "bg_predictor", "avd_network"}
    tps = build_networks(load_config("config/vox-256.yaml", overrides=TINY + [dm + "motion=tps"]))
    assert isinstance(tps["dense_motion_network"].motion, TPSMotion) and tps["dense_motion_network"].num_warps == K + 1


def test_builder_basis_switch():
    dm = "model_params.dense_motion_params.cpab."
    default = build_networks(load_config("config/vox-256.yaml", overrides=TINY))["dense_motion_network"]
    vertex = build_networks(load_config("config/vox-256.yaml", overrides=TINY + [dm + "basis=vertex"]))
    vertex = vertex["dense_motion_network"]
    default, vertex = default.motion, vertex.motion
    assert default.partial_cpab.basis_kind == default.global_cpab_transform.basis_kind == "libcpab"
    assert vertex.partial_cpab.basis_kind == vertex.global_cpab_transform.basis_kind == "vertex"
    assert not torch.allclose(default.partial_cpab.basis, vertex.partial_cpab.basis)


def test_keypoint_detector_shapes_and_range():
    out = KPDetector(num_cpab=K)(torch.rand(2, 3, 32, 32))
    assert out["fg_kp"].shape == (2, 5 * K, 2)
    assert out["fg_kp"].abs().max() < 1


def test_bg_predictor_starts_at_identity():
    net = BGMotionPredictor()
    out = net(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 3, 3)
    assert torch.equal(out, torch.eye(3).expand(2, 3, 3))


def test_avd_network_shapes():
    net = AVDNetwork(num_cpab=K, id_bottle_size=16, pose_bottle_size=8)
    out = net({"fg_kp": torch.rand(4, 5 * K, 2)}, {"fg_kp": torch.rand(4, 5 * K, 2)})
    assert out["fg_kp"].shape == (4, 5 * K, 2)
    assert net.pose_encoder[-1].out_features == 8 and net.id_encoder[-1].out_features == 16


def _identity_motion(bs, size):
    grid = make_coordinate_grid((size // 4, size // 4)).expand(bs, size // 4, size // 4, 2)
    return {"deformation": grid, "contribution_maps": torch.ones(bs, 3, 16, 16),
            "deformed_source": torch.zeros(bs, 3, 3, 16, 16),
            "occlusion_map": [torch.ones(bs, 1, size // 2 ** (3 - i), size // 2 ** (3 - i)) for i in range(4)]}


def test_inpainting_network_shapes_and_identity_blend():
    net = InpaintingNetwork(num_channels=3, block_expansion=8, max_features=32, num_down_blocks=3, multi_mask=True)
    source = torch.rand(2, 3, 64, 64)
    out = net(source, _identity_motion(2, 64))
    assert out["prediction"].shape == (2, 3, 64, 64)
    # Identity flow and no occlusion: the prediction is the source itself.
    assert torch.allclose(out["prediction"], source, atol=1e-5)
    assert torch.allclose(out["deformed"], source, atol=1e-5)
    assert [m.shape[1:] for m in out["warped_encoder_maps"]] == [(32, 8, 8), (32, 16, 16), (16, 32, 32), (8, 64, 64)]
    encode = net.get_encode(source, _identity_motion(2, 64)["occlusion_map"])
    assert [m.shape[1:] for m in encode] == [(8, 64, 64), (16, 32, 32), (32, 16, 16), (32, 8, 8)]
    assert not any(m.requires_grad for m in encode)


def test_full_forward_backward_reaches_every_parameter():
    nets = build_networks(load_config("config/vox-256.yaml", overrides=TINY))
    # The BG predictor's fc starts at zero weights (identity affine), which blocks the gradient into its
    # backbone at the very first step only; perturb it to test the path a trained network has.
    with torch.no_grad():
        nets["bg_predictor"].bg_encoder.fc.weight.normal_(0.0, 1e-3, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(0)
    source, driving = torch.rand(2, 3, 64, 64, generator=gen), torch.rand(2, 3, 64, 64, generator=gen)
    kp_s, kp_d = nets["kp_detector"](source), nets["kp_detector"](driving)
    bg = nets["bg_predictor"](source, driving)
    motion_out = nets["dense_motion_network"](source, kp_d, kp_s, bg_param=bg, dropout_flag=True, dropout_p=0.1)
    out = nets["inpainting_network"](source, motion_out)
    encode = nets["inpainting_network"].get_encode(driving, out["occlusion_map"])
    warp = sum((a - b).abs().mean() for a, b in zip(out["warped_encoder_maps"], encode[::-1], strict=True))
    avd = nets["avd_network"](kp_s, kp_d)["fg_kp"]
    loss = (out["prediction"] - driving).abs().mean() + warp + avd.pow(2).mean()
    loss.backward()
    for name, net in nets.items():
        for pname, param in net.named_parameters():
            assert param.grad is not None, f"{name}.{pname} got no gradient"
            assert torch.isfinite(param.grad).all(), f"{name}.{pname} has a non-finite gradient"
    # Every weight gets a non-zero gradient. Biases are only checked for finiteness: a conv bias right
    # before an InstanceNorm has a mathematically zero gradient (the norm removes it), rounding noise here.
    zero = [f"{name}.{p}" for name, net in nets.items() for p, param in net.named_parameters()
            if not p.endswith("bias") and param.grad.abs().max() == 0]
    assert not zero, zero


def test_single_occlusion_mask_is_resized_to_every_level():
    net = InpaintingNetwork(num_channels=3, block_expansion=8, max_features=32, num_down_blocks=3, multi_mask=False)
    motion = _identity_motion(2, 64)
    motion["occlusion_map"] = [torch.ones(2, 1, 16, 16)]
    source = torch.rand(2, 3, 64, 64)
    out = net(source, motion)
    assert torch.allclose(out["prediction"], source, atol=1e-5)
    assert [m.shape[-1] for m in net.get_encode(source, motion["occlusion_map"])] == [64, 32, 16, 8]


def test_state_dict_layouts_tpsmm_with_tps_and_official_with_cpab():
    """Key counts of TPSMM's / the official CPABMM's vox-256 state dicts; the warp count shows in two shapes."""
    counts = {"kp_detector": 122, "dense_motion_network": 59, "inpainting_network": 78, "bg_predictor": 122,
              "avd_network": 69}
    shapes = {"tps": ((11, 148, 7, 7), 84), "cpab": ((12, 151, 7, 7), 87)}   # K + 1 or K + 2 warps, K = 10
    for motion, (maps, hourglass_in) in shapes.items():
        nets = build_networks(load_config("config/vox-256.yaml",
                                          overrides=[f"model_params.dense_motion_params.motion={motion}"]))
        assert {name: len(net.state_dict()) for name, net in nets.items()} == counts, motion
        dense = nets["dense_motion_network"].state_dict()
        assert tuple(dense["maps.weight"].shape) == maps
        assert dense["hourglass.encoder.down_blocks.0.conv.weight"].shape[1] == hourglass_in
        assert not any(key.startswith("motion.") for key in dense), motion
