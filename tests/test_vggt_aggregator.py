"""Tests of VGGT's aggregator and its layers (tiny configurations, CPU, fast)."""
from __future__ import annotations

import math

import pytest
import torch

from archquant.models.vggt.aggregator import Aggregator, DinoVisionTransformer, select_frame_tokens
from archquant.models.vggt.layers import Attention, Block, RotaryPositionEmbedding2D, patch_positions

DIM, HEADS, DEPTH = 32, 2, 2
TINY_DINO = {"embed_dim": DIM, "depth": 2, "num_heads": HEADS}


def tiny(patch_embed: str = "dinov2_vits14_reg", **kw) -> Aggregator:
    torch.manual_seed(0)
    extra = {"dino_overrides": TINY_DINO} if patch_embed != "conv" else {}
    extra.update(kw)
    model = Aggregator(img_size=28, patch_size=14, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                       patch_embed=patch_embed, **extra)
    return model.eval()


def randomise_special_tokens(model: Aggregator) -> None:
    # The official init uses std 1e-6, which makes slot differences invisible; make them big.
    with torch.no_grad():
        model.camera_token.normal_()
        model.register_token.normal_()


# ----------------------------------------------------------------------------- state dict names
def test_state_dict_keys_follow_official_names():
    sd = tiny().state_dict()
    expected = {
        "camera_token": (1, 2, 1, DIM),
        "register_token": (1, 2, 4, DIM),
        "patch_embed.cls_token": (1, 1, DIM),
        "patch_embed.register_tokens": (1, 4, DIM),
        "patch_embed.pos_embed": (1, 1 + 2 * 2, DIM),
        "patch_embed.mask_token": (1, DIM),
        "patch_embed.patch_embed.proj.weight": (DIM, 3, 14, 14),
        "patch_embed.patch_embed.proj.bias": (DIM,),
        "patch_embed.blocks.0.norm1.weight": (DIM,),
        "patch_embed.blocks.0.attn.qkv.weight": (3 * DIM, DIM),
        "patch_embed.blocks.0.attn.qkv.bias": (3 * DIM,),
        "patch_embed.blocks.1.attn.proj.weight": (DIM, DIM),
        "patch_embed.blocks.1.ls1.gamma": (DIM,),
        "patch_embed.blocks.1.mlp.fc1.weight": (4 * DIM, DIM),
        "patch_embed.blocks.1.mlp.fc2.bias": (DIM,),
        "patch_embed.blocks.1.ls2.gamma": (DIM,),
        "patch_embed.norm.weight": (DIM,),
        "patch_embed.norm.bias": (DIM,),
        "frame_blocks.0.norm1.weight": (DIM,),
        "frame_blocks.0.attn.qkv.weight": (3 * DIM, DIM),
        "frame_blocks.0.attn.q_norm.weight": (DIM // HEADS,),
        "frame_blocks.0.attn.k_norm.bias": (DIM // HEADS,),
        "frame_blocks.1.attn.proj.bias": (DIM,),
        "frame_blocks.1.ls1.gamma": (DIM,),
        "frame_blocks.1.norm2.bias": (DIM,),
        "global_blocks.0.mlp.fc1.bias": (4 * DIM,),
        "global_blocks.1.mlp.fc2.weight": (DIM, 4 * DIM),
        "global_blocks.1.ls2.gamma": (DIM,),
    }
    for key, shape in expected.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    # Full key set: per-block pattern for both stacks and the DINOv2 blocks.
    aa_suffixes = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias",
                   "attn.q_norm.weight", "attn.q_norm.bias", "attn.k_norm.weight", "attn.k_norm.bias",
                   "attn.proj.weight", "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias",
                   "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma"]
    dino_suffixes = [s for s in aa_suffixes if "_norm" not in s]  # backbone has no QK-norm
    full = {"camera_token", "register_token"}
    full |= {f"patch_embed.{k}" for k in ["cls_token", "pos_embed", "register_tokens", "mask_token",
                                          "patch_embed.proj.weight", "patch_embed.proj.bias",
                                          "norm.weight", "norm.bias"]}
    for i in range(2):
        full |= {f"patch_embed.blocks.{i}.{s}" for s in dino_suffixes}
    for stack in ("frame_blocks", "global_blocks"):
        for i in range(DEPTH):
            full |= {f"{stack}.{i}.{s}" for s in aa_suffixes}
    assert set(sd) == full
    assert "_resnet_mean" not in sd  # normalisation constants are not persistent


def test_conv_patch_embed_keys_and_defaults():
    sd = tiny("conv").state_dict()
    assert {k for k in sd if k.startswith("patch_embed.")} == {"patch_embed.proj.weight",
                                                                "patch_embed.proj.bias"}
    model = tiny("conv")
    assert torch.allclose(model.frame_blocks[0].ls1.gamma, torch.full((DIM,), 0.01))
    assert model.frame_blocks[0].norm1.eps == 1e-5
    dino = tiny().patch_embed
    assert dino.blocks[0].norm1.eps == 1e-6 and dino.norm.eps == 1e-6
    assert torch.allclose(dino.blocks[0].ls1.gamma, torch.ones(DIM))


def test_full_size_dinov2_shapes_without_forward():
    # Shapes only (no forward): the released configuration with ViT-L/14 at 518 px.
    with torch.device("meta"):
        model = Aggregator()
    sd = model.state_dict()
    assert tuple(sd["patch_embed.pos_embed"].shape) == (1, 1 + 37 * 37, 1024)
    assert tuple(sd["camera_token"].shape) == (1, 2, 1, 1024)
    assert tuple(sd["register_token"].shape) == (1, 2, 4, 1024)
    assert tuple(sd["frame_blocks.23.attn.q_norm.weight"].shape) == (64,)
    assert "global_blocks.24.ls1.gamma" not in sd and "patch_embed.blocks.23.ls2.gamma" in sd


def test_bad_arguments():
    with pytest.raises(ValueError):
        Aggregator(img_size=28, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, patch_embed="nope")
    with pytest.raises(ValueError):  # ViT-S is 384-d, not 32-d, unless overridden
        Aggregator(img_size=28, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                   patch_embed="dinov2_vits14_reg")
    with pytest.raises(ValueError):
        tiny("conv")(torch.rand(1, 2, 3, 30, 28))


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("patch_embed", ["conv", "dinov2_vits14_reg"])
def test_output_shapes_and_determinism(patch_embed):
    model = tiny(patch_embed)
    images = torch.rand(2, 3, 3, 28, 42)
    with torch.no_grad():
        outs, start = model(images)
        outs2, _ = model(images)
    assert start == 5
    assert len(outs) == DEPTH
    p = 5 + 2 * 3
    for o, o2 in zip(outs, outs2):
        assert o.shape == (2, 3, p, 2 * DIM)
        assert torch.isfinite(o).all()
        assert torch.equal(o, o2)


def test_stored_intermediates_are_after_frame_and_global_blocks():
    model = tiny("conv", aa_block_size=1)
    seen = {}

    def keep(name):
        def hook(_m, _inp, out):
            seen[name] = out.detach().clone()
        return hook

    for i in range(DEPTH):
        model.frame_blocks[i].register_forward_hook(keep(f"f{i}"))
        model.global_blocks[i].register_forward_hook(keep(f"g{i}"))
    b, s = 2, 2
    with torch.no_grad():
        outs, start = model(torch.rand(b, s, 3, 28, 28))
    p = start + 4
    for i in range(DEPTH):
        assert torch.equal(outs[i][..., :DIM], seen[f"f{i}"].reshape(b, s, p, DIM))
        assert torch.equal(outs[i][..., DIM:], seen[f"g{i}"].reshape(b, s, p, DIM))
    assert seen["f0"].shape == (b * s, p, DIM)  # frame attention on (B*S, P, C)
    assert seen["g0"].shape == (b, s * p, DIM)  # global attention on (B, S*P, C)


def test_aa_block_size_two():
    model = tiny("conv", aa_block_size=2)
    with torch.no_grad():
        outs, _ = model(torch.rand(1, 2, 3, 28, 28))
    assert len(outs) == DEPTH and outs[0].shape == (1, 2, 9, 2 * DIM)


def test_frame_blocks_do_not_mix_frames_global_blocks_do():
    model = tiny("dinov2_vits14_reg")
    captured = []
    model.frame_blocks[0].register_forward_hook(lambda m, i, o: captured.append(o.detach().clone()))
    model.global_blocks[0].register_forward_hook(lambda m, i, o: captured.append(o.detach().clone()))
    torch.manual_seed(1)
    images = torch.rand(1, 3, 3, 28, 28)
    changed = images.clone()
    changed[:, 2] = torch.rand(3, 28, 28)
    with torch.no_grad():
        model(images)
        model(changed)
    f_a, g_a, f_b, g_b = captured[0], captured[1], captured[2], captured[3]
    # first frame block: (B*S, P, C); frames 0 and 1 untouched, frame 2 changed
    assert torch.equal(f_a[:2], f_b[:2])
    assert not torch.allclose(f_a[2], f_b[2])
    # first global block: (B, S*P, C); frames 0 and 1 now see frame 2
    p = f_a.shape[1]
    assert not torch.allclose(g_a[:, :p], g_b[:, :p])
    assert not torch.allclose(g_a[:, p:2 * p], g_b[:, p:2 * p])


def test_batches_do_not_mix():
    model = tiny("conv")
    images = torch.rand(2, 2, 3, 28, 28)
    with torch.no_grad():
        full, _ = model(images)
        single, _ = model(images[1:])
    for a, b in zip(full, single):
        torch.testing.assert_close(a[1:], b, rtol=1e-5, atol=1e-6)


def test_camera_and_register_token_selection():
    model = tiny("conv")
    with torch.no_grad():
        model.camera_token[0, 0] = 1.0
        model.camera_token[0, 1] = -2.0
        model.register_token[0, 0] = 3.0
        model.register_token[0, 1] = -4.0
    inputs = []
    model.frame_blocks[0].register_forward_hook(lambda m, i, o: inputs.append(i[0].detach().clone()))
    b, s = 2, 3
    with torch.no_grad():
        model(torch.rand(b, s, 3, 28, 28))
    tok = inputs[0].reshape(b, s, -1, DIM)
    assert torch.all(tok[:, 0, 0] == 1.0) and torch.all(tok[:, 1:, 0] == -2.0)
    assert torch.all(tok[:, 0, 1:5] == 3.0) and torch.all(tok[:, 1:, 1:5] == -4.0)
    # patch tokens are the patch embedder's output on the ImageNet-normalised images
    assert tok.shape[2] == 5 + 4


def test_select_frame_tokens_helper():
    t = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4)
    out = select_frame_tokens(t, 2, 3).view(2, 3, 3, 4)
    assert torch.equal(out[:, 0], t[0, 0].expand(2, 3, 4))
    assert torch.equal(out[:, 1:], t[0, 1].expand(2, 2, 3, 4))
    assert select_frame_tokens(t, 2, 1).shape == (2, 3, 4)


def test_images_are_imagenet_normalised_inside():
    model = tiny("conv")
    captured = []
    model.patch_embed.register_forward_hook(lambda m, i, o: captured.append(i[0].detach().clone()))
    images = torch.rand(1, 2, 3, 28, 28)
    with torch.no_grad():
        model(images)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(captured[0], (images[0] - mean) / std)


def test_dinov2_patch_tokens_are_normed_outputs_without_cls_and_registers():
    model = tiny("dinov2_vits14_reg")
    dino_out = []
    model.patch_embed.register_forward_hook(lambda m, i, o: dino_out.append(o))
    inputs = []
    model.frame_blocks[0].register_forward_hook(lambda m, i, o: inputs.append(i[0].detach().clone()))
    with torch.no_grad():
        model(torch.rand(1, 2, 3, 28, 42))
    d = dino_out[0]
    assert d["x_prenorm"].shape == (2, 1 + 4 + 6, DIM)
    expected = model.patch_embed.norm(d["x_prenorm"])[:, 5:]
    torch.testing.assert_close(d["x_norm_patchtokens"], expected)
    torch.testing.assert_close(inputs[0][:, 5:], expected)


def test_pos_embed_interpolation():
    torch.manual_seed(0)
    vit = DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=8, depth=1, num_heads=2)
    same = vit.interpolated_pos_embed(4, 4, torch.float32)
    assert same.shape == (1, 17, 8) and torch.equal(same, vit.pos_embed)
    other = vit.interpolated_pos_embed(2, 6, torch.float32)
    assert other.shape == (1, 13, 8)
    assert torch.equal(other[:, 0], vit.pos_embed[:, 0])  # cls position is kept as is
    grid = vit.pos_embed[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(2, 6), mode="bicubic", antialias=True)
    torch.testing.assert_close(other[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 12, 8))


# ----------------------------------------------------------------------------- RoPE
def test_rope_relative_property_and_zero_position():
    rope = RotaryPositionEmbedding2D(frequency=100.0)
    torch.manual_seed(0)
    d = 16
    q = torch.randn(1, 1, 1, d)
    k = torch.randn(1, 1, 1, d)

    def dot(pq, pk):
        rq = rope(q, torch.tensor([[pq]]))
        rk = rope(k, torch.tensor([[pk]]))
        return (rq * rk).sum()

    offsets = [(1, 2), (0, -3), (5, 0)]
    for dy, dx in offsets:
        values = [dot((y, x), (y + dy, x + dx)) for y, x in [(0, 0), (3, 7), (10, 2), (1, 9)]]
        for v in values[1:]:
            torch.testing.assert_close(v, values[0], rtol=1e-4, atol=1e-4)
    # a different offset gives a different score
    assert not torch.allclose(dot((0, 0), (1, 2)), dot((0, 0), (2, 1)))
    # position (0, 0) is the identity; rotation preserves the norm
    x = torch.randn(2, 3, 5, d)
    torch.testing.assert_close(rope(x, torch.zeros(2, 5, 2, dtype=torch.long)), x)
    pos = torch.randint(0, 20, (2, 5, 2))
    torch.testing.assert_close(rope(x, pos).norm(dim=-1), x.norm(dim=-1))


def test_rope_halves_and_frequencies():
    rope = RotaryPositionEmbedding2D(frequency=100.0)
    d = 8
    x = torch.randn(1, 1, 1, d)
    # only y set: second half (x features) untouched, and vice versa
    out = rope(x, torch.tensor([[[3, 0]]]))
    torch.testing.assert_close(out[..., d // 2:], x[..., d // 2:])
    assert not torch.allclose(out[..., : d // 2], x[..., : d // 2])
    out = rope(x, torch.tensor([[[0, 3]]]))
    torch.testing.assert_close(out[..., : d // 2], x[..., : d // 2])
    # explicit formula on the y half (size 4, frequencies 100^0 and 100^-0.5)
    y = x[..., :4]
    theta = 3 * torch.tensor([1.0, 100.0 ** -0.5])
    cos = torch.cat([theta.cos(), theta.cos()])
    sin = torch.cat([theta.sin(), theta.sin()])
    rot = torch.cat([-y[..., 2:], y[..., :2]], dim=-1)
    torch.testing.assert_close(rope(x, torch.tensor([[[3, 0]]]))[..., :4], y * cos + rot * sin)


def test_aggregator_positions_special_tokens_at_zero():
    model = tiny("conv")
    captured = []
    model.frame_blocks[0].register_forward_hook(lambda m, args, kwargs, o: captured.append(kwargs["pos"]),
                                                with_kwargs=True)
    model.global_blocks[0].register_forward_hook(lambda m, args, kwargs, o: captured.append(kwargs["pos"]),
                                                 with_kwargs=True)
    with torch.no_grad():
        model(torch.rand(1, 2, 3, 28, 42))
    fpos, gpos = captured
    assert fpos.shape == (2, 5 + 6, 2) and gpos.shape == (1, 2 * 11, 2)
    assert torch.all(fpos[:, :5] == 0)
    expected = patch_positions(1, 2, 3)[0] + 1
    assert torch.equal(fpos[0, 5:], expected) and torch.equal(fpos[1, 5:], expected)
    assert torch.all(fpos[:, 5:] >= 1)
    assert torch.equal(gpos.reshape(2, 11, 2), fpos)
    assert torch.equal(patch_positions(1, 2, 3)[0], torch.tensor([[0, 0], [0, 1], [0, 2],
                                                                   [1, 0], [1, 1], [1, 2]]))


# ----------------------------------------------------------------------------- attention
@pytest.mark.parametrize("qk_norm,use_rope", [(False, False), (True, True)])
def test_sdpa_attention_matches_naive(qk_norm, use_rope):
    torch.manual_seed(0)
    rope = RotaryPositionEmbedding2D(100.0) if use_rope else None
    attn = Attention(DIM, num_heads=4, qk_norm=qk_norm, rope=rope).eval()
    x = torch.randn(2, 7, DIM)
    pos = torch.randint(0, 6, (2, 7, 2)) if use_rope else None
    q, k, v = attn.project_qkv(x, pos)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    naive = attn.proj((weights @ v).transpose(1, 2).reshape(2, 7, DIM))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, pos=pos), naive, rtol=1e-5, atol=1e-5)


def test_block_order_of_operations():
    torch.manual_seed(0)
    blk = Block(DIM, HEADS, init_values=0.5, qk_norm=True).eval()
    x = torch.randn(2, 5, DIM)
    h = x + blk.ls1.gamma * blk.attn(blk.norm1(x))
    ref = h + blk.ls2.gamma * blk.mlp.fc2(torch.nn.functional.gelu(blk.mlp.fc1(blk.norm2(h))))
    with torch.no_grad():
        torch.testing.assert_close(blk(x), ref)
    no_ls = Block(DIM, HEADS, init_values=None)
    assert not any("gamma" in k for k in no_ls.state_dict())
