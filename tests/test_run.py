"""run.py: command line and run-directory naming (no training here; see test_train.py)."""
import datetime

import pytest

import run


def test_run_dir_name_is_config_tag_timestamp_without_spaces():
    now = datetime.datetime(2026, 1, 2, 3, 4, 5)
    assert run.run_dir_name("config/vox-256.yaml", "train", now) == "vox-256-train-20260102-030405"
    with pytest.raises(ValueError, match="--tag"):
        run.run_dir_name("config/vox-256.yaml", "two words", now)


def test_command_line_defaults_and_repeatable_overrides():
    args = run.parse_args(["--config", "c.yaml", "--set", "a.b=1", "--set", "c=[1, 2]"])
    assert (args.mode, args.log_dir, args.checkpoint, args.device, args.tag) == ("train", "runs", None, None, None)
    assert args.overrides == ["a.b=1", "c=[1, 2]"]
    with pytest.raises(SystemExit):
        run.parse_args(["--config", "c.yaml", "--mode", "animate"])


def test_single_process_setup_uses_cpu_when_asked(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist, device = run.setup_distributed("cpu")
    assert (dist.rank, dist.world_size, dist.initialized, device.type) == (0, 1, False, "cpu")
