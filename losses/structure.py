"""DINO structure-alignment loss (CPABMM, after Splice / Tumanyan et al. 2022).

For an image in [0, 1] (B, 3, H, W): ``Resize(224, max_size=480)`` (shorter side to 224, longer side
capped at 480, bilinear), ImageNet normalisation, DINO ViT-B/8; the keys of block ``layer`` (11, the
last) for every token, CLS included, heads concatenated (T x 768, T = 1 + 28*28 = 785 at 224x224);
their cosine self-similarity matrix S (T x T, denominators clamped at 1e-8). For a prediction P and a
driving frame D: loss = sum over the batch of mean_{ij} (S(P)_ij - S(D)_ij)^2, S(D) under no_grad.

The official code loops over the batch and sums one ``F.mse_loss`` per image; this computes the
whole batch at once and returns the same number (tested). The ViT is timm's
``vit_base_patch8_224``, whose state-dict keys are exactly those of DINO's checkpoint
(``dino_vitbase8_pretrain.pth``, loaded with strict=True). At 224x224 timm and DINO both use the
stored 28x28 position embedding as is; for non-square inputs timm resamples it (bicubic) where DINO
uses its own bicubic interpolation, which differs slightly.
"""
import timm
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from losses.pretrained import IMAGENET_MEAN, IMAGENET_STD, FrozenEncoderLoss, freeze, load_state_dict_file

DINO_LAYER = 11
# Faithful to the official code: Resize(224, max_size=480) before the ViT.
DINO_SIZE = 224
DINO_MAX_SIZE = 480
# Faithful to the official code: the denominator of the cosine similarity is clamped at 1e-8.
COSINE_EPS = 1e-8


def build_dino_vitb8(weights_path=None):
    """DINO ViT-B/8 backbone as a frozen timm ``VisionTransformer`` (no head), loaded strictly from
    DINO's state dict when a path is given; random (timm init) otherwise. Nothing is downloaded."""
    model = timm.create_model("vit_base_patch8_224", pretrained=False, num_classes=0, dynamic_img_size=True)
    if weights_path is not None:
        model.load_state_dict(load_state_dict_file(weights_path), strict=True)
    return freeze(model)


def cosine_self_similarity(tokens):
    """(B, T, D) -> (B, T, T): <t_i, t_j> / max(|t_i| |t_j|, 1e-8)."""
    norms = tokens.norm(dim=-1, keepdim=True)
    factor = torch.clamp(norms @ norms.transpose(1, 2), min=COSINE_EPS)
    return (tokens @ tokens.transpose(1, 2)) / factor


class StructureLoss(FrozenEncoderLoss):
    """Unweighted DINO key self-similarity loss (see the module docstring).

    vit: a timm ``VisionTransformer`` (``build_dino_vitb8`` or a tiny one in tests), frozen here (the
    ``encoder``).
    layer: block whose attention keys are used. size / max_size: the ``Resize`` of the input
    (``torchvision.transforms.Resize(size, max_size=max_size)``). dtype: dtype the frozen ViT runs in.
    forward(prediction, driving) -> scalar; gradient only towards ``prediction``.
    """

    def __init__(self, vit, dtype, layer=DINO_LAYER, size=DINO_SIZE, max_size=DINO_MAX_SIZE):
        if not 0 <= layer < len(vit.blocks):
            raise ValueError(f"structure loss layer {layer} out of range for a ViT with {len(vit.blocks)} blocks")
        super().__init__(vit, IMAGENET_MEAN, IMAGENET_STD, dtype)
        self.layer = layer
        self.size = size
        self.max_size = max_size

    def preprocess(self, images):
        """[0, 1] images (B, 3, H, W) -> resized, ImageNet-normalised images in the ViT's dtype.

        Faithful to the official code: torchvision's tensor ``Resize`` of its time (Python 3.7, so
        torchvision <= 0.14) did not antialias, so antialias is off here.
        """
        resized = TF.resize(images, [self.size], interpolation=InterpolationMode.BILINEAR,
                            max_size=self.max_size, antialias=False)
        return self.normalise(resized).to(self.dtype)

    def keys(self, images):
        """Keys of block ``layer`` for preprocessed images: (B, T, D), heads concatenated, CLS first.

        The ViT runs up to that block's qkv projection only; the qkv output is laid out
        [q | k | v] x [head] x [head_dim] (as in DINO and timm), so the keys are its middle third.
        """
        vit = self.encoder
        x = vit.patch_embed(images)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        for block in vit.blocks[:self.layer]:
            x = block(x)
        block = vit.blocks[self.layer]
        qkv = block.attn.qkv(block.norm1(x))
        dim = qkv.shape[-1] // 3
        return qkv[..., dim:2 * dim]

    def self_similarity(self, images):
        """[0, 1] images (B, 3, H, W) -> (B, T, T) float32 cosine self-similarity of the keys.
        The ViT runs in ``dtype`` even inside an autocast region (autocast is switched off here)."""
        with self.exact_precision(images):
            return cosine_self_similarity(self.keys(self.preprocess(images)).float())

    def forward(self, prediction, driving):
        with torch.no_grad():
            target = self.self_similarity(driving)
        # Faithful to the official code: one MSE (mean over T x T) per image, SUMMED over the batch.
        return (self.self_similarity(prediction) - target).pow(2).mean(dim=(1, 2)).sum()
