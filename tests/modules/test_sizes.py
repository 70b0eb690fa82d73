"""modules/sizes.py: the frame-size rule, checked against the real networks on tiny configs."""
import os

import pytest
import torch

import animation
from configuration import load_config
from modules import build_networks
from modules.sizes import FrameSizeError, check_frame_size, config_size_problem, describe_working_lengths

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny(num_down_blocks, num_blocks, scale_factor):
    return load_config(os.path.join(ROOT, "config", "vox-256.yaml"), overrides=[
        "model_params.dense_motion_params.motion=tps", "model_params.common_params.num_cpab=1",
        f"model_params.generator_params.num_down_blocks={num_down_blocks}",
        "model_params.generator_params.block_expansion=4", "model_params.generator_params.max_features=8",
        f"model_params.dense_motion_params.num_blocks={num_blocks}",
        f"model_params.dense_motion_params.scale_factor={scale_factor}",
        "model_params.dense_motion_params.block_expansion=4", "model_params.dense_motion_params.max_features=8"])


def _networks_take(networks, height, width):
    """Whether keypoints, background, dense motion and generator run on a (1, 3, height, width) frame."""
    frame = torch.rand(1, 3, height, width)
    try:
        with torch.no_grad():
            keypoints = networks["kp_detector"](frame)
            animation.animate(networks, frame, keypoints, keypoints, bg_param=networks["bg_predictor"](frame, frame))
    except (RuntimeError, ValueError):  # "Sizes of tensors must match ...", a 1-pixel motion grid
        return False
    return True


@pytest.mark.parametrize("num_down_blocks, num_blocks, scale_factor", [(3, 3, 0.25), (2, 3, 0.5), (3, 3, 0.3)])
def test_the_rule_is_what_the_networks_take(num_down_blocks, num_blocks, scale_factor):
    """Square and rectangular sizes from 8 to 72 (including 0.3, whose downscale floors unevenly):
    the rule says yes exactly where a forward pass works. (A wider sweep, 1 to 3 encoder levels x 1 to 3
    hourglass blocks x scale 1, 0.5, 0.25, 0.3 at 4..69 pixels, 1980 cases, agreed everywhere.)"""
    config = _tiny(num_down_blocks, num_blocks, scale_factor)
    networks = build_networks(config)
    for network in networks.values():
        network.eval()
    outcomes = {True: 0, False: 0}
    for height, width in [(n, n) for n in range(8, 73, 4)] + [(32, 40), (64, 48), (40, 64), (56, 30)]:
        fits = config_size_problem(config["model_params"], (height, width)) is None
        assert _networks_take(networks, height, width) == fits, (height, width)
        outcomes[fits] += 1
    assert outcomes[True] and outcomes[False]


def test_the_released_configs_and_what_the_error_says():
    vox = load_config(os.path.join(ROOT, "config", "vox-256.yaml"))["model_params"]
    # Generator: 3 poolings (x8); dense motion: 1/4 then 5 poolings (x32): 128 * k.
    assert describe_working_lengths(3, 5, 0.25) == "multiples of 128 (128, 256, 384, ...)"
    for size in ((256, 256), (384, 384), (128, 512)):
        assert config_size_problem(vox, size) is None
    with pytest.raises(FrameSizeError) as error:
        check_frame_size(vox, (100, 100), "--img_shape")
    message = str(error.value)
    assert "\n" not in message and message.startswith("--img_shape: frame size 100x100 does not fit")
    assert "divisible by 8" in message and "25x25" in message and "divisible by 32" in message
    assert "multiples of 128" in message and "nearest to 100: 128" in message
    quick = load_config(os.path.join(ROOT, "config", "synthetic-64.yaml"))["model_params"]
    assert describe_working_lengths(3, 3, 0.5, near=63) == "multiples of 16 (16, 32, 48, ...); nearest to 63: 48 or 64"
    assert "63x63" in config_size_problem(quick, (63, 63))
    assert describe_working_lengths(3, 3, 0.3).startswith("56, 80, 136, ")  # not a plain multiple
