"""CPABMM networks (keypoint detector, background predictor, dense motion and its motion model, generator,
AVD) and the builder that maps a validated config (see configuration.py, key names as in
config/vox-256.yaml) onto their explicit constructor arguments."""
from modules.avd_network import AVDNetwork
from modules.bg_motion_predictor import BGMotionPredictor
from modules.dense_motion import DenseMotionNetwork
from modules.inpainting_network import InpaintingNetwork
from modules.keypoint_detector import KPDetector
from modules.motion import KEYPOINTS_PER_GROUP, MOTION_MODELS, CPABMotion, TPSMotion

__all__ = ["MAIN_NETWORKS", "AVDNetwork", "BGMotionPredictor", "CPABMotion", "DenseMotionNetwork",
           "InpaintingNetwork", "KPDetector", "TPSMotion", "build_motion", "build_networks"]

# The networks of the animation model, trained by ``run.py --mode train`` (the AVD network is trained
# afterwards on top of them); checkpoint entries under these names. bg_predictor is None without bg.
MAIN_NETWORKS = ("kp_detector", "dense_motion_network", "inpainting_network", "bg_predictor")


def build_motion(model_params):
    """The motion model named by ``dense_motion_params.motion``: ``MOTION_MODELS[name](num_groups=K,
    **dense_motion_params[name])`` (the config section of that name holds its constructor arguments)."""
    dense_motion = model_params["dense_motion_params"]
    name = dense_motion["motion"]
    if name not in MOTION_MODELS:
        raise ValueError(f"model_params.dense_motion_params.motion must be one of {', '.join(MOTION_MODELS)}, "
                         f"got {name!r}")
    return MOTION_MODELS[name](num_groups=model_params["common_params"]["num_cpab"], **dense_motion[name])


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
            motion=build_motion(model), num_keypoints=KEYPOINTS_PER_GROUP * num_cpab,
            num_channels=common["num_channels"], block_expansion=dm["block_expansion"],
            num_blocks=dm["num_blocks"], max_features=dm["max_features"], scale_factor=dm["scale_factor"],
            multi_mask=common["multi_mask"], kp_variance=dm["kp_variance"]),
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
