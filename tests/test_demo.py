"""demo.py: image conversion, and end to end on CPU with a tiny random checkpoint and a generated driving
video that has an audio track (the keypoint arithmetic and the Animator are tested in test_animation.py)."""
import os
import re
import subprocess
import sys
import types

import imageio
import numpy as np
import pytest
import torch

import demo
from checkpoint import save_checkpoint
from configuration import load_config
from modules import build_networks

imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")  # the demo reads and writes video with its ffmpeg
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
N_FRAMES, FPS, SIZE = 6, 12, 32
# Background grey level of driving frame i (the fake face aligner below keys on brightness).
LEVELS = [20, 60, 100, 140, 180, 220]

TINY_OVERRIDES = [
    f"dataset_params.frame_shape=[{SIZE}, {SIZE}, 3]",
    "model_params.common_params.num_cpab=2",
    "model_params.common_params.bg=false",
    "model_params.generator_params.block_expansion=8",
    "model_params.generator_params.max_features=32",
    "model_params.dense_motion_params.block_expansion=8",
    "model_params.dense_motion_params.max_features=32",
    "model_params.dense_motion_params.num_blocks=3",
    "model_params.dense_motion_params.cpab.fit_method=adam",
    "model_params.dense_motion_params.cpab.max_iter=2",
    "model_params.dense_motion_params.cpab.partial_tess_size=[2, 2]",
    "model_params.dense_motion_params.cpab.global_tess_size=[3, 3]",
    "model_params.avd_network_params.id_bottle_size=16",
    "model_params.avd_network_params.pose_bottle_size=16",
]


# ---------------------------------------------------------------- fixtures: files written once per module

def write_tiny_assets(folder):
    """Tiny config, checkpoints with and without AVD network, RGBA source, driving videos (with/without audio)."""
    import yaml

    config = load_config(os.path.join(ROOT, "config", "vox-256.yaml"), overrides=TINY_OVERRIDES)
    paths = types.SimpleNamespace(folder=str(folder))
    paths.config = str(folder / "tiny.yaml")
    with open(paths.config, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle)
    torch.manual_seed(0)
    networks = build_networks(config)
    state = {name: networks[name].state_dict()
             for name in ("kp_detector", "dense_motion_network", "inpainting_network")}
    state.update(epoch=0, step=0, config=config)
    paths.checkpoint = str(folder / "tiny.pth.tar")
    save_checkpoint(paths.checkpoint, state)
    paths.checkpoint_avd = str(folder / "tiny-avd.pth.tar")
    save_checkpoint(paths.checkpoint_avd, dict(state, avd_network=networks["avd_network"].state_dict()))

    paths.source = str(folder / "source.png")
    source = np.zeros((50, 70, 4), np.uint8)
    source[..., :3] = LEVELS[3]
    source[10:30, 20:40, :3] = 255
    source[..., 3] = 255
    imageio.v3.imwrite(paths.source, source)

    paths.silent = str(folder / "silent.mp4")
    writer = imageio.v2.get_writer(paths.silent, format="FFMPEG", fps=FPS, codec="libx264", quality=8,
                                   macro_block_size=2, ffmpeg_log_level="error")
    for index, level in enumerate(LEVELS):
        frame = np.full((80, 96, 3), level, np.uint8)
        frame[10:40, 10 + 8 * index:40 + 8 * index] = 255
        writer.append_data(frame)
    writer.close()
    paths.driving = str(folder / "driving.mp4")   # its audio track lasts twice as long as its frames
    subprocess.run([FFMPEG, "-y", "-v", "error", "-i", paths.silent, "-f", "lavfi", "-i",
                    f"sine=frequency=440:duration={2 * N_FRAMES / FPS}", "-map", "0:v", "-map", "1:a",
                    "-c:v", "copy", "-c:a", "aac", paths.driving], check=True, capture_output=True)
    paths.frame_folder = str(folder / "frames")
    os.makedirs(paths.frame_folder)
    for index in range(3):
        frame = np.full((SIZE, SIZE, 3), LEVELS[index], np.uint8)
        frame[5:15, 5 + 4 * index:15 + 4 * index] = 255
        imageio.v3.imwrite(os.path.join(paths.frame_folder, f"{index:04d}.png"), frame)
    paths.empty_folder = str(folder / "empty")
    os.makedirs(paths.empty_folder)
    paths.audio_only = str(folder / "audio-only.mp4")
    subprocess.run([FFMPEG, "-y", "-v", "error", "-f", "lavfi", "-i", "sine=duration=0.5", paths.audio_only],
                   check=True, capture_output=True)
    return paths


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_tiny_assets(tmp_path_factory.mktemp("demo"))


def probe(path):
    """(frame count, fps, width, height, has an audio stream) of a video, from imageio and `ffmpeg -i`."""
    reader = imageio.v2.get_reader(path, format="FFMPEG")
    meta = reader.get_meta_data()
    count = reader.count_frames()
    reader.close()
    info = subprocess.run([FFMPEG, "-hide_banner", "-i", path], capture_output=True, text=True).stderr
    audio = re.search(r"Stream #\d+:\d+.*: Audio: ", info) is not None
    return count, meta["fps"], meta["size"][0], meta["size"][1], audio


def container_duration(path):
    """Seconds of the ``Duration:`` line of `ffmpeg -i` (the longest stream, audio included)."""
    info = subprocess.run([FFMPEG, "-hide_banner", "-i", path], capture_output=True, text=True).stderr
    hours, minutes, seconds = re.search(r"Duration: (\d+):(\d+):([\d.]+)", info).groups()
    return 3600 * int(hours) + 60 * int(minutes) + float(seconds)


def run_demo(assets, tmp_path, *extra, checkpoint=None, driving=None, img_shape=f"{SIZE},{SIZE}"):
    result = str(tmp_path / "result.mp4")
    argv = ["--config", assets.config, "--checkpoint", checkpoint or assets.checkpoint,
            "--source_image", assets.source, "--driving_video", driving or assets.driving,
            "--result_video", result, "--cpu", *extra]
    if img_shape is not None:
        argv += ["--img_shape", img_shape]
    return demo.main(argv), result


# ---------------------------------------------------------------- image conversion

def test_to_rgb_float_accepts_grey_rgba_and_16_bit():
    grey = np.full((4, 5), 255, np.uint8)
    assert demo.to_rgb_float(grey).shape == (4, 5, 3) and demo.to_rgb_float(grey).max() == 1.0
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 1] = 51
    np.testing.assert_allclose(demo.to_rgb_float(rgba)[0, 0], [0.0, 0.2, 0.0], atol=1e-6)
    deep = np.full((2, 2, 3), 65535, np.uint16)
    assert demo.to_rgb_float(deep).dtype == np.float32 and demo.to_rgb_float(deep).min() == 1.0
    tensor = demo.frames_to_tensor([np.zeros((30, 40), np.uint8)], (16, 24), torch.device("cpu"))
    assert tensor.shape == (1, 3, 16, 24)
    rgb = np.random.default_rng(0).integers(0, 256, size=(2, 30, 40, 3), dtype=np.uint8)
    fast = demo.frames_to_tensor(list(rgb), (16, 24), torch.device("cpu"))          # uint8 path
    slow = demo.frames_to_tensor([frame / 255.0 for frame in rgb], (16, 24), torch.device("cpu"))
    torch.testing.assert_close(fast, slow)


# ---------------------------------------------------------------- end to end

def test_standard_mode_side_by_side_from_a_frame_folder(assets, tmp_path, capsys):
    status, result = run_demo(assets, tmp_path, "--mode", "standard", "--side_by_side", "--fps", "10",
                              driving=assets.frame_folder, img_shape=None)   # from dataset_params.frame_shape
    assert status == 0, capsys.readouterr().err
    assert probe(result) == (3, 10, 3 * SIZE, SIZE, False)
    first = imageio.v2.get_reader(result, format="FFMPEG").get_data(0).astype(float)
    # Left tile is the source: the grey level LEVELS[3] with the white square.
    assert abs(np.median(first[:, :SIZE]) - LEVELS[3]) < 6


def test_demo_animates_through_the_one_path_without_background_motion(assets, tmp_path, capsys, monkeypatch):
    import animation

    calls = []
    original = animation.animate

    def recording(networks, source, kp_source, kp_driving, bg_param=None, dropout_flag=False, dropout_p=0.0):
        calls.append((source.shape[0], bg_param, dropout_flag))
        return original(networks, source, kp_source, kp_driving, bg_param=bg_param, dropout_flag=dropout_flag,
                        dropout_p=dropout_p)

    monkeypatch.setattr(animation, "animate", recording)
    status, _ = run_demo(assets, tmp_path, "--mode", "standard", "--batch_size", "2", driving=assets.frame_folder)
    assert status == 0, capsys.readouterr().err
    assert calls == [(2, None, False), (1, None, False)]   # 3 frames in batches of 2: no bg_param, no dropout


def test_avd_mode_runs_with_an_avd_network_and_fails_in_one_line_without(assets, tmp_path, capsys):
    status, result = run_demo(assets, tmp_path, "--mode", "avd", checkpoint=assets.checkpoint_avd,
                              driving=assets.silent)
    assert status == 0, capsys.readouterr().err
    assert probe(result) == (N_FRAMES, FPS, SIZE, SIZE, False)
    capsys.readouterr()
    status, _ = run_demo(assets, tmp_path, "--mode", "avd")
    error = capsys.readouterr().err.strip()
    assert status == 1 and "--mode avd needs an AVD network" in error and "\n" not in error


def _one_line_error(capsys):
    error = capsys.readouterr().err.strip()
    assert error.startswith("demo.py: error: ") and "\n" not in error
    return error


def test_errors_are_one_line(assets, tmp_path, capsys):
    assert run_demo(assets, tmp_path, driving=str(tmp_path / "missing.mp4"))[0] == 1
    assert "--driving_video: file not found" in _one_line_error(capsys)

    broken_image = tmp_path / "broken.png"
    broken_image.write_bytes(b"not an image")
    argv = ["--config", assets.config, "--checkpoint", assets.checkpoint, "--source_image", str(broken_image),
            "--driving_video", assets.driving, "--result_video", str(tmp_path / "r.mp4"), "--cpu"]
    assert demo.main(argv) == 1
    assert "cannot read source image" in _one_line_error(capsys)

    broken_checkpoint = tmp_path / "broken.pth.tar"
    broken_checkpoint.write_bytes(b"garbage")
    assert run_demo(assets, tmp_path, checkpoint=str(broken_checkpoint))[0] == 1
    assert "cannot read checkpoint" in _one_line_error(capsys)

    assert run_demo(assets, tmp_path, driving=assets.audio_only)[0] == 1
    assert "has no frames" in _one_line_error(capsys)
    assert run_demo(assets, tmp_path, driving=assets.empty_folder)[0] == 1
    assert "has no frames" in _one_line_error(capsys)
    assert not os.path.exists(tmp_path / "result.mp4")


def test_checkpoint_that_does_not_match_the_config_names_the_network(assets, tmp_path, capsys):
    status, _ = run_demo(assets, tmp_path, "--set", "model_params.common_params.num_cpab=3")
    error = _one_line_error(capsys)
    assert status == 1 and "does not match config" in error and "kp_detector" in error


def test_find_best_frame_without_face_alignment_says_how_to_install(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "face_alignment", None)   # makes `import face_alignment` fail
    status, _ = run_demo(assets, tmp_path, "--find_best_frame")
    error = _one_line_error(capsys)
    assert status == 1 and "pip install face-alignment" in error and "downloads" in error


def test_relative_mode_with_best_frame_keeps_frames_fps_and_audio(assets, tmp_path, capsys, monkeypatch):
    class FakeAligner:
        """68 points on an ellipse whose aspect ratio grows with the image's median brightness."""

        def __init__(self, landmarks_type, flip_input, device):
            assert landmarks_type == "2D" and device == "cpu"

        def get_landmarks(self, image):
            angle = np.linspace(0, 2 * np.pi, 68, endpoint=False)
            aspect = 1 + np.median(image) / 64
            return [np.stack([100 + 30 * np.cos(angle), 80 + 30 * aspect * np.sin(angle)], axis=1)]

    fake = types.SimpleNamespace(FaceAlignment=FakeAligner, LandmarksType=types.SimpleNamespace(TWO_D="2D"))
    monkeypatch.setitem(sys.modules, "face_alignment", fake)
    status, result = run_demo(assets, tmp_path, "--find_best_frame", "--batch_size", "4")  # batches of 4 + 2
    output = capsys.readouterr()
    assert status == 0, output.err
    assert "best frame: 3" in output.out   # the source has frame 3's grey level
    assert probe(result) == (N_FRAMES, FPS, SIZE, SIZE, True)
    assert container_duration(result) == pytest.approx(N_FRAMES / FPS, abs=0.05)   # audio cut at the video's end
    assert re.search(r"model: [0-9.]+ frames/s", output.out)
    frames = np.stack([frame for frame in imageio.v2.get_reader(result, format="FFMPEG")])
    assert frames.std() > 1.0  # an image, not a blank frame


def test_device_and_img_shape_arguments():
    assert demo.resolve_device("cuda", cpu=True) == torch.device("cpu")      # --cpu wins, like TPSMM
    assert demo.parse_img_shape("128,96") == (128, 96)
    with pytest.raises(SystemExit):
        demo.build_parser().parse_args(["--config", "c", "--checkpoint", "p", "--source_image", "s",
                                        "--driving_video", "v", "--img_shape", "256"])
    if not torch.cuda.is_available():
        with pytest.raises(demo.DemoError, match="CUDA is not available"):
            demo.resolve_device("cuda", cpu=False)
        assert demo.resolve_device(None, cpu=False) == torch.device("cpu")


def test_results_in_the_formats_imageio_writes_with_the_usual_file_mode(assets, tmp_path, capsys):
    previous = os.umask(0o022)
    try:
        for suffix in (".gif", ".webm", ".mkv"):
            result = str(tmp_path / f"result{suffix}")
            argv = ["--config", assets.config, "--checkpoint", assets.checkpoint, "--source_image", assets.source,
                    "--driving_video", assets.driving, "--result_video", result, "--cpu", "--img_shape",
                    f"{SIZE},{SIZE}", "--side_by_side"]
            assert demo.main(argv) == 0, capsys.readouterr().err
            frames = imageio.v3.imread(result, index=None)
            assert frames.shape[1:] == (SIZE, 3 * SIZE, 3) and len(frames) == N_FRAMES, suffix
            assert os.stat(result).st_mode & 0o777 == 0o644  # not mkstemp's 0600
    finally:
        os.umask(previous)
    assert imageio.v3.immeta(str(tmp_path / "result.gif"), index=0)["duration"] == pytest.approx(1000 / FPS, abs=10)
    assert sorted(os.listdir(tmp_path)) == ["result.gif", "result.mkv", "result.webm"]  # no partial file left


def test_an_unwritable_format_or_frame_size_is_one_line_before_any_work(assets, tmp_path, capsys):
    argv = ["--config", assets.config, "--checkpoint", assets.checkpoint, "--source_image", assets.source,
            "--driving_video", assets.driving, "--cpu"]
    assert demo.main(argv + ["--result_video", str(tmp_path / "x.tiff")]) == 1
    error = _one_line_error(capsys)
    assert "cannot write .tiff files; use one of .mp4, .mov, .mkv, .avi, .webm, .gif" in error
    assert demo.main(argv + ["--result_video", str(tmp_path / "x.mp4"), "--img_shape", "100,100"]) == 1
    error = _one_line_error(capsys)
    assert error.startswith("demo.py: error: --img_shape: frame size 100x100 does not fit the networks")
    assert "multiples of 32" in error and os.listdir(tmp_path) == []
