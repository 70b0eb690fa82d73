"""Warp loss (TPSMM/CPABMM): encoder features of the driving frame vs the warped source features.

``encoder_maps`` = ``InpaintingNetwork.get_encode(driving, occlusion_map)``, finest level first
(occlusion-masked, detached in the network); ``warped_encoder_maps`` = the generator's warped and
occluded source features, coarsest level first. As in the official code, level i of the first list
is paired with level -i-1 of the second: loss = sum_i mean |encoder_maps[i] - warped_encoder_maps[-i-1]|.
"""


def warp_loss(encoder_maps, warped_encoder_maps):
    """Sum over levels of the mean L1 (see the module docstring); lists of (B, C_l, H_l, W_l)."""
    if len(encoder_maps) != len(warped_encoder_maps):
        raise ValueError(f"warp loss needs as many encoder maps as warped maps, got "
                         f"{len(encoder_maps)} and {len(warped_encoder_maps)}")
    total = 0.0
    for i, encoded in enumerate(encoder_maps):
        warped = warped_encoder_maps[-i - 1]
        if encoded.shape != warped.shape:
            raise ValueError(f"warp loss level {i}: shapes {tuple(encoded.shape)} and {tuple(warped.shape)} differ")
        total = total + (encoded - warped).abs().mean()
    return total
