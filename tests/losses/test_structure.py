"""DINO structure loss: timm ViT with DINO's state-dict layout, keys vs an independent computation,
batched loss == the official per-image sum, Resize semantics, gradients."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torchvision import transforms

from losses.structure import StructureLoss, build_dino_vitb8


def dino_state_dict_shapes(depth, dim, patch, img, mlp_ratio=4):
    """Key -> shape of a DINO ``VisionTransformer`` backbone (facebookresearch/dino, head = Identity)."""
    tokens = (img // patch) ** 2 + 1
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, tokens, dim),
              "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,)}
    hidden = dim * mlp_ratio
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                       b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                       b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                       b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                       b + "mlp.fc1.weight": (hidden, dim), b + "mlp.fc1.bias": (hidden,),
                       b + "mlp.fc2.weight": (dim, hidden), b + "mlp.fc2.bias": (dim,)})
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    return shapes


def random_dino_state_dict(depth, dim, patch, img):
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen) * (1.0 if "norm" in k else 0.3)
            for k, s in dino_state_dict_shapes(depth, dim, patch, img).items()}


def dino_keys_by_hand(sd, image, layer, heads, patch):
    """Keys of block ``layer`` written from the raw state dict, DINO's way (qkv reshaped (T, 3, H, d),
    k = [1], heads concatenated), for one normalised image (3, H, W). Returns (T, dim)."""
    dim = sd["cls_token"].shape[-1]

    def ln(x, p):
        return F.layer_norm(x, (dim,), sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)

    def lin(x, p):
        return x @ sd[p + ".weight"].T + sd[p + ".bias"]

    x = F.conv2d(image[None], sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)[0]
    x = torch.cat([sd["cls_token"][0], x], 0) + sd["pos_embed"][0]
    tokens, head_dim = x.shape[0], dim // heads
    for i in range(layer + 1):
        b = f"blocks.{i}."
        qkv = lin(ln(x, b + "norm1"), b + "attn.qkv").reshape(tokens, 3, heads, head_dim).permute(1, 2, 0, 3)
        if i == layer:
            return qkv[1].transpose(0, 1).reshape(tokens, dim)
        attn = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        x = x + lin((attn @ qkv[2]).transpose(0, 1).reshape(tokens, dim), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
    raise AssertionError("unreachable")


def tiny_vit(state_dict=None):
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                            dynamic_img_size=True)
    if state_dict is not None:
        vit.load_state_dict(state_dict, strict=True)
    return vit


def cosine_by_hand(keys):
    n = keys.norm(dim=-1, keepdim=True)
    return (keys @ keys.T) / torch.clamp(n @ n.T, min=1e-8)


def test_dino_layout_loads_strictly_into_timm_and_keys_match_by_hand():
    sd = random_dino_state_dict(depth=2, dim=32, patch=8, img=32)
    loss = StructureLoss(tiny_vit(sd), dtype=torch.float32, layer=1, size=32, max_size=60)
    images = torch.rand(2, 3, 40, 40)
    ours = loss.keys(loss.preprocess(images))
    norm = transforms.Compose([transforms.Resize(32, max_size=60, antialias=False),
                               transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    assert ours.shape == (2, 17, 32)
    for b in range(2):
        expected = dino_keys_by_hand(sd, norm(images[b]), layer=1, heads=2, patch=8)
        torch.testing.assert_close(ours[b], expected, atol=1e-4, rtol=1e-4)


def test_vit_b8_has_dinos_state_dict_layout():
    with torch.device("meta"):  # shapes only, no memory
        vit = build_dino_vitb8(None)
    ours = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    assert ours == dino_state_dict_shapes(depth=12, dim=768, patch=8, img=224)
    assert not any(p.requires_grad for p in vit.parameters())


def test_build_dino_loads_the_checkpoint_strictly(tmp_path, monkeypatch):
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained, num_classes, dynamic_img_size: tiny_vit())
    sd = random_dino_state_dict(depth=2, dim=32, patch=8, img=32)
    path = tmp_path / "dino.pth"
    torch.save(sd, path)
    vit = build_dino_vitb8(str(path))
    torch.testing.assert_close(vit.state_dict()["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.weight"])
    del sd["norm.bias"]
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match="norm.bias"):
        build_dino_vitb8(str(path))


def test_batched_loss_equals_official_per_image_sum():
    loss = StructureLoss(tiny_vit(random_dino_state_dict(2, 32, 8, 32)), dtype=torch.float32, layer=1, size=32,
                         max_size=60)
    pred, drv = torch.rand(3, 3, 36, 36), torch.rand(3, 3, 36, 36)
    norm = transforms.Compose([transforms.Resize(32, max_size=60, antialias=False),
                               transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    sd = loss.encoder.state_dict()
    expected = 0.0
    for a, b in zip(drv, pred, strict=True):
        sim_a = cosine_by_hand(dino_keys_by_hand(sd, norm(a), 1, 2, 8))
        sim_b = cosine_by_hand(dino_keys_by_hand(sd, norm(b), 1, 2, 8))
        expected = expected + F.mse_loss(sim_b, sim_a)
    value = loss(pred, drv)
    torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-4)
    assert value.item() > 1e-5
    assert loss(drv, drv).item() == 0.0


def test_resize_semantics_follow_torchvision_resize_with_max_size():
    loss = StructureLoss(tiny_vit(), dtype=torch.float32, layer=1, size=16, max_size=24)
    # shorter side 40 -> 16, longer 80 -> 32 > 24: capped to 24, shorter int(24 * 16 / 32) = 12.
    assert loss.preprocess(torch.rand(1, 3, 40, 80)).shape == (1, 3, 12, 24)
    assert loss.preprocess(torch.rand(1, 3, 256, 256)).shape == (1, 3, 16, 16)


def test_gradient_reaches_the_prediction_only():
    loss = StructureLoss(tiny_vit(random_dino_state_dict(2, 32, 8, 32)), dtype=torch.float32, layer=1, size=32,
                         max_size=60)
    pred = torch.rand(2, 3, 32, 32, requires_grad=True)
    drv = torch.rand(2, 3, 32, 32, requires_grad=True)
    loss(pred, drv).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert drv.grad is None
    assert all(p.grad is None for p in loss.encoder.parameters())


def test_bfloat16_runs_close_to_float32():
    sd = random_dino_state_dict(2, 32, 8, 32)
    pred, drv = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    ref = StructureLoss(tiny_vit(sd), dtype=torch.float32, layer=1, size=32, max_size=60)(pred, drv)
    low = StructureLoss(tiny_vit(sd), dtype=torch.bfloat16, layer=1, size=32, max_size=60)(pred, drv)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=0.1, atol=1e-3)


def test_cosine_denominator_is_clamped_like_the_official_code():
    from losses.structure import cosine_self_similarity
    tokens = torch.tensor([[[0.0, 0.0], [3.0, 4.0], [1e-5, 0.0]]])
    sim = cosine_self_similarity(tokens)
    assert torch.isfinite(sim).all() and sim[0, 0, 0] == 0 and sim[0, 1, 1] == pytest.approx(1.0)
    # |t_2|^2 = 1e-10 < 1e-8: clamped, so the self-similarity of a tiny token is 1e-10 / 1e-8 = 0.01.
    assert sim[0, 2, 2].item() == pytest.approx(0.01, rel=1e-3)


def test_vit_keeps_its_dtype_under_autocast():
    loss = StructureLoss(tiny_vit(random_dino_state_dict(2, 32, 8, 32)), dtype=torch.float32, layer=1, size=32,
                         max_size=60)
    images = torch.rand(2, 3, 32, 32)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        inside = loss.self_similarity(images)
    torch.testing.assert_close(inside, loss.self_similarity(images))
