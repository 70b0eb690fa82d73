"""bench.speed: the CI smoke run prints every row with finite ratios; the channels_last switch changes
the memory format and not the outputs."""
import importlib
import json
import math
import re

import pytest
import torch

from animation import Animator
from bench import speed


def _installed(name):
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


@pytest.fixture
def one_thread():
    """The benchmark on one thread (a shared CI CPU), the test process's setting restored afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_run_prints_every_row_with_finite_ratios(tmp_path, capsys, one_thread):
    record = tmp_path / "bench.json"
    assert speed.main(["--quick", "--device", "cpu", "--threads", "1", "--json", str(record)]) == 0
    out = capsys.readouterr().out
    assert "QUICK" in out and "CPU, 1 threads" in out and f"torch {torch.__version__}" in out
    assert "failed" not in out
    rows = json.loads(record.read_text())["rows"]
    expected = [f"{motion} {switch}" for switch, _ in speed.SWITCHES for motion, _ in speed.MOTIONS]
    expected += [f"{motion} all losses, {kind}" for motion, _ in speed.MOTIONS for kind in ("faithful", "switches on")]
    assert set(expected) <= set(rows)
    for name in rows:
        assert re.search(rf"^{re.escape(name)} +\|", out, re.MULTILINE), name
    # Without segment-anything (a GPU-only stack) the rows with the SAM loss say "skipped: ... not installed".
    sam = _installed("segment_anything")
    assert ("skipped: segment_anything" in out) != sam
    for motion, _ in speed.MOTIONS:
        fp32 = rows[f"{motion} fp32"]
        times = [fp32["step"][0], fp32["struct"][0], fp32["anim"][0], fp32["anim"][1]]
        if sam:
            times += [rows[f"{motion} all losses, faithful"][0], rows[f"{motion} all losses, switches on"][0]]
        assert all(isinstance(t, float) and math.isfinite(t) and t > 0 for t in times), motion
    measured = ("cpab-adam fp32", "cpab-gn fp32") + (("cpab-adam all losses", "cpab-gn all losses") if sam else ())
    for line in out.splitlines():
        if line.startswith(measured):
            ratios = re.findall(r"\| (\S+)x ", line + " ")
            assert ratios and all(math.isfinite(float(r)) and float(r) > 0 for r in ratios), line


def test_channels_last_switch_changes_memory_format_not_outputs():
    config = speed.load(speed.CONFIG, list(speed.BASE_OVERRIDES) + list(speed.QUICK_OVERRIDES)
                        + ["model_params.dense_motion_params.motion=tps"])
    networks = speed.build_networks(config, torch.device("cpu"))
    for network in networks.values():
        if network is not None:
            network.eval()
    source = torch.rand(1, 3, 32, 32)
    driving = torch.rand(2, 3, 32, 32)
    conv = next(p for p in networks["inpainting_network"].parameters() if p.dim() == 4 and p.shape[-1] > 1)
    with torch.no_grad():
        reference = Animator(networks, source, "standard", background=False)(driving)
        speed.set_memory_format(networks, True)
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
        fast = Animator(networks, source.contiguous(memory_format=torch.channels_last), "standard", background=False)(
            driving.contiguous(memory_format=torch.channels_last))
        speed.set_memory_format(networks, False)
        assert conv.is_contiguous()
    assert fast.shape == reference.shape == (2, 3, 32, 32)
    assert (fast - reference).abs().max() < 1e-4  # float32 rounding of the other convolution order


@pytest.mark.parametrize("motion", ["motion=tps", "cpab.fit_method=gauss_newton"])
def test_amp_training_step_runs_with_the_warps_in_float32(motion):
    """Under bf16 autocast the keypoint solves and fits stay float32 (they have no bf16 kernels)."""
    config = speed.load(speed.CONFIG, list(speed.BASE_OVERRIDES) + list(speed.QUICK_OVERRIDES)
                        + ["model_params.dense_motion_params." + motion, "train_params.amp=true"])
    networks = speed.build_networks(config, torch.device("cpu"))
    encoders = speed.Encoders(config, speed.sizes(True, False), torch.device("cpu"))
    plain = speed.with_losses(config)
    step = speed.build_trainer(networks, plain, encoders.losses(plain["train_params"]))
    before = [p.detach().clone() for p in networks["dense_motion_network"].parameters()]
    step(speed.inputs(2, 32, torch.device("cpu"), False, seed=0))
    after = list(networks["dense_motion_network"].parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
