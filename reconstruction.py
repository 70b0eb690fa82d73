"""Reconstruction evaluation: animate frame 0 of each test video with all of its own frames.

For every video (C, T, H, W in [0, 1]) the source is frame 0 and every frame t (0 included) is the
driving frame; frames go through the networks in batches of ``train_params.eval_batch_size``, under
``torch.inference_mode`` on the networks' device. L1 = mean |prediction - driving| in [0, 1]; the
reported mean is over all frames of the split (each frame weighs the same, as in FOMM/TPSMM), next
to the L1 of the trivial baseline "predict the source frame" on the same frames.

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
from frames_dataset import dataset_from_config


def _to_uint8(frames):
    """(T, 3, H, W) tensor in [0, 1] -> (T, H, W, 3) uint8 array."""
    return (frames.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def predict_video(networks, video, batch_size):
    """Predictions (T, 3, H, W) for ``video`` (3, T, H, W) with frame 0 as source, no autograd.

    Like the official reconstruction, the BG predictor (when the model has one) gives the background
    motion between frame 0 and each frame (``animation.Animator`` with ``background=True``).
    """
    frames = video.permute(1, 0, 2, 3)
    animator = animation.Animator(networks, frames[:1], "standard", background=True)
    predictions = [animator(frames[start:start + batch_size]) for start in range(0, frames.shape[0], batch_size)]
    return torch.cat(predictions, dim=0)


def reconstruction(config, networks, dataset, out_dir, device, progress=True, checkpoint=None):
    """Evaluate ``networks`` on ``dataset`` (eval items {'video', 'name'}); returns the metrics dict.

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
                item = dataset[index]
                video = torch.as_tensor(item["video"]).to(device=device, dtype=torch.float32)
                prediction = predict_video(networks, video, batch_size)
                driving = video.permute(1, 0, 2, 3)
                frame_l1 = (prediction - driving).abs().flatten(1).mean(dim=1)
                frame_baseline = (driving[:1] - driving).abs().flatten(1).mean(dim=1)
                name = str(item["name"])
                frames = int(driving.shape[0])
                per_video[name] = {"l1": frame_l1.mean().item(), "baseline_l1": frame_baseline.mean().item(),
                                   "frames": frames}
                total_l1 += frame_l1.sum().item()
                total_baseline += frame_baseline.sum().item()
                total_frames += frames
                images = _to_uint8(prediction)
                file_name = name.replace(os.sep, "_")
                imageio.imwrite(os.path.join(png_dir, file_name + ".png"), np.concatenate(list(images), axis=1))
                if write_mp4:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        imageio.mimsave(os.path.join(mp4_dir, file_name + ".mp4"), list(images), fps=15)
    finally:
        for name, training in modes.items():
            networks[name].train(training)
    metrics = {"l1": total_l1 / total_frames, "baseline_l1": total_baseline / total_frames,
               "frames": total_frames, "per_video": per_video}
    with open(os.path.join(out_dir, "metrics.json"), "w") as stream:
        json.dump(metrics, stream, indent=2)  # written first: kept if the protocol metrics below fail
    from evaluation import evaluate_reconstruction

    metrics.update(evaluate_reconstruction(config["eval_params"], getattr(dataset, "split_dir", None), png_dir,
                                           device, getattr(dataset, "frame_shape", None), checkpoint, progress))
    with open(os.path.join(out_dir, "metrics.json"), "w") as stream:
        json.dump(metrics, stream, indent=2)
    print(f"reconstruction L1: {metrics['l1']:.4f}  (baseline 'predict the source frame': "
          f"{metrics['baseline_l1']:.4f}) over {len(per_video)} videos, {total_frames} frames; "
          f"metrics in {os.path.join(out_dir, 'metrics.json')}")
    return metrics


def evaluate_test_split(config, networks, run_dir, device, dist, checkpoint=None):
    """Reconstruct the config's test split on the main rank (the others wait): its metrics, None elsewhere."""
    metrics = None
    if dist.is_main:
        dataset = dataset_from_config(config["dataset_params"], is_train=False)
        metrics = reconstruction(config, networks, dataset, run_dir, device, checkpoint=checkpoint)
    dist.barrier()
    return metrics
