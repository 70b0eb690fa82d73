"""18 body keypoints (bodies' AKD and MKR): the rtpose VGG19 model (OpenPose's CMU network).

pose-evaluation's ``extract_body_pose`` with the fork it pins (AliaksandrSiarohin/
pytorch_Realtime_Multi-Person_Pose_Estimation, commit 257d8b4, one scale only), step by step:

1. The RGB uint8 frame is flipped to BGR, resized by 368 / min(H, W) (OpenCV's 8-bit INTER_LINEAR,
   emulated in extractors/opencv.py), zero-padded to a multiple of 8, mapped to x / 256 - 0.5.
2. The network's last stage gives 19 heatmaps (18 keypoints + background) and 38 PAF channels at 1/8
   resolution; the heatmaps are upsampled x8 (bicubic), cropped to the resized frame and resized to
   the frame (bicubic; OpenCV's INTER_CUBIC and torch's bicubic share the kernel, a = -0.75).
3. The same on the horizontally flipped frame; its heatmaps are flipped back, left/right channels
   swapped, and averaged with the first pass's.
4. Peaks: local maxima over the 4-neighbourhood (``maximum_filter`` with a cross) above
   ``thre1 = 0.1``, each moved to the maximum of the 5x5 window around it (clipped at the border);
   integer pixels. pose-evaluation keeps, per keypoint type, the last peak in row-major order of the
   heatmap (``tmp[joint_list[:, -1]] = joint_list[:, :2]``); a type without a peak is "not found"
   (-1 upstream).
The PAFs and the thresholds ``thre2 = 0.05``, ``thre3 = 0.5`` only group peaks into people, which
``extract.py`` discards, so they do not change the keypoints: they are not computed here.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluation.extractors.base import KeypointExtractor
from evaluation.extractors.opencv import resize_linear_uint8

NUM_KEYPOINTS = 18
INPUT_SIZE = 368
STRIDE = 8
PEAK_THRESHOLD = 0.1
# Heatmap channel order after a horizontal flip (left <-> right; the background channel 18 stays).
FLIP_HEATMAP = (0, 1, 5, 6, 7, 2, 3, 4, 11, 12, 13, 8, 9, 10, 15, 14, 17, 16, 18)

# VGG19 trunk of rtpose: (in, out) 3x3 convolutions, "pool" = 2x2 max-pool.
_TRUNK = ((3, 64), (64, 64), "pool", (64, 128), (128, 128), "pool", (128, 256), (256, 256), (256, 256),
          (256, 256), "pool", (256, 512), (512, 512), (512, 256), (256, 128))


def _sequential(layers):
    """nn.Sequential of (in, out, kernel, padding) convolutions, "relu" and "pool" (2x2 max-pool) entries."""
    modules = []
    for layer in layers:
        if layer == "pool":
            modules.append(nn.MaxPool2d(kernel_size=2, stride=2, padding=0))
        elif layer == "relu":
            modules.append(nn.ReLU(inplace=True))
        else:
            cin, cout, kernel, padding = layer
            modules.append(nn.Conv2d(cin, cout, kernel_size=kernel, stride=1, padding=padding))
    return nn.Sequential(*modules)


def _stage(layers):
    """Convolutions with a ReLU after each but the last (rtpose's ``make_stages``)."""
    sequence = []
    for index, layer in enumerate(layers):
        sequence.append(layer)
        if index < len(layers) - 1:
            sequence.append("relu")
    return _sequential(sequence)


class RTPose(nn.Module):
    """rtpose VGG19 (Cao et al. 2017, six stages, two branches), module names ``model0``,
    ``model<stage>_1`` (PAFs, 38 channels) and ``model<stage>_2`` (heatmaps, 19 channels) as in the
    published ``pose_model.pth``: (B, 3, H, W), BGR, x / 256 - 0.5 -> (PAFs, heatmaps) at H/8."""

    def __init__(self):
        super().__init__()
        trunk = []
        for layer in _TRUNK:
            trunk += ["pool"] if layer == "pool" else [(layer[0], layer[1], 3, 1), "relu"]
        self.model0 = _sequential(trunk)
        for branch, channels in ((1, 38), (2, 19)):
            setattr(self, f"model1_{branch}", _stage([(128, 128, 3, 1), (128, 128, 3, 1), (128, 128, 3, 1),
                                                      (128, 512, 1, 0), (512, channels, 1, 0)]))
            for stage in range(2, 7):
                setattr(self, f"model{stage}_{branch}",
                        _stage([(185, 128, 7, 3)] + [(128, 128, 7, 3)] * 4 + [(128, 128, 1, 0), (128, channels, 1, 0)]))

    def forward(self, x):
        features = self.model0(x)
        pafs, heatmaps = self.model1_1(features), self.model1_2(features)
        for stage in range(2, 7):
            joined = torch.cat((pafs, heatmaps, features), dim=1)
            pafs, heatmaps = getattr(self, f"model{stage}_1")(joined), getattr(self, f"model{stage}_2")(joined)
        return pafs, heatmaps


def network_input(frames, input_size=INPUT_SIZE, device="cpu"):
    """(B, H, W, 3) RGB uint8 -> ((B, 3, H', W') BGR x / 256 - 0.5, resized (h, w)) as rtpose's
    ``crop_with_factor`` + ``rtpose_preprocess`` build it (zero padding is -0.5 after the mapping)."""
    height, width = frames.shape[1:3]
    scale = float(input_size) / min(height, width)
    resized_h, resized_w = int(round(height * scale)), int(round(width * scale))
    bgr = torch.from_numpy(np.ascontiguousarray(frames[..., ::-1])).to(device)
    resized = resize_linear_uint8(bgr, resized_h, resized_w, inverse_scale=scale).permute(0, 3, 1, 2).float()
    padded_h, padded_w = -(-resized_h // STRIDE) * STRIDE, -(-resized_w // STRIDE) * STRIDE
    padded = F.pad(resized, (0, padded_w - resized_w, 0, padded_h - resized_h))
    return padded / 256.0 - 0.5, (resized_h, resized_w)


def heatmaps_at_frame_size(heatmaps, resized, frame_size):
    """Network heatmaps (B, C, h/8, w/8) -> (B, C, H, W): x8 bicubic, crop to the resized frame, bicubic
    to the frame size (rtpose's ``get_outputs``)."""
    up = F.interpolate(heatmaps, scale_factor=STRIDE, mode="bicubic", align_corners=False)
    up = up[:, :, :resized[0], :resized[1]]
    return F.interpolate(up, size=frame_size, mode="bicubic", align_corners=False)


def average_with_flip(heatmaps, flipped_heatmaps):
    """Mean of the heatmaps of a frame and of its mirror image (flipped back, channels swapped)."""
    return (heatmaps + flipped_heatmaps.flip(-1)[:, list(FLIP_HEATMAP)]) / 2.0


def select_peaks(heatmaps, threshold=PEAK_THRESHOLD):
    """(B, K, H, W) heatmaps -> keypoints (B, K, 2) (x, y) integer pixels, found (B, K).

    Per channel: the last local maximum (4-neighbourhood, > ``threshold``) in row-major order, moved to
    the arg-max (first in row-major order) of the 5x5 window around it, clipped at the border.
    """
    batch, count, height, width = heatmaps.shape
    padded = F.pad(heatmaps, (1, 1, 1, 1), mode="replicate")
    neighbours = torch.stack((padded[:, :, :-2, 1:-1], padded[:, :, 2:, 1:-1],
                              padded[:, :, 1:-1, :-2], padded[:, :, 1:-1, 2:]), dim=0).amax(dim=0)
    peaks = (heatmaps >= neighbours) & (heatmaps > threshold)
    order = torch.arange(1, height * width + 1, device=heatmaps.device)
    last = (peaks.reshape(batch, count, -1) * order).amax(dim=2)
    found = last > 0
    index = (last - 1).clamp(min=0)
    y, x = index // width, index % width
    window = F.pad(heatmaps, (2, 2, 2, 2), value=float("-inf"))
    offsets = torch.arange(-2, 3, device=heatmaps.device)
    dy = offsets.repeat_interleave(5)
    dx = offsets.repeat(5)
    rows = (y[..., None] + 2 + dy).reshape(batch, count, -1)
    cols = (x[..., None] + 2 + dx).reshape(batch, count, -1)
    flat = window.reshape(batch, count, -1)
    values = flat.gather(2, rows * (width + 4) + cols)
    best = values.argmax(dim=2)
    keypoints = torch.stack((x + dx[best], y + dy[best]), dim=2)
    return keypoints, found


class BodyKeypointExtractor(KeypointExtractor):
    """18 OpenPose keypoints per frame (0 nose, 1 neck, 2-4 right arm, 5-7 left arm, 8-10 right leg,
    11-13 left leg, 14/15 eyes, 16/17 ears), see the module docstring."""

    name = "rtpose VGG19 (pytorch_Realtime_Multi-Person_Pose_Estimation, 1 scale + flip)"
    num_keypoints = NUM_KEYPOINTS

    def __init__(self, weights=None, device="cpu", batch_size=8, input_size=INPUT_SIZE):
        super().__init__(device, batch_size)
        self.input_size = int(input_size)
        self.input_description = (f"frame resized so that its short side is {self.input_size} (uint8 bilinear), "
                                  f"BGR, x / 256 - 0.5, plus its mirror image; keypoints in whole pixels")
        self.network = self.published("rtpose", RTPose(), weights)

    def heatmaps(self, frames):
        """(B, 19, H, W) float64 heatmaps of uint8 frames, averaged with the mirrored pass."""
        frame_size = frames.shape[1:3]
        passes = []
        for view in (frames, frames[:, :, ::-1]):
            inputs, resized = network_input(view, self.input_size, self.device)
            heatmaps = self.network(inputs)[1].float()
            passes.append(heatmaps_at_frame_size(heatmaps, resized, frame_size).double())
        return average_with_flip(*passes)

    @torch.inference_mode()
    def extract(self, frames):
        keypoints, found = select_peaks(self.heatmaps(frames)[:, :NUM_KEYPOINTS])
        return keypoints.double().cpu().numpy(), found.cpu().numpy()
