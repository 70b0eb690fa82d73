"""Offline look-up and loading of the frozen pretrained models the losses use (VGG-19, DINO, SAM).

Nothing is ever downloaded. A weight file is looked for, in order, at
1. the path configured under ``train_params.pretrained.<key>`` (relative paths are relative to the
   current working directory), then
2. the torch hub cache: ``torch.hub.get_dir()/checkpoints/<file name of the configured path>``
   (where ``torchvision``/``torch.hub`` keep downloads, e.g. ``~/.cache/torch/hub/checkpoints``).
When a loss that needs the file is on and the file is in neither place, :class:`MissingWeightsError`
is raised with one line naming the config key, the expected file and where to obtain it, unless
``train_params.pretrained.allow_random_weights`` is true: then the model keeps random weights and a
warning is logged (smoke tests and the synthetic quick start only; the losses are then meaningless).
"""
import logging
import os

import torch
from torch import nn

from configuration import ConfigError

LOGGER = logging.getLogger(__name__)

# Canonical file names and where to get them (the official release of each model).
WEIGHT_SOURCES = {
    "vgg19": ("vgg19-dcbb9e9d.pth", "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"),
    "dino_vitb8": ("dino_vitbase8_pretrain.pth",
                   "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"),
    "sam_vit_b": ("sam_vit_b_01ec64.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"),
    "sam_vit_l": ("sam_vit_l_0b3195.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth"),
    "sam_vit_h": ("sam_vit_h_4b8939.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"),
}


# ImageNet normalisation of the torchvision VGG-19 and DINO inputs (images in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MissingWeightsError(ConfigError):
    """A loss is on but its pretrained weight file is missing (one-line message, see the module doc)."""


def source_of(key, sam_model_type):
    """(canonical file name, download URL) for ``train_params.pretrained.<key>``."""
    if key == "sam_checkpoint":
        return WEIGHT_SOURCES[f"sam_{sam_model_type}"]
    return WEIGHT_SOURCES[key]


def candidate_paths(path, default_name):
    """Where :func:`resolve_weight_file` looks, in order (see the module docstring)."""
    name = os.path.basename(path) if path else default_name
    candidates = [path] if path else []
    candidates.append(os.path.join(torch.hub.get_dir(), "checkpoints", name))
    return candidates


def find_weight_file(setting, candidates, shown, name, url, allow_random_weights, random_note, remedy):
    """The first existing file of ``candidates``, or None (logged loudly) when random weights are allowed.

    ``setting`` names the config key or flag in messages, ``shown`` the file asked for, ``name``/``url``
    the canonical file and where to get it, ``random_note`` what random weights mean for the user,
    ``remedy`` the ways out besides the file. Raises :class:`MissingWeightsError` (one line) when nothing
    is found. Shared by the losses here and the evaluation extractors (``evaluation/weights.py``).
    """
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    if allow_random_weights:
        LOGGER.warning("RANDOM WEIGHTS: %s: file %s not found; %s", setting, " or ".join(candidates), random_note)
        return None
    raise MissingWeightsError(f"{setting}: weight file '{shown}' not found (looked at {', '.join(candidates)}); "
                              f"get {name} from {url} and put it there, or {remedy}")


def resolve_weight_file(key, path, allow_random_weights, sam_model_type):
    """Existing file for ``train_params.pretrained.<key>``, or None when random weights are allowed.

    key: "vgg19" | "dino_vitb8" | "sam_checkpoint"; path: the configured path (may be None).
    Raises :class:`MissingWeightsError` (a ``ConfigError``, one line) when nothing is found.
    """
    default_name, url = source_of(key, sam_model_type)
    return find_weight_file(
        f"train_params.pretrained.{key}", candidate_paths(path, default_name), path or default_name, default_name, url,
        allow_random_weights, "the loss that needs it uses a randomly initialised network (allow_random_weights "
        "is true: smoke tests only, the loss is meaningless)",
        "set its loss weight to 0, or set train_params.pretrained.allow_random_weights to true for a smoke test")


def load_state_dict_file(path):
    """State dict saved with ``torch.save`` (tensors only), loaded on the CPU with ``weights_only=True``."""
    return torch.load(path, map_location="cpu", weights_only=True)


def freeze(module):
    """Eval mode and ``requires_grad_(False)`` for every parameter; returns the module."""
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


class FrozenEncoderLoss(nn.Module):
    """What the losses built on a frozen pretrained network (VGG-19, SAM, DINO) share.

    ``encoder`` is frozen (``freeze``: no gradient reaches its weights), converted to ``dtype`` and
    kept in eval mode whatever ``train()`` is called with (its BatchNorm / dropout never switch). The
    input normalisation ``(images - mean) / std`` (per channel, in the value range the subclass feeds
    it) uses non-persistent buffers: they follow the module to any device and are never saved.
    :meth:`exact_precision` switches autocast off for encoders that must run in their own ``dtype``.
    """

    def __init__(self, encoder, mean, std, dtype):
        super().__init__()
        self.encoder = freeze(encoder.to(dtype))
        self.dtype = dtype
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def train(self, mode=True):
        """The frozen encoder stays in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    def normalise(self, images):
        """(images - mean) / std, per channel, in the images' dtype."""
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    @staticmethod
    def exact_precision(images):
        """Context in which the encoder runs in its ``dtype`` even inside an autocast region."""
        return torch.autocast(device_type=images.device.type, enabled=False)
