"""Tiny network settings shared by the modules tests (64x64 images, K = 2, 2 fit iterations)."""
import pytest
import torch

K = 2
SIZE = 64
# The CPAB motion's settings (config section model_params.dense_motion_params.cpab), tiny fits.
CPAB_SETTINGS = dict(global_cpab=True, partial_tess_size=(4, 4), global_tess_size=(6, 6), zero_boundary=False,
                     volume_preservation=False, basis="libcpab", backend="auto", fit_method="adam", max_iter=2,
                     global_iter_multiplier=1.5, fit_lr=1e-2, theta_init=1e-6, gn_iter=2, gn_damping=1e-3,
                     detach_keypoints=True)
NETWORK_SETTINGS = dict(block_expansion=8, num_blocks=3, max_features=32, num_channels=3, scale_factor=0.25,
                        multi_mask=True, kp_variance=0.01)


def _tiny_dense_motion(motion="cpab", **overrides):
    """DenseMotionNetwork with the motion model named ``motion`` built as the builder does; keywords
    override the motion's settings or the network's."""
    from modules import DenseMotionNetwork, build_motion

    unknown = set(overrides) - set(CPAB_SETTINGS) - set(NETWORK_SETTINGS)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}")
    cpab = {key: overrides.get(key, value) for key, value in CPAB_SETTINGS.items()}
    network = {key: overrides.get(key, value) for key, value in NETWORK_SETTINGS.items()}
    model_params = {"common_params": {"num_cpab": K},
                    "dense_motion_params": {"motion": motion, "cpab": cpab, "tps": {}}}
    return DenseMotionNetwork(motion=build_motion(model_params), num_keypoints=5 * K, **network)


def _random_keypoints(bs=2, scale=0.7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(bs, 5 * K, 2, generator=gen) * 2 * scale - scale


@pytest.fixture
def make_dense_motion():
    """Factory: a tiny DenseMotionNetwork (16x16 dense motion for 64x64 inputs); keywords override."""
    return _tiny_dense_motion


@pytest.fixture
def make_keypoints():
    """Factory: (bs, 5K, 2) keypoints uniform in [-scale, scale]^2, reproducible from ``seed``."""
    return _random_keypoints


@pytest.fixture
def images():
    gen = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, SIZE, SIZE, generator=gen), torch.rand(2, 3, SIZE, SIZE, generator=gen)
