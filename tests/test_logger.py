"""logger.py: colour maps and image grids."""
import numpy as np
import pytest
import torch

from logger import Visualizer, colormap_rgb


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
    grid = Visualizer(kp_size=1, draw_border=False, colormap="gist_rainbow").visualize(source, source.clone(), out)
    columns = 2 + 1 + 1 + 2 + 2 * warps + 1
    assert grid.shape == (batch * size, columns * size, 3) and grid.dtype == np.uint8
    # The last keypoint (index 4 of 5) sits at the centre of the first source image.
    centre = (size - 1) / 2
    expected = (colormap_rgb("gist_rainbow", 4 / 5) * 255).round()
    assert np.array_equal(grid[int(round(centre)), int(round(centre))], expected.astype(np.uint8))
    assert grid[size // 2, size + size // 2].sum() == 0
