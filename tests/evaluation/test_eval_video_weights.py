"""Video matching and reading (FOMM layouts, one-line errors) and the weight-file look-up."""
import logging
import os

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from evaluation.core import match_videos
from evaluation.video import list_videos, read_pair, read_video, video_key
from evaluation.weights import WEIGHT_SOURCES, MissingWeightsError, resolve_weight_file
from frames_dataset import DatasetError


def _frames(count, height=16, width=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def _folder(path, frames):
    os.makedirs(path, exist_ok=True)
    for index, frame in enumerate(frames):
        imageio.imwrite(os.path.join(path, f"{index:04d}.png"), frame)


def _strip(path, frames):
    imageio.imwrite(path, np.concatenate(list(frames), axis=1))


def _error(call, *args):
    with pytest.raises(DatasetError) as info:
        call(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_video_names_match_across_layouts():
    assert video_key("id1#vid#00001.mp4") == "id1#vid#00001"
    assert video_key("id1#vid#00001.mp4.png") == "id1#vid#00001"
    assert video_key("00012") == "00012" and video_key("clip.001") == "clip.001"
    assert video_key(".png") == ".png"


def test_listing_matching_and_duplicates(tmp_path):
    real, generated = tmp_path / "real", tmp_path / "generated"
    _folder(str(real / "a"), _frames(2))
    _strip(str(real / "b.png"), _frames(2))
    os.makedirs(generated)
    _strip(str(generated / "a.mp4.png"), _frames(2))
    pairs, unmatched = match_videos(str(real), str(generated))
    assert [(key, os.path.basename(r), os.path.basename(g)) for key, r, g in pairs] == [("a", "a", "a.mp4.png")]
    assert unmatched == ["b"]
    _strip(str(generated / "c.png"), _frames(2))
    assert "no real video 'c'" in _error(match_videos, str(real), str(generated))
    _strip(str(real / "a.png"), _frames(2))
    assert "are both video 'a'" in _error(list_videos, str(real))
    os.makedirs(tmp_path / "empty")
    assert "no videos" in _error(list_videos, str(tmp_path / "empty"))


def test_strips_folders_and_mismatches(tmp_path):
    frames = _frames(3, 16, 24)
    _folder(str(tmp_path / "real"), frames)
    _strip(str(tmp_path / "generated.png"), frames)
    real, generated = read_pair(str(tmp_path / "real"), str(tmp_path / "generated.png"))
    # The generated strip takes the real video's frame size (16 x 24, not square).
    assert np.array_equal(real, frames) and np.array_equal(generated, frames)
    assert "square frames" in _error(read_video, str(tmp_path / "generated.png"))
    assert read_video(str(tmp_path / "generated.png"), (16, 24)).shape == (3, 16, 24, 3)
    _strip(str(tmp_path / "short.png"), frames[:2])
    assert "2 frames, its real video" in _error(read_pair, str(tmp_path / "real"), str(tmp_path / "short.png"))
    _folder(str(tmp_path / "small"), _frames(3, 8, 8))
    assert "frames of 8x8" in _error(read_pair, str(tmp_path / "real"), str(tmp_path / "small"))


def test_missing_weight_file_is_one_line_naming_key_file_and_source(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(MissingWeightsError) as info:
        resolve_weight_file("openface", str(tmp_path / "openface.pth"), False)
    message = str(info.value)
    assert "\n" not in message and message.startswith("eval_params.weights.openface:")
    assert str(tmp_path / "openface.pth") in message and "thnkim/OpenFacePytorch" in message
    with pytest.raises(MissingWeightsError, match=r"^--weight rtpose=\.\.\.: .*yadi\.sk"):
        resolve_weight_file("rtpose", None, False, option="--weight")


def test_random_weights_are_logged_and_the_hub_cache_is_searched(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with caplog.at_level(logging.WARNING):
        assert resolve_weight_file("fan", "missing.pth.tar", True) is None
    assert "RANDOM WEIGHTS" in caplog.text and "eval_params.weights.fan" in caplog.text
    cached = tmp_path / "hub" / "checkpoints" / WEIGHT_SOURCES["s3fd"][0]
    os.makedirs(cached.parent)
    cached.write_bytes(b"x")
    assert resolve_weight_file("s3fd", "weights/elsewhere.pth", False) == str(cached)
