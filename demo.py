"""Animate a source image with a driving video (the FOMM/TPSMM ``demo.py`` command line).

    python demo.py --config config/vox-256.yaml --checkpoint runs/<run directory>/checkpoint.pth.tar \
        --source_image source.png --driving_video driving.mp4 --result_video result.mp4

Conventions: frames are RGB; inside the networks they are float32 in [0, 1] shaped (B, 3, H, W) with
(H, W) = ``--img_shape``; keypoints are (x, y) in [-1, 1] (the ``grid_sample``, ``align_corners=True``
convention) shaped (B, 5K, 2). The driving video is streamed (never held in memory), resized, animated
in batches under ``torch.inference_mode`` and written at the driving video's frame rate (.mp4, .mov,
.mkv, .avi: H.264; .webm: VP9; .gif: an animated GIF); the driving video's audio track, if any, is
muxed into an .mp4/.mov/.mkv result with the ffmpeg binary of imageio-ffmpeg. Per batch of frames the
only host synchronisation is copying the result frames out (the model time is taken with CUDA events).

Frames are animated by ``animation.Animator`` (the path training and reconstruction take too). Like
TPSMM's and the official demo, no background motion is used: the dense motion network gets
``bg_param=None`` (identity background warp) even when the checkpoint has a BG predictor.
"""
import argparse
import math
import os
import re
import subprocess
import sys
import time

import imageio
import numpy as np
import torch
import torch.nn.functional as F
from skimage.util import img_as_float32
from tqdm import tqdm

import animation
from checkpoint import checkpoint_layout, load_checkpoint, load_network_states
from configuration import load_config
from modules import MAIN_NETWORKS, build_networks
from modules.sizes import check_frame_size

MODES = animation.MODES
# The networks every mode needs (no BG predictor: no background motion); ``avd_network`` is added for --mode avd.
DEMO_NETWORKS = tuple(name for name in MAIN_NETWORKS if name != "bg_predictor")
# Result formats: file suffix -> the ffmpeg video codec, or None for an animated GIF (written by Pillow).
RESULT_FORMATS = {".mp4": "libx264", ".mov": "libx264", ".mkv": "libx264", ".avi": "libx264",
                  ".webm": "libvpx-vp9", ".gif": None}
# Containers into which the driving video's audio is muxed.
AUDIO_CONTAINERS = (".mp4", ".mov", ".mkv")
# Frame files of a driving frame folder.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_AUDIO_STREAM = re.compile(r"^\s*Stream #\d+:\d+.*: Audio: ", re.MULTILINE)
_VIDEO_STREAM = re.compile(r"^\s*Stream #\d+:\d+.*: Video: ", re.MULTILINE)


class DemoError(Exception):
    """A problem with the user's input; ``main`` prints it as one line and exits with status 1."""


def parse_img_shape(text):
    """``"H,W"`` (TPSMM's ``--img_shape``: height first) -> (H, W) of positive ints."""
    parts = text.split(",")
    try:
        shape = tuple(int(part) for part in parts)
    except ValueError:
        shape = ()
    if len(shape) != 2 or min(shape) <= 0:
        raise argparse.ArgumentTypeError(f"expected two positive integers H,W such as 256,256, got {text!r}")
    return shape


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", required=True, help="YAML config the checkpoint was trained with")
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint written by run.py, or a published TPSMM model (with its "
                             "config/tpsmm-*.yaml)")
    parser.add_argument("--source_image", required=True, help="image to animate (any size, grey/RGB/RGBA)")
    parser.add_argument("--driving_video", required=True,
                        help="video whose motion drives the source, or a folder of frames (FOMM layout)")
    parser.add_argument("--fps", default=25.0, type=_positive_float,
                        help="frame rate of the result when --driving_video is a frame folder (default: 25)")
    parser.add_argument("--result_video", default="result.mp4",
                        help=f"output video: {', '.join(RESULT_FORMATS)} (default: result.mp4)")
    parser.add_argument("--img_shape", default=None, type=parse_img_shape,
                        help="H,W the model was trained on (default: the config's dataset_params.frame_shape, "
                             "else 256,256)")
    parser.add_argument("--mode", default="relative", choices=MODES,
                        help="relative: driving motion relative to the first (or best) driving frame, "
                             "scaled to the source (default); standard: driving keypoints as they are; "
                             "avd: through the AVD network (needs a checkpoint trained with --mode train_avd)")
    parser.add_argument("--find_best_frame", action="store_true",
                        help="relative mode: take the driving frame whose face landmarks are closest to the "
                             "source's as the reference frame (faces only; needs `pip install face-alignment`)")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
    parser.add_argument("--cpu", action="store_true", help="same as --device cpu (TPSMM's flag)")
    parser.add_argument("--side_by_side", action="store_true", help="write source | driving | result")
    parser.add_argument("--batch_size", default=4, type=_positive_int,
                        help="driving frames per forward pass (default: 4). With fit_method adam the official "
                             "batch-wide fit loss couples the frames of a batch slightly; 1 is exactly per-frame")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. "
                             "model_params.dense_motion_params.cpab.fit_method=gauss_newton")
    return parser


def resolve_device(device, cpu):
    """The torch device from ``--device`` / ``--cpu``; default cuda when available, else cpu."""
    if cpu:
        return torch.device("cpu")
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise DemoError(f"--device {device!r} is not a torch device (use cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DemoError(f"--device {device} asked for, but CUDA is not available here; use --device cpu")
    return resolved


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_networks(config, config_path, checkpoint_path, device, mode):
    """Build the networks of ``config``, load them from the checkpoint, move to ``device``, eval mode.

    Returns a dict with kp_detector, dense_motion_network, inpainting_network (and avd_network for
    ``mode == "avd"``). The BG predictor is not loaded: the demo uses no background motion. The
    checkpoint is this framework's or in the upstream layout (TPSMM's published models); either way
    the config is checked by strict loading only, so ``--set`` may change settings that hold no weights.
    """
    names = DEMO_NETWORKS + (("avd_network",) if mode == "avd" else ())
    built = build_networks(config)
    try:
        checkpoint = load_checkpoint(checkpoint_path, map_location=device)
        checkpoint_layout(checkpoint, checkpoint_path)
        if mode == "avd" and checkpoint.get("avd_network") is None:
            raise DemoError(f"--mode avd needs an AVD network but checkpoint {checkpoint_path} has none "
                            f"(train one with: python run.py --mode train_avd), or use --mode relative")
        load_network_states(built, checkpoint, checkpoint_path, names, config_path=config_path)
    except (OSError, ValueError) as error:
        raise DemoError(_first_line(error)) from None
    return {name: built[name].to(device).eval() for name in names}


def to_rgb_float(image):
    """Any image array (H, W), (H, W, 1|2|3|4), any integer/float/bool dtype -> (H, W, 3) float32 in [0, 1].

    Grey is repeated over the three channels; an alpha channel is dropped (TPSMM keeps ``[..., :3]``).
    Float input is taken to be in [0, 1] already.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"expected an (H, W) or (H, W, C) image with C in 1..4, got shape {image.shape}")
    image = image[:, :, :1] if image.shape[2] in (1, 2) else image[:, :, :3]
    image = img_as_float32(image)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image)


def frames_to_tensor(frames, img_shape, device):
    """List of (h, w, C) arrays (one size) -> (B, 3, H, W) float32 in [0, 1] on ``device``.

    Resized with anti-aliased bilinear interpolation (``align_corners=False``) when the size differs.
    """
    if all(frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3 for frame in frames):
        # The usual case (decoded video): move uint8 to the device, convert there (4x less to copy).
        tensor = torch.from_numpy(np.stack(frames)).to(device).permute(0, 3, 1, 2).float() / 255.0
    else:
        tensor = torch.from_numpy(np.stack([to_rgb_float(frame) for frame in frames])).to(device).permute(0, 3, 1, 2)
    if tuple(tensor.shape[2:]) != tuple(img_shape):
        tensor = F.interpolate(tensor, size=tuple(img_shape), mode="bilinear", align_corners=False,
                               antialias=True).clamp(0.0, 1.0)
    return tensor.contiguous()


def read_source_image(path, img_shape, device):
    """The source image as (1, 3, H, W) float32 in [0, 1] on ``device``; first frame of animated files."""
    try:
        image = imageio.v3.imread(path, index=0)
        return frames_to_tensor([image], img_shape, device)
    except (OSError, ValueError, RuntimeError, SyntaxError) as error:
        raise DemoError(f"cannot read source image {path}: {_first_line(error)}") from None


def frame_files(folder):
    """The image files of a frame folder (FOMM layout: one video = a folder of frames), sorted by name."""
    names = sorted(name for name in os.listdir(folder) if name.lower().endswith(IMAGE_EXTENSIONS))
    return [os.path.join(folder, name) for name in names]


def video_info(path, folder_fps):
    """(fps, frame count or an estimate from the duration, or None) of a video file or a frame folder."""
    if os.path.isdir(path):
        return float(folder_fps), len(frame_files(path))
    reader, fps, estimate = open_video(path)
    reader.close()
    return fps, estimate


def open_video(path):
    """The driving video's imageio ffmpeg reader, fps, and frame count estimated from its duration (or None)."""
    try:
        reader = imageio.v2.get_reader(path, format="FFMPEG")
        meta = reader.get_meta_data()
    except (OSError, ValueError, RuntimeError, IndexError) as error:
        probe = _ffmpeg_probe(path)
        if "Input #0" in probe and not _VIDEO_STREAM.search(probe):
            raise DemoError(f"driving video {path} has no frames (no video stream)") from None
        raise DemoError(f"cannot read driving video {path}: {_first_line(error)}") from None
    fps = meta.get("fps")
    if not fps or not math.isfinite(fps) or fps <= 0:
        reader.close()
        raise DemoError(f"driving video {path} has no frame rate: is it a video?")
    duration = meta.get("duration")
    estimate = None
    if isinstance(duration, (int, float)) and math.isfinite(duration) and duration > 0:
        estimate = max(1, round(duration * fps))
    return reader, float(fps), estimate


def iter_batches(path, batch_size):
    """Stream the driving video (file or frame folder) as lists of at most ``batch_size`` frames (H, W, C)."""
    if os.path.isdir(path):
        files = frame_files(path)
        for start in range(0, len(files), batch_size):
            batch = []
            for name in files[start:start + batch_size]:
                try:
                    batch.append(imageio.v3.imread(name, index=0))
                except (OSError, ValueError, RuntimeError, SyntaxError) as error:
                    raise DemoError(f"cannot read driving frame {name}: {_first_line(error)}") from None
            yield batch
        return
    reader, _, _ = open_video(path)
    batch = []
    try:
        index = 0
        while True:
            try:
                frame = reader.get_data(index)
            except IndexError:
                break
            except RuntimeError as error:
                if index == 0:
                    raise DemoError(f"cannot decode driving video {path}: {_first_line(error)}") from None
                # Like TPSMM: a broken tail ends the video instead of failing the whole run.
                print(f"demo.py: warning: driving video unreadable after frame {index}; stopping there "
                      f"({_first_line(error)})", file=sys.stderr)
                break
            batch.append(frame)
            index += 1
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch
    finally:
        reader.close()


def _ffmpeg_exe():
    """The ffmpeg binary of imageio-ffmpeg (imported here: only the video paths need it)."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _ffmpeg_probe(path):
    """What ``ffmpeg -i path`` prints about the file (its stream list), as text."""
    probe = subprocess.run([_ffmpeg_exe(), "-hide_banner", "-i", path],
                           capture_output=True, text=True, errors="replace", check=False)
    return probe.stderr


def has_audio(path):
    """Whether ffmpeg reports an audio stream in ``path``."""
    return bool(_AUDIO_STREAM.search(_ffmpeg_probe(path)))


def mux_audio(video_path, audio_path, result_path, duration):
    """Write ``result_path``: the video stream of ``video_path`` and the first audio stream of ``audio_path``.

    Audio is stream-copied when the container accepts it, else re-encoded to AAC. Both start at 0, so
    frame i stays at time i / fps next to the audio it had in the driving video. The result is cut at
    ``duration`` (the video's length) rather than with ``-shortest``, which would drop video frames
    when the audio track is the shorter one. Returns True on success.
    """
    for audio_codec in ("copy", "aac"):
        command = [_ffmpeg_exe(), "-y", "-v", "error", "-i", video_path, "-i", audio_path,
                   "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", "-c:a", audio_codec,
                   "-t", f"{duration:.6f}", result_path]
        if subprocess.run(command, capture_output=True, check=False).returncode == 0:
            return True
    return False


def find_best_frame(source, path, img_shape, batch_size, device):
    """Index of the driving frame whose face landmarks best match the source's, and that frame.

    Landmarks (face-alignment, 68 points) are centred and divided by the square root of their convex
    hull area, then compared by the sum of squared differences, as in TPSMM. Frames without a face are
    skipped. Returns (index, (1, 3, H, W) frame).
    """
    try:
        import face_alignment
    except ImportError:
        raise DemoError("--find_best_frame needs the optional face-alignment package: pip install "
                        "face-alignment (it downloads its own landmark weights on first use)") from None
    aligner = face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, flip_input=True,
                                           device=str(device))

    def normalised_landmarks(image):
        faces = aligner.get_landmarks(image)
        if not faces:
            return None
        landmarks = np.asarray(faces[0], dtype=np.float64)[:, :2]
        landmarks = landmarks - landmarks.mean(axis=0, keepdims=True)
        return landmarks / math.sqrt(max(animation.convex_hull_area(landmarks), 1e-12))

    reference = normalised_landmarks(animation.to_uint8(source)[0])
    if reference is None:
        raise DemoError("--find_best_frame: face-alignment finds no face in the source image")
    best_index, best_norm, best_frame, index = 0, math.inf, None, 0
    for frames in iter_batches(path, batch_size):
        tensor = frames_to_tensor(frames, img_shape, device)
        for offset, image in enumerate(animation.to_uint8(tensor)):
            landmarks = normalised_landmarks(image)
            if landmarks is not None:
                norm = float(((reference - landmarks) ** 2).sum())
                if norm < best_norm:
                    best_index, best_norm, best_frame = index + offset, norm, tensor[offset:offset + 1].clone()
        if best_frame is None and index == 0:
            best_frame = tensor[:1].clone()
        index += len(frames)
    if math.isinf(best_norm):
        print("demo.py: warning: face-alignment finds no face in the driving video; using frame 0", file=sys.stderr)
    return best_index, best_frame


class ResultWriter:
    """Appends uint8 frames (H, W, 3) to the result file: ffmpeg for the video containers of
    ``RESULT_FORMATS``, Pillow for a GIF (frame duration 1/fps, looping)."""

    def __init__(self, path, suffix, fps):
        codec = RESULT_FORMATS[suffix]
        if codec is None:
            self.writer = imageio.v2.get_writer(path, format="GIF", mode="I", duration=1000.0 / fps, loop=0)
        else:
            self.writer = imageio.v2.get_writer(path, format="FFMPEG", fps=fps, codec=codec, quality=8,
                                                macro_block_size=2, ffmpeg_log_level="error")

    def append(self, images):
        for image in images:
            self.writer.append_data(image)

    def close(self):
        self.writer.close()


def render_batch(animator, driving, source, side_by_side):
    """Animate one batch of driving frames (B, 3, H, W) and copy the result frames out: (B, H, W', 3)
    uint8, ``source | driving | result`` side by side when asked. The one host synchronisation of a
    batch is that copy (the tiling is done on the device)."""
    prediction = animator(driving)
    if side_by_side:
        prediction = torch.cat([source.expand_as(prediction), driving, prediction], dim=3)
    return animation.to_uint8(prediction)


class ModelTimer:
    """Seconds spent in the networks, without waiting on the device per batch: CUDA events recorded
    around each batch and read once at the end; wall-clock time elsewhere."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.events = []
        self.seconds = 0.0
        self.started = None

    def start(self):
        if self.cuda:
            self.events.append([torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)])
            self.events[-1][0].record()
        else:
            self.started = time.perf_counter()

    def stop(self):
        if self.cuda:
            self.events[-1][1].record()
        else:
            self.seconds += time.perf_counter() - self.started

    def total(self):
        if self.cuda and self.events:
            self.events[-1][1].synchronize()
            return sum(begin.elapsed_time(end) for begin, end in self.events) / 1000.0
        return self.seconds


def animate(args, networks, source, fps, frame_estimate, reference_frame, video_path, device):
    """Animate the streamed driving video into ``video_path`` (no audio).

    Returns (number of frames, seconds spent in the networks).
    """
    writer = None
    timer = ModelTimer(device)
    count = 0
    suffix = result_suffix(args.result_video)
    progress = tqdm(total=frame_estimate, unit="frame", desc="animating", file=sys.stderr)
    try:
        with torch.inference_mode():
            animator = animation.Animator(networks, source, args.mode, background=False)
            if reference_frame is not None and args.mode == "relative":
                animator.set_reference_frame(reference_frame)
            for frames in iter_batches(args.driving_video, args.batch_size):
                driving = frames_to_tensor(frames, args.img_shape, device)
                timer.start()
                result = render_batch(animator, driving, source, args.side_by_side)
                timer.stop()
                if writer is None:
                    writer = ResultWriter(video_path, suffix, fps)
                writer.append(result)
                count += len(frames)
                progress.update(len(frames))
    finally:
        progress.close()
        if writer is not None:
            writer.close()
    return count, timer.total()


def result_suffix(path):
    """The result's format (``RESULT_FORMATS`` key) from its file name; no suffix means mp4. One-line
    error for a format this demo cannot write."""
    suffix = os.path.splitext(path)[1].lower() or ".mp4"
    if suffix not in RESULT_FORMATS:
        raise DemoError(f"--result_video {path}: cannot write {suffix} files; use one of "
                        f"{', '.join(RESULT_FORMATS)}")
    return suffix


def run(args):
    """The whole demo; raises DemoError for problems with the inputs."""
    for flag, path in (("--config", args.config), ("--checkpoint", args.checkpoint),
                       ("--source_image", args.source_image), ("--driving_video", args.driving_video)):
        if not (os.path.isfile(path) or (flag == "--driving_video" and os.path.isdir(path))):
            raise DemoError(f"{flag}: file not found: {path}")
    try:
        config = load_config(args.config, overrides=args.overrides)
    except (OSError, ValueError) as error:
        raise DemoError(_first_line(error)) from None
    suffix = result_suffix(args.result_video)
    if args.img_shape is None:
        frame_shape = config["dataset_params"].get("frame_shape")
        args.img_shape = tuple(frame_shape[:2]) if frame_shape else (256, 256)
    try:
        check_frame_size(config["model_params"], args.img_shape, "--img_shape")
    except ValueError as error:
        raise DemoError(str(error)) from None
    device = resolve_device(args.device, args.cpu)
    source = read_source_image(args.source_image, args.img_shape, device)
    fps, frame_estimate = video_info(args.driving_video, args.fps)
    if frame_estimate == 0:
        raise DemoError(f"driving video {args.driving_video} has no frames (no image files in the folder)")
    networks = load_networks(config, args.config, args.checkpoint, device, args.mode)

    reference_frame = None
    if args.find_best_frame:
        if args.mode != "relative":
            print(f"demo.py: note: --find_best_frame only changes --mode relative, not {args.mode}", file=sys.stderr)
        index, reference_frame = find_best_frame(source, args.driving_video, args.img_shape, args.batch_size,
                                                 device)
        print(f"best frame: {index}")
    # With a fixed reference frame every frame is animated independently of the others (up to the
    # batch-wide Adam fit loss, see --batch_size), so streaming the video once in order gives the
    # frames TPSMM gets from animating backwards and forwards from the best frame.

    result_path = os.path.abspath(args.result_video)
    folder = os.path.dirname(result_path)
    # Written next to the result, then renamed into place; not pre-created, so it gets the usual mode
    # (0666 less the umask) like the result itself.
    video_path = os.path.join(folder, f".{os.path.basename(result_path)}.partial-{os.getpid()}{suffix}")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise DemoError(f"cannot write {args.result_video}: {_first_line(error)}") from None
    try:
        count, model_seconds = animate(args, networks, source, fps, frame_estimate, reference_frame,
                                       video_path, device)
        if count == 0:
            raise DemoError(f"driving video {args.driving_video} has no frames")
        muxed = False
        if os.path.isfile(args.driving_video) and has_audio(args.driving_video):
            if suffix in AUDIO_CONTAINERS:
                muxed = mux_audio(video_path, args.driving_video, result_path, duration=count / fps)
                if not muxed:
                    print("demo.py: warning: could not mux the driving video's audio; writing the video "
                          "without audio", file=sys.stderr)
            else:
                print(f"demo.py: note: {suffix} cannot hold audio; the result has none", file=sys.stderr)
        if not muxed:
            os.replace(video_path, result_path)
    finally:
        if os.path.exists(video_path):
            os.remove(video_path)
    print(f"wrote {count} frames at {fps:g} fps to {args.result_video}")
    print(f"model: {count / max(model_seconds, 1e-9):.2f} frames/s on {device} at "
          f"{args.img_shape[0]}x{args.img_shape[1]}, batch {args.batch_size} (networks only, without video I/O)")
    return count, model_seconds


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (DemoError, animation.AnimationError) as error:
        print(f"demo.py: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
