"""Offline weight look-up: configured path, torch hub cache, one-line error, random-weights switch."""
import logging
import os

import pytest
import torch

from configuration import ConfigError
from losses.pretrained import MissingWeightsError, resolve_weight_file


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub


def test_configured_path_wins(tmp_path, hub_dir):
    path = tmp_path / "my_vgg.pth"
    path.write_bytes(b"x")
    assert resolve_weight_file("vgg19", str(path), allow_random_weights=False, sam_model_type="vit_b") == str(path)


def test_hub_cache_is_searched_by_file_name(tmp_path, hub_dir):
    cached = hub_dir / "checkpoints" / "vgg19-dcbb9e9d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    found = resolve_weight_file("vgg19", str(tmp_path / "absent" / "vgg19-dcbb9e9d.pth"), allow_random_weights=False,
                                sam_model_type="vit_b")
    assert found == str(cached)


def test_missing_file_is_a_one_line_config_error(tmp_path, hub_dir):
    with pytest.raises(MissingWeightsError) as info:
        resolve_weight_file("vgg19", "weights/vgg19-dcbb9e9d.pth", allow_random_weights=False, sam_model_type="vit_b")
    message = str(info.value)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)
    assert "\n" not in message
    assert message.startswith("train_params.pretrained.vgg19:")
    assert "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth" in message
    assert os.path.join(str(hub_dir), "checkpoints", "vgg19-dcbb9e9d.pth") in message


@pytest.mark.parametrize("key, model_type, name", [
    ("dino_vitb8", "vit_b", "dino_vitbase8_pretrain.pth"),
    ("sam_checkpoint", "vit_b", "sam_vit_b_01ec64.pth"),
    ("sam_checkpoint", "vit_h", "sam_vit_h_4b8939.pth"),
])
def test_missing_message_names_key_and_source(hub_dir, key, model_type, name):
    with pytest.raises(MissingWeightsError, match=f"train_params.pretrained.{key}: .*{name}"):
        resolve_weight_file(key, None, allow_random_weights=False, sam_model_type=model_type)


def test_allow_random_weights_warns_and_returns_none(hub_dir, caplog):
    with caplog.at_level(logging.WARNING):
        assert resolve_weight_file("dino_vitb8", "nowhere/dino.pth", allow_random_weights=True,
                                   sam_model_type="vit_b") is None
    assert "RANDOM WEIGHTS" in caplog.text and "train_params.pretrained.dino_vitb8" in caplog.text
