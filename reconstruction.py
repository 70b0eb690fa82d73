"""Reconstruction evaluation: animate frame 0 of each test video with all of its own frames.

For every video (C, T, H, W in [0, 1]) the source is frame 0 and every frame t (0 included) is the
driving frame; frames go through the networks in batches of ``train_params.eval_batch_size``, under
``torch.inference_mode`` on the networks' device. L1 = mean |prediction - driving| in [0, 1]; the
reported mean is over all frames of the split (each frame weighs the same, as in FOMM/TPSMM), next
to the L1 of the trivial baseline "predict the source frame" on the same frames.

Videos are streamed: read, animated, written and scored in chunks of ``eval_batch_size`` frames, so
memory does not grow with a video's length beyond its predicted frames as uint8 (for the PNG strip).

Writes under ``<out_dir>/reconstruction/``: ``png/<video>.png`` (the predicted frames side by side,
lossless, the FOMM strip layout the protocol metrics read) and ``mp4/<video>.mp4`` (for viewing; only
with imageio-ffmpeg installed), and
``<out_dir>/metrics.json`` = {"l1", "baseline_l1", "frames", "per_video": {name: {"l1",
"baseline_l1", "frames"}}, "checkpoint"}, plus the protocol metrics of ``eval_params.metrics`` other
than L1 ("akd", "mkr", "aed" and "compared", see evaluation/core.py) computed on the PNG strips.
"""
import importlib.util
import json
import os
import warnings

import imageio
import numpy as np
import torch
from tqdm import tqdm

import animation
from evaluation import evaluate_reconstruction
from frames_dataset import dataset_from_config
from modules.sizes import check_frame_size


def predict_chunks(networks, chunks):
    """Predictions, chunk by chunk, for a video given as chunks of frames (n, 3, H, W) (frame 0 of the
    first chunk is the source), no autograd; yields (driving chunk, prediction chunk).

    Like the official reconstruction, the BG predictor (when the model has one) gives the background
    motion between frame 0 and each frame (``animation.Animator`` with ``background=True``).
    """
    animator = None
    for frames in chunks:
        if animator is None:
            animator = animation.Animator(networks, frames[:1], "standard", background=True)
        yield frames, animator(frames)


def predict_video(networks, video, batch_size):
    """Predictions (T, 3, H, W) for ``video`` (3, T, H, W) with frame 0 as source, in batches of ``batch_size``."""
    frames = video.permute(1, 0, 2, 3)
    chunks = (frames[start:start + batch_size] for start in range(0, frames.shape[0], batch_size))
    return torch.cat([prediction for _, prediction in predict_chunks(networks, chunks)], dim=0)


class L1Metric:
    """The reconstruction L1 of one video, accumulated chunk by chunk on the device (one host read per
    video): mean |prediction - driving| per frame, and the baseline "predict the source frame"."""

    def __init__(self):
        self.l1 = self.baseline = 0.0
        self.frames = 0

    def add(self, prediction, driving, source):
        """prediction, driving (n, 3, H, W); source (1, 3, H, W), frame 0."""
        self.l1 = self.l1 + (prediction - driving).abs().flatten(1).mean(dim=1).sum()
        self.baseline = self.baseline + (source - driving).abs().flatten(1).mean(dim=1).sum()
        self.frames += int(driving.shape[0])

    def sums(self):
        """(sum of the frames' L1, sum of their baseline L1, frames) as host numbers."""
        l1, baseline = torch.stack([torch.as_tensor(self.l1), torch.as_tensor(self.baseline)]).tolist()
        return l1, baseline, self.frames


class VideoWriters:
    """The outputs of one video, written as its chunks arrive: the PNG strip (frames side by side, kept as
    uint8 until the video ends: a PNG row spans every frame) and the mp4 preview (appended frame by frame)."""

    def __init__(self, png_path, mp4_path):
        self.png_path = png_path
        self.mp4_path = mp4_path
        self.strip = []
        self.mp4 = None
        if mp4_path is not None:
            self.mp4 = imageio.get_writer(mp4_path, fps=15)

    def add(self, images):
        """images (n, H, W, 3) uint8."""
        count, height, width, channels = images.shape
        self.strip.append(images.transpose(1, 0, 2, 3).reshape(height, count * width, channels))
        if self.mp4 is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for image in images:
                    self.mp4.append_data(image)

    def _close_mp4(self):
        if self.mp4 is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.mp4.close()
            self.mp4 = None

    def close(self):
        """The video is complete: finish the mp4, write the PNG strip."""
        self._close_mp4()
        if self.strip:
            imageio.imwrite(self.png_path, np.concatenate(self.strip, axis=1))
            self.strip = []

    def abort(self):
        """The video failed part-way: no strip, and no partial mp4 left behind."""
        self._close_mp4()
        self.strip = []
        if self.mp4_path is not None and os.path.exists(self.mp4_path):
            os.remove(self.mp4_path)


def reconstruction(config, networks, dataset, out_dir, device, progress=True, checkpoint=None):
    """Evaluate ``networks`` on ``dataset`` (a ``FramesDataset`` of the test split); returns the metrics dict.

    Each video is streamed in chunks of ``train_params.eval_batch_size`` frames (``dataset.iter_video``):
    read, animated, written (PNG strip, mp4 preview) and scored (``L1Metric``) chunk by chunk, so memory
    holds one chunk on the device and the video's predicted frames as uint8, whatever its length.
    ``checkpoint``: the path of the checkpoint evaluated, recorded in metrics.json.
    """
    if len(dataset) == 0:
        raise ValueError(f"dataset_params.root_dir: no test videos in "
                         f"{os.path.join(config['dataset_params']['root_dir'], 'test')}")
    batch_size = config["train_params"]["eval_batch_size"]
    png_dir = os.path.join(out_dir, "reconstruction", "png")
    mp4_dir = os.path.join(out_dir, "reconstruction", "mp4")
    os.makedirs(png_dir, exist_ok=True)
    # The mp4 previews need imageio-ffmpeg, which a GPU-only stack may lack; the PNG strips are the result.
    write_mp4 = importlib.util.find_spec("imageio_ffmpeg") is not None
    if write_mp4:
        os.makedirs(mp4_dir, exist_ok=True)
    else:
        print("reconstruction: imageio-ffmpeg is not installed, so no mp4 previews (the PNG strips are written)")
    modes = {}
    for name, network in networks.items():
        if network is not None:
            modes[name] = network.training
            network.to(device).eval()
    per_video = {}
    total_l1 = total_baseline = 0.0
    total_frames = 0
    try:
        with torch.inference_mode():
            for index in tqdm(range(len(dataset)), desc="reconstruction", unit="video", disable=not progress):
                name = str(dataset.videos[index])
                file_name = name.replace(os.sep, "_")
                metric = L1Metric()
                writers = VideoWriters(os.path.join(png_dir, file_name + ".png"),
                                       os.path.join(mp4_dir, file_name + ".mp4") if write_mp4 else None)
                source = None
                try:
                    chunks = video_chunks(dataset, index, batch_size, device, config["model_params"])
                    for driving, prediction in predict_chunks(networks, chunks):
                        source = driving[:1] if source is None else source
                        metric.add(prediction, driving, source)  # the metrics: a step of their own
                        writers.add(animation.to_uint8(prediction))
                except BaseException:
                    writers.abort()
                    raise
                writers.close()
                l1, baseline, frames = metric.sums()
                per_video[name] = {"l1": l1 / frames, "baseline_l1": baseline / frames, "frames": frames}
                total_l1 += l1
                total_baseline += baseline
                total_frames += frames
    finally:
        for name, training in modes.items():
            networks[name].train(training)
    metrics = {"l1": total_l1 / total_frames, "baseline_l1": total_baseline / total_frames,
               "frames": total_frames, "per_video": per_video,
               "checkpoint": os.path.abspath(checkpoint) if checkpoint else None}
    with open(os.path.join(out_dir, "metrics.json"), "w") as stream:
        json.dump(metrics, stream, indent=2)  # written first: kept if the protocol metrics below fail
    protocol = evaluate_reconstruction(config["eval_params"], getattr(dataset, "split_dir", None), png_dir, device,
                                       getattr(dataset, "frame_shape", None), checkpoint, progress)
    if protocol:
        metrics.update(protocol)
        with open(os.path.join(out_dir, "metrics.json"), "w") as stream:
            json.dump(metrics, stream, indent=2)
    print(f"reconstruction L1: {metrics['l1']:.4f}  (baseline 'predict the source frame': "
          f"{metrics['baseline_l1']:.4f}) over {len(per_video)} videos, {total_frames} frames; "
          f"metrics in {os.path.join(out_dir, 'metrics.json')}")
    return metrics


def video_chunks(dataset, index, batch_size, device, model_params):
    """Video ``index`` of ``dataset`` as float32 chunks (n <= batch_size, 3, H, W) on ``device``, read
    lazily; a frame size the networks cannot take is a one-line error naming the video (first chunk)."""
    for number, frames in enumerate(dataset.iter_video(index, batch_size)):
        if number == 0:
            check_frame_size(model_params, frames.shape[2:],
                             f"test video {os.path.join(dataset.split_dir, dataset.videos[index])}")
        yield frames.to(device=device, dtype=torch.float32)


def evaluate_test_split(config, networks, run_dir, device, dist, checkpoint=None):
    """Reconstruct the config's test split on the main rank (the others wait): its metrics, None elsewhere."""
    metrics = None
    if dist.is_main:
        dataset = dataset_from_config(config["dataset_params"], is_train=False)
        metrics = reconstruction(config, networks, dataset, run_dir, device, checkpoint=checkpoint)
    dist.barrier()
    return metrics
