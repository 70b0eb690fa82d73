"""Config loader: every shipped YAML validates; bad keys, types and overrides are one-line errors."""
import glob
import os

import pytest
import yaml

from configuration import SCHEMA, ConfigError, Section, config_name, describe_schema, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "config", "*.yaml")))
VOX = os.path.join(ROOT, "config", "vox-256.yaml")


def _leaf_keys(section, prefix=""):
    for name, spec in section.keys.items():
        if isinstance(spec, Section):
            yield from _leaf_keys(spec, prefix + name + ".")
        else:
            yield prefix + name


def _get(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


def _write(tmp_path, data, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _vox_raw():
    with open(VOX, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def _error(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_all_shipped_configs_load():
    names = {config_name(path) for path in CONFIGS}
    assert {"vox-256", "taichi-256", "ted-384", "mgif-256", "synthetic-64", "synthetic-256"} <= names
    for path in CONFIGS:
        config = load_config(path)
        assert config["model_params"]["common_params"]["num_cpab"] > 0


def test_every_key_of_the_canonical_config_is_in_the_schema_and_back():
    raw = _vox_raw()
    config = load_config(VOX)
    for dotted in _leaf_keys(SCHEMA):
        top = dotted.split(".")
        node = config
        for part in top[:-1]:
            node = node[part]
            if node is None:
                break
        else:
            assert top[-1] in node, dotted
    assert raw["train_params"]["loss_weights"]["sam"] == config["train_params"]["loss_weights"]["sam"]


def test_every_shipped_key_carries_a_comment():
    for path in CONFIGS:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if ":" in line and not line.lstrip().startswith("#"):
                    assert "#" in line, f"{path}:{number} has no comment"


def test_official_per_dataset_values():
    taichi = load_config(os.path.join(ROOT, "config", "taichi-256.yaml"))
    assert taichi["model_params"]["dense_motion_params"]["max_iter"] == 200
    assert taichi["train_params"]["dropout_maxp"] == 0.7
    ted = load_config(os.path.join(ROOT, "config", "ted-384.yaml"))
    assert ted["train_params"]["lr_generator"] == pytest.approx(2.0e-4)
    mgif = load_config(os.path.join(ROOT, "config", "mgif-256.yaml"))
    assert mgif["model_params"]["common_params"]["bg"] is False
    assert mgif["dataset_params"]["id_sampling"] is False
    assert mgif["dataset_params"]["augmentation_params"]["crop_param"]["size"] == [256, 256]
    assert mgif["dataset_params"]["augmentation_params"]["resize_param"]["ratio"] == [0.9, 1.1]
    assert mgif["dataset_params"]["augmentation_params"]["jitter_param"]["hue"] == 0.5
    small = load_config(os.path.join(ROOT, "config", "synthetic-64.yaml"))
    assert small["dataset_params"]["synthetic"]["size"] == 64
    assert small["train_params"]["loss_weights"]["sam"] == 0


def test_defaults_are_filled(tmp_path):
    raw = {
        "dataset_params": {"root_dir": "data/x"},
        "model_params": {"common_params": {"num_cpab": 3}},
        "train_params": {"num_epochs": 1, "num_repeats": 1, "lr_generator": 1e-4, "batch_size": 2},
    }
    config = load_config(_write(tmp_path, raw))
    assert config["model_params"]["dense_motion_params"]["max_iter"] == 100
    assert config["train_params"]["loss_weights"]["perceptual"] == [10.0] * 5
    assert config["dataset_params"]["augmentation_params"]["flip_param"] is None
    assert config["dataset_params"]["synthetic"] is None
    assert config["visualizer_params"]["colormap"] == "gist_rainbow"
    assert isinstance(config["train_params"]["clip_grad_norm"], float)


def test_unknown_and_misspelt_keys(tmp_path):
    raw = _vox_raw()
    raw["train_params"]["lr_genrator"] = 1e-4
    message = _error(_write(tmp_path, raw, "typo.yaml"))
    assert "train_params.lr_genrator" in message
    assert "did you mean 'train_params.lr_generator'" in message
    assert "typo.yaml" in message

    raw = _vox_raw()
    raw["train_params"]["motion"] = "cpab"
    message = _error(_write(tmp_path, raw, "moved.yaml"))
    assert "model_params.dense_motion_params.motion" in message

    raw = _vox_raw()
    raw["model_params"]["common_params"]["num_tps"] = 10
    message = _error(_write(tmp_path, raw, "official.yaml"))
    assert "model_params.common_params.num_tps" in message


def test_wrong_type_and_choice(tmp_path):
    raw = _vox_raw()
    raw["train_params"]["batch_size"] = "eight"
    message = _error(_write(tmp_path, raw))
    assert "'train_params.batch_size' must be int" in message and "cfg.yaml" in message
    raw = _vox_raw()
    raw["dataset_params"]["id_sampling"] = 1
    assert "dataset_params.id_sampling" in _error(_write(tmp_path, raw))
    raw = _vox_raw()
    raw["model_params"]["dense_motion_params"]["fit_method"] = "lbfgs"
    assert "adam, gauss_newton" in _error(_write(tmp_path, raw))
    raw = _vox_raw()
    raw["model_params"]["dense_motion_params"]["basis"] = "orthonormal"
    assert "libcpab, vertex" in _error(_write(tmp_path, raw))
    raw = _vox_raw()
    raw["model_params"]["dense_motion_params"]["partial_tess_size"] = [4, 4, 4]
    assert "partial_tess_size' must have 2 items" in _error(_write(tmp_path, raw))
    raw = _vox_raw()
    raw["train_params"] = [1, 2]
    assert "'train_params' must be a mapping" in _error(_write(tmp_path, raw))


def test_float_written_without_a_dot_is_accepted(tmp_path):
    path = tmp_path / "lr.yaml"
    with open(VOX, encoding="utf-8") as handle:
        path.write_text(handle.read().replace("lr_generator: 1.0e-4", "lr_generator: 1e-4"))
    assert load_config(str(path))["train_params"]["lr_generator"] == pytest.approx(1e-4)


def test_missing_required(tmp_path):
    raw = _vox_raw()
    del raw["dataset_params"]["root_dir"]
    message = _error(_write(tmp_path, raw))
    assert "missing required key 'dataset_params.root_dir'" in message
    raw = _vox_raw()
    del raw["model_params"]
    assert "missing required section 'model_params'" in _error(_write(tmp_path, raw))
    raw = _vox_raw()
    raw["dataset_params"]["augmentation_params"]["crop_param"] = {}
    assert "dataset_params.augmentation_params.crop_param.size" in _error(_write(tmp_path, raw))


def test_bad_files(tmp_path):
    assert "not found" in _error(str(tmp_path / "nope.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("train_params:\n  batch_size: [1, 2\n")
    message = _error(str(broken))
    assert "broken.yaml" in message and "not valid YAML" in message
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    assert "top level must be a mapping" in _error(str(listing))


def test_overrides():
    config = load_config(VOX, ["train_params.batch_size=4", "dataset_params.frame_shape=[64, 64, 3]",
                               "train_params.amp=true", "dataset_params.synthetic.seed=7",
                               "train_params.max_steps_per_epoch=null"])
    assert config["train_params"]["batch_size"] == 4
    assert config["dataset_params"]["frame_shape"] == [64, 64, 3]
    assert config["train_params"]["amp"] is True
    assert config["dataset_params"]["synthetic"]["seed"] == 7
    assert config["dataset_params"]["synthetic"]["num_frames"] == 32
    later = load_config(VOX, ["train_params.batch_size=4", "train_params.batch_size=2"])
    assert later["train_params"]["batch_size"] == 2
    assert load_config(VOX)["train_params"]["batch_size"] == 8


def test_bad_overrides():
    message = _error(VOX, ["train_params.batch_size"])
    assert "expected dotted.key=value" in message
    assert "dotted.key=value" in _error(VOX, ["=3"])
    assert "dotted.key=value" in _error(VOX, ["train_params..batch_size=3"])
    assert "not valid YAML" in _error(VOX, ["train_params.scales=[1, 2"])
    message = _error(VOX, ["train_params.batch_sise=3"])
    assert "--set train_params.batch_sise" in message and "did you mean 'train_params.batch_size'" in message
    message = _error(VOX, ["train_params.batch_size=big"])
    assert "--set train_params.batch_size" in message and "must be int" in message
    assert "is a value, not a section" in _error(VOX, ["train_params.batch_size.x=1"])


def test_describe_schema_lists_every_key():
    lines = describe_schema()
    assert any(line.startswith("train_params.lr_generator  float  required") for line in lines)
    assert len(lines) >= len(list(_leaf_keys(SCHEMA)))
