"""TPSMM's published models in this framework, and ``run.py --init_from``.

The checkpoints here are written in TPSMM's layout, as its logger's ``save_cpk`` writes them (one state
dict per network under kp_detector, dense_motion_network, inpainting_network, bg_predictor,
avd_network; Adam state dicts under optimizer, optimizer_bg_predictor, optimizer_avd; an int epoch),
with random values. Their keys and shapes are TPSMM's: this framework's networks under ``motion: tps``
load TPSMM's state dicts strict (tests/modules/test_networks.py pins the vox-256 key counts), so tiny
networks of those classes give tiny TPSMM checkpoints.
"""
import copy
import glob
import json
import os

import pytest
import torch
import yaml
from test_train import tiny_overrides as train_overrides

import checkpoint as checkpoints
import demo
import run
from configuration import load_config
from frames_dataset import dataset_from_config
from modules import MAIN_NETWORKS, build_networks
from reconstruction import reconstruction
from train import Distributed, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTHETIC = os.path.join(ROOT, "config", "synthetic-64.yaml")
NETWORKS = MAIN_NETWORKS + ("avd_network",)
# The dense-motion tensors whose shape depends on the number of warps (TPS: K + 1, CPAB: K + 2): the
# hourglass input (heatmaps + deformed sources), and everything fed by the hourglass output, which
# concatenates that input (contribution maps, the two extra upsampling blocks, two occlusion heads).
WARP_DEPENDENT = ["hourglass.encoder.down_blocks.0.conv.weight", "maps.weight", "maps.bias", "up.0.conv.weight",
                  "up.0.conv.bias", "up.0.norm.weight", "up.0.norm.bias", "up.1.conv.weight", "occlusion.1.weight",
                  "occlusion.2.weight"]


def tiny_overrides(data_dir, motion):
    """test_train's tiny run (4 training / 2 test videos of 6 frames at 32x32, tiny networks, batch 2), one
    epoch of one step, with the motion model ``motion``."""
    return train_overrides(data_dir) + [f"model_params.dense_motion_params.motion={motion}",
                                        "train_params.num_epochs=1"]


def write_config(path, motion, data_dir, *more):
    config = load_config(SYNTHETIC, tiny_overrides(data_dir, motion) + list(more))
    with open(path, "w", encoding="utf-8") as stream:
        yaml.safe_dump(config, stream, sort_keys=False)
    return str(path), config


def randomised(state, generator):
    """A state dict with every float tensor moved off its initial value (running variances stay > 0)."""
    out = {}
    for key, value in state.items():
        if value.is_floating_point():
            noise = 0.05 * torch.randn(value.shape, generator=generator)
            value = (value + noise).abs() + 0.5 if key.endswith("running_var") else value + noise
        out[key] = value.clone()
    return out


def adam_state(parameters, lr, stepped=4):
    """An Adam state dict as TPSMM's (torch 1.10) wrote it: 'initial_lr' in the param group (its
    MultiStepLR), the step counter a Python int. Only the first ``stepped`` parameters had a gradient,
    so only they have moments (this keeps the test files small; the entries' types are the same)."""
    parameters = list(parameters)
    optimizer = torch.optim.Adam([{"params": parameters, "initial_lr": lr}], lr=lr, betas=(0.5, 0.999),
                                 weight_decay=1e-4)
    for parameter in parameters[:stepped]:
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    for parameter in parameters[:stepped]:
        parameter.grad = None
    state = optimizer.state_dict()
    for entry in state["state"].values():
        entry["step"] = int(entry["step"])
    return state


def write_tpsmm_checkpoint(path, config, bg=True, avd=True):
    """A checkpoint in TPSMM's layout for ``config`` (motion tps), random values; returns its dict."""
    torch.manual_seed(123)
    networks = build_networks(config)
    generator = torch.Generator().manual_seed(7)
    names = ("kp_detector", "dense_motion_network", "inpainting_network") + (("bg_predictor",) if bg else ())
    names += ("avd_network",) if avd else ()
    state = {name: randomised(networks[name].state_dict(), generator) for name in names}
    state["optimizer"] = adam_state(list(networks["inpainting_network"].parameters())
                                    + list(networks["dense_motion_network"].parameters())
                                    + list(networks["kp_detector"].parameters()), 2e-4)
    if bg:
        state["optimizer_bg_predictor"] = adam_state(networks["bg_predictor"].parameters(), 2e-4)
    if avd:
        state["optimizer_avd"] = adam_state(networks["avd_network"].parameters(), 1e-3)
    state["epoch"] = 99
    torch.save(state, path)   # as TPSMM's Logger.save_cpk: no config, no scheduler, no step
    return state


@pytest.fixture(scope="module")
def tpsmm(tmp_path_factory):
    """Tiny configs (motion tps and cpab, one synthetic data set) and TPSMM-layout checkpoints."""
    base = tmp_path_factory.mktemp("tpsmm")
    data = str(base / "data")
    tps_path, tps = write_config(base / "tiny-tps.yaml", "tps", data)
    cpab_path, cpab = write_config(base / "tiny-cpab.yaml", "cpab", data)
    checkpoint_path = str(base / "tiny-tpsmm.pth.tar")
    state = write_tpsmm_checkpoint(checkpoint_path, tps)
    return dict(base=base, tps_path=tps_path, tps=tps, cpab_path=cpab_path, cpab=cpab,
                checkpoint_path=checkpoint_path, state=state)


def one_line_error(capsys, status, prefix="error: "):
    assert status == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(prefix) and "\n" not in error, error
    return error


def only_run_dir(log_dir):
    runs = sorted(glob.glob(os.path.join(str(log_dir), "*")))
    assert len(runs) == 1, runs
    return runs[0]


# ---------------------------------------------------------------- reading TPSMM's layout

def test_tpsmm_layout_reads_with_weights_only_and_only_its_networks_are_used(tpsmm, tmp_path):
    path = tpsmm["checkpoint_path"]
    raw = torch.load(path, weights_only=True)   # tensors, dicts, lists, tuples, numbers: nothing else
    assert raw["epoch"] == 99 and raw["optimizer"]["param_groups"][0]["initial_lr"] == 2e-4
    assert checkpoints.checkpoint_layout(raw, path) == checkpoints.UPSTREAM_LAYOUT
    states, resume = checkpoints.open_checkpoint(path, tpsmm["tps"], "reconstruction")
    assert resume is None and set(states) == set(NETWORKS)     # optimisers and epoch are dropped
    assert checkpoints.open_checkpoint(path, tpsmm["tps"], "train_avd")[1] is None
    with pytest.raises(checkpoints.CheckpointError, match="cannot be resumed.*--init_from"):
        checkpoints.open_checkpoint(path, tpsmm["tps"], "train")
    legacy = str(tmp_path / "legacy.pth.tar")                   # torch's pre-1.6 file format
    torch.save({key: raw[key] for key in ("inpainting_network", "optimizer", "epoch")}, legacy,
               _use_new_zipfile_serialization=False)
    assert checkpoints.load_checkpoint(legacy)["optimizer"]["state"][0]["step"] == 1
    networks = build_networks(tpsmm["tps"])
    checkpoints.load_network_states(networks, states, path, NETWORKS)   # strict, every network
    for name in NETWORKS:
        for key, value in networks[name].state_dict().items():
            assert torch.equal(value, tpsmm["state"][name][key]), (name, key)


def test_reconstruction_runs_on_a_tpsmm_checkpoint_with_its_config(tpsmm, tmp_path):
    log_dir = tmp_path / "runs"
    argv = ["--config", tpsmm["tps_path"], "--device", "cpu", "--mode", "reconstruction", "--checkpoint",
            tpsmm["checkpoint_path"], "--log_dir", str(log_dir)]
    assert run.main(argv) == 0
    metrics = json.load(open(os.path.join(only_run_dir(log_dir), "metrics.json")))
    # The same numbers as the TPSMM weights loaded by hand (BG predictor included).
    networks = build_networks(tpsmm["tps"])
    for name in MAIN_NETWORKS:
        networks[name].load_state_dict(tpsmm["state"][name])
    dataset = dataset_from_config(tpsmm["tps"]["dataset_params"], is_train=False)
    expected = reconstruction(tpsmm["tps"], networks, dataset, str(tmp_path / "by-hand"), torch.device("cpu"),
                              progress=False)
    assert metrics["frames"] == 12 and metrics["l1"] == pytest.approx(expected["l1"], abs=1e-6)
    fresh = build_networks(tpsmm["tps"])
    untrained = reconstruction(tpsmm["tps"], fresh, dataset, str(tmp_path / "fresh"), torch.device("cpu"),
                               progress=False)
    assert abs(untrained["l1"] - metrics["l1"]) > 1e-4      # the checkpoint's weights made the difference


def test_demo_animates_with_a_tpsmm_checkpoint(tpsmm, tmp_path, capsys):
    pytest.importorskip("imageio_ffmpeg")   # the demo writes video with its ffmpeg
    import imageio

    dataset = dataset_from_config(tpsmm["tps"]["dataset_params"], is_train=False)
    video = dataset_from_config(tpsmm["tps"]["dataset_params"], is_train=False)[0]["video"]   # (3, T, H, W)
    frames = tmp_path / "driving"
    frames.mkdir()
    for index in range(3):
        image = (torch.as_tensor(video[:, index]).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        imageio.v3.imwrite(str(frames / f"{index:04d}.png"), image)
    assert len(dataset) == 2
    for mode in ("relative", "avd"):
        result = str(tmp_path / f"{mode}.mp4")
        status = demo.main(["--config", tpsmm["tps_path"], "--checkpoint", tpsmm["checkpoint_path"],
                            "--source_image", str(frames / "0000.png"), "--driving_video", str(frames),
                            "--result_video", result, "--cpu", "--mode", mode])
        assert status == 0, capsys.readouterr().err
        assert imageio.v2.get_reader(result, format="FFMPEG").count_frames() == 3
    capsys.readouterr()
    status = demo.main(["--config", tpsmm["cpab_path"], "--checkpoint", tpsmm["checkpoint_path"],
                        "--source_image", str(frames / "0000.png"), "--driving_video", str(frames),
                        "--result_video", str(tmp_path / "bad.mp4"), "--cpu"])
    error = one_line_error(capsys, status, "demo.py: error: ")
    assert "dense_motion_network.hourglass.encoder.down_blocks.0.conv.weight has shape" in error


def test_a_config_that_does_not_fit_a_tpsmm_checkpoint_is_one_line(tpsmm, tmp_path, capsys):
    log_dir = tmp_path / "runs"

    def reconstruct(config_path, checkpoint_path=tpsmm["checkpoint_path"], *overrides):
        argv = ["--config", config_path, "--device", "cpu", "--mode", "reconstruction", "--checkpoint",
                checkpoint_path, "--log_dir", str(log_dir)]
        for override in overrides:
            argv += ["--set", override]
        return one_line_error(capsys, run.main(argv))

    # CPABMM's config: K + 2 warps where TPSMM has K + 1 (K = 2 here), so other input channels.
    error = reconstruct(tpsmm["cpab_path"])
    assert (f"checkpoint {tpsmm['checkpoint_path']} does not match config {tpsmm['cpab_path']}: "
            "dense_motion_network.hourglass.encoder.down_blocks.0.conv.weight has shape (16, 20, 3, 3) in the "
            "checkpoint but (16, 23, 3, 3) in this config (and 9 more); TPSMM's published models need their "
            "config/tpsmm-*.yaml (motion: tps)") in error
    error = reconstruct(tpsmm["tps_path"], tpsmm["checkpoint_path"], "model_params.generator_params.max_features=32")
    assert "inpainting_network." in error and "in the checkpoint but" in error
    error = reconstruct(tpsmm["tps_path"], tpsmm["checkpoint_path"], "model_params.common_params.bg=false")
    assert "it has 'bg_predictor' weights but the config builds no bg_predictor" in error
    without_bg = str(tmp_path / "no-bg.pth.tar")
    write_tpsmm_checkpoint(without_bg, tpsmm["tps"], bg=False)
    assert "has no 'bg_predictor' weights" in reconstruct(tpsmm["tps_path"], without_bg)
    # Training cannot resume TPSMM's checkpoints; --init_from starts from their weights.
    error = one_line_error(capsys, run.main(["--config", tpsmm["tps_path"], "--device", "cpu", "--checkpoint",
                                             tpsmm["checkpoint_path"], "--log_dir", str(log_dir)]))
    assert "TPSMM's layout" in error and "--init_from" in error
    assert not os.path.exists(log_dir) or os.listdir(log_dir) == []


# ---------------------------------------------------------------- --init_from

def _expected_copy(networks, state):
    """{name: set of keys whose name and shape match the checkpoint}, computed independently."""
    return {name: {key for key, value in networks[name].state_dict().items()
                   if key in state.get(name, {}) and state[name][key].shape == value.shape}
            for name in networks if networks[name] is not None}


def test_init_from_copies_exactly_the_matching_tensors_and_nothing_else(tpsmm, tmp_path):
    """TPSMM (motion tps) into CPABMM (motion cpab): right after the initialisation, every tensor whose
    name and shape match holds TPSMM's value and every other one the fresh one; after a training step
    with lr 0 every parameter still does (the BatchNorm running statistics move, as in any step)."""
    config = tpsmm["cpab"]
    state = tpsmm["state"]
    torch.manual_seed(0)
    reference = build_networks(config)        # what a fresh run with seed 0 starts from
    torch.manual_seed(0)
    networks = build_networks(config)
    expected = _expected_copy({name: networks[name] for name in MAIN_NETWORKS}, state)
    record = checkpoints.init_network_states(networks, tpsmm["checkpoint_path"], MAIN_NETWORKS)
    assert record["layout"] == checkpoints.UPSTREAM_LAYOUT
    assert record["init_from"] == os.path.abspath(tpsmm["checkpoint_path"])
    summary = record["networks"]
    assert list(summary) == list(MAIN_NETWORKS)
    assert sorted(summary["dense_motion_network"]["fresh"]) == sorted(WARP_DEPENDENT)
    assert sorted(summary["dense_motion_network"]["unused"]) == sorted(WARP_DEPENDENT)
    for name in MAIN_NETWORKS:
        own = networks[name].state_dict()
        assert summary[name]["copied"] == len(expected[name])
        assert set(summary[name]["fresh"]) == set(own) - expected[name]
        for key, value in own.items():
            source = state[name][key] if key in expected[name] else reference[name].state_dict()[key]
            assert torch.equal(value, source), (name, key)
    for name in ("kp_detector", "inpainting_network", "bg_predictor"):
        assert summary[name]["fresh"] == [] and summary[name]["unused"] == []

    # One step with lr 0 (a config dict for train(): files and --set keep lr > 0, the schema's range).
    before = {name: copy.deepcopy(networks[name].state_dict()) for name in MAIN_NETWORKS}
    zero_lr = copy.deepcopy(config)
    zero_lr["train_params"]["lr_generator"] = 0.0
    train(zero_lr, networks, str(tmp_path), torch.device("cpu"), dist=Distributed())
    written = checkpoints.load_checkpoint(os.path.join(str(tmp_path), checkpoints.CHECKPOINT_NAME))
    assert written["step"] == 1 and max(s["step"] for s in written["optimizer"]["state"].values()) == 1
    for name in MAIN_NETWORKS:
        parameters = dict(networks[name].named_parameters())
        for key in parameters:
            assert torch.equal(written[name][key], before[name][key]), (name, key)
    moved = [key for key in before["kp_detector"] if key.endswith("running_mean")
             and not torch.equal(written["kp_detector"][key], before["kp_detector"][key])]
    assert moved                                          # the step ran (batch statistics in train mode)


def test_run_init_from_starts_a_cpabmm_run_from_a_tpsmm_model(tpsmm, tmp_path, capsys):
    log_dir = tmp_path / "runs"
    argv = ["--config", tpsmm["cpab_path"], "--device", "cpu", "--init_from", tpsmm["checkpoint_path"],
            "--log_dir", str(log_dir)]
    assert run.main(argv) == 0
    out = capsys.readouterr().out
    run_dir = only_run_dir(log_dir)
    record_path = os.path.join(run_dir, checkpoints.INIT_RECORD)
    summary = [line for line in out.splitlines() if line.startswith("init_from ")]
    assert summary == [f"init_from {os.path.abspath(tpsmm['checkpoint_path'])} (TPSMM's / official CPABMM's "
                       f"layout): tensors copied/fresh: kp_detector 122/0, dense_motion_network 25/10, "
                       f"inpainting_network 78/0, bg_predictor 122/0; fresh tensor names in {record_path}"]
    record = json.load(open(record_path))
    assert record["init_from"] == os.path.abspath(tpsmm["checkpoint_path"])
    assert sorted(record["networks"]["dense_motion_network"]["fresh"]) == sorted(WARP_DEPENDENT)
    written = checkpoints.load_checkpoint(os.path.join(run_dir, checkpoints.CHECKPOINT_NAME))
    # A fresh run: its own optimiser (one step), epoch and config, nothing of TPSMM's optimiser or epoch.
    assert written["epoch"] == 1 and written["step"] == 1 and written["config"] == tpsmm["cpab"]
    assert max(s["step"] for s in written["optimizer"]["state"].values()) == 1
    assert written["optimizer"]["param_groups"][0]["lr"] == tpsmm["cpab"]["train_params"]["lr_generator"]
    # bg_start 1: the BG predictor did not train in epoch 0, so it still holds TPSMM's weights.
    for key, value in tpsmm["state"]["bg_predictor"].items():
        assert torch.equal(written["bg_predictor"][key], value), key
    # The run resumes like any other (--checkpoint), and the two flags together are refused.
    argv_resume = ["--config", tpsmm["cpab_path"], "--device", "cpu", "--set", "train_params.num_epochs=2",
                   "--checkpoint", os.path.join(run_dir, checkpoints.CHECKPOINT_NAME)]
    assert run.main(argv_resume) == 0
    assert checkpoints.load_checkpoint(os.path.join(run_dir, checkpoints.CHECKPOINT_NAME))["epoch"] == 2
    capsys.readouterr()
    error = one_line_error(capsys, run.main(argv + ["--checkpoint", tpsmm["checkpoint_path"]]))
    assert "not both" in error
    error = one_line_error(capsys, run.main(argv + ["--mode", "reconstruction"]))
    assert "--init_from starts a training run" in error
    error = one_line_error(capsys, run.main(["--config", tpsmm["cpab_path"], "--device", "cpu", "--init_from",
                                             str(tmp_path / "missing.pth.tar"), "--log_dir", str(tmp_path / "x")]))
    assert "checkpoint file not found" in error and not os.path.exists(tmp_path / "x")


def test_train_avd_init_from_a_tpsmm_model_fine_tunes_its_avd(tpsmm, tmp_path, capsys):
    log_dir = tmp_path / "runs"
    assert run.main(["--config", tpsmm["tps_path"], "--device", "cpu", "--mode", "train_avd", "--init_from",
                     tpsmm["checkpoint_path"], "--log_dir", str(log_dir)]) == 0
    out = capsys.readouterr().out
    assert ("tensors copied/fresh: kp_detector 122/0, dense_motion_network 35/0, inpainting_network 78/0, "
            "bg_predictor 122/0, avd_network ") in out
    written = checkpoints.load_checkpoint(os.path.join(only_run_dir(log_dir), checkpoints.CHECKPOINT_NAME))
    assert written["avd_epoch"] == 1 and "optimizer_avd" in written
    for name in ("dense_motion_network", "inpainting_network", "bg_predictor"):
        for key, value in tpsmm["state"][name].items():
            assert torch.equal(written[name][key], value), (name, key)
    avd = tpsmm["state"]["avd_network"]
    assert any(not torch.equal(written["avd_network"][key], avd[key]) for key in avd)   # trained from TPSMM's
    # --checkpoint instead: TPSMM's main networks (strict), a fresh AVD network, no resume of TPSMM's AVD.
    assert run.main(["--config", tpsmm["tps_path"], "--device", "cpu", "--mode", "train_avd", "--checkpoint",
                     tpsmm["checkpoint_path"], "--log_dir", str(tmp_path / "fresh-avd")]) == 0
    fresh = checkpoints.load_checkpoint(os.path.join(only_run_dir(tmp_path / "fresh-avd"), checkpoints.CHECKPOINT_NAME))
    assert fresh["avd_epoch"] == 1 and "epoch" not in fresh
    for key, value in tpsmm["state"]["inpainting_network"].items():
        assert torch.equal(fresh["inpainting_network"][key], value), key
    torch.manual_seed(0)
    initial = build_networks(tpsmm["tps"])["avd_network"]      # the run's seed 0: where a fresh AVD starts
    for key, value in initial.named_parameters():              # 2 Adam steps of lr 1e-3 from there
        assert (fresh["avd_network"][key] - value).abs().max() < (avd[key] - value).abs().max(), key


def test_init_from_a_file_that_matches_nothing_is_one_line(tpsmm, tmp_path):
    other = str(tmp_path / "other.pth.tar")
    torch.save({name: {"unrelated.weight": torch.zeros(1)} for name in checkpoints.UPSTREAM_REQUIRED}, other)
    with pytest.raises(checkpoints.CheckpointError, match="no tensor of the checkpoint matches"):
        checkpoints.init_network_states(build_networks(tpsmm["cpab"]), other, MAIN_NETWORKS)
    torch.save({"weights": {}}, other)
    with pytest.raises(checkpoints.CheckpointError, match="holds no config and is not in TPSMM's layout"):
        checkpoints.init_network_states(build_networks(tpsmm["cpab"]), other, MAIN_NETWORKS)


def test_vox256_tpsmm_to_cpabmm_carry_over():
    """What ``--init_from vox.pth.tar`` with config/vox-256.yaml copies from TPSMM's vox-256 networks."""
    tps = build_networks(load_config(os.path.join(ROOT, "config", "tpsmm-vox-256.yaml")))
    states = {name: network.state_dict() for name, network in tps.items()}
    cpab = build_networks(load_config(os.path.join(ROOT, "config", "vox-256.yaml")))
    summary = checkpoints.copy_matching_states(cpab, states, NETWORKS)
    assert {name: (entry["copied"], len(entry["fresh"])) for name, entry in summary.items()} == {
        "kp_detector": (122, 0), "dense_motion_network": (49, 10), "inpainting_network": (78, 0),
        "bg_predictor": (122, 0), "avd_network": (69, 0)}
    assert summary["dense_motion_network"]["fresh"] == WARP_DEPENDENT
    fresh = cpab["dense_motion_network"].state_dict()
    assert sum(fresh[key].numel() for key in WARP_DEPENDENT) == 327_223      # of 37,958,266 values


# TPSMM's values (yoyo-nb/Thin-Plate-Spline-Motion-Model, config/*.yaml) where they differ from this
# repository's CPABMM config of the same data set, plus the TPSMM facts every tpsmm-*.yaml must keep.
TPSMM_VALUES = {
    "vox-256": {"train_params.lr_generator": 2e-4, "train_params.batch_size": 28, "train_params.num_repeats": 75},
    "taichi-256": {"train_params.lr_generator": 2e-4, "train_params.batch_size": 28, "train_params.num_repeats": 150,
                   "train_params.checkpoint_freq": 50, "train_params.dropout_maxp": 0.7, "train_params.bg_start": 0},
    "ted-384": {"train_params.lr_generator": 2e-4, "train_params.batch_size": 12, "train_params.checkpoint_freq": 50,
                "train_params.dataloader_workers": 6, "train_avd_params.num_epochs": 30},
    "mgif-256": {"train_params.lr_generator": 2e-4, "train_params.batch_size": 28,
                 "model_params.common_params.bg": False, "dataset_params.augmentation_params.jitter_param.hue": 0.5,
                 "train_avd_params.lambda_affine": 1.0},
}
TPSMM_COMMON = {"model_params.dense_motion_params.motion": "tps", "model_params.common_params.num_cpab": 10,
                "model_params.avd_network_params.id_bottle_size": 128, "train_params.loss_weights.sam": 0.0,
                "train_params.loss_weights.structure": 0.0, "train_params.pretrained.sam_checkpoint": None,
                "train_params.pretrained.dino_vitb8": None, "train_params.clip_grad_norm": 10.0,
                "model_params.dense_motion_params.kp_variance": 0.01}


def _get(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("name", sorted(TPSMM_VALUES))
def test_tpsmm_configs_carry_tpsmm_values(name):
    config = load_config(os.path.join(ROOT, "config", f"tpsmm-{name}.yaml"))
    cpabmm = load_config(os.path.join(ROOT, "config", f"{name}.yaml"))
    for dotted, value in {**TPSMM_COMMON, **TPSMM_VALUES[name]}.items():
        assert _get(config, dotted) == value, dotted
    # Same networks as CPABMM's config but for the motion model: TPSMM's checkpoints are the upstream layout.
    for section in ("common_params", "generator_params", "avd_network_params"):
        assert config["model_params"][section] == cpabmm["model_params"][section]
    with open(os.path.join(ROOT, "config", f"tpsmm-{name}.yaml"), encoding="utf-8") as stream:
        assert f"published {name.split('-')[0]}.pth.tar" in stream.read()
