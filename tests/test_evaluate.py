"""evaluate.py end to end on tiny synthetic folders (random-weight or stand-in extractors, CPU)."""
import json
import os

import imageio.v2 as imageio
import numpy as np
import pytest

import evaluate
from evaluation import extractors
from evaluation.extractors import EmbeddingExtractor, KeypointExtractor


def _write_pair(tmp_path, videos=2, frames=3, size=24, shift=0, seed=0):
    """Real videos as frame folders, generated ones as FOMM strips ``<name>.mp4.png`` (+ ``shift`` grey levels)."""
    rng = np.random.default_rng(seed)
    real, generated = tmp_path / "real", tmp_path / "generated"
    os.makedirs(generated, exist_ok=True)
    clips = {}
    for index in range(videos):
        clip = rng.integers(20, 200, (frames, size, size, 3), dtype=np.uint8)
        clips[f"v{index}"] = clip
        os.makedirs(real / f"v{index}", exist_ok=True)
        for t, frame in enumerate(clip):
            imageio.imwrite(real / f"v{index}" / f"{t:04d}.png", frame)
        imageio.imwrite(generated / f"v{index}.mp4.png", np.concatenate(list(clip + shift), axis=1))
    return str(real), str(generated), clips


def _run(argv, capsys):
    code = evaluate.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_identical_videos_score_zero_and_the_report_says_what_was_compared(tmp_path, capsys):
    real, generated, clips = _write_pair(tmp_path)
    out = str(tmp_path / "report" / "metrics.json")
    code, stdout, _ = _run(["--real", real, "--generated", generated, "--metrics", "l1,aed", "--domain", "face",
                            "--allow_random_weights", "--weights_dir", str(tmp_path / "none"), "--device", "cpu",
                            "--out", out, "--quiet"], capsys)
    assert code == 0 and "RANDOM WEIGHTS" in stdout
    report = json.load(open(out))
    assert set(report) == {"l1", "aed", "compared"}
    for metric in ("l1", "aed"):
        assert report[metric]["mean"] == 0.0 and report[metric]["frames"] == 6
        assert set(report[metric]["per_video"]) == {"v0", "v1"}
        assert report[metric]["per_video"]["v1"] == {"mean": 0.0, "frames": 3, "skipped_frames": 0}
    assert "squared L2" in report["aed"]["units"] and "[0, 4]" in report["aed"]["units"]
    compared = report["compared"]
    assert compared["image_size"] == [24, 24] and compared["videos"] == 2 and compared["frames"] == 6
    assert compared["real"] == os.path.abspath(real) and compared["generated"] == os.path.abspath(generated)
    assert compared["extractors"]["identity"]["weights"]["openface"] == {"path": None, "random": True}
    assert compared["random_weights"] == ["openface"]


def test_l1_of_a_uniform_shift_is_exact(tmp_path, capsys):
    real, generated, _ = _write_pair(tmp_path, shift=17)
    out = str(tmp_path / "metrics.json")
    assert _run(["--real", real, "--generated", generated, "--out", out, "--quiet"], capsys)[0] == 0
    report = json.load(open(out))
    assert set(report) == {"l1", "compared"}
    assert report["l1"]["mean"] == pytest.approx(17 / 255, abs=1e-12)


class BrightestPixel(KeypointExtractor):
    """Stand-in keypoint extractor (the interface is pluggable): keypoint 0 = the brightest pixel, found
    when brighter than 250; keypoint 1 = never found."""

    name = "brightest pixel"
    num_keypoints = 2

    def __init__(self, *weights, device="cpu", batch_size=16):
        super().__init__(device, batch_size)

    def extract(self, frames):
        grey = frames.astype(np.float64).mean(axis=3)
        flat = grey.reshape(len(frames), -1).argmax(axis=1)
        points = np.zeros((len(frames), 2, 2))
        points[:, 0] = np.stack((flat % frames.shape[2], flat // frames.shape[2]), axis=1)
        found = np.zeros((len(frames), 2), dtype=bool)
        found[:, 0] = grey.reshape(len(frames), -1).max(axis=1) > 250
        return points, found


class MeanColour(EmbeddingExtractor):
    name = "mean colour"
    dim = 3

    def __init__(self, *weights, device="cpu", batch_size=16):
        super().__init__(device, batch_size)

    def extract(self, frames):
        return frames.astype(np.float64).mean(axis=(1, 2)) / 255.0


def test_body_metrics_through_pluggable_extractors(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(extractors.EXTRACTORS, ("body", "keypoints"), (BrightestPixel, ("rtpose",)))
    monkeypatch.setitem(extractors.EXTRACTORS, ("body", "identity"), (MeanColour, ("reid",)))
    real, generated = tmp_path / "real", tmp_path / "generated"
    os.makedirs(real)
    os.makedirs(generated)
    clip = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    clip[:, 5, 3] = 255                # the real keypoint at (x, y) = (3, 5) in both frames
    fake = np.zeros_like(clip)
    fake[0, 8, 7] = 255                # frame 0: at (7, 8): |dx| = 4, |dy| = 3 -> AKD 3.5
    fake[1] = 10                       # frame 1: nothing bright -> missing: MKR 1 (1 of 1), AKD not scored
    imageio.imwrite(real / "clip.png", np.concatenate(list(clip), axis=1))
    imageio.imwrite(generated / "clip.mp4.png", np.concatenate(list(fake), axis=1))
    out = str(tmp_path / "body.json")
    code, _, _ = _run(["--real", str(real), "--generated", str(generated), "--domain", "body", "--metrics",
                       "akd,mkr,aed", "--allow_random_weights", "--weights_dir", str(tmp_path), "--out", out,
                       "--quiet"], capsys)
    assert code == 0
    report = json.load(open(out))
    assert report["akd"]["mean"] == 3.5 and report["akd"]["frames"] == 1 and report["akd"]["skipped_frames"] == 1
    assert report["mkr"]["mean"] == 0.5 and report["mkr"]["per_video"]["clip"]["frames"] == 2
    assert report["akd"]["skipped"] == {"frames_without_keypoints_in_real": 0,
                                        "frames_without_keypoints_in_generated": 1}
    # Mean colours: a one-pixel dot 1/256 per channel (real frames, generated frame 0), 10/255 (generated frame 1).
    assert report["aed"]["mean"] == pytest.approx((0 + 3 * (10 / 255 - 1 / 256) ** 2) / 2, rel=1e-9)
    assert report["compared"]["extractors"]["keypoints"]["name"] == "brightest pixel"


@pytest.mark.parametrize("argv, expected", [
    (["--metrics", "l1,psnr"], "--metrics: unknown metric 'psnr'"),
    (["--metrics", "mkr", "--domain", "face"], "mkr needs body keypoints"),
    (["--metrics", "aed", "--domain", "face"], "--weight openface=...: weight file"),
    (["--weight", "nose=x.pth"], "--weight 'nose=x.pth': expected KEY=PATH"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, expected):
    real, generated, _ = _write_pair(tmp_path, videos=1, frames=1)
    code, _, stderr = _run(["--real", real, "--generated", generated, "--weights_dir", str(tmp_path / "none"),
                            "--out", str(tmp_path / "m.json"), "--quiet"] + argv, capsys)
    assert code == 1 and stderr.startswith("error: ") and expected in stderr and stderr.count("\n") == 1
    assert not os.path.exists(tmp_path / "m.json")


def test_length_mismatch_is_a_one_line_error(tmp_path, capsys):
    real, generated, clips = _write_pair(tmp_path, videos=1, frames=3)
    imageio.imwrite(os.path.join(generated, "v0.mp4.png"), np.concatenate(list(clips["v0"][:2]), axis=1))
    code, _, stderr = _run(["--real", real, "--generated", generated, "--out", str(tmp_path / "m.json"),
                            "--quiet"], capsys)
    assert code == 1 and stderr.count("\n") == 1 and "v0.mp4.png: 2 frames, its real video" in stderr


def test_config_supplies_metrics_domain_and_weight_settings(tmp_path, capsys):
    import yaml

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "config", "synthetic-64.yaml")) as stream:
        raw = yaml.safe_load(stream)
    raw["eval_params"].update(metrics=["aed"], allow_random_weights=True)
    raw["eval_params"]["weights"]["openface"] = str(tmp_path / "absent.pth")
    raw["dataset_params"]["frame_shape"] = None
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump(raw))
    real, generated, _ = _write_pair(tmp_path, videos=1, frames=2)
    out = str(tmp_path / "m.json")
    code, stdout, _ = _run(["--real", real, "--generated", generated, "--config", str(config), "--out", out,
                            "--quiet"], capsys)
    assert code == 0 and "RANDOM WEIGHTS for openface" in stdout
    report = json.load(open(out))
    assert set(report) == {"aed", "compared"} and report["compared"]["domain"] == "face"
