"""Synthetic generator: layout, byte-identical output per seed, motion, mp4 writer, on-demand generation."""
import json
import os

import numpy as np
import pytest

import synthetic
from frames_dataset import FramesDataset, count_frames, read_frames

TINY = {"seed": 3, "num_train": 3, "num_test": 2, "num_frames": 5, "size": 32, "format": "frames"}


def _files(root):
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, root)] = handle.read()
    return found


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic") / "tiny")
    synthetic.generate_dataset(root, workers=1, **TINY)
    return root


def test_layout_and_parameters(tiny):
    assert sorted(os.listdir(os.path.join(tiny, "train"))) == ["00000", "00001", "00002"]
    assert sorted(os.listdir(os.path.join(tiny, "test"))) == ["00000", "00001"]
    assert sorted(os.listdir(os.path.join(tiny, "train", "00001"))) == [f"{i:04d}.png" for i in range(5)]
    with open(os.path.join(tiny, "synthetic.json"), encoding="utf-8") as handle:
        assert json.load(handle) == TINY
    video = read_frames(os.path.join(tiny, "test", "00001"), frame_shape=(32, 32, 3))
    assert video.shape == (5, 32, 32, 3)
    assert not any(name.startswith("tiny.tmp") for name in os.listdir(os.path.dirname(tiny)))
    dataset = FramesDataset(tiny, frame_shape=[32, 32, 3], id_sampling=False, is_train=True, augmentation_params=None)
    assert len(dataset) == 3


def test_same_seed_gives_identical_bytes_whatever_the_workers(tiny, tmp_path):
    again = str(tmp_path / "again")
    synthetic.generate_dataset(again, workers=2, **TINY)
    assert _files(again) == _files(tiny)
    other = str(tmp_path / "other")
    synthetic.generate_dataset(other, workers=1, **{**TINY, "seed": 4})
    first, second = _files(tiny), _files(other)
    assert first.keys() == second.keys()
    assert first[os.path.join("train", "00000", "0000.png")] != second[os.path.join("train", "00000", "0000.png")]


def test_videos_move_and_differ(tiny):
    first = read_frames(os.path.join(tiny, "train", "00000"))
    second = read_frames(os.path.join(tiny, "train", "00001"))
    assert np.abs(first[0] - first[-1]).mean() > 0.02
    assert np.abs(first[0] - second[0]).mean() > 0.05
    assert 0.05 < first.mean() < 0.95 and first.std() > 0.05


def test_render_is_deterministic_and_uint8():
    a = synthetic.render_video(1, 0, 7, num_frames=3, size=32)
    b = synthetic.render_video(1, 0, 7, num_frames=3, size=32)
    assert a.dtype == np.uint8 and a.shape == (3, 32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, synthetic.render_video(1, 1, 7, num_frames=3, size=32))


def test_mp4_format_matches_the_frames(tiny, tmp_path):
    pytest.importorskip("imageio_ffmpeg")  # the mp4 writer's ffmpeg; optional where only the GPU stack is installed
    root = str(tmp_path / "mp4")
    synthetic.generate_dataset(root, workers=1, **{**TINY, "format": "mp4", "num_train": 1, "num_test": 1})
    assert sorted(os.listdir(os.path.join(root, "train"))) == ["00000.mp4"]
    path = os.path.join(root, "train", "00000.mp4")
    assert count_frames(path) == 5
    lossy = read_frames(path)
    lossless = read_frames(os.path.join(tiny, "train", "00000"))
    assert lossy.shape == lossless.shape
    assert np.abs(lossy - lossless).mean() < 0.03
    again = str(tmp_path / "mp4-again")
    synthetic.generate_dataset(again, workers=1, **{**TINY, "format": "mp4", "num_train": 1, "num_test": 1})
    assert _files(again) == _files(root)  # single-threaded, -bitexact libx264: identical bytes


def test_existing_root_and_bad_parameters(tiny, tmp_path):
    with pytest.raises(FileExistsError, match="--force"):
        synthetic.generate_dataset(tiny, **TINY)
    with pytest.raises(ValueError, match="synthetic.format"):
        synthetic.generate_dataset(str(tmp_path / "x"), **{**TINY, "format": "avi"})
    with pytest.raises(ValueError, match="synthetic.size"):
        synthetic.generate_dataset(str(tmp_path / "x"), **{**TINY, "size": 8})
    with pytest.raises(ValueError, match="even"):
        synthetic.generate_dataset(str(tmp_path / "x"), **{**TINY, "size": 33, "format": "mp4"})
    assert not os.path.exists(tmp_path / "x")


def test_ensure_dataset(tmp_path, capsys):
    root = str(tmp_path / "nested" / "made")
    params = {"root_dir": root, "synthetic": {**TINY, "num_train": 1, "num_test": 1, "num_frames": 2}}
    assert synthetic.ensure_dataset(params, workers=1) is True
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and root in lines[0] and "1 train + 1 test" in lines[0]
    assert synthetic.ensure_dataset(params, workers=1) is False
    assert capsys.readouterr().out == ""
    assert synthetic.ensure_dataset({"root_dir": str(tmp_path / "real"), "synthetic": None}) is False
    assert not os.path.exists(tmp_path / "real")


def test_command_line(tmp_path, capsys):
    root = tmp_path / "cli"
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config", "synthetic-64.yaml")
    overrides = [f"dataset_params.root_dir={root}", "dataset_params.synthetic.num_train=1",
                 "dataset_params.synthetic.num_test=1", "dataset_params.synthetic.num_frames=2",
                 "dataset_params.synthetic.size=32"]
    arguments = ["--config", config, "--workers", "1"] + [item for o in overrides for item in ("--set", o)]
    assert synthetic.main(arguments) == 0
    assert os.listdir(root / "train") == ["00000"]
    assert "Generated" in capsys.readouterr().out
    assert synthetic.main(arguments) == 0
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        synthetic.main(["--config", config, "--set", "dataset_params.synthetic.formt=mp4"])
    assert info.value.code == 2
    assert "did you mean 'dataset_params.synthetic.format'" in capsys.readouterr().err
