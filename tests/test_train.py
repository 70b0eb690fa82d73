"""run.py / train.py end to end on a tiny synthetic set and tiny networks (CPU, seconds each).

One module-scoped training run provides the checkpoint that the train_avd, reconstruction and
bad-input tests start from.
"""
import glob
import importlib.util
import json
import os
import re

import pytest
import torch

import run
from checkpoint import load_checkpoint
from train import Distributed, NonFiniteLossError, check_finite, clip_gradients, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "config", "synthetic-64.yaml")


def tiny_overrides(data_dir):
    """--set overrides: 4 training / 2 test videos of 6 frames at 32x32, tiny networks, 2 steps."""
    return [
        f"dataset_params.root_dir={data_dir}",
        "dataset_params.frame_shape=[32, 32, 3]",
        "dataset_params.synthetic.num_train=4",
        "dataset_params.synthetic.num_test=2",
        "dataset_params.synthetic.num_frames=6",
        "dataset_params.synthetic.size=32",
        "model_params.common_params.num_cpab=2",
        "model_params.generator_params.block_expansion=8",
        "model_params.generator_params.max_features=16",
        "model_params.dense_motion_params.block_expansion=8",
        "model_params.dense_motion_params.max_features=16",
        "model_params.dense_motion_params.num_blocks=2",
        "model_params.dense_motion_params.scale_factor=0.25",
        "model_params.dense_motion_params.cpab.gn_iter=2",
        "model_params.avd_network_params.id_bottle_size=8",
        "model_params.avd_network_params.pose_bottle_size=8",
        "train_params.num_epochs=2",
        "train_params.num_repeats=1",
        "train_params.batch_size=2",
        "train_params.max_steps_per_epoch=1",
        "train_params.dataloader_workers=0",
        "train_params.scales=[1]",
        "train_params.loss_weights.perceptual=[0, 0, 0, 0, 0]",
        "train_params.log_freq=1",
        "train_params.image_freq=1",
        "train_params.checkpoint_freq=2",
        "train_params.bg_start=1",
        "train_params.dropout_epoch=1",
        "train_avd_params.num_epochs=1",
        "train_avd_params.num_repeats=1",
        "train_avd_params.batch_size=2",
        "train_avd_params.dataloader_workers=0",
        "visualizer_params.kp_size=1",
    ]


def cli(overrides, *extra):
    args = ["--config", CONFIG, "--device", "cpu"]
    for override in overrides:
        args += ["--set", override]
    return list(args) + list(extra)


def only_run_dir(log_dir):
    runs = sorted(glob.glob(os.path.join(str(log_dir), "*")))
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run (2 epochs of 1 step, evaluation after training): (overrides, run dir)."""
    base = tmp_path_factory.mktemp("trained")
    overrides = tiny_overrides(str(base / "data"))
    assert run.main(cli(overrides, "--log_dir", str(base / "runs"), "--tag", "tiny")) == 0
    return overrides, only_run_dir(base / "runs")


def test_train_writes_run_dir_checkpoints_logs_and_metrics(trained):
    overrides, run_dir = trained
    assert os.path.basename(run_dir).startswith("synthetic-64-tiny-") and " " not in run_dir
    names = set(os.listdir(run_dir))
    assert {"config.yaml", "checkpoint.pth.tar", "checkpoint-00002.pth.tar", "metrics.json",
            "tensorboard", "reconstruction"} <= names
    checkpoint = torch.load(os.path.join(run_dir, "checkpoint.pth.tar"), weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["step"] == 2
    assert checkpoint["config"]["model_params"]["common_params"]["num_cpab"] == 2
    assert {"kp_detector", "dense_motion_network", "inpainting_network", "bg_predictor", "optimizer",
            "optimizer_bg", "scheduler", "scheduler_bg"} <= set(checkpoint)
    # bg_start = 1: the BG optimizer took exactly one step (epoch 1), the main one two.
    assert max(s["step"] for s in checkpoint["optimizer"]["state"].values()) == 2
    assert max(s["step"] for s in checkpoint["optimizer_bg"]["state"].values()) == 1
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert set(metrics["per_video"]) and len(metrics["per_video"]) == 2
    assert 0 < metrics["l1"] < 1 and 0 < metrics["baseline_l1"] < 1
    assert glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))


def _copy(path, folder):
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(str(folder), os.path.basename(path))
    with open(path, "rb") as source, open(target, "wb") as destination:
        destination.write(source.read())
    return target


def test_resume_equals_straight_training_and_stays_in_the_run_dir(trained, tmp_path):
    """2 steps (the fixture) + save + resume 1 step == 3 steps straight, same seed (float tolerance)."""
    overrides, run_dir = trained
    target = _copy(os.path.join(run_dir, "checkpoint.pth.tar"), tmp_path / "split")
    more = overrides + ["train_params.num_epochs=3", "train_params.evaluate_after_training=false"]
    assert run.main(cli(more, "--log_dir", str(tmp_path / "unused"), "--checkpoint", target)) == 0
    assert not os.path.exists(tmp_path / "unused")
    assert os.path.exists(tmp_path / "split" / "config.yaml")
    assert run.main(cli(more, "--log_dir", str(tmp_path / "straight"))) == 0
    resumed = load_checkpoint(target)
    straight = load_checkpoint(os.path.join(only_run_dir(tmp_path / "straight"), "checkpoint.pth.tar"))
    assert resumed["epoch"] == straight["epoch"] == 3 and resumed["step"] == straight["step"] == 3
    assert resumed["scheduler"] == straight["scheduler"]
    for name in ("kp_detector", "dense_motion_network", "inpainting_network", "bg_predictor"):
        for key, value in straight[name].items():
            assert torch.allclose(value.float(), resumed[name][key].float(), atol=1e-6, rtol=1e-5), (name, key)
    for key in ("optimizer", "optimizer_bg"):
        for index, state in straight[key]["state"].items():
            assert state["step"] == resumed[key]["state"][index]["step"]
            assert torch.allclose(state["exp_avg_sq"], resumed[key]["state"][index]["exp_avg_sq"],
                                  atol=1e-9, rtol=1e-5)


def test_train_avd_trains_only_the_avd_network(trained, tmp_path):
    overrides, run_dir = trained
    checkpoint_path = os.path.join(run_dir, "checkpoint.pth.tar")
    assert run.main(cli(overrides, "--mode", "train_avd", "--checkpoint", checkpoint_path,
                        "--log_dir", str(tmp_path))) == 0
    avd_dir = only_run_dir(tmp_path)
    assert "-train_avd-" in os.path.basename(avd_dir)
    main = load_checkpoint(checkpoint_path)
    avd = load_checkpoint(os.path.join(avd_dir, "checkpoint.pth.tar"))
    assert avd["avd_epoch"] == 1 and avd["avd_step"] == 2 and "optimizer_avd" in avd
    for name in ("dense_motion_network", "inpainting_network", "bg_predictor"):
        for key, value in main[name].items():
            assert torch.equal(value, avd[name][key]), (name, key)
    # Faithful to the official code: the keypoint detector ran in train mode (batch statistics): its
    # BatchNorm running statistics moved and were saved (2 steps x source and driving = 4 batches),
    # its weights did not change.
    kp_main, kp_avd = main["kp_detector"], avd["kp_detector"]
    assert set(kp_main) == set(kp_avd)
    stats = {key for key in kp_main if key.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert stats
    for key in stats:
        if key.endswith("num_batches_tracked"):
            assert int(kp_avd[key]) == int(kp_main[key]) + 4, key
        else:
            assert not torch.equal(kp_main[key], kp_avd[key]), key
    for key in set(kp_main) - stats:
        assert torch.equal(kp_main[key], kp_avd[key]), key
    steps = [state["step"] for state in avd["optimizer_avd"]["state"].values()]
    assert steps and max(steps) == 2


def test_reconstruction_mode_writes_lossless_strips_mp4_and_metrics(trained, tmp_path, monkeypatch):
    import imageio.v2

    import frames_dataset

    def whole_video(self, index):
        raise AssertionError("reconstruction must stream the video, not read it whole")

    monkeypatch.setattr(frames_dataset.FramesDataset, "__getitem__", whole_video)
    overrides, run_dir = trained
    # Frames batched 4 + 2 here, 6 at once in the evaluation after training (eval_batch_size 32).
    assert run.main(cli(overrides + ["train_params.eval_batch_size=4"], "--mode", "reconstruction", "--checkpoint",
                        os.path.join(run_dir, "checkpoint.pth.tar"), "--log_dir", str(tmp_path))) == 0
    out_dir = only_run_dir(tmp_path)
    metrics = json.load(open(os.path.join(out_dir, "metrics.json")))
    reference = json.load(open(os.path.join(run_dir, "metrics.json")))
    # Same weights, same test split, other batching: same numbers as the evaluation after training.
    assert metrics["l1"] == pytest.approx(reference["l1"], abs=1e-6)
    assert metrics["baseline_l1"] == pytest.approx(reference["baseline_l1"], abs=1e-6)
    strips = sorted(glob.glob(os.path.join(out_dir, "reconstruction", "png", "*.png")))
    assert len(strips) == 2 and imageio.v2.imread(strips[0]).shape == (32, 32 * 6, 3)
    previews = glob.glob(os.path.join(out_dir, "reconstruction", "mp4", "*.mp4"))
    assert len(previews) == (2 if importlib.util.find_spec("imageio_ffmpeg") else 0)  # mp4 needs imageio-ffmpeg
    frames = sum(video["frames"] for video in metrics["per_video"].values())
    weighted = sum(video["l1"] * video["frames"] for video in metrics["per_video"].values()) / frames
    assert metrics["l1"] == pytest.approx(weighted, rel=1e-6)


def _one_line_error(capsys, argv):
    """Run, expect exit status 1 and exactly one line on stderr besides the progress bar's: the error."""
    assert run.main(argv) == 1
    lines = [line for line in re.split(r"[\r\n]", capsys.readouterr().err)
             if line.strip() and not re.search(r"\d+/\d+ \[", line)]  # tqdm: " 0/2 [00:00<?, ?it/s]"
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0].strip()


def test_bad_inputs_give_one_line_errors(trained, tmp_path, capsys):
    overrides, run_dir = trained
    checkpoint_path = os.path.join(run_dir, "checkpoint.pth.tar")
    log_dir = str(tmp_path / "runs")
    error = _one_line_error(capsys, cli(overrides, "--checkpoint", str(tmp_path / "nope.pth.tar"),
                                        "--log_dir", log_dir))
    assert "checkpoint file not found" in error
    error = _one_line_error(capsys, cli(overrides + ["model_params.common_params.num_cpab=3"], "--mode",
                                        "reconstruction", "--checkpoint", checkpoint_path, "--log_dir", log_dir))
    assert "another config" in error and "model_params.common_params.num_cpab" in error
    error = _one_line_error(capsys, cli(overrides, "--mode", "reconstruction", "--log_dir", log_dir))
    assert "needs --checkpoint" in error
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "test").mkdir()
    error = _one_line_error(capsys, cli(overrides + [f"dataset_params.root_dir={empty}",
                                                     "dataset_params.synthetic=null"], "--log_dir", log_dir))
    assert "empty" in error or "no training videos" in error or "no video" in error
    if not torch.cuda.is_available():
        error = _one_line_error(capsys, cli(overrides, "--log_dir", log_dir) + ["--device", "cuda"])
        assert "CUDA is not available" in error
    error = _one_line_error(capsys, cli(overrides, "--tag", "has space", "--log_dir", log_dir))
    assert "--tag" in error
    # Nothing but failed starts: no run directory is left behind.
    assert not os.path.exists(log_dir) or os.listdir(log_dir) == []


def test_non_finite_loss_stops_with_the_loss_name_and_keeps_the_last_checkpoint(trained, tmp_path,
                                                                                   monkeypatch):
    import full_model
    from configuration import load_config
    from modules import build_networks

    overrides, run_dir = trained
    target = _copy(os.path.join(run_dir, "checkpoint.pth.tar"), tmp_path)
    before = open(target, "rb").read()
    config = load_config(CONFIG, overrides + ["train_params.num_epochs=3"])
    original = full_model.GeneratorFullModel.forward

    def poisoned(self, x, epoch, step=0):
        losses, generated = original(self, x, epoch, step)
        losses["warp_loss"] = losses["warp_loss"] * float("nan")
        return losses, generated

    monkeypatch.setattr(full_model.GeneratorFullModel, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"loss 'warp_loss' is nan at step 2 \(epoch 2\)"):
        train(config, build_networks(config), str(tmp_path), torch.device("cpu"), dist=Distributed(),
              checkpoint=load_checkpoint(target), checkpoint_path=target)
    assert open(target, "rb").read() == before
    # No point was logged before the stop, so no TensorBoard folder either (created at the first write).
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth.tar"]


def test_clip_gradients_inf_norm_none_and_non_finite():
    def module_with_grad(values):
        module = torch.nn.Linear(2, 1, bias=False)
        module.weight.grad = torch.tensor([values])
        return module

    a, b = module_with_grad([30.0, -5.0]), module_with_grad([0.5, -40.0])
    norms = clip_gradients({"a": a, "b": b}, 10.0)
    # inf-norm clipping, per module: each gradient scaled so its largest entry is (about) 10
    assert torch.allclose(a.weight.grad, torch.tensor([[10.0, -5.0 / 3]]), rtol=1e-5)
    assert torch.allclose(b.weight.grad, torch.tensor([[0.125, -10.0]]), rtol=1e-5)
    assert {name: float(norm) for name, norm in norms.items()} == {"a": 30.0, "b": 40.0}  # before clipping
    c = module_with_grad([30.0, -5.0])
    clip_gradients({"c": c}, None)  # clip_grad_norm: null -> no clipping
    assert torch.equal(c.weight.grad, torch.tensor([[30.0, -5.0]]))
    # A non-finite gradient is not read on the host here: its norm goes to the step's one check.
    norms = clip_gradients({"good": module_with_grad([1.0, 2.0]), "bad": module_with_grad([1.0, float("inf")])},
                           None)
    watched = {f"max |gradient| of {name}": norm for name, norm in norms.items()}
    with pytest.raises(NonFiniteLossError, match=r"max \|gradient\| of bad is inf at step 7 \(epoch 1\)"):
        check_finite(watched, 7, 1, Distributed())


def test_check_finite_returns_host_floats_and_names_the_first_bad_value():
    host = check_finite({"loss 'a'": torch.tensor([1.0, 3.0]).mean(), "loss 'b'": torch.tensor(0.5)}, 0, 0,
                        Distributed())
    assert host == {"loss 'a'": 2.0, "loss 'b'": 0.5} and all(type(v) is float for v in host.values())
    with pytest.raises(NonFiniteLossError, match=r"loss 'b' is inf at step 3 \(epoch 0\)"):
        check_finite({"loss 'a'": torch.tensor(1.0), "loss 'b'": torch.tensor(float("inf")),
                      "loss 'c'": torch.tensor(float("nan"))}, 3, 0, Distributed())


def _run_two_ranks(argv):
    """run.py with argv in 2 DDP processes (gloo on CPU, a free local port), forked from this one."""
    import socket

    import torch.multiprocessing

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, port, argv), nprocs=2, join=True,
                                          start_method="fork")


def _ddp_worker(rank, world_size, port, argv):
    """One rank: torchrun's environment variables, then the normal entry point."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    code = run.main(argv)
    if code != 0:
        raise SystemExit(code)


def test_ddp_two_processes_gloo(trained, tmp_path):
    """Two CPU processes (gloo) through run.main with torchrun's environment; forked, so no re-import."""
    overrides, _ = trained
    more = overrides + ["train_params.num_epochs=1", "train_params.max_steps_per_epoch=2",
                        "train_params.batch_size=4", "train_params.num_repeats=2",
                        "train_params.evaluate_after_training=false"]
    _run_two_ranks(cli(more, "--log_dir", str(tmp_path)))
    checkpoint = load_checkpoint(os.path.join(only_run_dir(tmp_path), "checkpoint.pth.tar"))
    # Each of the 2 ranks took 2 steps of 2 samples (global batch 4), in lock step.
    assert checkpoint["epoch"] == 1 and checkpoint["step"] == 2


def test_ddp_tells_of_unused_parameters_only_while_there_are_some(trained, tmp_path, capfd):
    """With the prediction in a loss, the only unused parameters are the BG predictor's before bg_start:
    epoch 0 runs with find_unused_parameters (the BG predictor idle), epoch 1 without, and DDP never
    warns that the flag was set for nothing (nor fails for lack of it)."""
    overrides, _ = trained
    more = overrides + ["model_params.dense_motion_params.motion=tps", "train_params.num_epochs=2",
                        "train_params.batch_size=4", "train_params.num_repeats=2", "train_params.bg_start=1",
                        "train_params.loss_weights.perceptual=[10, 0, 0, 0, 0]",
                        "train_params.pretrained.vgg19=absent/vgg19.pth",  # a random VGG-19 (allowed here)
                        "train_params.evaluate_after_training=false"]
    _run_two_ranks(cli(more, "--log_dir", str(tmp_path)))
    checkpoint = load_checkpoint(os.path.join(only_run_dir(tmp_path), "checkpoint.pth.tar"))
    assert checkpoint["epoch"] == 2 and max(s["step"] for s in checkpoint["optimizer_bg"]["state"].values()) == 1
    assert "find_unused_parameters" not in capfd.readouterr().err


def test_training_step_steps_the_bg_predictor_from_bg_start_only():
    from configuration import load_config
    from full_model import GeneratorFullModel
    from modules import build_networks
    from train import make_optimizers, training_step

    config = load_config(CONFIG, overrides=tiny_overrides("unused") + [
        "model_params.dense_motion_params.motion=tps", "train_params.loss_weights.equivariance_value=0"])
    networks = build_networks(config)
    params = dict(config["train_params"], bg_start=1)
    model = GeneratorFullModel(networks, params, losses={})
    optimizers = make_optimizers(networks, params)
    x = {"source": torch.rand(2, 3, 32, 32), "driving": torch.rand(2, 3, 32, 32)}
    bg_before = [p.detach().clone() for p in networks["bg_predictor"].parameters()]
    kp_before = [p.detach().clone() for p in networks["kp_detector"].parameters()]
    means, generated = training_step(model, networks, optimizers, x, 0, 0, params, Distributed())
    assert set(means) == {"warp_loss"} and all(type(v) is float for v in means.values())
    assert generated["prediction"].shape == (2, 3, 32, 32)
    assert not optimizers[1].state and all(torch.equal(a, b) for a, b in
                                           zip(bg_before, networks["bg_predictor"].parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(kp_before, networks["kp_detector"].parameters(), strict=True))
    means, _ = training_step(model, networks, optimizers, x, 1, 1, params, Distributed())
    assert set(means) == {"warp_loss", "bg"}
    assert max(state["step"] for state in optimizers[1].state.values()) == 1


def _data_dir(overrides):
    return next(item.split("=", 1)[1] for item in overrides if item.startswith("dataset_params.root_dir="))


def _corrupt_copy(overrides, tmp_path, split):
    """A copy of the fixture's data set in which frame 3 of every video of ``split`` is garbage."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(_data_dir(overrides), data)
    for video in sorted((data / split).iterdir()):
        (video / "0003.png").write_bytes(b"not a png")
    return data


def test_data_errors_are_one_line_with_dataloader_workers(trained, tmp_path, capsys):
    """With worker processes (every released config has them) a corrupt frame is the DatasetError's one
    line, not the worker's traceback; a run that fails before its first point leaves no run directory."""
    overrides, run_dir = trained
    data = _corrupt_copy(overrides, tmp_path, "train")
    bad = overrides + [f"dataset_params.root_dir={data}", "train_params.dataloader_workers=1",
                       "train_avd_params.dataloader_workers=1"]
    log_dir = tmp_path / "runs"
    error = _one_line_error(capsys, cli(bad, "--log_dir", str(log_dir)))
    assert error.startswith(f"error: {data / 'train'}") and "0003.png: unreadable or corrupt image" in error
    error = _one_line_error(capsys, cli(bad, "--mode", "train_avd", "--checkpoint",
                                        os.path.join(run_dir, "checkpoint.pth.tar"), "--log_dir", str(log_dir)))
    assert "0003.png: unreadable or corrupt image" in error
    assert os.listdir(log_dir) == []
    test_data = _corrupt_copy(overrides, tmp_path / "second", "test")
    error = _one_line_error(capsys, cli(overrides + [f"dataset_params.root_dir={test_data}"], "--mode",
                                        "reconstruction", "--checkpoint", os.path.join(run_dir, "checkpoint.pth.tar"),
                                        "--log_dir", str(log_dir)))
    assert f"{test_data / 'test'}" in error and "0003.png: unreadable or corrupt image" in error


def test_a_frame_size_the_networks_cannot_take_fails_at_start_up(trained, tmp_path, capsys):
    overrides, _ = trained
    log_dir = tmp_path / "runs"
    error = _one_line_error(capsys, cli(overrides + ["dataset_params.frame_shape=[100, 100, 3]",
                                                     f"dataset_params.root_dir={tmp_path / 'never'}"],
                                        "--log_dir", str(log_dir)))
    assert error.startswith("error: dataset_params.frame_shape: frame size 100x100 does not fit the networks")
    assert "sizes that work: multiples of 16 (16, 32, 48, ...); nearest to 100: 96 or 112" in error
    assert not os.path.exists(tmp_path / "never")  # checked before the data set is generated
    # Without frame_shape, the frames of the first video are measured (once the data exist).
    unsized = overrides + ["dataset_params.frame_shape=null", "dataset_params.synthetic.size=36",
                           f"dataset_params.root_dir={tmp_path / 'data36'}"]
    error = _one_line_error(capsys, cli(unsized, "--log_dir", str(log_dir)))
    assert f"the frames of {tmp_path / 'data36' / 'train' / '00000'}" in error and "36x36 does not fit" in error
    assert not os.path.exists(log_dir) or os.listdir(log_dir) == []


def _dead_pid():
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_resume_after_a_crash_applies_a_changed_lr_cleans_partial_files_and_logs_each_step_once(trained, tmp_path,
                                                                                                  capsys):
    """A run of 2 epochs (a checkpoint each) "crashes" after epoch 1's checkpoint: TensorBoard holds steps
    1-2, a kill -9 left partial checkpoint files. Resuming from checkpoint-00001 with a lower lr and
    other milestones applies them (one line says so), deletes the partial files of dead processes, and
    the TensorBoard curve has each step once (purge_step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides, _ = trained
    tps = overrides + ["model_params.dense_motion_params.motion=tps", "train_params.checkpoint_freq=1",
                       "train_params.evaluate_after_training=false"]
    assert run.main(cli(tps, "--log_dir", str(tmp_path / "runs"))) == 0
    run_dir = only_run_dir(tmp_path / "runs")
    left = [os.path.join(run_dir, f"checkpoint.pth.tar.partial-{_dead_pid()}"),
            os.path.join(run_dir, ".tmp-k2j4x9ab.pth.tar")]  # what earlier versions left
    alive = os.path.join(run_dir, f"checkpoint-00003.pth.tar.partial-{os.getppid()}")  # another process writing
    for path in left + [alive]:
        with open(path, "wb") as stream:
            stream.write(b"\0" * 1000)
    capsys.readouterr()
    changed = tps + ["train_params.lr_generator=1e-5", "train_params.epoch_milestones=[1]"]
    assert run.main(cli(changed, "--checkpoint", os.path.join(run_dir, "checkpoint-00001.pth.tar"))) == 0
    out = capsys.readouterr().out
    assert "removed 2 partial checkpoint file(s)" in out and not any(os.path.exists(path) for path in left)
    assert os.path.exists(alive)
    assert ("resuming with train_params.lr_generator 0.0004 -> 1e-05, train_params.epoch_milestones [5] -> [1]: "
            "applied (lr now 1e-06)") in out
    resumed = load_checkpoint(os.path.join(run_dir, "checkpoint.pth.tar"))
    for optimizer, scheduler in (("optimizer", "scheduler"), ("optimizer_bg", "scheduler_bg")):
        group = resumed[optimizer]["param_groups"][0]
        assert group["lr"] == pytest.approx(1e-6) and group["initial_lr"] == 1e-5
        assert dict(resumed[scheduler]["milestones"]) == {1: 1}
    events = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("loss/total")] == [1, 2]
    assert [event.step for event in events.Images("train/grid")] == [1, 2]
    assert events.Scalars("lr/generator")[-1].value == pytest.approx(1e-6)


def test_a_diverging_run_stops_in_one_line_and_writes_no_checkpoint(trained, tmp_path, capsys):
    overrides, _ = trained
    diverging = overrides + ["model_params.dense_motion_params.motion=tps", "train_params.lr_generator=1e30",
                             "train_params.max_steps_per_epoch=2"]
    error = _one_line_error(capsys, cli(diverging, "--log_dir", str(tmp_path)))
    assert re.search(r"^error: (max \|\w+\| .*|loss '\w+') is (nan|inf|-inf) at step [01] \(epoch 0\); training "
                     r"stopped, no checkpoint written for this epoch", error), error
    assert not glob.glob(os.path.join(str(tmp_path), "*", "*.pth.tar*"))


def _tiny_step_inputs(motion):
    from configuration import load_config
    from full_model import GeneratorFullModel
    from modules import build_networks
    from train import make_optimizers

    config = load_config(CONFIG, overrides=tiny_overrides("unused") + [
        f"model_params.dense_motion_params.motion={motion}"])
    networks = build_networks(config)
    params = dict(config["train_params"], bg_start=0)
    model = GeneratorFullModel(networks, params, losses={})
    x = {"source": torch.rand(2, 3, 32, 32), "driving": torch.rand(2, 3, 32, 32)}
    return networks, params, model, make_optimizers(networks, params), x


def test_non_finite_keypoints_are_named_before_the_cpab_fits_can_fail(monkeypatch):
    """A diverged detector's NaN keypoints: the step stops naming them, instead of the CPAB reference
    integrator failing first (``cannot convert float NaN to integer``)."""
    from train import training_step

    networks, params, model, optimizers, x = _tiny_step_inputs("cpab")
    detector = networks["kp_detector"]
    original = type(detector).forward
    monkeypatch.setattr(detector, "forward", lambda image: {"fg_kp": original(detector, image)["fg_kp"] * float("nan")})
    with pytest.raises(NonFiniteLossError, match=r"max \|keypoint\| \(kp_detector output\) is nan at step 5 "
                                                 r"\(epoch 1\)"):
        training_step(model, networks, optimizers, x, 1, 5, params, Distributed())


def test_a_non_finite_update_is_named_in_the_same_step():
    from train import training_step

    networks, params, model, optimizers, x = _tiny_step_inputs("tps")
    optimizer = optimizers[0]
    original = optimizer.step

    def overflowing_step(closure=None):
        original(closure)
        with torch.no_grad():
            networks["inpainting_network"].final.weight[0, 0, 0, 0] = float("inf")

    optimizer.step = overflowing_step
    with pytest.raises(NonFiniteLossError, match=r"max \|weight\| of inpainting_network after the update is inf "
                                                 r"at step 0 \(epoch 0\)"):
        training_step(model, networks, optimizers, x, 0, 0, params, Distributed())


@pytest.mark.parametrize("overrides", [
    [],  # the tiny config: no loss reads the prediction
    ["train_params.loss_weights.perceptual=[10, 0, 0, 0, 0]"],
    ["train_params.loss_weights.perceptual=[10, 0, 0, 0, 0]", "train_params.loss_weights.equivariance_value=0",
     "train_params.loss_weights.warp_loss=0"],
    ["train_params.loss_weights.perceptual=[10, 0, 0, 0, 0]", "model_params.common_params.bg=false"],
])
def test_unused_parameters_are_exactly_where_train_tells_ddp(overrides):
    """``unused_parameters`` (the find_unused_parameters flag) against the gradients of a real step,
    before and from bg_start."""
    import sys

    from configuration import load_config
    from full_model import GeneratorFullModel
    from modules import build_networks
    from train import unused_parameters

    sys.path.insert(0, os.path.join(ROOT, "tests", "losses"))
    from test_perceptual import tiny_vgg19_features

    from losses.perceptual import PerceptualLoss

    config = load_config(CONFIG, overrides=tiny_overrides("unused") + ["model_params.dense_motion_params.motion=tps"]
                         + overrides)
    networks = build_networks(config)
    params = config["train_params"]
    perceptual = any(params["loss_weights"]["perceptual"])
    losses = {"perceptual": PerceptualLoss(tiny_vgg19_features(), [1], 3, num_layers=1)} if perceptual else {}
    model = GeneratorFullModel(networks, params, losses=losses)
    x = {"source": torch.rand(2, 3, 32, 32), "driving": torch.rand(2, 3, 32, 32)}
    for epoch in (0, params["bg_start"]):
        model.zero_grad(set_to_none=True)
        losses, _ = model(x, epoch, 0)
        sum(value.mean() for value in losses.values()).backward()
        unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert bool(unused) == unused_parameters(networks, params, epoch), (epoch, unused[:3])
