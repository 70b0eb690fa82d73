"""The two extractor interfaces the metrics use; a new extractor implements one of them.

Frames come as a (T, H, W, 3) RGB array, uint8 or floats in [0, 1] (converted to uint8 by rounding,
since every published pipeline starts from 8-bit images). Keypoints are (x, y) in pixels of the given
frames; ``found`` marks the keypoints the extractor detected.
"""
import numpy as np
import torch

from evaluation.weights import describe_weight_file, load_published


def to_uint8(frames):
    """(T, H, W, 3) uint8 from uint8 or [0, 1] floats; a wrong shape is a ValueError."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3) RGB, got shape {frames.shape}")
    if frames.dtype == np.uint8:
        return frames
    return np.clip(np.rint(frames.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)


class Extractor:
    """Common part: a name, the weight files it loaded (for the report), batching, its device."""

    name = "extractor"
    input_description = ""

    def __init__(self, device="cpu", batch_size=16):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.weights = {}

    def published(self, key, network, weights):
        """``network`` with the published weight file ``weights`` for ``eval_params.weights.<key>`` loaded
        strictly (None: random weights), on this extractor's device in eval mode; the file is recorded
        for the report."""
        if weights is not None:
            load_published(network, weights, f"eval_params.weights.{key}")
        self.weights[key] = describe_weight_file(weights)
        return network.to(self.device).eval()

    def describe(self):
        """What the report records about this extractor."""
        return {"name": self.name, "input": self.input_description, "weights": dict(self.weights)}

    def batches(self, frames):
        """Consecutive slices of at most ``batch_size`` frames."""
        for start in range(0, len(frames), self.batch_size):
            yield frames[start:start + self.batch_size]


class KeypointExtractor(Extractor):
    """frames (T, H, W, 3) -> keypoints (T, K, 2) float64 pixels (x, y), found (T, K) bool."""

    num_keypoints = 0

    def __call__(self, frames):
        frames = to_uint8(frames)
        keypoints, found = [], []
        for batch in self.batches(frames):
            points, mask = self.extract(batch)
            keypoints.append(np.asarray(points, dtype=np.float64))
            found.append(np.asarray(mask, dtype=bool))
        return np.concatenate(keypoints), np.concatenate(found)

    def extract(self, frames):
        """One batch of uint8 frames -> (keypoints, found)."""
        raise NotImplementedError


class EmbeddingExtractor(Extractor):
    """frames (T, H, W, 3) -> embeddings (T, D) float64."""

    dim = 0

    def __call__(self, frames):
        frames = to_uint8(frames)
        return np.concatenate([np.asarray(self.extract(batch), dtype=np.float64) for batch in self.batches(frames)])

    def extract(self, frames):
        """One batch of uint8 frames -> (B, D) embeddings."""
        raise NotImplementedError
