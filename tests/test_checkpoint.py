"""checkpoint.py: atomic checkpoints loadable with weights_only=True, config comparison, loading into the
networks with one-line errors, and where a run given --checkpoint continues."""
import glob
import os
import pickle

import pytest
import torch
import yaml

import checkpoint as checkpoints
from checkpoint import CheckpointError, first_difference, load_checkpoint, save_checkpoint


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
    with pytest.raises((pickle.PicklingError, AttributeError)):  # an object torch.save cannot pickle
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


def test_open_checkpoint_checks_the_config_and_says_where_the_run_goes(tmp_path):
    config = {"model_params": {"a": [1, 2], "b": None, "c": "x"}, "train_params": {"num_epochs": 3}}
    _, state = _state()
    path = str(tmp_path / "run" / "checkpoint.pth.tar")
    save_checkpoint(path, state)
    checkpoint, resume = checkpoints.open_checkpoint(path, config, "train")
    assert checkpoint["epoch"] == 3 and resume == os.path.dirname(os.path.abspath(path))
    assert checkpoints.open_checkpoint(path, config, "reconstruction")[1] is None
    assert checkpoints.open_checkpoint(path, config, "train_avd")[1] is None        # from the main networks
    save_checkpoint(path, dict(state, optimizer_avd={}))
    assert checkpoints.open_checkpoint(path, config, "train_avd")[1] == os.path.dirname(os.path.abspath(path))
    other = {"model_params": {"a": [1, 3], "b": None, "c": "x"}}
    with pytest.raises(CheckpointError, match=r"another config: model_params.a is \[1, 2\] there but \[1, 3\]"):
        checkpoints.open_checkpoint(path, other, "train")
    save_checkpoint(path, {"kp_detector": {}})
    with pytest.raises(CheckpointError, match="holds no config"):
        checkpoints.open_checkpoint(path, config, "train")


def test_resumed_config_path_keeps_a_different_config_next_to_the_first(tmp_path):
    config = {"train_params": {"num_epochs": 3}}
    assert checkpoints.resumed_config_path(str(tmp_path), config) == str(tmp_path / "config.yaml")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert checkpoints.resumed_config_path(str(tmp_path), config) == str(tmp_path / "config.yaml")
    other = checkpoints.resumed_config_path(str(tmp_path), {"train_params": {"num_epochs": 4}})
    assert os.path.basename(other).startswith("config-resumed-") and other.endswith(".yaml")


def test_load_network_states_maps_the_names_and_gives_one_line_errors(tmp_path):
    source, state = _state()
    target = {"kp_detector": torch.nn.Linear(3, 2), "bg_predictor": None}
    assert set(checkpoints.network_states(state)) == {"kp_detector"}
    checkpoints.load_network_states(target, state, "ck.pth", ("kp_detector", "bg_predictor"))
    assert torch.equal(target["kp_detector"].weight, source.weight)
    with pytest.raises(CheckpointError, match="^checkpoint ck.pth has no 'avd_network' weights$"):
        checkpoints.load_network_states({"avd_network": torch.nn.Linear(3, 2)}, state, "ck.pth", ("avd_network",))
    with pytest.raises(CheckpointError) as error:
        checkpoints.load_network_states({"kp_detector": torch.nn.Linear(4, 2)}, state, "ck.pth", ("kp_detector",),
                                        config_path="tiny.yaml")
    message = str(error.value)
    assert message == ("checkpoint ck.pth does not match config tiny.yaml: kp_detector.weight has shape (2, 3) in "
                       "the checkpoint but (2, 4) in this config")
    # Keys missing or extra, counted after the first; weights for a network the config does not build.
    with pytest.raises(CheckpointError, match=r"kp_detector.weight is missing from the checkpoint \(and 3 more\)$"):
        checkpoints.load_network_states({"kp_detector": torch.nn.Linear(3, 2)},
                                        dict(state, kp_detector={"w": torch.zeros(2, 3), "b": torch.zeros(2)}),
                                        "ck.pth", ("kp_detector",))
    with pytest.raises(CheckpointError, match="it has 'kp_detector' weights but the config builds no kp_detector"):
        checkpoints.load_network_states({"kp_detector": None}, state, "ck.pth", ("kp_detector",))


def test_state_dict_differences_name_every_key_that_does_not_fit():
    expected = {"a": torch.zeros(2), "b": torch.zeros(3, 1), "c": torch.zeros(1)}
    found = {"a": torch.zeros(2), "b": torch.zeros(3, 2), "d": torch.zeros(1)}
    assert checkpoints.state_dict_differences(expected, found) == [
        "b has shape (3, 2) in the checkpoint but (3, 1) in this config", "c is missing from the checkpoint",
        "d of the checkpoint is not in this config's network"]
    assert checkpoints.state_dict_differences(expected, dict(expected)) == []


def test_checkpoint_layouts_this_frameworks_tpsmms_and_neither(tmp_path):
    _, state = _state()
    assert checkpoints.checkpoint_layout(state, "ck.pth") == checkpoints.FRAMEWORK_LAYOUT
    upstream = {"kp_detector": {}, "dense_motion_network": {}, "inpainting_network": {}, "optimizer": {}, "epoch": 9}
    assert checkpoints.checkpoint_layout(upstream, "ck.pth") == checkpoints.UPSTREAM_LAYOUT
    assert set(checkpoints.network_states(upstream)) == {"kp_detector", "dense_motion_network", "inpainting_network"}
    with pytest.raises(CheckpointError, match="^checkpoint ck.pth holds no config and is not in TPSMM's layout"):
        checkpoints.checkpoint_layout({"kp_detector": {}, "epoch": 9}, "ck.pth")
    # An upstream checkpoint that does not fit says which config TPSMM's models need.
    upstream["kp_detector"] = {"weight": torch.zeros(2, 3)}
    with pytest.raises(CheckpointError, match=r"kp_detector.bias is missing .*config/tpsmm-\*.yaml \(motion: tps\)$"):
        checkpoints.load_network_states({"kp_detector": torch.nn.Linear(3, 2)}, upstream, "ck.pth", ("kp_detector",))


def test_init_summary_line_counts_copied_and_fresh_tensors_per_network():
    record = {"init_from": "/m/vox.pth.tar", "layout": checkpoints.UPSTREAM_LAYOUT,
              "networks": {"kp_detector": {"copied": 122, "fresh": [], "unused": []},
                           "dense_motion_network": {"copied": 49, "fresh": ["maps.weight"] * 10, "unused": []}}}
    assert checkpoints.init_summary_line(record) == (
        "init_from /m/vox.pth.tar (TPSMM's / official CPABMM's layout): tensors copied/fresh: kp_detector 122/0, "
        "dense_motion_network 49/10")


def test_load_training_states_resumes_and_names_a_missing_entry():
    _, state = _state()
    optimizer = torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
    checkpoints.load_training_states(state, "ck.pth", {"optimizer": optimizer, "optimizer_bg": None})
    assert optimizer.param_groups[0]["betas"] == (0.5, 0.999)
    with pytest.raises(CheckpointError, match="has no 'scheduler_bg' state: cannot resume"):
        checkpoints.load_training_states(state, "ck.pth", {"scheduler_bg": optimizer})


def test_save_epoch_writes_the_latest_and_numbered_copies(tmp_path):
    _, state = _state()
    checkpoints.save_epoch(str(tmp_path), state, 1, checkpoint_freq=2)
    assert os.listdir(tmp_path) == [checkpoints.CHECKPOINT_NAME]
    checkpoints.save_epoch(str(tmp_path), state, 2, checkpoint_freq=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-00002.pth.tar", "checkpoint.pth.tar"]


def test_checkpoints_get_the_usual_file_mode_and_clearly_temporary_partial_names(tmp_path, monkeypatch):
    _, state = _state()
    path = str(tmp_path / "checkpoint.pth.tar")
    seen = []
    original = torch.save

    def spying_save(obj, stream):
        seen.extend(os.listdir(tmp_path))
        original(obj, stream)

    monkeypatch.setattr(checkpoints.torch, "save", spying_save)
    previous = os.umask(0o022)
    try:
        save_checkpoint(path, state)
    finally:
        os.umask(previous)
    assert os.stat(path).st_mode & 0o777 == 0o644  # like any other output (mkstemp's files are 0600)
    assert seen == [f"checkpoint.pth.tar.partial-{os.getpid()}"]  # never matches *.pth.tar
    assert os.listdir(tmp_path) == ["checkpoint.pth.tar"]


def _full_disk_save(obj, stream):
    """What torch.save does on a full disk: the writer's OSError, then the zip writer's RuntimeError."""
    stream.write(b"\0" * 100)
    try:
        raise OSError(28, "No space left on device")
    except OSError:  # implicitly chained (its __context__), as torch's zip writer does: hence no "from"
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 231593088 vs 231592980")  # noqa: B904


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _, state = _state()
    path = str(tmp_path / "checkpoint.pth.tar")
    save_checkpoint(path, state)
    monkeypatch.setattr(checkpoints.torch, "save", _full_disk_save)
    with pytest.raises(checkpoints.CheckpointWriteError) as error:
        save_checkpoint(path, dict(state, epoch=4))
    assert str(error.value) == (f"cannot write checkpoint {path}: no space left on device (the previous "
                                f"checkpoint is kept)")
    assert isinstance(error.value, OSError) and error.value.errno == 28
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 3 and os.listdir(tmp_path) == ["checkpoint.pth.tar"]


def test_a_write_killed_with_sigkill_leaves_a_partial_file_the_next_start_removes(tmp_path):
    """kill -9 in the middle of torch.save (a real process): the checkpoint stays as it was, the partial
    file does not look like a checkpoint, and remove_partial_files (run on resume) deletes it."""
    import signal
    import subprocess
    import sys
    import time

    path = str(tmp_path / "checkpoint.pth.tar")
    _, state = _state()
    save_checkpoint(path, state)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import checkpoint; "
              "checkpoint.save_checkpoint(sys.argv[2], {'w': torch.zeros(150_000_000)})")  # 600 MB
    child = subprocess.Popen([sys.executable, "-c", script, root, path])
    partial = f"{path}.partial-{child.pid}"
    deadline = time.monotonic() + 120
    while not (os.path.exists(partial) and os.path.getsize(partial) > 1_000_000) and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert os.path.exists(partial), "the write finished or never started"
    assert glob.glob(str(tmp_path / "*.pth.tar")) == [path]
    assert load_checkpoint(path)["epoch"] == 3
    removed = checkpoints.remove_partial_files(str(tmp_path))
    assert [name for name, _ in removed] == [partial] and os.listdir(tmp_path) == ["checkpoint.pth.tar"]
