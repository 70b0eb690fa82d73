import math

import torch

from modules.blocks import (
    AntiAliasInterpolation2d,
    DownBlock2d,
    Hourglass,
    ResBlock2d,
    SameBlock2d,
    UpBlock2d,
    identity_grid,
    kp2gaussian,
    make_coordinate_grid,
)


def test_coordinate_grid_is_xy_in_minus_one_one():
    grid = make_coordinate_grid((3, 5))
    assert grid.shape == (3, 5, 2)
    assert torch.equal(grid[0, 0], torch.tensor([-1.0, -1.0]))
    assert torch.equal(grid[-1, -1], torch.tensor([1.0, 1.0]))
    assert torch.allclose(grid[1, 2], torch.tensor([0.0, 0.0]))
    assert torch.allclose(grid[0, 1], torch.tensor([-0.5, -1.0]))  # x varies along the width


def test_identity_grid_is_cached_and_usable_by_autograd_after_inference_mode():
    with torch.inference_mode():
        grid = identity_grid((7, 9), torch.float32, "cpu")
    assert not grid.is_inference()
    assert identity_grid((7, 9), torch.float32, torch.device("cpu")) is grid
    w = torch.ones(2, requires_grad=True)
    (grid * w).sum().backward()
    assert torch.allclose(w.grad, grid.sum((0, 1)))


def test_kp2gaussian_peak_and_width():
    kp = torch.tensor([[[0.0, 0.0], [-1.0, 1.0]]])  # (1, 2, 2)
    heat = kp2gaussian(kp, (5, 5), kp_variance=0.01)
    assert heat.shape == (1, 2, 5, 5)
    assert heat[0, 0, 2, 2] == 1.0
    assert heat[0, 1, 4, 0] == 1.0  # y = 1 is the last row, x = -1 the first column
    assert math.isclose(heat[0, 0, 2, 3].item(), math.exp(-0.5 * 0.25 / 0.01), rel_tol=1e-5)


def test_hourglass_returns_every_decoder_level():
    net = Hourglass(block_expansion=8, in_features=5, num_blocks=3, max_features=16)
    outs = net(torch.rand(2, 5, 32, 32))
    assert [o.shape[1] for o in outs] == net.out_channels == [32, 32, 13]
    assert [o.shape[-1] for o in outs] == [8, 16, 32]


def test_block_shapes():
    x = torch.rand(2, 4, 8, 8)
    assert DownBlock2d(4, 6)(x).shape == (2, 6, 4, 4)
    assert UpBlock2d(4, 6)(x).shape == (2, 6, 16, 16)
    assert SameBlock2d(4, 6, kernel_size=7, padding=3)(x).shape == (2, 6, 8, 8)
    assert ResBlock2d(4)(x).shape == (2, 4, 8, 8)


def test_anti_alias_interpolation():
    down = AntiAliasInterpolation2d(3, 0.25)
    assert down.weight.shape == (3, 1, 13, 13)  # sigma 1.5, kernel 2 * round(6) + 1
    assert torch.allclose(down.weight.sum((1, 2, 3)), torch.ones(3))
    out = down(torch.full((1, 3, 64, 64), 0.5))
    assert out.shape == (1, 3, 16, 16)
    assert torch.allclose(out[..., 4:-4, 4:-4], torch.full_like(out[..., 4:-4, 4:-4], 0.5))
    x = torch.rand(1, 3, 8, 8)
    assert AntiAliasInterpolation2d(3, 1.0)(x) is x
