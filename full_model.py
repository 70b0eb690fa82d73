"""The generator's training model: networks + losses, weighted in one place (FOMM/TPSMM/CPABMM).

``GeneratorFullModel.forward(x, epoch, step)`` follows the official forward: keypoints on source S
and driving D; background affine from ``bg_start``; dropout-softmax schedule; dense motion and
inpainting (``animation.animate``, the path reconstruction and the demo take too); then the losses.
Every loss returns an unweighted value; the weights ``train_params.loss_weights`` are applied here
only, and a loss whose weight is 0 is neither built (no pretrained file looked up or loaded) nor
computed. loss_dict keys: perceptual, equivariance_value, warp_loss, bg, sam, structure (each present
only when on and computed).
"""
import torch
from torch import nn

import animation
from losses.background import background_loss
from losses.equivariance import equivariance_loss, random_transform
from losses.keypoint_semantic import KeypointSemanticLoss, build_sam_image_encoder
from losses.perceptual import PerceptualLoss, build_vgg19_features
from losses.pretrained import resolve_weight_file
from losses.structure import StructureLoss, build_dino_vitb8
from losses.warp import warp_loss

LOSS_NAMES = ("perceptual", "equivariance_value", "warp_loss", "bg", "sam", "structure")
# Losses that need a pretrained file: loss name -> train_params.pretrained key.
PRETRAINED_KEYS = {"perceptual": "vgg19", "sam": "sam_checkpoint", "structure": "dino_vitb8"}


def loss_enabled(loss_weights, name):
    """A loss is on when its weight is non-zero (perceptual: any of its per-layer weights)."""
    weight = loss_weights[name]
    if isinstance(weight, (list, tuple)):
        return any(w != 0 for w in weight)
    return weight != 0


def required_pretrained_files(train_params):
    """[(config key, configured path)] of the weight files the enabled losses need, e.g.
    [("train_params.pretrained.vgg19", "weights/vgg19-dcbb9e9d.pth")]."""
    pretrained = train_params["pretrained"]
    return [(f"train_params.pretrained.{key}", pretrained[key]) for name, key in PRETRAINED_KEYS.items()
            if loss_enabled(train_params["loss_weights"], name)]


def resolve_pretrained_files(train_params):
    """{pretrained key: existing path or None (random weights allowed)} for the enabled losses.

    Call at start-up: a missing file raises ``losses.pretrained.MissingWeightsError`` (one line naming
    the key, the file and where to get it) before any network is built or trained.
    """
    pretrained = train_params["pretrained"]
    resolved = {}
    for name, key in PRETRAINED_KEYS.items():
        if loss_enabled(train_params["loss_weights"], name):
            resolved[key] = resolve_weight_file(key, pretrained[key], pretrained["allow_random_weights"],
                                                sam_model_type=pretrained["sam_model_type"])
    return resolved


def build_losses(train_params, num_channels):
    """The enabled losses that own frozen pretrained models, as {name: module}: perceptual
    (VGG-19), sam (SAM image encoder), structure (DINO ViT-B/8). Disabled ones are absent."""
    files = resolve_pretrained_files(train_params)
    losses = {}
    if "vgg19" in files:
        weights = train_params["loss_weights"]["perceptual"]
        last_used = max(i for i, w in enumerate(weights) if w != 0) + 1  # deeper VGG blocks are not run
        losses["perceptual"] = PerceptualLoss(build_vgg19_features(files["vgg19"]), scales=train_params["scales"],
                                              num_channels=num_channels, num_layers=last_used)
    if "sam_checkpoint" in files:
        sam_params = train_params["sam_params"]
        encoder = build_sam_image_encoder(train_params["pretrained"]["sam_model_type"], files["sam_checkpoint"])
        losses["sam"] = KeypointSemanticLoss(encoder, input_size=sam_params["input_size"],
                                             dtype=getattr(torch, sam_params["dtype"]),
                                             every_n_steps=sam_params["every_n_steps"])
    if "dino_vitb8" in files:
        losses["structure"] = StructureLoss(build_dino_vitb8(files["dino_vitb8"]),
                                            dtype=getattr(torch, train_params["structure_params"]["dtype"]))
    return losses


def dropout_schedule(epoch, train_params):
    """(dropout_flag, dropout_p) of the dense motion's dropout softmax at ``epoch`` (official schedule):
    on while epoch < dropout_epoch, p = min(epoch / dropout_inc_epoch * maxp + startp, maxp)."""
    if epoch >= train_params["dropout_epoch"]:
        return False, 0.0
    p = epoch / train_params["dropout_inc_epoch"] * train_params["dropout_maxp"] + train_params["dropout_startp"]
    return True, min(p, train_params["dropout_maxp"])


def _finite(keypoints):
    """{'fg_kp': keypoints} with NaN/inf entries replaced by 0 (no host synchronisation)."""
    return {"fg_kp": torch.nan_to_num(keypoints["fg_kp"], nan=0.0, posinf=0.0, neginf=0.0)}


class GeneratorFullModel(nn.Module):
    """Keypoint detector + BG predictor + dense motion + generator, with the training losses.

    networks: ``modules.build_networks(config)`` (kp_detector, dense_motion_network,
    inpainting_network, bg_predictor or None; avd_network is not used here).
    train_params: the config's ``train_params``.
    losses: the pretrained-model losses (``build_losses``); None builds them from ``train_params``.
    Tests inject tiny ones. Its keys must be exactly the enabled ones among perceptual, sam, structure.
    """

    def __init__(self, networks, train_params, losses=None):
        super().__init__()
        self.kp_extractor = networks["kp_detector"]
        self.dense_motion_network = networks["dense_motion_network"]
        self.inpainting_network = networks["inpainting_network"]
        self.bg_predictor = networks.get("bg_predictor")
        # The networks animate() reads (the same modules as the attributes above, not registered twice).
        self.networks = {"dense_motion_network": self.dense_motion_network,
                         "inpainting_network": self.inpainting_network}
        self.train_params = train_params
        self.loss_weights = train_params["loss_weights"]
        self.amp = train_params["amp"]
        self.enabled = {name for name in LOSS_NAMES if loss_enabled(self.loss_weights, name)}
        if losses is None:
            losses = build_losses(train_params, num_channels=self.inpainting_network.num_channels)
        expected = {name for name in PRETRAINED_KEYS if name in self.enabled}
        if set(losses) != expected:
            raise ValueError(f"GeneratorFullModel needs losses for exactly {sorted(expected)}, got {sorted(losses)}")
        self.losses = nn.ModuleDict(losses)
        self.register_buffer("perceptual_weights",
                             torch.tensor(self.loss_weights["perceptual"], dtype=torch.float32), persistent=False)

    def forward(self, x, epoch, step=0):
        """x: {'source', 'driving'} (B, 3, H, W) in [0, 1]. Returns (loss_dict, generated): weighted
        float32 scalar losses and the dense-motion + inpainting outputs plus 'kp_source', 'kp_driving'
        (and 'transformed_frame', 'transformed_kp' when the equivariance loss is on).
        ``train_params.amp``: the whole forward runs under bfloat16 autocast on the inputs' device."""
        with torch.autocast(device_type=x["source"].device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss_dict, generated = self._forward(x, epoch, step)
        return {name: value.float() for name, value in loss_dict.items()}, generated

    def _forward(self, x, epoch, step):
        tp = self.train_params
        source, driving = x["source"], x["driving"]
        kp_source = self.kp_extractor(source)
        kp_driving = self.kp_extractor(driving)
        bg_on = self.bg_predictor is not None and epoch >= tp["bg_start"]
        bg_param = self.bg_predictor(source, driving) if bg_on else None
        dropout_flag, dropout_p = dropout_schedule(epoch, tp)
        # A diverged detector's NaN/inf keypoints go into the motion fits as 0 (finite keypoints are
        # unchanged, gradient included), so the fits and the CPAB integrator always get finite input and
        # train.training_step reports the keypoints (from generated["kp_source"/"kp_driving"], as
        # detected) at the step's one host synchronisation, instead of the integrator failing first.
        generated = animation.animate(self.networks, source, _finite(kp_source), _finite(kp_driving),
                                      bg_param=bg_param, dropout_flag=dropout_flag, dropout_p=dropout_p)
        generated.update({"kp_source": kp_source, "kp_driving": kp_driving})

        w = self.loss_weights
        loss_dict = {}
        if "perceptual" in self.enabled:
            per_layer = self.losses["perceptual"](generated["prediction"], driving)
            loss_dict["perceptual"] = (self.perceptual_weights * per_layer).sum()
        if "equivariance_value" in self.enabled:
            transform = tp["transform_params"]
            tps, transformed_frame = random_transform(driving, sigma_affine=transform["sigma_affine"],
                                                      sigma_tps=transform["sigma_tps"],
                                                      points_tps=transform["points_tps"])
            transformed_kp = self.kp_extractor(transformed_frame)
            generated.update({"transformed_frame": transformed_frame, "transformed_kp": transformed_kp})
            value = equivariance_loss(kp_driving["fg_kp"], transformed_kp["fg_kp"], tps)
            loss_dict["equivariance_value"] = w["equivariance_value"] * value
        if "warp_loss" in self.enabled:
            encoder_maps = self.inpainting_network.get_encode(driving, generated["occlusion_map"])
            loss_dict["warp_loss"] = w["warp_loss"] * warp_loss(encoder_maps, generated["warped_encoder_maps"])
        if "bg" in self.enabled and bg_on:
            bg_param_reverse = self.bg_predictor(driving, source)
            loss_dict["bg"] = w["bg"] * background_loss(bg_param, bg_param_reverse)
        if "sam" in self.enabled and self.losses["sam"].active(step):
            value = self.losses["sam"](source, driving, kp_source["fg_kp"], kp_driving["fg_kp"])
            loss_dict["sam"] = w["sam"] * value
        if "structure" in self.enabled:
            loss_dict["structure"] = w["structure"] * self.losses["structure"](generated["prediction"], driving)
        return loss_dict, generated
