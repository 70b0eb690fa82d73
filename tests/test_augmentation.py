"""Augmentation: same parameters for every frame, seeded determinism, each step's geometry and range."""
import numpy as np
import pytest
import torch

from augmentation import Augmentation, color_jitter, random_crop, random_flip, random_resize

FULL = {
    "flip_param": {"horizontal_flip": True, "time_flip": True},
    "resize_param": {"ratio": [0.9, 1.1]},
    "crop_param": {"size": [16, 16]},
    "jitter_param": {"brightness": 0.1, "contrast": 0.1, "saturation": 0.1, "hue": 0.1},
}


def _clip(frames=2, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(frames, 3, size, size, generator=generator)


def test_seeded_generator_gives_the_same_result():
    augment = Augmentation.from_config(FULL)
    clip = _clip()
    first = augment(clip, np.random.default_rng(5))
    second = augment(clip, np.random.default_rng(5))
    assert torch.equal(first, second)
    others = [augment(clip, np.random.default_rng(seed)) for seed in range(6, 10)]
    assert any(not torch.equal(first, other) for other in others)


def test_identical_frames_stay_identical():
    frame = _clip(frames=1, size=20)
    clip = frame.repeat(2, 1, 1, 1)
    augment = Augmentation.from_config(FULL)
    for seed in range(8):
        out = augment(clip, np.random.default_rng(seed))
        assert out.shape == (2, 3, 16, 16)
        assert torch.equal(out[0], out[1])
        assert out.dtype == torch.float32 and 0.0 <= out.min() and out.max() <= 1.0


def test_flips_and_the_faithful_exclusive_rule():
    clip = _clip()
    outcomes = {"time": 0, "mirror": 0, "none": 0}
    rng = np.random.default_rng(0)
    for _ in range(800):
        out = random_flip(clip, rng, horizontal_flip=True, time_flip=True)
        if torch.equal(out, clip.flip(0)):
            outcomes["time"] += 1
        elif torch.equal(out, clip.flip(-1)):
            outcomes["mirror"] += 1
        else:
            assert torch.equal(out, clip)
            outcomes["none"] += 1
    assert 340 < outcomes["time"] < 460
    assert 150 < outcomes["mirror"] < 250  # P = 0.5 * 0.5: a time-flipped clip is never mirrored
    mirrored_only = random_flip(clip, np.random.default_rng(1), horizontal_flip=False, time_flip=False)
    assert torch.equal(mirrored_only, clip)


def test_resize_and_crop_geometry():
    clip = _clip(size=10)
    doubled = random_resize(clip, np.random.default_rng(0), ratio=[2.0, 2.0])
    assert doubled.shape == (2, 3, 20, 20)
    assert torch.equal(doubled[..., ::2, ::2], clip)
    crop = random_crop(clip, np.random.default_rng(3), size=[4, 6])
    assert crop.shape == (2, 3, 4, 6)
    windows = [clip[..., top:top + 4, left:left + 6] for top in range(7) for left in range(5)]
    assert any(torch.equal(crop, window) for window in windows)
    padded = random_crop(clip, np.random.default_rng(0), size=[14, 12])
    assert padded.shape == (2, 3, 14, 12)
    assert torch.equal(padded[..., 2:12, 1:11], clip)
    assert torch.equal(padded[..., 0, 1:11], clip[..., 0, :])


def test_colour_jitter():
    grey = torch.full((2, 3, 8, 8), 0.5)
    rng = np.random.default_rng(0)
    out = color_jitter(grey, rng, saturation=0.5, hue=0.5)
    assert torch.allclose(out, grey, atol=1 / 255)
    bright = color_jitter(grey, np.random.default_rng(1), brightness=0.5)
    factor = bright.mean() / 0.5
    assert 0.5 <= factor <= 1.5 and abs(factor - 1) > 1e-3
    assert torch.allclose(bright[0], bright[1])
    unchanged = color_jitter(grey, rng)
    assert unchanged is grey
    with pytest.raises(ValueError, match="hue"):
        color_jitter(grey, rng, hue=0.6)


def test_bad_arguments():
    augment = Augmentation.from_config(None)
    clip = _clip()
    assert torch.equal(augment(clip, np.random.default_rng(0)), clip)
    with pytest.raises(ValueError, match="T, C, H, W"):
        augment(clip[0], np.random.default_rng(0))
    with pytest.raises(TypeError, match="Generator"):
        augment(clip, 0)
