"""Generator ("inpainting network", TPSMM/CPABMM): warps and occludes the source's encoder features
with the dense motion, decodes the driving frame, and blends it with the warped source."""
import torch
import torch.nn.functional as F
from torch import nn

from modules.blocks import DownBlock2d, ResBlock2d, SameBlock2d, UpBlock2d


class InpaintingNetwork(nn.Module):
    """Encoder (SameBlock 7x7 + ``num_down_blocks`` DownBlocks) / decoder (2 ResBlocks + UpBlock per
    level) with warped, occluded skip features; final 7x7 conv + sigmoid.

    Encoder level l has ch(l) = min(max_features, block_expansion * 2^l) channels at 1/2^l of the
    input. Decoder step i takes ch(n) (i = 0) or 2 ch(n - i) channels and outputs ch(n - i - 1)
    (for the released configs these are the official hard-coded [512, 512, 256] -> [256, 128, 64]).
    With ``multi_mask`` the dense motion gives one occlusion map per encoder level, coarsest first
    (``occlusion_map[k]`` belongs to level n - k); otherwise one map, resized to every level.
    """

    def __init__(self, num_channels, block_expansion, max_features, num_down_blocks, multi_mask):
        super().__init__()
        if num_down_blocks < 1:
            raise ValueError(f"num_down_blocks must be >= 1, got {num_down_blocks}")
        self.num_down_blocks = num_down_blocks
        self.multi_mask = multi_mask
        self.num_channels = num_channels

        def ch(level):
            return min(max_features, block_expansion * (2 ** level))

        n = num_down_blocks
        self.first = SameBlock2d(num_channels, block_expansion, kernel_size=(7, 7), padding=(3, 3))
        self.down_blocks = nn.ModuleList(DownBlock2d(ch(i), ch(i + 1)) for i in range(n))
        in_features = [ch(n)] + [2 * ch(n - i) for i in range(1, n)]
        self.up_blocks = nn.ModuleList(UpBlock2d(in_features[i], ch(n - i - 1)) for i in range(n))
        self.resblock = nn.ModuleList(ResBlock2d(in_features[i // 2], kernel_size=(3, 3), padding=(1, 1))
                                      for i in range(2 * n))
        self.final = nn.Conv2d(block_expansion, num_channels, kernel_size=(7, 7), padding=(3, 3))

    @staticmethod
    def deform_input(inp, deformation):
        """Backward-warp ``inp`` (B, C, H, W) with the (B, h, w, 2) grid, resized bilinearly to (H, W)."""
        h, w = inp.shape[2:]
        if deformation.shape[1:3] != (h, w):
            deformation = F.interpolate(deformation.permute(0, 3, 1, 2), size=(h, w), mode="bilinear",
                                        align_corners=True).permute(0, 2, 3, 1)
        return F.grid_sample(inp, deformation, align_corners=True)

    def _occlusion(self, occlusion_map, level):
        return occlusion_map[self.num_down_blocks - level] if self.multi_mask else occlusion_map[0]

    @staticmethod
    def occlude_input(inp, occlusion):
        if occlusion.shape[2:] != inp.shape[2:]:
            occlusion = F.interpolate(occlusion, size=inp.shape[2:], mode="bilinear", align_corners=True)
        return inp * occlusion

    def forward(self, source_image, dense_motion):
        """source_image (B, C, H, W) in [0, 1]; dense_motion: the DenseMotionNetwork output dict.

        Returns 'prediction' (B, C, H, W) in [0, 1], 'deformed' (the source warped by the flow),
        'occlusion_map', 'contribution_maps', 'deformed_source' (passed through), and
        'warped_encoder_maps' (warped, occluded source encoder features, deepest first, computed from
        detached features and masks: they feed the warp loss only).
        """
        out = self.first(source_image)
        encoder_map = [out]
        for block in self.down_blocks:
            out = block(out)
            encoder_map.append(out)

        occlusion_map = dense_motion["occlusion_map"]
        deformation = dense_motion["deformation"]
        n = self.num_down_blocks
        warped_encoder_maps = []
        out = None
        for i in range(n + 1):
            level = n - i
            feature = encoder_map[level]
            occlusion = self._occlusion(occlusion_map, level)
            warped_encoder_maps.append(self.occlude_input(self.deform_input(feature.detach(), deformation),
                                                          occlusion.detach()))
            warped = self.occlude_input(self.deform_input(feature, deformation), occlusion)
            if i == 0:
                out = warped
            elif i < n:
                out = torch.cat([out, warped], dim=1)
            if i < n:
                out = self.up_blocks[i](self.resblock[2 * i + 1](self.resblock[2 * i](out)))
        deformed_source = self.deform_input(source_image, deformation)
        occlusion_last = self._occlusion(occlusion_map, 0)
        if occlusion_last.shape[2:] != out.shape[2:]:
            occlusion_last = F.interpolate(occlusion_last, size=out.shape[2:], mode="bilinear",
                                           align_corners=True)
        out = out * (1 - occlusion_last) + warped
        out = torch.sigmoid(self.final(out))
        out = out * (1 - occlusion_last) + deformed_source * occlusion_last
        return {
            "prediction": out,
            "deformed": deformed_source,
            "occlusion_map": occlusion_map,
            "contribution_maps": dense_motion["contribution_maps"],
            "deformed_source": dense_motion["deformed_source"],
            "warped_encoder_maps": warped_encoder_maps,
        }

    def get_encode(self, driver_image, occlusion_map):
        """Encoder features of the driving frame, occluded, detached, finest first (for the warp loss).

        Returns n + 1 tensors: level 0 (full resolution) to level n, each masked by its occlusion map.
        """
        with torch.no_grad():
            out = self.first(driver_image)
            encoder_map = [self.occlude_input(out, self._occlusion(occlusion_map, 0))]
            for i, block in enumerate(self.down_blocks):
                out = block(out)
                encoder_map.append(self.occlude_input(out, self._occlusion(occlusion_map, i + 1)))
        return encoder_map
