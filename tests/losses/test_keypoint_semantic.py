"""SAM keypoint semantic loss (reconstruction) with a tiny real segment-anything ImageEncoderViT."""
import math

import pytest
import torch
import torch.nn.functional as F

import losses.keypoint_semantic as ks
from losses.keypoint_semantic import (
    KeypointSemanticLoss,
    adapt_image_encoder_state_dict,
    build_sam_image_encoder,
    resize_image_encoder,
)

# segment-anything is optional where only the GPU stack is installed: this file is skipped there.
modeling = pytest.importorskip("segment_anything.modeling")
ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer = (
    modeling.ImageEncoderViT, modeling.MaskDecoder, modeling.PromptEncoder, modeling.Sam, modeling.TwoWayTransformer)
get_rel_pos = modeling.image_encoder.get_rel_pos

MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


def sam_loss(encoder, input_size, dtype=torch.float32, every_n_steps=1):
    """The loss with the settings the tests do not vary at their config defaults."""
    return KeypointSemanticLoss(encoder, input_size=input_size, dtype=dtype, every_n_steps=every_n_steps)


def tiny_encoder(img_size=32, window_size=2, randomise_positions=False):
    """Tiny real SAM encoder (patch 8); block 1 global. randomise_positions: non-zero pos_embed and
    rel_pos tables (SAM initialises them to zero)."""
    encoder = ImageEncoderViT(img_size=img_size, patch_size=8, embed_dim=16, depth=2, num_heads=2, out_chans=8,
                              use_rel_pos=True, window_size=window_size, global_attn_indexes=(1,))
    if randomise_positions:
        with torch.no_grad():
            for name, parameter in encoder.named_parameters():
                if name == "pos_embed" or "rel_pos" in name:
                    parameter.normal_()
    return encoder


def features_by_hand(encoder, image, kps, size):
    """SAM preprocessing and bilinear sampling written out for one image (3, H, W) and kps (N, 2)."""
    _, h, w = image.shape
    scale = size / max(h, w)
    new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
    x = F.interpolate(image[None] * 255, (new_h, new_w), mode="bilinear", align_corners=False, antialias=True)[0]
    x = (x - MEAN) / STD
    padded = torch.zeros(3, encoder.img_size, encoder.img_size)
    padded[:, :new_h, :new_w] = x
    with torch.no_grad():
        emb = encoder(padded[None])[0]
    cells = emb.shape[-1]
    out = []
    for kx, ky in kps.tolist():
        # pixel centre in the original image -> in the resized image -> continuous embedding index
        px = ((kx + 1) * (w - 1) / 2 + 0.5) * new_w / w
        py = ((ky + 1) * (h - 1) / 2 + 0.5) * new_h / h
        ex = min(max(px * cells / encoder.img_size - 0.5, 0.0), cells - 1.0)
        ey = min(max(py * cells / encoder.img_size - 0.5, 0.0), cells - 1.0)
        x0, y0 = min(math.floor(ex), cells - 2), min(math.floor(ey), cells - 2)
        fx, fy = ex - x0, ey - y0
        out.append(emb[:, y0, x0] * (1 - fx) * (1 - fy) + emb[:, y0, x0 + 1] * fx * (1 - fy)
                   + emb[:, y0 + 1, x0] * (1 - fx) * fy + emb[:, y0 + 1, x0 + 1] * fx * fy)
    return torch.stack(out)


@pytest.mark.parametrize("height, width, input_size", [(24, 24, 32), (20, 28, 32), (20, 28, 16)])
def test_loss_matches_hand_computation(height, width, input_size):
    loss = sam_loss(tiny_encoder(randomise_positions=True), input_size=input_size)
    encoder = loss.encoder
    assert encoder.img_size == input_size
    src, drv = torch.rand(2, 3, height, width), torch.rand(2, 3, height, width)
    kp_s, kp_d = torch.rand(2, 6, 2) * 1.8 - 0.9, torch.rand(2, 6, 2) * 1.8 - 0.9
    expected = []
    for b in range(2):
        fs = features_by_hand(encoder, src[b], kp_s[b], input_size)
        fd = features_by_hand(encoder, drv[b], kp_d[b], input_size)
        expected.append(1 - (fs * fd).sum(-1) / (fs.norm(dim=-1) * fd.norm(dim=-1)))
    value = loss(src, drv, kp_s, kp_d)
    torch.testing.assert_close(value, torch.cat(expected).mean(), atol=1e-5, rtol=1e-5)
    assert value.item() > 1e-3


def test_identical_inputs_give_zero():
    loss = sam_loss(tiny_encoder(), input_size=32)
    img, kp = torch.rand(2, 3, 16, 16), torch.rand(2, 5, 2) * 2 - 1
    assert abs(loss(img, img, kp, kp).item()) < 1e-6


@pytest.mark.parametrize("input_size", [32, 16])
def test_gradient_reaches_keypoints_only(input_size):
    loss = sam_loss(tiny_encoder(), input_size=input_size)
    src = torch.rand(2, 3, 16, 16, requires_grad=True)
    drv = torch.rand(2, 3, 16, 16, requires_grad=True)
    kp_s = (torch.rand(2, 5, 2) * 2 - 1).requires_grad_()
    kp_d = (torch.rand(2, 5, 2) * 2 - 1).requires_grad_()
    loss(src, drv, kp_s, kp_d).backward()
    assert kp_s.grad.abs().sum() > 0 and kp_d.grad.abs().sum() > 0
    assert src.grad is None and drv.grad is None
    assert all(p.grad is None and not p.requires_grad for p in loss.encoder.parameters())


def test_every_n_steps_and_argument_checks():
    loss = sam_loss(tiny_encoder(), input_size=32, every_n_steps=3)
    assert [loss.active(s) for s in range(5)] == [True, False, False, True, False]
    with pytest.raises(ValueError, match="input_size"):
        sam_loss(tiny_encoder(), input_size=64)
    for bad in (12, 0, 16.0):
        with pytest.raises(ValueError, match="train_params.sam_params.input_size must be a positive multiple of 8"):
            sam_loss(tiny_encoder(), input_size=bad)
    with pytest.raises(ValueError, match="every_n_steps"):
        sam_loss(tiny_encoder(), input_size=32, every_n_steps=0)


def test_default_size_keeps_the_given_encoder():
    encoder = tiny_encoder()
    loss = sam_loss(encoder, input_size=32)
    assert loss.encoder is encoder and loss.preprocess(torch.rand(1, 3, 8, 8)).shape == (1, 3, 32, 32)


def test_smaller_input_size_is_padded_only_to_input_size():
    loss = sam_loss(tiny_encoder(), input_size=16)
    x = loss.preprocess(torch.rand(1, 3, 8, 12))
    assert x.shape == (1, 3, 16, 16)
    assert x[..., 11:, :].abs().sum() == 0 and x[..., :11, :].abs().min() > 0
    assert loss.embed(torch.rand(1, 3, 8, 12)).shape == (1, 8, 2, 2)  # input_size / patch cells a side


def test_reduced_encoder_has_reduced_position_tables():
    full = tiny_encoder(img_size=64, window_size=3, randomise_positions=True)
    loss = sam_loss(full, input_size=32)
    reduced = loss.encoder
    assert full.img_size == 64 and full.pos_embed.shape == (1, 8, 8, 16)  # the given encoder is untouched
    assert reduced.img_size == 32 and reduced.pos_embed.shape == (1, 4, 4, 16)
    assert reduced.blocks[1].window_size == 0 and reduced.blocks[0].window_size == 3
    assert full.blocks[1].attn.rel_pos_h.shape == (15, 8)
    assert reduced.blocks[1].attn.rel_pos_h.shape == (7, 8) and reduced.blocks[1].attn.rel_pos_w.shape == (7, 8)
    # windowed block: window 3 at both sizes, table kept as it is
    torch.testing.assert_close(reduced.blocks[0].attn.rel_pos_h, full.blocks[0].attn.rel_pos_h, rtol=0, atol=0)
    assert not any(p.requires_grad for p in reduced.parameters()) and not reduced.training


def test_pos_embed_and_rel_pos_resampling_by_hand():
    full = tiny_encoder(img_size=64, window_size=3, randomise_positions=True)
    reduced = resize_image_encoder(full, 32)
    expected = F.interpolate(full.pos_embed.detach().permute(0, 3, 1, 2), size=(4, 4), mode="bicubic",
                             align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(reduced.pos_embed, expected)
    assert (reduced.pos_embed - full.pos_embed[:, ::2, ::2]).abs().max() > 1e-3
    # the rel_pos tables are what SAM's own get_rel_pos makes of the full-size table on a 4 x 4 grid
    for table in ("rel_pos_h", "rel_pos_w"):
        original = getattr(full.blocks[1].attn, table).detach()
        resized = getattr(reduced.blocks[1].attn, table)
        torch.testing.assert_close(get_rel_pos(4, 4, resized), get_rel_pos(4, 4, original))
    # hence: the reduced encoder is the full-size one run on a 32 x 32 input with only pos_embed resampled
    swapped = tiny_encoder(img_size=64, window_size=3)
    swapped.load_state_dict(full.state_dict())
    swapped.pos_embed = torch.nn.Parameter(expected)
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reduced(image), swapped(image))


def test_full_size_checkpoint_loads_strictly_into_reduced_encoder():
    full = tiny_encoder(img_size=64, window_size=3, randomise_positions=True)
    reduced = tiny_encoder(img_size=32, window_size=3)
    with pytest.raises(RuntimeError, match="size mismatch for pos_embed"):
        reduced.load_state_dict(full.state_dict(), strict=True)
    reduced.load_state_dict(adapt_image_encoder_state_dict(full.state_dict(), reduced), strict=True)
    torch.testing.assert_close(reduced.neck[2].weight, full.neck[2].weight, rtol=0, atol=0)
    torch.testing.assert_close(reduced.pos_embed, resize_image_encoder(full, 32).pos_embed)


def test_resized_encoder_keeps_dtype():
    full = tiny_encoder(randomise_positions=True).to(torch.bfloat16)
    reduced = resize_image_encoder(full, 16)
    assert all(p.dtype == torch.bfloat16 for p in reduced.parameters())
    expected = F.interpolate(full.pos_embed.float().permute(0, 3, 1, 2), size=(2, 2), mode="bicubic",
                             align_corners=False).permute(0, 2, 3, 1).to(torch.bfloat16)
    torch.testing.assert_close(reduced.pos_embed, expected, rtol=0, atol=0)


def test_bfloat16_encoder_runs():
    encoder = tiny_encoder()
    src, drv = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    kp_s, kp_d = torch.rand(2, 5, 2) * 2 - 1, torch.rand(2, 5, 2) * 2 - 1
    ref = sam_loss(encoder, input_size=32)(src, drv, kp_s, kp_d)
    low = sam_loss(encoder, input_size=32, dtype=torch.bfloat16)(src, drv, kp_s, kp_d)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, atol=0.05, rtol=0.1)


def test_unknown_model_type_is_refused():
    with pytest.raises(ValueError, match="sam_model_type"):
        build_sam_image_encoder("vit_s")


def tiny_sam(checkpoint=None):
    return Sam(image_encoder=tiny_encoder(),
               prompt_encoder=PromptEncoder(embed_dim=8, image_embedding_size=(4, 4), input_image_size=(32, 32),
                                            mask_in_chans=4),
               mask_decoder=MaskDecoder(transformer_dim=8, num_multimask_outputs=3, iou_head_depth=1,
                                        iou_head_hidden_dim=8,
                                        transformer=TwoWayTransformer(depth=1, embedding_dim=8, mlp_dim=16,
                                                                      num_heads=2)))


def test_build_loads_the_whole_sam_checkpoint_strictly(tmp_path, monkeypatch):
    import segment_anything

    # build_sam_image_encoder imports segment_anything's registry when it is called (an optional dependency).
    monkeypatch.setattr(segment_anything, "sam_model_registry", {"vit_b": tiny_sam})
    reference = tiny_sam()
    state = reference.state_dict()
    path = tmp_path / "sam.pth"
    torch.save(state, path)
    encoder = build_sam_image_encoder("vit_b", str(path))
    torch.testing.assert_close(encoder.neck[0].weight, reference.image_encoder.neck[0].weight)
    assert not any(p.requires_grad for p in encoder.parameters())
    del state["mask_decoder.iou_token.weight"]
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="iou_token"):
        build_sam_image_encoder("vit_b", str(path))


def test_build_at_reduced_input_size_adapts_the_full_size_checkpoint(tmp_path, monkeypatch):
    import segment_anything

    # build_sam_image_encoder imports segment_anything's registry when it is called (an optional dependency).
    monkeypatch.setattr(segment_anything, "sam_model_registry", {"vit_b": tiny_sam})
    reference = tiny_sam()
    with torch.no_grad():
        reference.image_encoder.pos_embed.normal_()
    path = tmp_path / "sam.pth"
    torch.save(reference.state_dict(), path)
    encoder = build_sam_image_encoder("vit_b", str(path), input_size=16)
    assert encoder.img_size == 16 and encoder.pos_embed.shape == (1, 2, 2, 16)
    torch.testing.assert_close(encoder.pos_embed, resize_image_encoder(reference.image_encoder, 16).pos_embed)
    torch.testing.assert_close(encoder.neck[0].weight, reference.image_encoder.neck[0].weight, rtol=0, atol=0)
    assert not any(p.requires_grad for p in encoder.parameters())


def test_vit_b_encoder_shape():
    with torch.device("meta"):
        encoder = build_sam_image_encoder("vit_b")
    assert encoder.img_size == 1024 and encoder.neck[0].out_channels == 256 and len(encoder.blocks) == 12


def test_vit_b_encoder_at_512_keeps_the_registry_arguments():
    with torch.device("meta"):
        full = build_sam_image_encoder("vit_b")
        encoder = resize_image_encoder(full, 512)
    assert encoder.img_size == 512 and encoder.pos_embed.shape == (1, 32, 32, 768)
    assert [b.window_size for b in encoder.blocks] == [b.window_size for b in full.blocks]
    assert [b.attn.rel_pos_h.shape[0] for b in encoder.blocks] == [27, 27, 63] * 4
    assert {n: p.shape for n, p in encoder.state_dict().items() if "pos" not in n} == \
        {n: p.shape for n, p in full.state_dict().items() if "pos" not in n}
    assert encoder.blocks[0].norm1.eps == 1e-6 and encoder.blocks[0].attn.qkv.bias is not None


def test_encoder_keeps_its_dtype_under_autocast():
    loss = sam_loss(tiny_encoder(), input_size=32)
    images = torch.rand(2, 3, 16, 16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        inside = loss.embed(images)
    torch.testing.assert_close(inside, loss.embed(images))


def test_preprocess_shape_matches_segment_anything():
    from segment_anything.utils.transforms import ResizeLongestSide

    for height, width, size in [(40, 60, 32), (33, 17, 1024), (256, 256, 512), (7, 1000, 64), (384, 200, 1024)]:
        assert ks.preprocess_shape(height, width, size) == ResizeLongestSide.get_preprocess_shape(height, width, size)
