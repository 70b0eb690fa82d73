"""The reconstruction metrics as pose-evaluation computes them: per-frame values and their means.

Each ``*_frames`` function returns one float64 value per frame, NaN where the frame is not scored
(pose-evaluation leaves such frames out of its mean). :func:`summarise` pools the scored frames of all
videos (pose-evaluation's ``np.mean`` over the rows of every video: each frame weighs the same) and
keeps the per-video means next to it.

- L1: mean |real - generated| over pixels and channels, values in [0, 1].
- AKD (average keypoint distance): mean absolute coordinate difference, in pixels of the evaluated
  frames, over the x and y of the keypoints found in both frames (``cmp_with_missing.py``; for faces,
  where the 68 landmarks are found together or not at all, this is ``cmp_kp.py``: frames without a
  face in the generated frame are skipped). Note: the mean of |dx| and |dy|, not a Euclidean distance.
- MKR (missing keypoint rate): keypoints found in the real frame but not in the generated one, as a
  fraction of those found in the real frame (frames where the real frame has none are skipped).
- AED (average euclidean distance): the *squared* L2 distance between the identity embeddings
  (``cmp.py``: ``np.sum(np.abs(a - b) ** 2)``), despite its name.
"""
import math

import numpy as np

METRICS = ("l1", "akd", "mkr", "aed")

DEFINITIONS = {
    "l1": "mean |real - generated| over pixels and channels, frames in [0, 1]",
    "akd": "mean |real - generated| of the x and y pixel coordinates of the keypoints found in both frames",
    "mkr": "share of the keypoints found in the real frame that are missing in the generated frame",
    "aed": "squared L2 distance between the identity embeddings of the real and generated frames",
}


def _as_unit_float(frames):
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames.astype(np.float64) / 255.0
    return frames.astype(np.float64)


def l1_frames(real, generated):
    """Per-frame mean absolute difference of (T, H, W, C) frames (uint8, or floats in [0, 1])."""
    real, generated = _as_unit_float(real), _as_unit_float(generated)
    if real.shape != generated.shape:
        raise ValueError(f"l1: frames of shape {real.shape} and {generated.shape}")
    return np.abs(real - generated).reshape(real.shape[0], -1).mean(axis=1)


def akd_frames(real_keypoints, real_found, generated_keypoints, generated_found):
    """Per-frame AKD: mean |difference| of the coordinates of the keypoints found in both frames.

    keypoints: (T, K, 2) pixels; found: (T, K) bool. NaN where no keypoint is found in both.
    """
    real_keypoints = np.asarray(real_keypoints, dtype=np.float64)
    generated_keypoints = np.asarray(generated_keypoints, dtype=np.float64)
    both = np.asarray(real_found, dtype=bool) & np.asarray(generated_found, dtype=bool)
    difference = np.abs(real_keypoints - generated_keypoints).sum(axis=2)
    count = both.sum(axis=1)
    total = np.where(both, difference, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / (2.0 * count), np.nan)


def mkr_frames(real_found, generated_found):
    """Per-frame MKR: keypoints found in the real frame and missing in the generated one / found in the
    real frame. NaN where the real frame has none."""
    real_found = np.asarray(real_found, dtype=bool)
    generated_found = np.asarray(generated_found, dtype=bool)
    lost = (real_found & ~generated_found).sum(axis=1)
    present = real_found.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(present > 0, lost / np.maximum(present, 1), np.nan)


def aed_frames(real_embeddings, generated_embeddings):
    """Per-frame AED: squared L2 distance between (T, D) embeddings (pose-evaluation's ``cmp.py``)."""
    real = np.asarray(real_embeddings, dtype=np.float64)
    generated = np.asarray(generated_embeddings, dtype=np.float64)
    if real.shape != generated.shape:
        raise ValueError(f"aed: embeddings of shape {real.shape} and {generated.shape}")
    return ((real - generated) ** 2).sum(axis=1)


def _mean_or_none(values):
    return float(np.mean(values)) if len(values) else None


def summarise(per_video, definition=None):
    """{'mean', 'frames', 'skipped_frames', 'per_video': {name: {'mean', 'frames', 'skipped_frames'}}}.

    ``per_video``: {name: per-frame values with NaN for unscored frames}. The mean pools the scored
    frames of every video (None when no frame is scored).
    """
    pooled = []
    videos = {}
    skipped = 0
    for name, values in per_video.items():
        values = np.asarray(values, dtype=np.float64)
        scored = values[~np.isnan(values)]
        pooled.append(scored)
        skipped += int(values.size - scored.size)
        videos[name] = {"mean": _mean_or_none(scored), "frames": int(scored.size),
                        "skipped_frames": int(values.size - scored.size)}
    pooled = np.concatenate(pooled) if pooled else np.zeros(0)
    summary = {"mean": _mean_or_none(pooled), "frames": int(pooled.size), "skipped_frames": skipped,
               "per_video": videos}
    if definition is not None:
        summary = {"definition": definition, **summary}
    return summary


def format_mean(value):
    """A mean for a log line: 4 decimals, or 'n/a' when nothing was scored."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
