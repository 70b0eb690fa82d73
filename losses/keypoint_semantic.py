"""SAM-guided keypoint semantic loss — a RECONSTRUCTION, not the official code.

The paper (CPABMM, AAAI 2024) uses a frozen Segment-Anything model to make corresponding keypoints
of the source and driving frames semantically consistent. The official code does NOT contain this
loss (its ``modules/sam_loss.py`` is missing and the call is commented out), so what follows is our
reconstruction from the paper's description (DESIGN.md §4):

1. SAM's image encoder (``segment_anything``, frozen, under ``no_grad``, in ``sam_params.dtype``)
   embeds the source and the driving frames in one batch, with SAM's standard preprocessing:
   [0, 1] -> [0, 255], longest side resized to ``sam_params.input_size`` (bilinear, antialiased, as
   ``ResizeLongestSide``), normalised with SAM's pixel mean/std, zero-padded bottom/right to the
   encoder's square input (1024 -> 256 x 64 x 64 embeddings).
2. The embeddings are sampled bilinearly at each keypoint; gradients flow to the keypoint
   coordinates only (never to the images or to SAM).
3. loss = mean over batch and keypoints of (1 - cos(f_source(kp_source_n), f_driving(kp_driving_n))).

Keypoints are (B, N, 2), (x, y) in [-1, 1], -1/1 the centres of the first/last pixels
(``align_corners=True``); they are mapped exactly onto the padded embedding grid.
"""
import torch
import torch.nn.functional as F
from segment_anything import sam_model_registry
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from losses.pretrained import freeze, load_state_dict_file

# SAM's pixel normalisation (``segment_anything.modeling.Sam`` defaults), in the [0, 255] range.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def build_sam_image_encoder(model_type, weights_path=None):
    """Frozen SAM image encoder (``ImageEncoderViT``) of ``model_type`` (vit_b | vit_l | vit_h).

    The whole SAM checkpoint is loaded strictly (so a checkpoint of another variant fails) and only
    the image encoder is kept. Random (SAM's init) when no path is given. Nothing is downloaded.
    """
    if model_type not in ("vit_b", "vit_l", "vit_h"):
        raise ValueError(f"train_params.pretrained.sam_model_type must be vit_b, vit_l or vit_h, got {model_type!r}")
    sam = sam_model_registry[model_type](checkpoint=None)
    if weights_path is not None:
        sam.load_state_dict(load_state_dict_file(weights_path), strict=True)
    return freeze(sam.image_encoder)


class KeypointSemanticLoss(nn.Module):
    """Unweighted SAM keypoint semantic loss (reconstruction; see the module docstring).

    image_encoder: a ``segment_anything`` ``ImageEncoderViT`` (``build_sam_image_encoder`` or a tiny
    one in tests), frozen here. input_size: longest side fed to the encoder (<= its ``img_size``).
    dtype: dtype the encoder runs in. every_n_steps: :meth:`active` is true every N iterations.
    forward(source, driving, kp_source, kp_driving) -> scalar.
    """

    def __init__(self, image_encoder, input_size=1024, dtype=torch.float32, every_n_steps=1):
        super().__init__()
        if input_size > image_encoder.img_size:
            raise ValueError(f"sam_params.input_size {input_size} exceeds the SAM encoder's input size "
                             f"{image_encoder.img_size}")
        if every_n_steps < 1:
            raise ValueError(f"sam_params.every_n_steps must be >= 1, got {every_n_steps}")
        self.encoder = freeze(image_encoder.to(dtype))
        self.input_size = input_size
        self.dtype = dtype
        self.every_n_steps = every_n_steps
        self.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):
        """The frozen encoder stays in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    def active(self, step):
        """Whether the loss is computed at iteration ``step`` (every ``every_n_steps`` iterations)."""
        return step % self.every_n_steps == 0

    def resized_shape(self, height, width):
        """(h', w') of an H x W image after resizing its longest side to ``input_size``."""
        return ResizeLongestSide.get_preprocess_shape(height, width, self.input_size)

    def preprocess(self, images):
        """[0, 1] images (B, 3, H, W) -> SAM encoder input (B, 3, S, S) in the encoder's dtype."""
        new_h, new_w = self.resized_shape(images.shape[2], images.shape[3])
        x = F.interpolate(images.float() * 255.0, size=(new_h, new_w), mode="bilinear", align_corners=False,
                          antialias=True)
        x = (x - self.pixel_mean) / self.pixel_std
        size = self.encoder.img_size
        x = F.pad(x, (0, size - new_w, 0, size - new_h))
        return x.to(self.dtype)

    @torch.no_grad()
    def embed(self, images):
        """Frozen SAM embeddings (B, C, S/16, S/16), float32, no gradient. The encoder runs in
        ``dtype`` even inside an autocast region (autocast is switched off here)."""
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.encoder(self.preprocess(images)).float()

    def embedding_grid(self, keypoints, height, width):
        """Keypoints (B, N, 2) of an H x W image -> grid_sample coordinates (align_corners=False) on
        the padded embedding: pixel centre u = (x + 1)(W - 1)/2 lands at 2 (u + 0.5) w' / (W S) - 1."""
        new_h, new_w = self.resized_shape(height, width)
        size = self.encoder.img_size
        scale = keypoints.new_tensor([new_w / (width * size), new_h / (height * size)])
        extent = keypoints.new_tensor([width - 1, height - 1])
        pixels = (keypoints + 1.0) * extent / 2.0
        return 2.0 * (pixels + 0.5) * scale - 1.0

    def sample(self, embeddings, keypoints, height, width):
        """Bilinear features at the keypoints: (B, C, h, w), (B, N, 2) -> (B, N, C)."""
        grid = self.embedding_grid(keypoints.float(), height, width)[:, :, None, :]
        features = F.grid_sample(embeddings, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return features[..., 0].transpose(1, 2)

    def forward(self, source, driving, kp_source, kp_driving):
        if source.shape != driving.shape or kp_source.shape != kp_driving.shape:
            raise ValueError("keypoint semantic loss needs source/driving and their keypoints of equal shapes")
        height, width = source.shape[2:]
        embeddings = self.embed(torch.cat([source, driving], dim=0))
        emb_source, emb_driving = embeddings.chunk(2, dim=0)
        feat_source = self.sample(emb_source, kp_source, height, width)
        feat_driving = self.sample(emb_driving, kp_driving, height, width)
        cosine = F.cosine_similarity(feat_source, feat_driving, dim=-1, eps=1e-8)
        return (1.0 - cosine).mean()
