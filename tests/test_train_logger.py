"""logger.py: atomic checkpoints loadable with weights_only=True, config comparison, image grids."""
import os

import numpy as np
import pytest
import torch

from logger import (CheckpointError, Visualizer, colormap_rgb, first_difference, load_checkpoint,
                    save_checkpoint)


def _state():
    network = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3, betas=(0.5, 0.999))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [1, 2], gamma=0.1)
    network(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    return network, {"kp_detector": network.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": 3, "step": 12, "seed": 0,
                     "config": {"model_params": {"a": [1, 2], "b": None, "c": "x"}}}


def test_checkpoint_round_trip_loads_with_weights_only(tmp_path):
    network, state = _state()
    path = str(tmp_path / "run" / "checkpoint.pth.tar")
    save_checkpoint(path, state)
    raw = torch.load(path, weights_only=True)
    loaded = load_checkpoint(path)
    assert raw["epoch"] == 3 and loaded["step"] == 12
    assert loaded["config"] == state["config"]
    assert torch.equal(loaded["kp_detector"]["weight"], network.weight.detach())
    assert loaded["scheduler"]["last_epoch"] == 1
    restored = torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
    restored.load_state_dict(loaded["optimizer"])
    assert restored.param_groups[0]["betas"] == (0.5, 0.999)
    assert os.listdir(tmp_path / "run") == ["checkpoint.pth.tar"]


def test_failed_save_keeps_previous_checkpoint_and_leaves_no_temp_file(tmp_path):
    _, state = _state()
    path = str(tmp_path / "checkpoint.pth.tar")
    save_checkpoint(path, state)
    with pytest.raises(Exception):
        save_checkpoint(path, {"bad": lambda value: value})
    assert load_checkpoint(path)["epoch"] == 3
    assert os.listdir(tmp_path) == ["checkpoint.pth.tar"]


def test_bad_checkpoint_files_give_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        load_checkpoint(str(tmp_path / "missing.pth.tar"))
    garbage = tmp_path / "garbage.pth.tar"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(str(garbage))
    assert "\n" not in str(error.value) and "cannot read checkpoint" in str(error.value)
    torch.save([1, 2], str(tmp_path / "list.pth.tar"))
    with pytest.raises(CheckpointError, match="does not hold a dict"):
        load_checkpoint(str(tmp_path / "list.pth.tar"))


def test_first_difference_names_the_dotted_key():
    assert first_difference({"a": {"b": [1, 2]}}, {"a": {"b": [1, 2]}}) is None
    assert first_difference({"a": {"b": [1, 2]}}, {"a": {"b": [1, 3]}}, "model_params") == (
        "model_params.a.b", [1, 2], [1, 3])
    assert first_difference({"a": 1}, {"a": 1, "z": 2})[0] == "z"


def test_colormap_matches_gist_rainbow_stops():
    assert np.allclose(colormap_rgb("gist_rainbow", 0.0), (1.0, 0.0, 0.16))
    assert np.allclose(colormap_rgb("gist_rainbow", 0.4), (0.0, 1.0, 0.0))
    with pytest.raises(ValueError, match="visualizer_params.colormap"):
        colormap_rgb("no-such-map", 0.5)


def test_visualizer_grid_layout_and_keypoint_colour():
    batch, warps, size = 2, 4, 16
    source = torch.zeros(batch, 3, size, size)
    out = {"kp_source": {"fg_kp": torch.zeros(batch, 5, 2)},
           "kp_driving": {"fg_kp": torch.full((batch, 5, 2), -1.0)},
           "prediction": torch.rand(batch, 3, size, size),
           "deformed": torch.rand(batch, 3, size, size),
           "occlusion_map": [torch.rand(batch, 1, size // 2, size // 2), torch.rand(batch, 1, size, size)],
           "deformed_source": torch.rand(batch, warps, 3, size // 4, size // 4),
           "contribution_maps": torch.softmax(torch.randn(batch, warps, size // 4, size // 4), dim=1)}
    grid = Visualizer(kp_size=1, draw_border=False).visualize(source, source.clone(), out)
    columns = 2 + 1 + 1 + 2 + 2 * warps + 1
    assert grid.shape == (batch * size, columns * size, 3) and grid.dtype == np.uint8
    # The last keypoint (index 4 of 5) sits at the centre of the first source image.
    centre = (size - 1) / 2
    expected = (colormap_rgb("gist_rainbow", 4 / 5) * 255).round()
    assert np.array_equal(grid[int(round(centre)), int(round(centre))], expected.astype(np.uint8))
    assert grid[size // 2, size + size // 2].sum() == 0
