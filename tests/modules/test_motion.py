"""Motion models are injected parts: a toy one works end to end through the builder, the dense-motion
network and a training step; the schema sections are the models' constructor arguments."""
import copy
import inspect

import pytest
import torch

import modules
from configuration import MOTION_SECTIONS, load_config, schema_entry
from modules import DenseMotionNetwork, build_networks
from modules.motion import MOTION_MODELS

K = 2
TINY = ["model_params.common_params.num_cpab=2", "model_params.generator_params.block_expansion=8",
        "model_params.generator_params.max_features=16", "model_params.dense_motion_params.block_expansion=8",
        "model_params.dense_motion_params.max_features=16", "model_params.dense_motion_params.num_blocks=3",
        "train_params.scales=[1]"]


class ShiftMotion(torch.nn.Module):
    """A toy motion model: per group of 5 keypoints, the translation by gain * mean(source - driving).
    ``gain`` is a learnable parameter (so it shows up in the dense-motion state dict as motion.gain)."""

    def __init__(self, num_groups, initial_gain):
        super().__init__()
        self.num_groups = num_groups
        self.num_warps = num_groups
        self.gain = torch.nn.Parameter(torch.tensor(float(initial_gain)))

    def warps(self, kp_driving, kp_source, size):
        bs = kp_driving.shape[0]
        shift = (kp_source - kp_driving).reshape(bs, self.num_groups, 5, 2).mean(dim=2) * self.gain
        h, w = size
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack([xs, ys], dim=-1).to(kp_driving)
        return identity[None, None] + shift[:, :, None, None, :]


@pytest.fixture
def shift_config(monkeypatch):
    """A config whose dense_motion_params.motion is 'shift' with its own section, as the builder sees it
    (the schema would get a 'shift' section in configuration.MOTION_SECTIONS); MOTION_MODELS knows it."""
    monkeypatch.setitem(MOTION_MODELS, "shift", ShiftMotion)
    config = copy.deepcopy(load_config("config/synthetic-64.yaml", overrides=TINY))
    config["model_params"]["dense_motion_params"].update(motion="shift", shift={"initial_gain": 0.5})
    return config


def test_a_toy_motion_model_trains_end_to_end(shift_config):
    from full_model import GeneratorFullModel

    networks = build_networks(shift_config)
    dense = networks["dense_motion_network"]
    assert isinstance(dense.motion, ShiftMotion) and dense.num_warps == K + 1
    assert "motion.gain" in dense.state_dict() and dense.motion.gain.item() == 0.5
    tp = shift_config["train_params"]
    tp = dict(tp, loss_weights=dict(tp["loss_weights"], perceptual=[0] * 5))
    model = GeneratorFullModel(networks, tp, losses={})
    x = {"source": torch.rand(2, 3, 32, 32), "driving": torch.rand(2, 3, 32, 32)}
    loss_dict, generated = model(x, epoch=tp["bg_start"], step=0)
    assert generated["transformations"].shape == (2, K + 1, 16, 16, 2)
    assert generated["prediction"].shape == (2, 3, 32, 32)
    # Warp k + 1 is the identity shifted by the group's mean displacement times the gain.
    kp_d, kp_s = generated["kp_driving"]["fg_kp"], generated["kp_source"]["fg_kp"]
    shift = 0.5 * (kp_s - kp_d).reshape(2, K, 5, 2).mean(dim=2)
    centre = generated["transformations"][:, 1:, 8, 8]
    torch.testing.assert_close(centre.detach(), shift.detach() + torch.linspace(-1, 1, 16)[8], atol=1e-5,
                               rtol=0)
    sum(loss_dict.values()).backward()
    assert dense.motion.gain.grad is not None and torch.isfinite(dense.motion.gain.grad)
    # The toy warps are differentiable in the keypoints: the warp loss reaches the keypoint detector.
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in networks["kp_detector"].parameters())


def test_dense_motion_checks_what_a_motion_model_returns():
    class Wrong(ShiftMotion):
        def warps(self, kp_driving, kp_source, size):
            return super().warps(kp_driving, kp_source, size)[:, :1]

    net = DenseMotionNetwork(motion=Wrong(K, 1.0), num_keypoints=5 * K, num_channels=3, block_expansion=8,
                             num_blocks=3, max_features=16, scale_factor=0.25, multi_mask=True, kp_variance=0.01)
    kp = {"fg_kp": torch.rand(2, 5 * K, 2) - 0.5}
    with pytest.raises(ValueError, match=r"Wrong.warps returned \(2, 1, 16, 16, 2\), expected \(2, 2, 16, 16, 2\)"):
        net(torch.rand(2, 3, 64, 64), kp, kp)


def test_schema_sections_are_the_motion_models_constructor_arguments():
    motion_key = schema_entry("model_params.dense_motion_params.motion")
    assert set(motion_key.choices) == set(MOTION_MODELS) == set(MOTION_SECTIONS)
    for name, cls in MOTION_MODELS.items():
        arguments = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        assert arguments[0] == "num_groups", name
        assert set(arguments[1:]) == set(MOTION_SECTIONS[name].keys), name
        # No defaults: the schema is the one table of defaults.
        assert all(p.default is inspect.Parameter.empty
                   for p in inspect.signature(cls.__init__).parameters.values()), name


def test_dense_motion_network_takes_at_most_twelve_arguments_and_no_motion_settings():
    arguments = [p for p in inspect.signature(DenseMotionNetwork.__init__).parameters if p != "self"]
    assert len(arguments) <= 12 and arguments[0] == "motion"
    assert not set(arguments) & set(MOTION_SECTIONS["cpab"].keys)
    # It knows no motion model: nothing of cpab, the TPS or the motion classes is in its module.
    assert not {"CPAB", "TPS", "CPABMotion", "TPSMotion", "cpab"} & set(vars(modules.dense_motion))
