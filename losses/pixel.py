"""Pixel L1 reconstruction loss (not in the official code; ``loss_weights.l1``, 0 = off by default).

Images are (B, C, H, W) in [0, 1]; the value is mean |prediction - target| over every element, the
same quantity as the reconstruction L1 that evaluation reports. It gives a direct training signal
where the perceptual loss has none worth having, e.g. the synthetic quick start, which runs with a
randomly initialised VGG-19 because no weight file can be downloaded.
"""


def pixel_l1_loss(prediction, target):
    """Unweighted mean absolute difference; the gradient reaches ``prediction`` (and ``target`` if it needs one)."""
    return (prediction - target).abs().mean()
