"""checkpoint.py: atomic checkpoints loadable with weights_only=True, config comparison, loading into the
networks with one-line errors, and where a run given --checkpoint continues."""
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
    assert message.startswith("checkpoint ck.pth does not match config tiny.yaml: kp_detector: size mismatch")
    assert "\n" not in message


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
