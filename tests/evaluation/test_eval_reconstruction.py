"""run.py --mode reconstruction computes eval_params.metrics on its lossless strips; start-up checks."""
import hashlib
import json
import os

import pytest
import torch

import run
from configuration import load_config
from evaluation import evaluate_folders
from evaluation.extractors.face_identity import OpenFace

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "config", "synthetic-64.yaml")


def _tiny(data_dir):
    return [f"dataset_params.root_dir={data_dir}", "dataset_params.frame_shape=[32, 32, 3]",
            "dataset_params.synthetic.num_train=1", "dataset_params.synthetic.num_test=2",
            "dataset_params.synthetic.num_frames=3", "dataset_params.synthetic.size=32",
            "model_params.common_params.num_cpab=2", "model_params.generator_params.block_expansion=8",
            "model_params.generator_params.max_features=16", "model_params.dense_motion_params.block_expansion=8",
            "model_params.dense_motion_params.max_features=16", "model_params.dense_motion_params.num_blocks=2",
            "model_params.dense_motion_params.scale_factor=0.25", "model_params.dense_motion_params.cpab.gn_iter=1",
            "eval_params.metrics=[l1, aed]",
            "eval_params.allow_random_weights=true", "eval_params.weights.openface=missing/openface.pth"]


def test_reconstruction_computes_the_configured_metrics_and_records_the_checkpoint(tmp_path):
    from frames_dataset import dataset_from_config
    from modules import build_networks
    from reconstruction import reconstruction
    from synthetic import ensure_dataset

    weights = str(tmp_path / "openface.pth")
    stand_in = OpenFace()
    for name, value in stand_in.state_dict().items():
        if name.endswith("running_var"):
            value.uniform_(0.5, 1.5)
        elif value.dtype.is_floating_point:
            value.normal_(0.0, 0.1)
    torch.save(stand_in.state_dict(), weights)  # a local file in the published layout
    config = load_config(CONFIG, _tiny(str(tmp_path / "data")) + [f"eval_params.weights.openface={weights}"])
    ensure_dataset(config["dataset_params"])
    dataset = dataset_from_config(config["dataset_params"], is_train=False)
    out_dir = str(tmp_path / "run")
    checkpoint = str(tmp_path / "some" / "checkpoint.pth.tar")
    metrics = reconstruction(config, build_networks(config), dataset, out_dir, "cpu", progress=False,
                             checkpoint=checkpoint)
    saved = json.load(open(os.path.join(out_dir, "metrics.json")))
    assert saved["checkpoint"] == checkpoint and saved["compared"]["checkpoint"] == checkpoint
    assert 0 < saved["l1"] < 1 and len(saved["per_video"]) == 2  # the reconstruction's own L1, unchanged
    assert saved["aed"]["frames"] == 6 and set(saved["aed"]["per_video"]) == {"00000", "00001"}
    assert saved["aed"]["mean"] > 0 and saved["compared"]["image_size"] == [32, 32]
    recorded = saved["compared"]["extractors"]["identity"]["weights"]["openface"]
    assert recorded["path"] == weights and recorded["bytes"] == os.path.getsize(weights)
    assert recorded["sha256"] == hashlib.sha256(open(weights, "rb").read()).hexdigest()
    assert "akd" not in saved and metrics["aed"] == saved["aed"]
    # The same numbers as scoring the written strips with evaluate.py's function.
    png_dir = os.path.join(out_dir, "reconstruction", "png")
    again = evaluate_folders(dataset.split_dir, png_dir, ["aed"], "face", {"openface": weights}, progress=False)
    assert again["aed"]["mean"] == pytest.approx(saved["aed"]["mean"], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("override, expected", [
    ("eval_params.allow_random_weights=false", "eval_params.weights.openface: weight file 'missing/openface.pth'"),
    ("eval_params.metrics=[l1, mkr]", "mkr needs body keypoints"),
    ("eval_params.metrics=[l1, psnr]", "eval_params.metrics: unknown metric 'psnr'"),
])
def test_eval_params_are_checked_at_start_up(tmp_path, capsys, override, expected):
    argv = ["--config", CONFIG, "--device", "cpu", "--mode", "reconstruction", "--checkpoint",
            str(tmp_path / "absent.pth.tar"), "--log_dir", str(tmp_path / "runs")]
    for item in _tiny(str(tmp_path / "data")) + [override]:
        argv += ["--set", item]
    assert run.main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and expected in error
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "data")
