"""animation.py: the keypoint arithmetic of the motion transfer by hand, the Animator's modes and
background choice, and that every entry point (training, reconstruction, demo, benchmark) animates
through animation.animate."""
import numpy as np
import pytest
import torch

import animation

# ---------------------------------------------------------------- keypoint arithmetic

def test_convex_hull_area_by_hand():
    square_with_inside_and_duplicates = [[0, 0], [1, 0], [1, 1], [0, 1], [0.5, 0.5], [1, 1], [0.2, 0.9]]
    assert animation.convex_hull_area(square_with_inside_and_duplicates) == pytest.approx(1.0)
    assert animation.convex_hull_area([[0, 0], [4, 0], [0, 3]]) == pytest.approx(6.0)
    assert animation.convex_hull_area([[0, 0], [1, 1], [2, 2], [3, 3]]) == 0.0
    spatial = pytest.importorskip("scipy.spatial")
    points = np.random.default_rng(0).uniform(-1, 1, size=(50, 2))
    assert animation.convex_hull_area(points) == pytest.approx(spatial.ConvexHull(points).volume, rel=1e-12)


def test_relative_keypoints_match_hand_computation():
    square = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0], [0.0, 0.0]])  # hull area 4
    kp_source = (0.5 * square)[None]                       # area 1
    kp_initial = (0.25 * square + 0.1)[None]               # area 0.25 -> scale sqrt(1) / sqrt(0.25) = 2
    shift = torch.tensor([0.1, -0.05])
    kp_driving = torch.stack([kp_initial[0] + shift, kp_initial[0]])
    scale = animation.movement_scale(kp_source, kp_initial)
    assert scale == pytest.approx(2.0)
    relative = animation.relative_keypoints(kp_source, kp_driving, kp_initial, scale)
    torch.testing.assert_close(relative[0], kp_source[0] + torch.tensor([0.2, -0.1]))
    torch.testing.assert_close(relative[1], kp_source[0])


def test_movement_scale_uses_batch_element_zero_only():
    # Faithful to the official code: the hull areas come from element 0 of each batch.
    square = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    kp_source = torch.stack([square, 3 * square])
    assert animation.movement_scale(kp_source, (0.5 * square)[None]) == pytest.approx(2.0)
    with pytest.raises(animation.AnimationError, match="collinear"):
        animation.movement_scale(kp_source, torch.zeros(1, 4, 2))


class _StubKP(torch.nn.Module):
    """Keypoints = BASE * (0.5 + mean intensity of the image): BASE has hull area 1."""
    BASE = torch.tensor([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5], [0.0, 0.1]])

    def forward(self, image):
        return {"fg_kp": self.BASE[None] * (0.5 + image.mean(dim=(1, 2, 3)))[:, None, None]}


class _StubDenseMotion(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, source_image, kp_driving, kp_source, bg_param, dropout_flag, dropout_p):
        self.calls.append((kp_driving["fg_kp"].clone(), kp_source["fg_kp"].clone(), bg_param, dropout_flag))
        return {"deformation": None}


class _StubInpainting(torch.nn.Module):
    def forward(self, source_image, dense_motion):
        return {"prediction": source_image}


@pytest.mark.parametrize("mode", ["relative", "standard"])
def test_animator_passes_hand_computed_keypoints(mode):
    dense = _StubDenseMotion()
    networks = {"kp_detector": _StubKP(), "dense_motion_network": dense, "inpainting_network": _StubInpainting()}
    source = torch.full((1, 3, 8, 8), 0.5)                # kp_source = BASE, area 1
    means = [0.0, 0.2, 0.4, 0.6]                           # reference frame 0: BASE * 0.5, scale 2
    frames = torch.stack([torch.full((3, 8, 8), m) for m in means])
    with torch.inference_mode():
        animator = animation.Animator(networks, source, mode, background=False)
        predictions = [animator(frames[:2]), animator(frames[2:])]
    assert torch.equal(torch.cat(predictions), source.expand(4, -1, -1, -1))
    kp_driving = torch.cat([call[0] for call in dense.calls])
    # By hand: relative = (BASE (0.5 + m) - 0.5 BASE) * 2 + BASE = BASE (1 + 2 m); standard = BASE (0.5 + m).
    factors = [1 + 2 * m for m in means] if mode == "relative" else [0.5 + m for m in means]
    expected = torch.stack([_StubKP.BASE * f for f in factors])
    torch.testing.assert_close(kp_driving, expected)
    for _, kp_source, bg_param, dropout_flag in dense.calls:
        assert kp_source.shape == (2, 5, 2) and torch.equal(kp_source[1], _StubKP.BASE)
        assert bg_param is None and dropout_flag is False  # like TPSMM: no background motion in the demo


class _StubBackground(torch.nn.Module):
    """A BG predictor whose affine is a shift by 0.1 in x; records its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, source_image, driving_image):
        self.calls += 1
        affine = torch.eye(3).repeat(source_image.shape[0], 1, 1)
        affine[:, 0, 2] = 0.1
        return affine


@pytest.mark.parametrize("background", [True, False])
def test_animator_uses_the_bg_predictor_only_when_asked(background):
    dense, bg_predictor = _StubDenseMotion(), _StubBackground()
    networks = {"kp_detector": _StubKP(), "dense_motion_network": dense, "inpainting_network": _StubInpainting(),
                "bg_predictor": bg_predictor}
    with torch.inference_mode():
        animation.Animator(networks, torch.rand(1, 3, 8, 8), "standard", background=background)(torch.rand(3, 3, 8, 8))
    bg_param = dense.calls[0][2]
    if background:  # reconstruction: the official code applies the BG predictor to (frame 0, frame t)
        assert bg_predictor.calls == 1 and bg_param.shape == (3, 3, 3) and torch.all(bg_param[:, 0, 2] == 0.1)
    else:  # demo: no background motion, even with a BG predictor in the checkpoint
        assert bg_predictor.calls == 0 and bg_param is None


def test_animator_rejects_an_unknown_mode():
    networks = {"kp_detector": _StubKP()}
    with pytest.raises(ValueError, match="relative, standard, avd"):
        animation.Animator(networks, torch.rand(1, 3, 8, 8), "mirror", background=False)


# ---------------------------------------------------------------- every entry point takes the one path

@pytest.fixture(scope="module")
def tiny():
    """A tiny TPS-motion config and its networks (with a BG predictor)."""
    from configuration import load_config
    from modules import build_networks

    config = load_config("config/synthetic-64.yaml", overrides=[
        "model_params.dense_motion_params.motion=tps", "model_params.common_params.num_cpab=2",
        "model_params.generator_params.block_expansion=8", "model_params.generator_params.max_features=16",
        "model_params.dense_motion_params.block_expansion=8", "model_params.dense_motion_params.max_features=16",
        "model_params.dense_motion_params.num_blocks=3", "train_params.scales=[1]"])
    return config, build_networks(config)


@pytest.fixture
def spy(monkeypatch):
    """Replaces animation.animate by a wrapper that records each call's bg_param and dropout flag."""
    calls = []
    original = animation.animate

    def recording(networks, source, kp_source, kp_driving, bg_param=None, dropout_flag=False, dropout_p=0.0):
        calls.append({"bg_param": bg_param, "dropout_flag": dropout_flag, "batch": source.shape[0]})
        return original(networks, source, kp_source, kp_driving, bg_param=bg_param, dropout_flag=dropout_flag,
                        dropout_p=dropout_p)

    monkeypatch.setattr(animation, "animate", recording)
    return calls


def test_training_animates_through_the_one_path(tiny, spy):
    from full_model import GeneratorFullModel

    config, networks = tiny
    tp = dict(config["train_params"], dropout_epoch=0, loss_weights=dict(
        perceptual=[0] * 5, equivariance_value=0, warp_loss=10, bg=0, sam=0, structure=0))
    model = GeneratorFullModel(networks, tp, losses={})
    with torch.no_grad():
        loss_dict, generated = model({"source": torch.rand(2, 3, 32, 32), "driving": torch.rand(2, 3, 32, 32)},
                                     epoch=tp["bg_start"], step=0)
    assert len(spy) == 1 and spy[0]["bg_param"].shape == (2, 3, 3) and spy[0]["dropout_flag"] is False
    assert set(loss_dict) == {"warp_loss"} and generated["prediction"].shape == (2, 3, 32, 32)


def test_reconstruction_animates_through_the_one_path_with_the_bg_predictor(tiny, spy):
    from reconstruction import predict_video

    _, networks = tiny
    for network in networks.values():
        network.eval()
    with torch.inference_mode():
        prediction = predict_video(networks, torch.rand(3, 5, 32, 32), batch_size=2)
    assert prediction.shape == (5, 3, 32, 32)
    assert [call["batch"] for call in spy] == [2, 2, 1]
    assert all(call["bg_param"] is not None and not call["dropout_flag"] for call in spy)


def test_benchmark_animates_and_trains_through_the_one_path(tiny, spy):
    from bench import speed

    config, networks = tiny
    size = speed.sizes(quick=True, on_cuda=False)
    speed.time_animation(networks, config, size, torch.device("cpu"))
    assert spy and all(call["bg_param"] is None for call in spy)  # as the demo animates
    spy.clear()
    plain = speed.with_losses(config)
    plain["train_params"]["loss_weights"]["perceptual"] = [0] * 5
    step = speed.build_trainer(networks, plain, losses={})
    step(speed.inputs(2, 32, torch.device("cpu"), False, seed=0))
    assert len(spy) == 1 and spy[0]["bg_param"] is not None  # training at bg_start
