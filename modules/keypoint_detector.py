"""Keypoint detector: ResNet-18 regressing K groups of 5 keypoints (CPABMM/TPSMM)."""
import torch
from torch import nn
from torchvision import models


class KPDetector(nn.Module):
    """ResNet-18 (random init, never downloaded) with ``fc -> num_cpab * 5 * 2`` and ``sigmoid * 2 - 1``.

    forward(image (B, C, H, W)) -> {'fg_kp': (B, 5 * num_cpab, 2)}: (x, y) in [-1, 1], grouped as
    num_cpab consecutive groups of 5 keypoints.
    """

    def __init__(self, num_cpab):
        super().__init__()
        if num_cpab < 1:
            raise ValueError(f"num_cpab must be >= 1, got {num_cpab}")
        self.num_cpab = num_cpab
        self.fg_encoder = models.resnet18(weights=None)
        self.fg_encoder.fc = nn.Linear(self.fg_encoder.fc.in_features, num_cpab * 5 * 2)

    def forward(self, image):
        kp = torch.sigmoid(self.fg_encoder(image)) * 2 - 1
        return {"fg_kp": kp.view(image.shape[0], self.num_cpab * 5, 2)}
