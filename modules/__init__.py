"""CPABMM networks (keypoint detector, background predictor, dense motion, generator, AVD) and the
builder that maps a validated config (see configuration.py, key names as in config/vox-256.yaml)."""
from modules.avd_network import AVDNetwork
from modules.bg_motion_predictor import BGMotionPredictor
from modules.dense_motion import DenseMotionNetwork
from modules.inpainting_network import InpaintingNetwork
from modules.keypoint_detector import KPDetector

__all__ = ["AVDNetwork", "BGMotionPredictor", "DenseMotionNetwork", "InpaintingNetwork", "KPDetector",
           "build_networks"]


def build_networks(config, device=None):
    """Build every network from the full config dict (``load_config`` output; all keys present).

    Returns {'kp_detector', 'dense_motion_network', 'inpainting_network', 'bg_predictor' (None when
    model_params.common_params.bg is false), 'avd_network'}, in float32, on ``device`` (default: CPU).
    """
    model = config["model_params"]
    common = model["common_params"]
    gen = model["generator_params"]
    dm = model["dense_motion_params"]
    avd = model["avd_network_params"]
    num_cpab = common["num_cpab"]
    networks = {
        "kp_detector": KPDetector(num_cpab=num_cpab),
        "dense_motion_network": DenseMotionNetwork(
            block_expansion=dm["block_expansion"], num_blocks=dm["num_blocks"],
            max_features=dm["max_features"], num_cpab=num_cpab, num_channels=common["num_channels"],
            scale_factor=dm["scale_factor"], bg=common["bg"], multi_mask=common["multi_mask"],
            kp_variance=dm["kp_variance"], motion=dm["motion"], global_cpab=dm["global_cpab"],
            partial_tess_size=tuple(dm["partial_tess_size"]), global_tess_size=tuple(dm["global_tess_size"]),
            zero_boundary=dm["zero_boundary"], volume_preservation=dm["volume_preservation"], basis=dm["basis"],
            fit_method=dm["fit_method"], max_iter=dm["max_iter"],
            global_iter_multiplier=dm["global_iter_multiplier"], fit_lr=dm["fit_lr"],
            theta_init=dm["theta_init"], gn_iter=dm["gn_iter"], gn_damping=dm["gn_damping"],
            detach_keypoints=dm["detach_keypoints"]),
        "inpainting_network": InpaintingNetwork(
            num_channels=common["num_channels"], block_expansion=gen["block_expansion"],
            max_features=gen["max_features"], num_down_blocks=gen["num_down_blocks"],
            multi_mask=common["multi_mask"]),
        "bg_predictor": BGMotionPredictor() if common["bg"] else None,
        "avd_network": AVDNetwork(num_cpab=num_cpab, id_bottle_size=avd["id_bottle_size"],
                                  pose_bottle_size=avd["pose_bottle_size"]),
    }
    if device is not None:
        for network in networks.values():
            if network is not None:
                network.to(device)
    return networks
