"""The host synchronisations of one training step (one: the finiteness check that also gives the logged
losses) and of one demo batch (none beyond copying the result frames out), counted on the CPU with
``cpab.counting.count_device_work``, which emulates what waits on the device under CUDA
(``bench/counts.py`` holds the set-up and says why the training rows step fused Adams).

The training step is counted with TPS (its solves are ``solve_ex``: no sync) and with the CPAB motion
(the faithful Adam fits and Gauss-Newton) on cpab's Triton backend (run by the Triton interpreter here, as
on CUDA by default; cpab's reference backend, the CPU default, reads its integrator's scaling on the
host). The fits' own launch budgets are pinned in tests/cpab.
"""
import pytest

from bench import counts as bench_counts

SYNCING = ("_local_scalar_dense", "Tensor.tolist", "Tensor.cpu", "Tensor.numpy", "nonzero", "cuda.synchronize")


# Gauss-Newton's training step is left out here: its fits take minutes in the interpreter, and their
# zero host syncs are pinned by tests/cpab/test_counting.py (``python -m bench.counts`` counts the step).
@pytest.mark.parametrize("motion", ["tps", "cpab adam"])
def test_one_training_step_synchronises_with_the_host_once(motion):
    counts = bench_counts.count_training_step(dict(bench_counts.MOTIONS)[motion])
    syncing = {name: count for name, count in counts.ops.items() if name in SYNCING}
    assert counts.syncs == 1 and syncing == {"Tensor.tolist": 1}, counts.ops
    assert counts.launches > 100  # the counter did see the step's device work


@pytest.mark.parametrize("side_by_side", [False, True])
def test_one_demo_batch_synchronises_only_to_copy_the_frames_out(side_by_side):
    counts, frames = bench_counts.count_demo_batch(side_by_side)
    assert frames.shape == (3, 32, 32 * (3 if side_by_side else 1), 3)
    # One copy of the frames to the host (counted as its .cpu() and the .numpy() view of it).
    assert counts.ops["Tensor.cpu"] == 1 and counts.syncs == counts.ops["Tensor.cpu"] + counts.ops["Tensor.numpy"]


def test_the_counts_command_prints_every_row(capsys):
    assert bench_counts.main(["--motion", "tps"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    steps = [line for line in lines if line.startswith("training step")]
    demos = [line for line in lines if line.startswith("demo batch")]
    assert len(steps) == 1 and all(line.endswith("1 host sync(s)") for line in steps), steps
    assert len(demos) == 2 and all("0 host sync(s) beyond 1 copy" in line for line in demos), demos
