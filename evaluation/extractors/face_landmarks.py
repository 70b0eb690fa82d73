"""68 facial landmarks (faces' AKD): face-alignment's S3FD detector and 2-D FAN-4, rebuilt here.

pose-evaluation runs ``face_alignment.FaceAlignment(LandmarksType._2D, flip_input=False)`` of the
face-alignment commit it pins (3750f83, v1.0.0, Oct 2018) on each RGB uint8 frame and keeps the first
face. That pipeline, step by step (each step below follows it; the networks load its published files):

1. S3FD on the whole frame: BGR, minus the means (104, 117, 123), no resizing. Softmax scores
   > 0.05 at the six levels (strides 4 ... 128, anchors 4x the stride) give boxes (variances 0.1,
   0.2); greedy NMS at IoU 0.3 (areas with +1), then boxes with score > 0.5. No box: no face, the
   frame's 68 landmarks are all "not found".
2. The highest-scoring box (x1, y1, x2, y2) gives the centre (mid-x, mid-y - 0.12 * height) and the
   scale (width + height) / 195; a 256x256 crop of 200 * scale pixels around the centre (zero
   outside the frame, corners truncated to integers) is resized bilinearly (OpenCV's 8-bit
   INTER_LINEAR, emulated in extractors/opencv.py).
3. FAN-4 on the crop (RGB, [0, 1]): the last hourglass's 64x64 heatmaps; the arg-max of each, moved a
   quarter pixel towards the larger neighbour (not at the border), minus 0.5, mapped back to the frame
   and truncated to integers (``transform(...).int()`` upstream): landmarks are whole pixels.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluation.extractors.base import KeypointExtractor
from evaluation.extractors.opencv import resize_linear_uint8

NUM_LANDMARKS = 68
CROP = 256
HEATMAP = 64
DETECTOR_MEAN_BGR = (104.0, 117.0, 123.0)
REFERENCE_SCALE = 195.0


def _conv3x3(in_planes, out_planes):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)


class ConvBlock(nn.Module):
    """FAN's residual block: three pre-activated 3x3 convolutions whose outputs (C/2, C/4, C/4 channels)
    are concatenated; a pre-activated 1x1 projection on the skip path when the width changes."""

    def __init__(self, in_planes, out_planes):
        super().__init__()
        half, quarter = out_planes // 2, out_planes // 4
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, half)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv2 = _conv3x3(half, quarter)
        self.bn3 = nn.BatchNorm2d(quarter)
        self.conv3 = _conv3x3(quarter, quarter)
        self.downsample = None
        if in_planes != out_planes:
            self.downsample = nn.Sequential(nn.BatchNorm2d(in_planes), nn.ReLU(True),
                                            nn.Conv2d(in_planes, out_planes, kernel_size=1, bias=False))

    def forward(self, x):
        out1 = self.conv1(F.relu(self.bn1(x)))
        out2 = self.conv2(F.relu(self.bn2(out1)))
        out3 = self.conv3(F.relu(self.bn3(out2)))
        skip = x if self.downsample is None else self.downsample(x)
        return torch.cat((out1, out2, out3), dim=1) + skip


class HourGlass(nn.Module):
    """Recursive hourglass of ``depth`` levels; module names ``b1_<l>``, ``b2_<l>``, ``b2_plus_1``,
    ``b3_<l>`` as in face-alignment (so its state dicts load)."""

    def __init__(self, depth, features):
        super().__init__()
        self.depth = depth
        for level in range(depth, 0, -1):
            self.add_module(f"b1_{level}", ConvBlock(features, features))
            self.add_module(f"b2_{level}", ConvBlock(features, features))
            self.add_module(f"b3_{level}", ConvBlock(features, features))
        self.add_module("b2_plus_1", ConvBlock(features, features))

    def _level(self, level, x):
        upper = self._modules[f"b1_{level}"](x)
        lower = self._modules[f"b2_{level}"](F.avg_pool2d(x, 2, stride=2))
        if level > 1:
            lower = self._level(level - 1, lower)
        else:
            lower = self._modules["b2_plus_1"](lower)
        lower = self._modules[f"b3_{level}"](lower)
        return upper + F.interpolate(lower, scale_factor=2, mode="nearest")

    def forward(self, x):
        return self._level(self.depth, x)


class FAN(nn.Module):
    """Face Alignment Network (Bulat & Tzimiropoulos 2017) with ``num_modules`` stacked hourglasses:
    (B, 3, 256, 256) RGB in [0, 1] -> a list of (B, 68, 64, 64) heatmaps, one per hourglass.
    The published 2-D model is ``FAN(4)`` (``2DFAN4-11f355bf06.pth.tar``)."""

    def __init__(self, num_modules=4, num_landmarks=NUM_LANDMARKS):
        super().__init__()
        self.num_modules = num_modules
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = ConvBlock(64, 128)
        self.conv3 = ConvBlock(128, 128)
        self.conv4 = ConvBlock(128, 256)
        for index in range(num_modules):
            self.add_module(f"m{index}", HourGlass(4, 256))
            self.add_module(f"top_m_{index}", ConvBlock(256, 256))
            self.add_module(f"conv_last{index}", nn.Conv2d(256, 256, kernel_size=1))
            self.add_module(f"bn_end{index}", nn.BatchNorm2d(256))
            self.add_module(f"l{index}", nn.Conv2d(256, num_landmarks, kernel_size=1))
            if index < num_modules - 1:
                self.add_module(f"bl{index}", nn.Conv2d(256, 256, kernel_size=1))
                self.add_module(f"al{index}", nn.Conv2d(num_landmarks, 256, kernel_size=1))

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.conv4(self.conv3(F.avg_pool2d(self.conv2(x), 2, stride=2)))
        previous = x
        outputs = []
        for index in range(self.num_modules):
            features = self._modules[f"top_m_{index}"](self._modules[f"m{index}"](previous))
            features = F.relu(self._modules[f"bn_end{index}"](self._modules[f"conv_last{index}"](features)))
            heatmaps = self._modules[f"l{index}"](features)
            outputs.append(heatmaps)
            if index < self.num_modules - 1:
                previous = previous + self._modules[f"bl{index}"](features) + self._modules[f"al{index}"](heatmaps)
        return outputs


class L2Norm(nn.Module):
    """Channel-wise L2 normalisation with a learnt per-channel scale (S3FD's conv3_3/4_3/5_3 norms)."""

    def __init__(self, channels, scale):
        super().__init__()
        self.eps = 1e-10
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x):
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps
        return x / norm * self.weight.view(1, -1, 1, 1)


class S3FD(nn.Module):
    """S3FD face detector (VGG-16 trunk, six detection levels), face-alignment's port:
    (B, 3, H, W) BGR minus the means -> [cls1, reg1, ..., cls6, reg6] (2 class, 4 box channels each;
    the first level's 4 class channels are max-out-reduced to 2)."""

    _TRUNK = (("conv1_1", 3, 64), ("conv1_2", 64, 64), None,
              ("conv2_1", 64, 128), ("conv2_2", 128, 128), None,
              ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256), None,
              ("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3", 512, 512), None,
              ("conv5_1", 512, 512), ("conv5_2", 512, 512), ("conv5_3", 512, 512), None)
    _HEADS = (("conv3_3_norm", 256, 4), ("conv4_3_norm", 512, 2), ("conv5_3_norm", 512, 2),
              ("fc7", 1024, 2), ("conv6_2", 512, 2), ("conv7_2", 256, 2))

    def __init__(self):
        super().__init__()
        for entry in self._TRUNK:
            if entry is not None:
                name, cin, cout = entry
                self.add_module(name, nn.Conv2d(cin, cout, kernel_size=3, padding=1))
        self.fc6 = nn.Conv2d(512, 1024, kernel_size=3, padding=3)
        self.fc7 = nn.Conv2d(1024, 1024, kernel_size=1)
        self.conv6_1 = nn.Conv2d(1024, 256, kernel_size=1)
        self.conv6_2 = nn.Conv2d(256, 512, kernel_size=3, stride=2, padding=1)
        self.conv7_1 = nn.Conv2d(512, 128, kernel_size=1)
        self.conv7_2 = nn.Conv2d(128, 256, kernel_size=3, stride=2, padding=1)
        self.conv3_3_norm = L2Norm(256, 10)
        self.conv4_3_norm = L2Norm(512, 8)
        self.conv5_3_norm = L2Norm(512, 5)
        for name, channels, classes in self._HEADS:
            self.add_module(f"{name}_mbox_conf", nn.Conv2d(channels, classes, kernel_size=3, padding=1))
            self.add_module(f"{name}_mbox_loc", nn.Conv2d(channels, 4, kernel_size=3, padding=1))

    def forward(self, x):
        taps = {}
        for entry in self._TRUNK:
            if entry is None:
                x = F.max_pool2d(x, 2, 2)
            else:
                x = F.relu(self._modules[entry[0]](x))
                taps[entry[0]] = x
        x = F.relu(self.fc7(F.relu(self.fc6(x))))
        taps["fc7"] = x
        x = F.relu(self.conv6_2(F.relu(self.conv6_1(x))))
        taps["conv6_2"] = x
        taps["conv7_2"] = F.relu(self.conv7_2(F.relu(self.conv7_1(x))))
        features = {"conv3_3_norm": self.conv3_3_norm(taps["conv3_3"]),
                    "conv4_3_norm": self.conv4_3_norm(taps["conv4_3"]),
                    "conv5_3_norm": self.conv5_3_norm(taps["conv5_3"]),
                    "fc7": taps["fc7"], "conv6_2": taps["conv6_2"], "conv7_2": taps["conv7_2"]}
        outputs = []
        for name, _, _ in self._HEADS:
            outputs.append(self._modules[f"{name}_mbox_conf"](features[name]))
            outputs.append(self._modules[f"{name}_mbox_loc"](features[name]))
        # Max-out background label of the first level (3 background channels, 1 face channel).
        first = outputs[0]
        background = first[:, :3].max(dim=1, keepdim=True).values
        outputs[0] = torch.cat((background, first[:, 3:4]), dim=1)
        return outputs


def decode_detections(outputs, index):
    """Candidate boxes (N, 5) = x1, y1, x2, y2, score of image ``index`` from S3FD's outputs
    (softmax over the class channels, score > 0.05, priors at stride/2 + i * stride of size 4 * stride,
    variances 0.1 and 0.2), in face-alignment's order (level, then row-major position)."""
    boxes = []
    for level in range(len(outputs) // 2):
        scores = F.softmax(outputs[2 * level][index], dim=0)[1]
        loc = outputs[2 * level + 1][index]
        stride = 2 ** (level + 2)
        rows, cols = torch.nonzero(scores > 0.05, as_tuple=True)
        if rows.numel() == 0:
            continue
        offsets = loc[:, rows, cols].t()
        prior_size = float(stride * 4)
        centre = torch.stack((stride / 2 + cols.float() * stride, stride / 2 + rows.float() * stride), dim=1)
        centre = centre + offsets[:, :2] * 0.1 * prior_size
        size = prior_size * torch.exp(offsets[:, 2:] * 0.2)
        corner = centre - size / 2
        boxes.append(torch.cat((corner, corner + size, scores[rows, cols][:, None]), dim=1))
    if not boxes:
        return np.zeros((0, 5))
    return torch.cat(boxes).double().cpu().numpy()


def nms(boxes, threshold):
    """Greedy non-maximum suppression (face-alignment's: areas and overlaps with +1 pixel); kept
    indices by decreasing score."""
    if len(boxes) == 0:
        return []
    x1, y1, x2, y2, scores = (boxes[:, k] for k in range(5))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        width = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        height = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        overlap = width * height / (areas[best] + areas[rest] - width * height)
        order = rest[overlap <= threshold]
    return keep


def first_face(candidates):
    """face-alignment's detection result (NMS 0.3, score > 0.5), first box: (x1, y1, x2, y2) or None."""
    kept = [candidates[k] for k in nms(candidates, 0.3) if candidates[k, 4] > 0.5]
    return kept[0][:4] if kept else None


def crop_geometry(box):
    """(centre (2,) float32 tensor, scale) of a face box, as face-alignment derives them from its
    float32 boxes with NumPy 1.x promotion (float32 differences, float64 divisions)."""
    x1, y1, x2, y2 = (np.float32(v) for v in box[:4])
    width, height = np.float32(x2 - x1), np.float32(y2 - y1)
    centre = torch.tensor([float(x2) - float(width) / 2.0, float(y2) - float(height) / 2.0], dtype=torch.float32)
    centre[1] = centre[1] - float(height) * 0.12
    return centre, float(np.float32(np.float32(width + y2) - y1)) / REFERENCE_SCALE


def crop_transform(centre, scale, resolution, invert=False):
    """face-alignment's 3x3 float32 similarity from frame pixels to a ``resolution`` crop (or back)."""
    h = 200.0 * scale
    t = torch.eye(3)
    t[0, 0] = resolution / h
    t[1, 1] = resolution / h
    t[0, 2] = resolution * (-centre[0] / h + 0.5)
    t[1, 2] = resolution * (-centre[1] / h + 0.5)
    return torch.inverse(t) if invert else t


def transform_points(points, centre, scale, resolution, invert=False):
    """(N, 2) points through :func:`crop_transform`, truncated to integers like ``.int()`` upstream."""
    t = crop_transform(centre, scale, resolution, invert)
    points = torch.as_tensor(points, dtype=torch.float32).reshape(-1, 2)
    homogeneous = torch.cat((points, torch.ones(points.shape[0], 1)), dim=1)
    return (homogeneous @ t.t())[:, :2].int()


def resize_bilinear_uint8(image, height, width):
    """(h, w, 3) uint8 -> (height, width, 3) uint8 like ``cv2.resize(image, (width, height))``."""
    tensor = torch.from_numpy(np.ascontiguousarray(image))[None]
    return resize_linear_uint8(tensor, height, width)[0].numpy()


def crop_face(image, centre, scale, resolution=CROP):
    """face-alignment's ``crop``: the square around ``centre`` (corners from the inverse transform,
    truncated), zero where it leaves the frame, resized to ``resolution``; (resolution, resolution, 3) uint8."""
    ul = transform_points([[1, 1]], centre, scale, resolution, invert=True)[0].tolist()
    br = transform_points([[resolution, resolution]], centre, scale, resolution, invert=True)[0].tolist()
    height, width = image.shape[:2]
    canvas = np.zeros((max(br[1] - ul[1], 1), max(br[0] - ul[0], 1), image.shape[2]), dtype=np.uint8)
    new_x = (max(1, -ul[0] + 1), min(br[0], width) - ul[0])
    new_y = (max(1, -ul[1] + 1), min(br[1], height) - ul[1])
    old_x = (max(1, ul[0] + 1), min(br[0], width))
    old_y = (max(1, ul[1] + 1), min(br[1], height))
    if new_x[1] >= new_x[0] and new_y[1] >= new_y[0]:
        canvas[new_y[0] - 1:new_y[1], new_x[0] - 1:new_x[1]] = image[old_y[0] - 1:old_y[1], old_x[0] - 1:old_x[1]]
    return resize_bilinear_uint8(canvas, resolution, resolution)


def heatmap_peaks(heatmaps):
    """(B, K, 64, 64) heatmaps -> (B, K, 2) float32 (x, y) in face-alignment's heatmap coordinates:
    1-based arg-max, +-0.25 towards the larger neighbour when not on the border, then -0.5."""
    batch, count, rows, cols = heatmaps.shape
    index = heatmaps.reshape(batch, count, -1).argmax(dim=2)
    x, y = index % cols, index // cols
    peaks = torch.stack((x + 1, y + 1), dim=2).float()
    inside = (x > 0) & (x < cols - 1) & (y > 0) & (y < rows - 1)
    xl, xr = (x - 1).clamp(0, cols - 1), (x + 1).clamp(0, cols - 1)
    yu, yd = (y - 1).clamp(0, rows - 1), (y + 1).clamp(0, rows - 1)

    def at(yy, xx):
        return heatmaps.reshape(batch, count, -1).gather(2, (yy * cols + xx)[..., None])[..., 0]

    shift = torch.stack((at(y, xr) - at(y, xl), at(yd, x) - at(yu, x)), dim=2).sign() * 0.25
    return peaks + torch.where(inside[..., None], shift, torch.zeros_like(shift)) - 0.5


class FaceLandmarkExtractor(KeypointExtractor):
    """68 landmarks per frame from S3FD + FAN-4 (see the module docstring); all found or none."""

    name = "face-alignment FAN-4 2D + S3FD (v1.0.0 pipeline)"
    input_description = ("S3FD: full frame, BGR uint8 minus (104, 117, 123); FAN: 256x256 face crop, RGB, "
                         "[0, 1]; landmarks in whole pixels of the frame")
    num_keypoints = NUM_LANDMARKS

    def __init__(self, fan_weights=None, s3fd_weights=None, device="cpu", batch_size=16, fan_modules=4):
        super().__init__(device, batch_size)
        self.fan = self.published("fan", FAN(fan_modules), fan_weights)
        self.detector = self.published("s3fd", S3FD(), s3fd_weights)

    @torch.inference_mode()
    def extract(self, frames):
        batch = frames.shape[0]
        keypoints = np.zeros((batch, NUM_LANDMARKS, 2))
        found = np.zeros((batch, NUM_LANDMARKS), dtype=bool)
        bgr = torch.from_numpy(np.ascontiguousarray(frames[..., ::-1])).to(self.device)
        mean = torch.tensor(DETECTOR_MEAN_BGR, device=self.device)
        detector_input = (bgr.float() - mean).permute(0, 3, 1, 2).contiguous()
        outputs = [output.float().cpu() for output in self.detector(detector_input)]
        faces = []
        for index in range(batch):
            box = first_face(decode_detections(outputs, index))
            if box is not None:
                centre, scale = crop_geometry(box)
                faces.append((index, centre, scale, crop_face(frames[index], centre, scale)))
        if not faces:
            return keypoints, found
        crops = torch.from_numpy(np.stack([face[3] for face in faces])).to(self.device)
        heatmaps = self.fan(crops.permute(0, 3, 1, 2).float() / 255.0)[-1].float().cpu()
        peaks = heatmap_peaks(heatmaps)
        for (index, centre, scale, _), points in zip(faces, peaks, strict=True):
            keypoints[index] = transform_points(points, centre, scale, HEATMAP, invert=True).numpy()
            found[index] = True
        return keypoints, found
