"""`python -m bench.counts`: the device work of one training step and of one demo batch, counted on a CPU.

    python -m bench.counts                  # every row: about 2.5 minutes on a CPU (Triton interpreter)
    python -m bench.counts --motion tps     # some rows only (--motion is repeatable)

Counts kernel launches and host synchronisations with ``cpab.counting.count_device_work``, which emulates
on a CPU what waits on the GPU (see its docstring). Rows: one ``train.training_step`` (forward, the one
finiteness check, backward, clipping, both Adam steps; the first step, which also creates the optimisers'
state) with ``motion: tps`` and with ``motion: cpab`` (``fit_method`` adam, the faithful one, and
gauss_newton) on cpab's Triton backend (``dense_motion_params.cpab.backend: triton``: on a CPU the Triton
interpreter runs the kernels CUDA runs by default); one demo batch (``demo.render_batch`` of 3 frames,
mode relative, plain and side by side). The budgets: one host sync per training step (the check that also
gives the logged losses), none per demo batch beyond copying the frames out; ``tests/test_host_syncs.py``
pins them. The fits' own budgets: ``python -m cpab.benchmark --count``.

The official Adams (``train.make_optimizers``) keep their step counts in host tensors and read them with
``.item()``: free on CUDA, but indistinguishable from a device read for a counter on a CPU, where every
tensor is a host tensor. The training rows therefore step Adams with the same settings and
``fused=True``, which keep the step counts on the parameters' device: the CPU count is then what a GPU
waits for. Launch counts are of eager dispatch (on CUDA the Adam fits replay as one graph each).
"""
import argparse
import os
import subprocess
import sys

import torch

from configuration import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "config", "synthetic-64.yaml")
TINY = ["model_params.common_params.num_cpab=2", "model_params.generator_params.block_expansion=8",
        "model_params.generator_params.max_features=16", "model_params.dense_motion_params.block_expansion=8",
        "model_params.dense_motion_params.max_features=16", "model_params.dense_motion_params.num_blocks=2",
        "model_params.dense_motion_params.scale_factor=0.25", "model_params.dense_motion_params.cpab.max_iter=1",
        "model_params.dense_motion_params.cpab.gn_iter=1", "model_params.dense_motion_params.cpab.backend=triton",
        "train_params.loss_weights.perceptual=[0, 0, 0, 0, 0]", "train_params.bg_start=0"]
MOTIONS = (("tps", ["model_params.dense_motion_params.motion=tps"]),
           ("cpab adam", ["model_params.dense_motion_params.cpab.fit_method=adam"]),
           ("cpab gauss_newton", ["model_params.dense_motion_params.cpab.fit_method=gauss_newton"]))
SIZE = 32


def tiny_networks(overrides=()):
    """(config, networks) of synthetic-64 at tiny sizes with ``overrides`` (see ``MOTIONS``)."""
    from modules import build_networks

    config = load_config(CONFIG, overrides=TINY + list(overrides))
    return config, build_networks(config)


def device_step_adams(optimizer):
    """An Adam with ``optimizer``'s settings whose step counts live on the parameters' device (see above)."""
    defaults = optimizer.defaults
    return torch.optim.Adam(optimizer.param_groups[0]["params"], lr=defaults["lr"], betas=defaults["betas"],
                            weight_decay=defaults["weight_decay"], fused=True)


def count_training_step(overrides=()):
    """``Counts`` of the first ``train.training_step`` of tiny networks on a batch of 2 random pairs."""
    from cpab.counting import count_device_work
    from full_model import GeneratorFullModel
    from train import Distributed, make_optimizers, training_step

    config, networks = tiny_networks(overrides)
    params = config["train_params"]
    model = GeneratorFullModel(networks, params, losses={})
    optimizers = tuple(device_step_adams(optimizer) for optimizer in make_optimizers(networks, params))
    x = {"source": torch.rand(2, 3, SIZE, SIZE), "driving": torch.rand(2, 3, SIZE, SIZE)}
    return count_device_work(lambda: training_step(model, networks, optimizers, x, 0, 0, params, Distributed()))


def count_demo_batch(side_by_side, frames=3):
    """(``Counts``, frames) of one ``demo.render_batch`` of ``frames`` driving frames (mode relative)."""
    import animation
    import demo
    from cpab.counting import count_device_work

    _, networks = tiny_networks(MOTIONS[0][1])
    for network in networks.values():
        network.eval()
    source = torch.rand(1, 3, SIZE, SIZE)
    result = []
    with torch.inference_mode():
        animator = animation.Animator(networks, source, "relative", background=False)
        demo.render_batch(animator, torch.rand(frames, 3, SIZE, SIZE), source, side_by_side)  # the reference frame
        driving = torch.rand(frames, 3, SIZE, SIZE)
        counts = count_device_work(lambda: result.append(demo.render_batch(animator, driving, source, side_by_side)))
    return counts, result[0]


def main(argv=None):
    from cpab import fused

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--motion", action="append", choices=[name for name, _ in MOTIONS],
                        help="training-step rows to count (repeatable; default: all)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    if fused.HAS_TRITON and not fused.interpreter_available():
        # cpab's kernels read TRITON_INTERPRET when first imported: run again with it set.
        env = dict(os.environ, TRITON_INTERPRET="1")
        command = [sys.executable, "-m", "bench.counts"] + (sys.argv[1:] if argv is None else list(argv))
        return subprocess.run(command, env=env, cwd=ROOT).returncode
    torch.manual_seed(0)
    print("device work counted on CPU by cpab.counting (launches: aten kernels + Triton launches; syncs: host "
          "synchronisations on CUDA, emulated); tiny sizes (32x32, K = 2), cpab backend triton (interpreted)")
    for name, overrides in MOTIONS:
        if args.motion and name not in args.motion:
            continue
        counts = count_training_step(overrides)
        print(f"training step, {name:18s}: {counts.launches:5d} launches, {counts.syncs} host sync(s)")
    for side_by_side in (False, True):
        counts, frames = count_demo_batch(side_by_side)
        copies = counts.ops["Tensor.cpu"]
        print(f"demo batch of {frames.shape[0]} frames{', side by side' if side_by_side else '':15s}: "
              f"{counts.launches:5d} launches, {counts.syncs - copies - counts.ops['Tensor.numpy']} host sync(s) "
              f"beyond {copies} copy of the frames to the host")
    return 0


if __name__ == "__main__":
    sys.exit(main())
