"""Config loader: every shipped YAML validates; bad keys, types and overrides are one-line errors."""
import glob
import os

import pytest
import yaml

import configuration
from configuration import (
    SCHEMA,
    ConfigError,
    Key,
    Section,
    comment_mismatches,
    config_name,
    describe_schema,
    load_config,
)

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
    assert taichi["model_params"]["dense_motion_params"]["cpab"]["max_iter"] == 200
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
    assert config["model_params"]["dense_motion_params"]["cpab"]["max_iter"] == 100
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
    raw["model_params"]["dense_motion_params"]["cpab"]["fit_method"] = "lbfgs"
    assert "adam, gauss_newton" in _error(_write(tmp_path, raw))
    raw = _vox_raw()
    raw["model_params"]["dense_motion_params"]["cpab"]["basis"] = "orthonormal"
    assert "libcpab, vertex" in _error(_write(tmp_path, raw))
    raw = _vox_raw()
    raw["model_params"]["dense_motion_params"]["cpab"]["partial_tess_size"] = [4, 4, 4]
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
    binary = tmp_path / "weights.yaml"  # e.g. a checkpoint given as --config
    binary.write_bytes(b"PK\x03\x04\x14\x00\x00\x08\x08\x00\xa1\xbe\x81\xff" + bytes(range(256)))
    message = _error(str(binary))
    assert message == f"{binary}: not a YAML text file (byte 10 is not UTF-8: a binary file?)"


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


def test_every_schema_entry_has_help_and_every_shipped_comment_starts_with_it():
    def entries(section, prefix=""):
        for name, spec in section.keys.items():
            yield prefix + name, spec
            if isinstance(spec, Section):
                yield from entries(spec, prefix + name + ".")

    missing = [dotted for dotted, spec in entries(SCHEMA) if not spec.help]
    assert not missing, missing
    for path in CONFIGS:
        assert comment_mismatches(path) == []


def test_a_comment_that_drifts_from_the_help_text_is_reported(tmp_path):
    with open(VOX, encoding="utf-8") as handle:
        text = handle.read()
    drifted = tmp_path / "drifted.yaml"
    drifted.write_text(text.replace("# hourglass depth", "# depth of the hourglass")
                       .replace("  batch_size: 8                     # pairs per iteration", "  batch_size: 8"))
    problems = comment_mismatches(str(drifted))
    assert len(problems) == 2
    assert "model_params.dense_motion_params.num_blocks" in problems[0] and "'hourglass depth'" in problems[0]
    assert "train_params.batch_size" in problems[1] and "drifted.yaml:" in problems[1]
    # A dataset-specific note after the help text is fine.
    noted = tmp_path / "noted.yaml"
    noted.write_text(text.replace("# hourglass depth", "# hourglass depth (shallower here)"))
    assert comment_mismatches(str(noted)) == []


@pytest.mark.parametrize("key, value, expected", [
    ("train_params.num_epochs", -3, "'train_params.num_epochs' must be in [1, inf), got -3"),
    ("train_params.batch_size", 0, "'train_params.batch_size' must be in [1, inf), got 0"),
    ("train_params.lr_generator", float("nan"), "'train_params.lr_generator' must be a finite number, got nan"),
    ("train_params.lr_generator", 0.0, "'train_params.lr_generator' must be in (0, inf), got 0.0"),
    ("train_params.dropout_maxp", 1.5, "'train_params.dropout_maxp' must be in [0, 1], got 1.5"),
    ("train_params.scales", [1.0, 0.0], "'train_params.scales' (every item) must be in (0, 1], got 0.0"),
    ("train_params.loss_weights.perceptual", [10, 10, -1, 10, 10],
     "'train_params.loss_weights.perceptual' (every item) must be in [0, inf), got -1.0"),
    ("model_params.dense_motion_params.scale_factor", 2.0,
     "'model_params.dense_motion_params.scale_factor' must be in (0, 1], got 2.0"),
    ("model_params.dense_motion_params.cpab.max_iter", -1,
     "'model_params.dense_motion_params.cpab.max_iter' must be in [0, inf), got -1"),
    ("dataset_params.augmentation_params.jitter_param.hue", 0.6,
     "'dataset_params.augmentation_params.jitter_param.hue' must be in [0, 0.5], got 0.6"),
    ("train_params.clip_grad_norm", float("inf"), "'train_params.clip_grad_norm' must be a finite number, got inf"),
])
def test_out_of_range_values_are_one_line_errors_naming_the_key_and_the_file(tmp_path, key, value, expected):
    raw = _vox_raw()
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    message = _error(_write(tmp_path, raw, "ranges.yaml"))
    assert message.endswith(expected) and "ranges.yaml" in message
    # The same through an override (YAML spells NaN and infinity .nan and .inf): the message names the --set.
    text = ".nan" if value != value else ".inf" if value == float("inf") else value
    message = _error(VOX, [f"{key}={text}"])
    assert message.endswith(expected) and f"(--set {key})" in message


def test_boundary_and_null_values_are_accepted():
    config = load_config(VOX, ["train_params.num_epochs=1", "train_params.dropout_maxp=1",
                               "train_params.dataloader_workers=0", "train_params.clip_grad_norm=null",
                               "train_params.max_steps_per_epoch=null",
                               "model_params.dense_motion_params.scale_factor=1",
                               "model_params.dense_motion_params.cpab.theta_init=-0.5"])
    assert config["train_params"]["clip_grad_norm"] is None and config["train_params"]["dropout_maxp"] == 1.0


def test_every_numeric_key_has_a_range_or_is_unbounded_on_purpose():
    unbounded = {"model_params.dense_motion_params.cpab.theta_init"}  # any real constant

    def leaves(section, prefix=""):
        for name, spec in section.keys.items():
            if isinstance(spec, Section):
                yield from leaves(spec, prefix + name + ".")
            else:
                yield prefix + name, spec

    numeric = {dotted for dotted, spec in leaves(SCHEMA)
               if any(t in ("int", "float", "list[int]", "list[float]") for t in spec.types.split("|"))}
    without = {dotted for dotted, spec in leaves(SCHEMA) if dotted in numeric and not spec.interval}
    assert without == unbounded
    with pytest.raises(ValueError, match="bad interval"):
        Key("int", 1, "x", interval="1, 2")


def test_describe_and_check_from_the_command_line(tmp_path, capsys):
    assert configuration.main(["--describe"]) == 0
    out = capsys.readouterr().out
    assert "train_params.batch_size  int  required  in [1, inf)  pairs per iteration" in out
    assert configuration.main(["--check"] + CONFIGS) == 0
    raw = _vox_raw()
    raw["train_params"]["num_epochs"] = -3
    assert configuration.main(["--check", _write(tmp_path, raw, "bad.yaml")]) == 1
    assert "num_epochs' must be in [1, inf), got -3" in capsys.readouterr().err


def test_a_cpab_key_at_its_former_place_points_to_its_section(tmp_path):
    raw = _vox_raw()
    raw["model_params"]["dense_motion_params"]["fit_method"] = "adam"
    message = _error(_write(tmp_path, raw, "old-layout.yaml"))
    assert "unknown key 'model_params.dense_motion_params.fit_method'" in message
    assert "it belongs under 'model_params.dense_motion_params.cpab.fit_method'" in message
