"""GeneratorFullModel: official forward order, weights applied in one place, weight 0 builds
nothing, missing weight files fail at start-up, gradients reach the right networks."""
import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torchvision.models.vgg import make_layers

from configuration import load_config
from full_model import (
    GeneratorFullModel,
    build_losses,
    dropout_schedule,
    required_pretrained_files,
    resolve_pretrained_files,
)
from losses.keypoint_semantic import KeypointSemanticLoss
from losses.perceptual import PerceptualLoss
from losses.pretrained import MissingWeightsError
from losses.structure import StructureLoss
from modules import build_networks

NETWORKS = ("kp_detector", "dense_motion_network", "inpainting_network", "bg_predictor")
ALL_OFF = dict(perceptual=[0, 0, 0, 0, 0], equivariance_value=0, warp_loss=0, bg=0, sam=0, structure=0)


@pytest.fixture(scope="module")
def config():
    # TPS motion keeps this test independent of the CPAB fit (tested in tests/cpab and tests/modules).
    return load_config("config/synthetic-64.yaml", overrides=[
        "model_params.dense_motion_params.motion=tps", "train_params.scales=[1, 0.5]",
        "model_params.generator_params.block_expansion=8", "model_params.generator_params.max_features=64",
        "model_params.dense_motion_params.block_expansion=8", "model_params.dense_motion_params.max_features=64"])


@pytest.fixture(scope="module")
def shared_networks(config):
    return build_networks(config)


@pytest.fixture
def networks(shared_networks):
    for net in shared_networks.values():
        for p in net.parameters():
            p.grad = None
    return shared_networks


@pytest.fixture(scope="module")
def vgg_features():
    """VGG-19's layer sequence with 16x fewer channels (the real one is slow on a shared CPU)."""
    return make_layers([4, 4, "M", 8, 8, "M", 16, 16, 16, 16, "M", 32, 32, 32, 32, "M", 32, 32, 32, 32, "M"])


def tiny_losses(train_params, vgg_features, names=("perceptual", "sam", "structure")):
    losses = {}
    if "perceptual" in names:
        losses["perceptual"] = PerceptualLoss(vgg_features, train_params["scales"], num_channels=3)
    if "sam" in names:
        # segment-anything is optional where only the GPU stack is installed: the tests that need SAM skip there.
        modeling = pytest.importorskip("segment_anything.modeling")
        encoder = modeling.ImageEncoderViT(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, out_chans=8,
                                           use_rel_pos=True, window_size=2, global_attn_indexes=(0,))
        losses["sam"] = KeypointSemanticLoss(encoder, input_size=32, dtype=torch.float32,
                                             every_n_steps=train_params["sam_params"]["every_n_steps"])
    if "structure" in names:
        vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                                dynamic_img_size=True)
        losses["structure"] = StructureLoss(vit, dtype=torch.float32, layer=1, size=32, max_size=60)
    return losses


def with_weights(train_params, **weights):
    tp = copy.deepcopy(train_params)
    tp["loss_weights"].update(weights)
    return tp


def batch():
    return {"source": torch.rand(2, 3, 32, 32), "driving": torch.rand(2, 3, 32, 32)}


def test_dropout_schedule_is_the_official_one(config):
    tp = dict(config["train_params"], dropout_epoch=35, dropout_maxp=0.3, dropout_startp=0.1, dropout_inc_epoch=10)
    assert dropout_schedule(0, tp) == (True, pytest.approx(0.1))
    assert dropout_schedule(5, tp) == (True, pytest.approx(0.25))
    assert dropout_schedule(20, tp) == (True, pytest.approx(0.3))
    assert dropout_schedule(35, tp) == (False, 0.0)


def test_weight_zero_builds_nothing_and_needs_no_file(config, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    tp = with_weights(config["train_params"], perceptual=[0, 0, 0, 0, 0], sam=0, structure=0)
    tp["pretrained"].update(vgg19="absent/vgg.pth", allow_random_weights=False)
    assert required_pretrained_files(tp) == []
    assert build_losses(tp, num_channels=3) == {}


def test_missing_file_fails_at_start_up_naming_the_key(config, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    tp = with_weights(config["train_params"], perceptual=[0, 0, 0, 0, 0], sam=1, structure=0)
    tp["pretrained"].update(sam_checkpoint="absent/sam_vit_b_01ec64.pth", allow_random_weights=False)
    assert required_pretrained_files(tp) == [("train_params.pretrained.sam_checkpoint", "absent/sam_vit_b_01ec64.pth")]
    with pytest.raises(MissingWeightsError, match="^train_params.pretrained.sam_checkpoint: .*sam_vit_b_01ec64.pth"):
        resolve_pretrained_files(tp)


def test_random_vgg_when_allowed(config, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    tp = with_weights(config["train_params"], sam=0, structure=0)
    tp["pretrained"].update(vgg19="absent/vgg.pth", allow_random_weights=True)
    losses = build_losses(tp, num_channels=3)
    assert list(losses) == ["perceptual"] and isinstance(losses["perceptual"], PerceptualLoss)


def test_losses_must_match_the_enabled_ones(config, networks, vgg_features):
    tp = with_weights(config["train_params"], sam=0, structure=0)
    with pytest.raises(ValueError, match="exactly"):
        GeneratorFullModel(networks, tp, losses=tiny_losses(tp, vgg_features))


# Which networks each loss reaches (graph connectivity). TPSMM's warp loss detaches the driving
# features and the occlusions but not the flow: no generator gradient. The SAM loss reaches the
# keypoint detector only.
REACHES = {
    "perceptual": set(NETWORKS),
    "equivariance_value": {"kp_detector"},
    "warp_loss": {"kp_detector", "dense_motion_network", "bg_predictor"},
    "bg": {"bg_predictor"},
    "sam": {"kp_detector"},
    "structure": set(NETWORKS),
}


def test_forward_backward_all_losses(config, networks, vgg_features):
    tp = with_weights(config["train_params"], sam=1, structure=0.1)
    model = GeneratorFullModel(networks, tp, losses=tiny_losses(tp, vgg_features))
    x = batch()
    loss_dict, generated = model(x, epoch=tp["bg_start"], step=0)
    assert sorted(loss_dict) == sorted(REACHES)
    assert all(v.dim() == 0 and v.dtype == torch.float32 and torch.isfinite(v) for v in loss_dict.values())
    for key in ("prediction", "occlusion_map", "deformation", "kp_source", "kp_driving", "transformed_kp"):
        assert key in generated
    # Weights are applied here, once: compare with the unweighted losses recomputed from the outputs.
    with torch.no_grad():
        per_layer = model.losses["perceptual"](generated["prediction"], x["driving"])
        structure = model.losses["structure"](generated["prediction"], x["driving"])
    weights = torch.tensor(tp["loss_weights"]["perceptual"])
    torch.testing.assert_close(loss_dict["perceptual"].detach(), (weights * per_layer).sum())
    torch.testing.assert_close(loss_dict["structure"].detach(), 0.1 * structure)
    owners = [(name, p) for name in NETWORKS for p in networks[name].parameters()]
    for loss, reached in REACHES.items():
        grads = torch.autograd.grad(loss_dict[loss], [p for _, p in owners], retain_graph=True, allow_unused=True)
        got = {name for (name, _), g in zip(owners, grads, strict=True) if g is not None}
        assert got == reached, loss
    sum(loss_dict.values()).backward()
    for name in NETWORKS:
        params = [p for p in networks[name].parameters() if p.requires_grad]
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params), name
    frozen = [p for loss in model.losses.values() for p in loss.parameters()]
    assert frozen and all(p.grad is None for p in frozen)


def test_schedule_before_bg_start_and_sam_every_n_steps(config, networks, vgg_features, monkeypatch):
    tp = with_weights(config["train_params"], **dict(ALL_OFF, bg=10, sam=1))
    tp["sam_params"] = dict(tp["sam_params"], every_n_steps=2)
    tp.update(bg_start=3, dropout_epoch=2)
    model = GeneratorFullModel(networks, tp, losses=tiny_losses(tp, vgg_features, names=("sam",)))
    seen = {}
    original = networks["dense_motion_network"].forward

    def spy(source_image, kp_driving, kp_source, bg_param=None, dropout_flag=False, dropout_p=0.0):
        seen.update(bg_param=bg_param, dropout_flag=dropout_flag, dropout_p=dropout_p)
        return original(source_image=source_image, kp_driving=kp_driving, kp_source=kp_source, bg_param=bg_param,
                        dropout_flag=dropout_flag, dropout_p=dropout_p)

    monkeypatch.setattr(networks["dense_motion_network"], "forward", spy)
    with torch.no_grad():
        loss_dict, _ = model(batch(), epoch=1, step=1)
        assert loss_dict == {} and seen["bg_param"] is None and seen["dropout_flag"]
        ramp = 1 / tp["dropout_inc_epoch"] * tp["dropout_maxp"] + tp["dropout_startp"]
        assert seen["dropout_p"] == pytest.approx(min(ramp, tp["dropout_maxp"]))
        loss_dict, _ = model(batch(), epoch=3, step=2)
    assert sorted(loss_dict) == ["bg", "sam"] and seen["bg_param"].shape == (2, 3, 3)
    assert not seen["dropout_flag"] and seen["dropout_p"] == 0.0


def test_amp_runs_in_bfloat16_and_returns_float32_losses(config, networks):
    # Forward only: bfloat16 convolutions (and their backward) are slow on CPUs without bf16 units.
    tp = with_weights(config["train_params"], **dict(ALL_OFF, warp_loss=10, bg=10))
    tp["amp"] = True
    model = GeneratorFullModel(networks, tp, losses={})
    with torch.no_grad():
        loss_dict, generated = model(batch(), epoch=tp["bg_start"])
    assert generated["contribution_maps"].dtype == torch.bfloat16  # autocast was on
    assert sorted(loss_dict) == ["bg", "warp_loss"]
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in loss_dict.values())


@pytest.mark.parametrize("fit_method", ["gauss_newton", "adam"])
def test_forward_backward_with_cpab_motion(fit_method, vgg_features):
    config = load_config("config/synthetic-64.yaml", overrides=[
        f"model_params.dense_motion_params.cpab.fit_method={fit_method}",
        "model_params.dense_motion_params.cpab.max_iter=3", "model_params.dense_motion_params.cpab.gn_iter=2",
        "model_params.common_params.num_cpab=2",
        "train_params.scales=[1, 0.5]",
        "model_params.generator_params.block_expansion=8", "model_params.generator_params.max_features=64",
        "model_params.dense_motion_params.block_expansion=8", "model_params.dense_motion_params.max_features=64"])
    networks = build_networks(config)
    tp = config["train_params"]
    model = GeneratorFullModel(networks, tp, losses=tiny_losses(tp, vgg_features, names=("perceptual",)))
    loss_dict, generated = model(batch(), epoch=tp["bg_start"])
    assert sorted(loss_dict) == ["bg", "equivariance_value", "perceptual", "warp_loss"]
    assert generated["contribution_maps"].shape[1] == 2 + 2  # K partial warps + global + background
    sum(loss_dict.values()).backward()
    for name in NETWORKS:
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in networks[name].parameters()), name
