"""Animation-via-disentanglement network (MRAA/TPSMM/CPABMM): identity from the source keypoints,
pose from the driving keypoints, decoded into new keypoints."""
import torch
from torch import nn


def _mlp(sizes, inplace):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers += [nn.BatchNorm1d(sizes[i + 1]), nn.ReLU(inplace=inplace)]
    return nn.Sequential(*layers)


class AVDNetwork(nn.Module):
    """Two MLP encoders (5K*2 -> 256 -> 512 -> 1024 -> bottleneck) and an MLP decoder
    (pose + id -> 1024 -> 512 -> 256 -> 5K*2), BatchNorm + ReLU between linear layers.

    forward(kp_source {'fg_kp': (B, 5K, 2)}, kp_random {'fg_kp': (B, 5K, 2)}) -> {'fg_kp': (B, 5K, 2)}:
    keypoints with the identity of kp_source and the pose of kp_random (unbounded, not clamped).
    """

    def __init__(self, num_cpab, id_bottle_size, pose_bottle_size):
        super().__init__()
        self.num_cpab = num_cpab
        input_size = 5 * 2 * num_cpab
        self.id_encoder = _mlp([input_size, 256, 512, 1024, id_bottle_size], inplace=True)
        self.pose_encoder = _mlp([input_size, 256, 512, 1024, pose_bottle_size], inplace=True)
        self.decoder = _mlp([pose_bottle_size + id_bottle_size, 1024, 512, 256, input_size], inplace=False)

    def forward(self, kp_source, kp_random):
        bs = kp_source["fg_kp"].shape[0]
        pose = self.pose_encoder(kp_random["fg_kp"].reshape(bs, -1))
        identity = self.id_encoder(kp_source["fg_kp"].reshape(bs, -1))
        rec = self.decoder(torch.cat([pose, identity], dim=1))
        return {"fg_kp": rec.view(bs, self.num_cpab * 5, 2)}
