"""SAM keypoint semantic loss (reconstruction) with a tiny real segment-anything ImageEncoderViT."""
import math

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

import losses.keypoint_semantic as ks
from losses.keypoint_semantic import KeypointSemanticLoss, build_sam_image_encoder

MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


def tiny_encoder():
    return ImageEncoderViT(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, out_chans=8,
                           use_rel_pos=True, window_size=2, global_attn_indexes=(1,))


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


@pytest.mark.parametrize("height, width", [(24, 24), (20, 28)])
def test_loss_matches_hand_computation(height, width):
    encoder = tiny_encoder()
    loss = KeypointSemanticLoss(encoder, input_size=32)
    src, drv = torch.rand(2, 3, height, width), torch.rand(2, 3, height, width)
    kp_s, kp_d = torch.rand(2, 6, 2) * 1.8 - 0.9, torch.rand(2, 6, 2) * 1.8 - 0.9
    expected = []
    for b in range(2):
        fs = features_by_hand(encoder, src[b], kp_s[b], 32)
        fd = features_by_hand(encoder, drv[b], kp_d[b], 32)
        expected.append(1 - (fs * fd).sum(-1) / (fs.norm(dim=-1) * fd.norm(dim=-1)))
    value = loss(src, drv, kp_s, kp_d)
    torch.testing.assert_close(value, torch.cat(expected).mean(), atol=1e-5, rtol=1e-5)
    assert value.item() > 1e-3


def test_identical_inputs_give_zero():
    loss = KeypointSemanticLoss(tiny_encoder(), input_size=32)
    img, kp = torch.rand(2, 3, 16, 16), torch.rand(2, 5, 2) * 2 - 1
    assert abs(loss(img, img, kp, kp).item()) < 1e-6


def test_gradient_reaches_keypoints_only():
    loss = KeypointSemanticLoss(tiny_encoder(), input_size=32)
    src = torch.rand(2, 3, 16, 16, requires_grad=True)
    drv = torch.rand(2, 3, 16, 16, requires_grad=True)
    kp_s = (torch.rand(2, 5, 2) * 2 - 1).requires_grad_()
    kp_d = (torch.rand(2, 5, 2) * 2 - 1).requires_grad_()
    loss(src, drv, kp_s, kp_d).backward()
    assert kp_s.grad.abs().sum() > 0 and kp_d.grad.abs().sum() > 0
    assert src.grad is None and drv.grad is None
    assert all(p.grad is None and not p.requires_grad for p in loss.encoder.parameters())


def test_every_n_steps_and_argument_checks():
    loss = KeypointSemanticLoss(tiny_encoder(), input_size=32, every_n_steps=3)
    assert [loss.active(s) for s in range(5)] == [True, False, False, True, False]
    with pytest.raises(ValueError, match="input_size"):
        KeypointSemanticLoss(tiny_encoder(), input_size=64)
    with pytest.raises(ValueError, match="every_n_steps"):
        KeypointSemanticLoss(tiny_encoder(), input_size=32, every_n_steps=0)


def test_smaller_input_size_is_padded():
    loss = KeypointSemanticLoss(tiny_encoder(), input_size=16)
    x = loss.preprocess(torch.rand(1, 3, 8, 8))
    assert x.shape == (1, 3, 32, 32)
    assert x[..., 16:, :].abs().sum() == 0 and x[..., :16, :16].abs().sum() > 0


def test_bfloat16_encoder_runs():
    encoder = tiny_encoder()
    src, drv = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    kp_s, kp_d = torch.rand(2, 5, 2) * 2 - 1, torch.rand(2, 5, 2) * 2 - 1
    ref = KeypointSemanticLoss(encoder, input_size=32)(src, drv, kp_s, kp_d)
    low = KeypointSemanticLoss(encoder, input_size=32, dtype=torch.bfloat16)(src, drv, kp_s, kp_d)
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
    monkeypatch.setattr(ks, "sam_model_registry", {"vit_b": tiny_sam})
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


def test_vit_b_encoder_shape():
    with torch.device("meta"):
        encoder = build_sam_image_encoder("vit_b")
    assert encoder.img_size == 1024 and encoder.neck[0].out_channels == 256 and len(encoder.blocks) == 12


def test_encoder_keeps_its_dtype_under_autocast():
    loss = KeypointSemanticLoss(tiny_encoder(), input_size=32)
    images = torch.rand(2, 3, 16, 16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        inside = loss.embed(images)
    torch.testing.assert_close(inside, loss.embed(images))
