"""The host synchronisations of one training step (one: the finiteness check that also gives the logged
losses) and of one demo batch (none beyond copying the result frames out), counted on the CPU with
``cpab.counting.count_device_work``, which emulates what waits on the device under CUDA.

The training step is counted with TPS (its solves are ``solve_ex``: no sync) and with the faithful CPAB
motion (Adam fits) on cpab's Triton backend (run by the Triton interpreter here, as on CUDA by default;
cpab's reference backend, the CPU default, reads its integrator's scaling on the host). The fits' own
launch budgets are pinned in tests/cpab.
"""
import os

import pytest
import torch

from configuration import load_config
from full_model import GeneratorFullModel
from modules import build_networks
from train import Distributed, make_optimizers, training_step

counting = pytest.importorskip("cpab.counting")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model_params.dense_motion_params.motion=tps", "model_params.common_params.num_cpab=2",
        "model_params.generator_params.block_expansion=8", "model_params.generator_params.max_features=16",
        "model_params.dense_motion_params.block_expansion=8", "model_params.dense_motion_params.max_features=16",
        "model_params.dense_motion_params.num_blocks=2", "model_params.dense_motion_params.scale_factor=0.25",
        "train_params.loss_weights.perceptual=[0, 0, 0, 0, 0]",
        "train_params.bg_start=0"]


def _networks(motion="tps"):
    overrides = TINY if motion == "tps" else [item for item in TINY if "motion=tps" not in item] + [
        "model_params.dense_motion_params.cpab.fit_method=adam", "model_params.dense_motion_params.cpab.max_iter=1"]
    config = load_config(os.path.join(ROOT, "config", "synthetic-64.yaml"), overrides=overrides)
    networks = build_networks(config)
    if motion == "cpab":  # the fits and warps as on CUDA: cpab's fused kernels (interpreted on a CPU)
        networks["dense_motion_network"].motion.partial_cpab.backend = "triton"
        networks["dense_motion_network"].motion.global_cpab_transform.backend = "triton"
    return config, networks


def _device_step_adams(optimizer):
    """The official optimiser's settings with its step counts on the parameters' device (``fused``).

    The official Adams (``make_optimizers``, capturable=False) keep their step counts in host tensors and
    read them with ``.item()``: no device synchronisation on CUDA, but indistinguishable from one for a
    counter running on the CPU, where every tensor is a host tensor. The fused implementation (same
    update) keeps them on the device, so the CPU count is what a GPU waits for.
    """
    defaults = optimizer.defaults
    return torch.optim.Adam(optimizer.param_groups[0]["params"], lr=defaults["lr"], betas=defaults["betas"],
                            weight_decay=defaults["weight_decay"], fused=True)


@pytest.mark.parametrize("motion", ["tps", "cpab"])
def test_one_training_step_synchronises_with_the_host_once(motion):
    config, networks = _networks(motion)
    params = config["train_params"]
    model = GeneratorFullModel(networks, params, losses={})
    optimizers = tuple(_device_step_adams(optimizer) for optimizer in make_optimizers(networks, params))
    x = {"source": torch.rand(2, 3, 32, 32), "driving": torch.rand(2, 3, 32, 32)}
    counts = counting.count_device_work(  # the first step: it also creates the optimisers' state
        lambda: training_step(model, networks, optimizers, x, 0, 0, params, Distributed()))
    syncing = {name: count for name, count in counts.ops.items()
               if name in ("_local_scalar_dense", "Tensor.tolist", "Tensor.cpu", "Tensor.numpy", "nonzero",
                           "cuda.synchronize")}
    assert counts.syncs == 1 and syncing == {"Tensor.tolist": 1}, counts.ops
    assert counts.launches > 100  # the counter did see the step's device work


@pytest.mark.parametrize("side_by_side", [False, True])
def test_one_demo_batch_synchronises_only_to_copy_the_frames_out(side_by_side):
    import animation
    import demo

    _, networks = _networks()
    for network in networks.values():
        network.eval()
    source = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        animator = animation.Animator(networks, source, "relative", background=False)
        demo.render_batch(animator, torch.rand(3, 3, 32, 32), source, side_by_side)  # the reference frame
        driving = torch.rand(3, 3, 32, 32)
        result = []
        counts = counting.count_device_work(
            lambda: result.append(demo.render_batch(animator, driving, source, side_by_side)))
    assert result[0].shape == (3, 32, 32 * (3 if side_by_side else 1), 3)
    # One copy of the frames to the host (counted as its .cpu() and the .numpy() view of it).
    assert counts.ops["Tensor.cpu"] == 1 and counts.syncs == counts.ops["Tensor.cpu"] + counts.ops["Tensor.numpy"]
