"""Person re-ID embeddings (bodies' AED): layumi/Person_reID_baseline_pytorch's ``ft_net`` (ResNet-50).

pose-evaluation's ``extract_body_id`` (with the re-ID commit it pins, 2a5a656, Jan 2018), exactly:
- ``ft_net(751)`` loads ``reid_model.pth``, then its ``model.fc`` (512-d bottleneck) and
  ``classifier`` are replaced by empty ``nn.Sequential``: the embedding is ResNet-50's 2048-d global
  average pool, not L2-normalised, without the flipped-image average of the re-ID repository's own
  ``test.py``.
- Input: the RGB uint8 frame -> PIL -> ``Resize((288, 144), interpolation=3)`` (PIL bicubic, with
  PIL's anti-aliasing) -> ``ToTensor`` ([0, 1]) -> ``Normalize(0, 255)`` -> ImageNet
  ``Normalize``: the pixels are divided by 255 twice, so the network sees values in [0, 1/255]
  before the ImageNet normalisation.
- The network is never put in eval mode: every BatchNorm normalises with the statistics of the one
  frame it is given (training-mode batch statistics over a batch of 1).
Faithful to the official code: the published AED values come from exactly this chain; this module
keeps it (``batch_norm="frame"``); ``batch_norm="running"`` uses the running statistics instead.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.models import resnet50

from evaluation.extractors.base import EmbeddingExtractor

INPUT_HEIGHT, INPUT_WIDTH = 288, 144
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NUM_IDS = 751  # Market-1501 training identities


class FrameStatisticsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d (same parameters, buffers and state-dict keys) that normalises each sample with its
    own statistics: what a training-mode BatchNorm does to a batch of one frame, so frames can be
    batched without changing their embeddings."""

    def forward(self, x):
        return F.instance_norm(x, weight=self.weight, bias=self.bias, use_input_stats=True, eps=self.eps)


class FtNet(nn.Module):
    """``ft_net(751)`` of the pinned re-ID commit: ``model`` = torchvision ResNet-50 whose ``fc`` is the
    bottleneck Linear(2048, 512) + BatchNorm1d + LeakyReLU(0.1) + Dropout(0.5), ``classifier`` =
    Linear(512, 751). ``forward`` returns the 2048-d pooled feature (the head is loaded, not used)."""

    def __init__(self, batch_norm="frame"):
        super().__init__()
        if batch_norm not in ("frame", "running"):
            raise ValueError(f"batch_norm must be 'frame' or 'running', got {batch_norm!r}")
        norm_layer = FrameStatisticsBatchNorm2d if batch_norm == "frame" else nn.BatchNorm2d
        self.model = resnet50(weights=None, norm_layer=norm_layer)
        self.model.fc = nn.Sequential(nn.Linear(2048, 512), nn.BatchNorm1d(512), nn.LeakyReLU(0.1), nn.Dropout(p=0.5))
        self.classifier = nn.Sequential(nn.Linear(512, NUM_IDS))

    def forward(self, x):
        net = self.model
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        return torch.flatten(net.avgpool(x), 1)


def reid_input(frames):
    """(B, H, W, 3) RGB uint8 -> (B, 3, 288, 144) float32: PIL bicubic resize, /255 twice, ImageNet
    normalisation (pose-evaluation's transform, see the module docstring)."""
    resized = [np.asarray(Image.fromarray(frame).resize((INPUT_WIDTH, INPUT_HEIGHT), Image.BICUBIC))
               for frame in frames]
    tensor = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float() / 255.0
    tensor = tensor / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (tensor - mean) / std


class BodyIdentityExtractor(EmbeddingExtractor):
    """2048-d re-ID features of whole frames, pose-evaluation's body_id (see the module docstring)."""

    name = "person re-ID ft_net ResNet-50 (layumi/Person_reID_baseline_pytorch, 2a5a656)"
    input_description = ("whole frame resized to 288x144 (PIL bicubic), RGB, divided by 255 twice then "
                         "ImageNet-normalised; BatchNorm with per-frame statistics; 2048-d pooled feature")
    dim = 2048

    def __init__(self, weights=None, device="cpu", batch_size=16, batch_norm="frame"):
        super().__init__(device, batch_size)
        self.network = self.published("reid", FtNet(batch_norm), weights)

    @torch.inference_mode()
    def extract(self, frames):
        return self.network(reid_input(frames).to(self.device)).double().cpu().numpy()
