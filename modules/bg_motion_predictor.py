"""Background motion predictor: one affine transformation per (source, driving) pair (TPSMM)."""
import torch
from torch import nn
from torchvision import models


class BGMotionPredictor(nn.Module):
    """ResNet-18 (random init) on the 6-channel concatenation source || driving, ``fc -> 6``.

    The fc layer starts at the identity affine (weights 0, bias [1, 0, 0, 0, 1, 0]).
    forward(source (B, 3, H, W), driving (B, 3, H, W)) -> (B, 3, 3) matrix [[A, b], [0, 0, 1]] acting
    on homogeneous (x, y, 1) in [-1, 1]: it maps driving-frame coordinates to source-frame coordinates.
    """

    def __init__(self):
        super().__init__()
        self.bg_encoder = models.resnet18(weights=None)
        self.bg_encoder.conv1 = nn.Conv2d(6, 64, kernel_size=(7, 7), stride=(2, 2), padding=(3, 3), bias=False)
        self.bg_encoder.fc = nn.Linear(self.bg_encoder.fc.in_features, 6)
        with torch.no_grad():
            self.bg_encoder.fc.weight.zero_()
            self.bg_encoder.fc.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))

    def forward(self, source_image, driving_image):
        bs = source_image.shape[0]
        affine = self.bg_encoder(torch.cat([source_image, driving_image], dim=1)).view(bs, 2, 3)
        last_row = affine.new_zeros(bs, 1, 3)
        last_row[..., 2] = 1.0
        return torch.cat([affine, last_row], dim=1)
