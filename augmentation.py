"""Training augmentation applied identically to every frame of a clip (the source/driving pair).

Clips are float tensors of shape (T, C, H, W) with values in [0, 1]. Every random draw comes from the
``numpy.random.Generator`` passed to the call, so a seeded generator gives the same result.
The order of the steps and the parameter ranges follow FOMM/TPSMM's ``AllAugmentationTransform``:
flip, resize, crop, colour jitter (each step only when its parameters are given).
"""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import functional as TF


def random_flip(clip, rng, horizontal_flip=False, time_flip=False):
    """Reverse the frame order with p = 0.5 (``time_flip``), else mirror left-right with p = 0.5."""
    if time_flip and rng.random() < 0.5:
        # Faithful to the official code: a time-flipped clip is never also mirrored, so with both
        # flips on P(mirror) = 0.25.
        return clip.flip(0)
    if horizontal_flip and rng.random() < 0.5:
        return clip.flip(-1)
    return clip


def random_resize(clip, rng, ratio):
    """Rescale every frame by one factor drawn uniformly in ``ratio = [low, high]``.

    Nearest-neighbour like the official MGif augmentation (FOMM's RandomResize default).
    Output size: ``int(H * factor), int(W * factor)``.
    """
    low, high = ratio
    factor = rng.uniform(low, high)
    height, width = clip.shape[-2:]
    size = (max(1, int(height * factor)), max(1, int(width * factor)))
    return F.interpolate(clip, size=size, mode="nearest-exact")


def random_crop(clip, rng, size):
    """Crop every frame at one random position to ``size = [H, W]``; edge-pad (centred) when smaller."""
    crop_h, crop_w = size
    height, width = clip.shape[-2:]
    pad_h, pad_w = max(0, crop_h - height), max(0, crop_w - width)
    if pad_h or pad_w:
        clip = F.pad(clip, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2), mode="replicate")
        height, width = clip.shape[-2:]
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    return clip[..., top:top + crop_h, left:left + crop_w]


def color_jitter(clip, rng, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0):
    """torchvision colour jitter with one set of factors for the whole clip, applied in random order.

    Factors: brightness/contrast/saturation in [max(0, 1 - x), 1 + x], hue shift in [-hue, hue]
    (hue <= 0.5); a parameter of 0 switches its step off. Like FOMM, the frames go through 8-bit PIL
    images (torchvision's PIL ops, ~30x faster on a CPU than its tensor hue op); output in [0, 1].
    """
    if not 0.0 <= hue <= 0.5:
        raise ValueError(f"jitter_param.hue must be in [0, 0.5], got {hue}")
    steps = []
    if brightness > 0:
        factor = rng.uniform(max(0.0, 1.0 - brightness), 1.0 + brightness)
        steps.append(lambda image, f=factor: TF.adjust_brightness(image, f))
    if contrast > 0:
        factor = rng.uniform(max(0.0, 1.0 - contrast), 1.0 + contrast)
        steps.append(lambda image, f=factor: TF.adjust_contrast(image, f))
    if saturation > 0:
        factor = rng.uniform(max(0.0, 1.0 - saturation), 1.0 + saturation)
        steps.append(lambda image, f=factor: TF.adjust_saturation(image, f))
    if hue > 0:
        factor = rng.uniform(-hue, hue)
        steps.append(lambda image, f=factor: TF.adjust_hue(image, f))
    if not steps:
        return clip
    order = rng.permutation(len(steps))
    frames = (clip.detach().permute(0, 2, 3, 1).cpu().numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
    jittered = []
    for frame in frames:
        image = Image.fromarray(frame)
        for index in order:
            image = steps[index](image)
        jittered.append(np.asarray(image, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(jittered)).permute(0, 3, 1, 2).to(clip.dtype)


class Augmentation:
    """All configured steps, built from ``dataset_params.augmentation_params``.

    Args mirror the config sections (each ``None`` = step off): ``flip_param`` {horizontal_flip,
    time_flip}, ``resize_param`` {ratio}, ``crop_param`` {size}, ``jitter_param`` {brightness,
    contrast, saturation, hue}.
    Call: ``augmentation(clip (T, C, H, W) float in [0, 1], rng) -> clip``.
    """

    def __init__(self, flip_param, resize_param, crop_param, jitter_param):
        self.flip_param = flip_param
        self.resize_param = resize_param
        self.crop_param = crop_param
        self.jitter_param = jitter_param

    @classmethod
    def from_config(cls, augmentation_params):
        """Build from the (validated) ``augmentation_params`` dict; ``None`` -> no augmentation."""
        params = augmentation_params or {}
        return cls(flip_param=params.get("flip_param"), resize_param=params.get("resize_param"),
                   crop_param=params.get("crop_param"), jitter_param=params.get("jitter_param"))

    def __call__(self, clip, rng):
        if not isinstance(clip, torch.Tensor) or clip.dim() != 4:
            raise ValueError(f"augmentation expects a (T, C, H, W) tensor, got {type(clip).__name__} "
                             f"{tuple(getattr(clip, 'shape', ()))}")
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"augmentation needs a numpy.random.Generator, got {type(rng).__name__}")
        if self.flip_param:
            clip = random_flip(clip, rng, horizontal_flip=self.flip_param["horizontal_flip"],
                               time_flip=self.flip_param["time_flip"])
        if self.resize_param:
            clip = random_resize(clip, rng, ratio=self.resize_param["ratio"])
        if self.crop_param:
            clip = random_crop(clip, rng, size=self.crop_param["size"])
        if self.jitter_param:
            clip = color_jitter(clip, rng, brightness=self.jitter_param["brightness"],
                                contrast=self.jitter_param["contrast"], saturation=self.jitter_param["saturation"],
                                hue=self.jitter_param["hue"])
        return clip.contiguous()
