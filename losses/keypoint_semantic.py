"""SAM-guided keypoint semantic loss — a RECONSTRUCTION, not the official code.

The paper (CPABMM, AAAI 2024) uses a frozen Segment-Anything model to make corresponding keypoints
of the source and driving frames semantically consistent. The official code does NOT contain this
loss (its ``modules/sam_loss.py`` is missing and the call is commented out), so what follows is our
reconstruction from the paper's description (README, "Faithful by default"):

1. SAM's image encoder (``segment_anything``, frozen, under ``no_grad``, in ``sam_params.dtype``)
   embeds the source and the driving frames in one batch, with SAM's standard preprocessing:
   [0, 1] -> [0, 255], longest side resized to ``sam_params.input_size`` (bilinear, antialiased, as
   ``ResizeLongestSide``), normalised with SAM's pixel mean/std, zero-padded bottom/right to the
   square ``input_size`` x ``input_size`` (1024 -> 256 x 64 x 64 embeddings).
2. The embeddings are sampled bilinearly at each keypoint; gradients flow to the keypoint
   coordinates only (never to the images or to SAM).
3. loss = mean over batch and keypoints of (1 - cos(f_source(kp_source_n), f_driving(kp_driving_n))).

Keypoints are (B, N, 2), (x, y) in [-1, 1], -1/1 the centres of the first/last pixels
(``align_corners=True``); they are mapped exactly onto the padded embedding grid (input_size/16 cells).

Speed switch, OFF by default: ``train_params.sam_params.input_size`` below SAM's 1024 (a multiple of
16, e.g. 512) runs a SAM encoder built natively at that size, so it costs what a 512 ViT costs (about
4x less than at 1024), not a 1024 pass over a padded image. The 1024 checkpoint is adapted on load
(:func:`adapt_image_encoder_state_dict`): the absolute position embedding (1, 64, 64, C) is resampled
bicubically to (1, input_size/16, input_size/16, C), and the relative position tables of the
global-attention blocks (2*64-1, head_dim) linearly to 2*input_size/16-1 rows, the same resampling
SAM's own ``get_rel_pos`` applies when a table and the token grid disagree; the windowed blocks keep
theirs (window 14 at every size). The embeddings are then an APPROXIMATION of the full-resolution
SAM embeddings (coarser grid, a resolution SAM was not trained at). At 1024 nothing is adapted and
the loss is exactly the reconstruction above.
"""
from functools import partial

import torch
import torch.nn.functional as F

from losses.pretrained import FrozenEncoderLoss, freeze, load_state_dict_file

# SAM's pixel normalisation (``segment_anything.modeling.Sam`` defaults), in the [0, 255] range.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
# Input size of every released SAM checkpoint (``segment_anything.build_sam``).
SAM_INPUT_SIZE = 1024


def preprocess_shape(height, width, long_side):
    """(h', w') of an H x W image whose longest side is resized to ``long_side``, rounded as
    ``segment_anything``'s ``ResizeLongestSide.get_preprocess_shape``."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def check_input_size(input_size, image_encoder):
    """ValueError unless ``input_size`` is a positive multiple of the encoder's patch size (16 for
    SAM) no larger than its ``img_size``."""
    patch = image_encoder.patch_embed.proj.kernel_size[0]
    if not isinstance(input_size, int) or input_size < patch or input_size % patch != 0:
        raise ValueError(f"train_params.sam_params.input_size must be a positive multiple of {patch}, "
                         f"got {input_size!r}")
    if input_size > image_encoder.img_size:
        raise ValueError(f"train_params.sam_params.input_size {input_size} exceeds the SAM encoder's input "
                         f"size {image_encoder.img_size}")


def image_encoder_arguments(image_encoder):
    """The ``ImageEncoderViT`` constructor arguments of ``image_encoder`` except ``img_size``, read off
    the module (for the released checkpoints these are ``segment_anything.build_sam``'s)."""
    block = image_encoder.blocks[0]
    norm = block.norm1
    embed_dim = image_encoder.patch_embed.proj.out_channels
    return dict(patch_size=image_encoder.patch_embed.proj.kernel_size[0],
                in_chans=image_encoder.patch_embed.proj.in_channels,
                embed_dim=embed_dim,
                depth=len(image_encoder.blocks),
                num_heads=block.attn.num_heads,
                mlp_ratio=block.mlp.lin1.out_features / embed_dim,
                out_chans=image_encoder.neck[0].out_channels,
                qkv_bias=block.attn.qkv.bias is not None,
                norm_layer=partial(type(norm), eps=norm.eps),
                act_layer=type(block.mlp.act),
                use_abs_pos=image_encoder.pos_embed is not None,
                use_rel_pos=block.attn.use_rel_pos,
                window_size=max(b.window_size for b in image_encoder.blocks),
                global_attn_indexes=tuple(i for i, b in enumerate(image_encoder.blocks) if b.window_size == 0))


def adapt_image_encoder_state_dict(state_dict, image_encoder):
    """An image-encoder state dict of another input size -> one that loads strictly into ``image_encoder``.

    ``pos_embed`` (1, S, S, C) is resampled to the encoder's (1, S', S', C) bicubically
    (``align_corners=False``); ``blocks.i.attn.rel_pos_h``/``rel_pos_w`` (2S-1, head_dim) of the
    global-attention blocks linearly (``align_corners=False``, as SAM's ``get_rel_pos``) to 2S'-1 rows.
    Entries whose shapes already agree (all others, the windowed blocks' tables) are kept as they are;
    any other shape mismatch is left for ``load_state_dict`` to report. Resampling runs in float32.
    """
    adapted = dict(state_dict)
    for name, target in image_encoder.state_dict().items():
        if name not in state_dict or state_dict[name].shape == target.shape:
            continue
        value = state_dict[name].float()
        if name == "pos_embed":
            resampled = F.interpolate(value.permute(0, 3, 1, 2), size=tuple(target.shape[1:3]), mode="bicubic",
                                      align_corners=False)
            adapted[name] = resampled.permute(0, 2, 3, 1)
        elif name.endswith(("attn.rel_pos_h", "attn.rel_pos_w")):
            resampled = F.interpolate(value.t()[None], size=target.shape[0], mode="linear", align_corners=False)
            adapted[name] = resampled[0].t()
    return adapted


def resize_image_encoder(image_encoder, input_size):
    """A frozen copy of a SAM ``ImageEncoderViT`` built natively for ``input_size`` x ``input_size``
    inputs, its weights adapted by :func:`adapt_image_encoder_state_dict` and loaded strictly; same
    device and dtype as ``image_encoder``. The encoder itself when ``input_size`` is its ``img_size``."""
    check_input_size(input_size, image_encoder)
    if input_size == image_encoder.img_size:
        return image_encoder
    # segment-anything is an optional dependency (the GPU benchmark box lacks it): imported only here
    # and in build_sam_image_encoder, when a SAM encoder is built.
    from segment_anything.modeling import ImageEncoderViT

    reference = next(image_encoder.parameters())
    with torch.device(reference.device):
        resized = ImageEncoderViT(img_size=input_size, **image_encoder_arguments(image_encoder))
    resized.to(reference.dtype)
    resized.load_state_dict(adapt_image_encoder_state_dict(image_encoder.state_dict(), resized), strict=True)
    return freeze(resized)


def build_sam_image_encoder(model_type, weights_path=None, input_size=None):
    """Frozen SAM image encoder (``ImageEncoderViT``) of ``model_type`` (vit_b | vit_l | vit_h).

    The whole SAM checkpoint is loaded strictly (so a checkpoint of another variant fails) and only
    the image encoder is kept. Random (SAM's init) when no path is given. Nothing is downloaded.
    ``input_size`` (None: SAM's 1024) below 1024: the encoder is rebuilt for that input size
    (:func:`resize_image_encoder`; an approximation, see the module docstring).
    """
    if model_type not in ("vit_b", "vit_l", "vit_h"):
        raise ValueError(f"train_params.pretrained.sam_model_type must be vit_b, vit_l or vit_h, got {model_type!r}")
    from segment_anything import sam_model_registry  # optional dependency, see resize_image_encoder

    sam = sam_model_registry[model_type](checkpoint=None)
    if weights_path is not None:
        sam.load_state_dict(load_state_dict_file(weights_path), strict=True)
    encoder = freeze(sam.image_encoder)
    return encoder if input_size is None else resize_image_encoder(encoder, input_size)


class KeypointSemanticLoss(FrozenEncoderLoss):
    """Unweighted SAM keypoint semantic loss (reconstruction; see the module docstring).

    image_encoder: a ``segment_anything`` ``ImageEncoderViT`` (``build_sam_image_encoder`` or a tiny
    one in tests), frozen here. input_size: longest side fed to the encoder, a multiple of its patch
    size (16), <= its ``img_size``; when smaller, a copy of the encoder rebuilt natively at
    ``input_size`` is used (:func:`resize_image_encoder`, an approximation; the given encoder is left
    as it is), so the encoder sees input_size x input_size and gives input_size/16 cells a side.
    dtype: dtype the encoder runs in. every_n_steps: :meth:`active` is true every N iterations.
    forward(source, driving, kp_source, kp_driving) -> scalar.
    """

    def __init__(self, image_encoder, input_size, dtype, every_n_steps):
        check_input_size(input_size, image_encoder)
        if every_n_steps < 1:
            raise ValueError(f"sam_params.every_n_steps must be >= 1, got {every_n_steps}")
        super().__init__(resize_image_encoder(image_encoder, input_size), SAM_PIXEL_MEAN, SAM_PIXEL_STD, dtype)
        self.input_size = input_size
        self.every_n_steps = every_n_steps

    def active(self, step):
        """Whether the loss is computed at iteration ``step`` (every ``every_n_steps`` iterations)."""
        return step % self.every_n_steps == 0

    def resized_shape(self, height, width):
        """(h', w') of an H x W image after resizing its longest side to ``input_size``."""
        return preprocess_shape(height, width, self.input_size)

    def preprocess(self, images):
        """[0, 1] images (B, 3, H, W) -> SAM encoder input (B, 3, S, S), S = ``input_size`` (the
        encoder's ``img_size``), in the encoder's dtype."""
        new_h, new_w = self.resized_shape(images.shape[2], images.shape[3])
        x = F.interpolate(images.float() * 255.0, size=(new_h, new_w), mode="bilinear", align_corners=False,
                          antialias=True)
        x = self.normalise(x)
        size = self.input_size
        x = F.pad(x, (0, size - new_w, 0, size - new_h))
        return x.to(self.dtype)

    @torch.no_grad()
    def embed(self, images):
        """Frozen SAM embeddings (B, C, S/16, S/16), float32, no gradient. The encoder runs in
        ``dtype`` even inside an autocast region (autocast is switched off here)."""
        with self.exact_precision(images):
            return self.encoder(self.preprocess(images)).float()

    def embedding_grid(self, keypoints, height, width):
        """Keypoints (B, N, 2) of an H x W image -> grid_sample coordinates (align_corners=False) on
        the padded embedding: pixel centre u = (x + 1)(W - 1)/2 lands at 2 (u + 0.5) w' / (W S) - 1."""
        new_h, new_w = self.resized_shape(height, width)
        size = self.input_size
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
