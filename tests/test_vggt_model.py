"""Tests of the VGGT model (aggregator + camera/depth/point heads) and its checkpoint loader.

Tiny configurations on CPU; the full-size model is only ever built on the meta device.
"""
from __future__ import annotations

import json
import logging
import math
import re

import pytest
import torch
import torch.nn as nn

from archquant.models.vggt.heads import CameraHead, ResidualConvUnit, uv_grid
from archquant.models.vggt.model import VGGT, VGGTConfig, check_state_dict, load_vggt, read_state_dict

pytestmark = pytest.mark.usefixtures("single_thread")

C = 32  # aggregator embed_dim; every head sees 2C channels ([frame, global] concatenated)
TINY = {
    "img_size": 28, "patch_size": 14, "embed_dim": C, "depth": 2, "num_heads": 2,
    "patch_embed": "dinov2_vits14_reg",
    "dino_overrides": {"embed_dim": C, "depth": 1, "num_heads": 2},
    "camera_head": {"trunk_depth": 1, "num_heads": 2},
    "dpt_head": {"features": 8, "out_channels": [8, 16, 32, 32], "intermediate_layer_idx": [0, 1, 1, 1]},
}
H, W = 28, 42  # non-square: 2 x 3 patches


def tiny_model(seed: int = 0, **overrides) -> VGGT:
    torch.manual_seed(seed)
    return VGGT(VGGTConfig.from_dict({**TINY, **overrides}, where="test")).eval()


@pytest.fixture(scope="module")
def model() -> VGGT:
    return tiny_model()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(1))


def save_checkpoint(folder, sd, config=TINY, name="model.pt"):
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / name))
    else:
        torch.save(sd, folder / name)
    return folder / name


# ----------------------------------------------------------------------------- official key layout
def test_tiny_model_keys_follow_released_names(model):
    sd = model.state_dict()
    two_c = 2 * C
    assert model.camera_head.embed_pose.out_features == two_c  # the heads' dim_in is 2C
    fc1_hidden = model.camera_head.pose_branch.fc1.out_features
    assert fc1_hidden == two_c // 2
    oc0 = TINY["dpt_head"]["out_channels"]
    feats = TINY["dpt_head"]["features"]
    expected = {
        "camera_head.poseLN_modulation.1.weight": (3 * two_c, two_c),
        "camera_head.poseLN_modulation.1.bias": (3 * two_c,),
        "camera_head.empty_pose_tokens": (1, 1, 9),
        "camera_head.embed_pose.weight": (two_c, 9),
        "camera_head.embed_pose.bias": (two_c,),
        "camera_head.token_norm.weight": (two_c,),
        "camera_head.trunk_norm.weight": (two_c,),
        "camera_head.trunk.0.attn.qkv.weight": (3 * two_c, two_c),
        "camera_head.trunk.0.ls1.gamma": (two_c,),
        "camera_head.trunk.0.ls2.gamma": (two_c,),
        "camera_head.pose_branch.fc1.weight": (fc1_hidden, two_c),
        "camera_head.pose_branch.fc2.weight": (9, fc1_hidden),
        "depth_head.norm.weight": (two_c,),
        "depth_head.projects.0.weight": (oc0[0], two_c, 1, 1),
        "depth_head.projects.3.weight": (oc0[3], two_c, 1, 1),
        "depth_head.resize_layers.0.weight": (oc0[0], oc0[0], 4, 4),  # ConvTranspose: (in, out, k, k)
        "depth_head.resize_layers.1.weight": (oc0[1], oc0[1], 2, 2),
        "depth_head.resize_layers.3.weight": (oc0[3], oc0[3], 3, 3),
        "depth_head.scratch.layer1_rn.weight": (feats, oc0[0], 3, 3),
        "depth_head.scratch.layer4_rn.weight": (feats, oc0[3], 3, 3),
        "depth_head.scratch.refinenet4.resConfUnit2.conv1.weight": (feats, feats, 3, 3),
        "depth_head.scratch.refinenet1.resConfUnit1.conv2.bias": (feats,),
        "depth_head.scratch.refinenet1.out_conv.weight": (feats, feats, 1, 1),
        "depth_head.scratch.output_conv1.weight": (feats // 2, feats, 3, 3),
        "depth_head.scratch.output_conv2.0.weight": (32, feats // 2, 3, 3),
        "depth_head.scratch.output_conv2.2.weight": (2, 32, 1, 1),
        "point_head.scratch.output_conv2.2.weight": (4, 32, 1, 1),
        "point_head.scratch.output_conv2.2.bias": (4,),
        "aggregator.frame_blocks.0.attn.q_norm.weight": (C // 2,),
        "aggregator.global_blocks.1.attn.k_norm.bias": (C // 2,),
        "aggregator.camera_token": (1, 2, 1, C),
        "aggregator.register_token": (1, 2, 4, C),
        "aggregator.patch_embed.pos_embed": (1, 1 + 2 * 2, C),
    }
    for key, shape in expected.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, (key, tuple(sd[key].shape))
    # identity resize layer and biasless scratch convs hold nothing; the deepest fusion block has no skip unit
    for head in ("depth_head", "point_head"):
        assert not any(k.startswith(f"{head}.resize_layers.2.") for k in sd)
        assert not any(k.startswith(f"{head}.scratch.refinenet4.resConfUnit1.") for k in sd)
        for i in range(1, 5):
            assert f"{head}.scratch.layer{i}_rn.bias" not in sd
        assert not any(".output_conv2.1." in k for k in sd)  # the ReLU
    assert not any(k.startswith("camera_head.adaln_norm") for k in sd)  # no affine parameters
    assert not any(k.startswith("track_head.") for k in sd)
    assert not any("_resnet_" in k for k in sd)
    prefixes = {k.split(".")[0] for k in sd}
    assert prefixes == {"aggregator", "camera_head", "depth_head", "point_head"}
    # the depth and point heads have the same layout (only output_conv2.2 differs in size)
    dk = {k[len("depth_head."):] for k in sd if k.startswith("depth_head.")}
    pk = {k[len("point_head."):] for k in sd if k.startswith("point_head.")}
    assert dk == pk


def test_full_size_model_on_meta_device():
    with torch.device("meta"):
        model = VGGT()
    sd = model.state_dict()
    assert len(sd) == 1403  # VGGT-1B's keys less the track head's
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 1_190_596_120
    assert 1.15e9 <= n_params <= 1.30e9
    assert tuple(sd["aggregator.patch_embed.pos_embed"].shape) == (1, 1370, 1024)
    assert tuple(sd["camera_head.poseLN_modulation.1.weight"].shape) == (3 * 2048, 2048)
    assert tuple(sd["camera_head.pose_branch.fc1.weight"].shape) == (1024, 2048)
    assert tuple(sd["depth_head.projects.0.weight"].shape) == (256, 2048, 1, 1)
    assert tuple(sd["point_head.projects.3.weight"].shape) == (1024, 2048, 1, 1)
    assert tuple(sd["depth_head.scratch.output_conv1.weight"].shape) == (128, 256, 3, 3)
    assert "camera_head.trunk.3.ls2.gamma" in sd and "camera_head.trunk.4.norm1.weight" not in sd
    assert "aggregator.frame_blocks.23.ls2.gamma" in sd and "aggregator.global_blocks.24.ls1.gamma" not in sd
    per_head = {p: sum(1 for k in sd if k.startswith(p + ".")) for p in ("camera_head", "depth_head", "point_head")}
    assert per_head == {"camera_head": 69, "depth_head": 62, "point_head": 62}


# ----------------------------------------------------------------------------- outputs
def test_output_shapes_and_ranges_for_a_sequence(model, images):
    with torch.no_grad():
        out = model(images)
    s = images.shape[0]
    assert set(out) == {"pose_enc", "pose_enc_list", "depth", "depth_conf", "world_points",
                        "world_points_conf", "images"}
    assert out["pose_enc"].shape == (1, s, 9)
    assert len(out["pose_enc_list"]) == 4
    assert out["pose_enc"] is out["pose_enc_list"][-1]
    assert out["depth"].shape == (1, s, H, W, 1)
    assert out["depth_conf"].shape == (1, s, H, W)
    assert out["world_points"].shape == (1, s, H, W, 3)
    assert out["world_points_conf"].shape == (1, s, H, W)
    assert out["images"].shape == (1, s, 3, H, W) and torch.equal(out["images"][0], images)
    assert (out["depth"] > 0).all()
    assert (out["depth_conf"] > 1).all() and (out["world_points_conf"] > 1).all()
    assert (out["pose_enc"][..., 7:] >= 0).all()
    for v in out.values():
        if torch.is_tensor(v):
            assert torch.isfinite(v).all()
    # world points (inv_log) are signed; depth is not
    assert (out["world_points"] < 0).any() and (out["world_points"] > 0).any()


def test_batched_input_matches_per_sequence_runs(model, images):
    other = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        both = model(torch.stack([images, other]), num_iterations=2)
        first = model(images, num_iterations=2)
        second = model(other.unsqueeze(0), num_iterations=2)
    assert both["pose_enc"].shape == (2, 2, 9)
    assert both["depth"].shape == (2, 2, H, W, 1) and both["world_points"].shape == (2, 2, H, W, 3)
    assert len(both["pose_enc_list"]) == 2
    for key in ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"):
        torch.testing.assert_close(both[key][0], first[key][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(both[key][1], second[key][0], rtol=1e-4, atol=1e-5)


def test_bad_image_shapes_are_refused(model):
    with pytest.raises(ValueError, match=r"\(1, 2, 4, 28, 28\)"):
        model(torch.rand(1, 2, 4, 28, 28))
    with pytest.raises(ValueError, match="expected images"):
        model(torch.rand(3, 28, 28))


@pytest.mark.parametrize("disabled, absent", [
    ("enable_camera", {"pose_enc", "pose_enc_list"}),
    ("enable_depth", {"depth", "depth_conf"}),
    ("enable_point", {"world_points", "world_points_conf"}),
])
def test_disabled_heads_are_absent(images, disabled, absent):
    m = tiny_model(**{disabled: False})
    head = {"enable_camera": "camera_head", "enable_depth": "depth_head", "enable_point": "point_head"}[disabled]
    assert getattr(m, head) is None
    assert not any(k.startswith(head + ".") for k in m.state_dict())
    with torch.no_grad():
        out = m(images[:1])
    everything = {"pose_enc", "pose_enc_list", "depth", "depth_conf", "world_points", "world_points_conf", "images"}
    assert set(out) == everything - absent


def test_dense_head_activations_from_a_constant_output_conv(images):
    # With the last 1x1 conv zeroed, every pixel's raw output is that conv's bias: the activations
    # are then checked exactly: depth = exp(d), points = sign(y)(e^|y| - 1), confidence = 1 + e^c.
    m = tiny_model()
    with torch.no_grad():
        for head, bias in ((m.depth_head, [0.5, -1.0]), (m.point_head, [-2.0, 0.0, 1.5, 0.25])):
            last = head.scratch.output_conv2[2]
            last.weight.zero_()
            last.bias.copy_(torch.tensor(bias))
        out = m(images)
    torch.testing.assert_close(out["depth"], torch.full_like(out["depth"], math.exp(0.5)))
    torch.testing.assert_close(out["depth_conf"], torch.full_like(out["depth_conf"], 1 + math.exp(-1.0)))
    pts = torch.tensor([-(math.exp(2.0) - 1), 0.0, math.exp(1.5) - 1])
    torch.testing.assert_close(out["world_points"], pts.expand_as(out["world_points"]))
    torch.testing.assert_close(out["world_points_conf"],
                               torch.full_like(out["world_points_conf"], 1 + math.exp(0.25)))


# ----------------------------------------------------------------------------- camera head
def test_camera_refinement_is_causal(model, images):
    with torch.no_grad():
        one = model(images, num_iterations=1)
        four = model(images, num_iterations=4)
    assert len(one["pose_enc_list"]) == 1 and len(four["pose_enc_list"]) == 4
    assert torch.equal(one["pose_enc_list"][0], four["pose_enc_list"][0])
    assert torch.equal(one["pose_enc"], one["pose_enc_list"][0])
    # the later rounds do refine (add a delta) rather than repeat the first estimate
    assert not torch.equal(four["pose_enc_list"][0], four["pose_enc_list"][1])
    for enc in four["pose_enc_list"]:
        assert (enc[..., 7:] >= 0).all()
    # the dense heads do not depend on the number of camera rounds
    assert torch.equal(one["depth"], four["depth"])


def test_camera_activations_relu_on_fov_only():
    torch.manual_seed(0)
    head = CameraHead(2 * C, trunk_depth=1, num_heads=2).eval()
    tokens = [torch.randn(1, 3, 6, 2 * C)]
    with torch.no_grad():
        head.pose_branch.fc2.weight.zero_()
        head.pose_branch.fc2.bias.fill_(-3.0)
        preds = head(tokens, num_iterations=2)
    assert torch.equal(preds[0][..., 7:], torch.zeros(1, 3, 2))  # field of view: ReLU
    assert torch.equal(preds[0][..., :7], torch.full((1, 3, 7), -3.0))  # translation, quaternion: linear
    # second round: the deltas accumulate before the activation (-6 raw -> fov still 0)
    assert torch.equal(preds[1][..., :7], torch.full((1, 3, 7), -6.0))
    assert torch.equal(preds[1][..., 7:], torch.zeros(1, 3, 2))
    # only the camera token (index 0) of the last layer is used
    tokens2 = [tokens[0].clone()]
    tokens2[0][:, :, 1:] = torch.randn(1, 3, 5, 2 * C)
    with torch.no_grad():
        head.pose_branch.fc2.weight.normal_()
        assert torch.equal(head(tokens, 3)[-1], head(tokens2, 3)[-1])


# ----------------------------------------------------------------------------- DPT pieces
def test_uv_grid_geometry():
    w, h = 6, 4
    grid = uv_grid(w, h, aspect_ratio=w / h, dtype=torch.float64)
    assert grid.shape == (h, w, 2)
    assert abs(grid.sum().item()) < 1e-12
    assert torch.allclose(grid[..., 0].sum(dim=1), torch.zeros(h, dtype=torch.float64), atol=1e-12)
    # u varies along the width only, v along the height only
    assert torch.equal(grid[0, :, 0], grid[-1, :, 0]) and torch.equal(grid[:, 0, 1], grid[:, -1, 1])
    assert (grid[0, 1:, 0] > grid[0, :-1, 0]).all() and (grid[1:, 0, 1] > grid[:-1, 0, 1]).all()
    # full spans (pixel edges, not centres): ratio W/H, half-diagonal 1
    span_x = grid[..., 0].max().item() * w / (w - 1)
    span_y = grid[..., 1].max().item() * h / (h - 1)
    assert span_x / span_y == pytest.approx(w / h, rel=1e-12)
    assert span_x ** 2 + span_y ** 2 == pytest.approx(1.0, rel=1e-12)
    # with the image's own aspect ratio the pixels are square: equal steps in u and v
    step_u = (grid[0, 1, 0] - grid[0, 0, 0]).item()
    step_v = (grid[1, 0, 1] - grid[0, 0, 1]).item()
    assert step_u == pytest.approx(step_v, rel=1e-12)
    # the aspect ratio passed in (the image's), not the grid's, sets the spans
    g2 = uv_grid(3, 3, aspect_ratio=2.0, dtype=torch.float64)
    assert (g2[..., 0].max() / g2[..., 1].max()).item() == pytest.approx(2.0, rel=1e-12)


def _official_residual_conv_unit(unit: ResidualConvUnit, x: torch.Tensor) -> torch.Tensor:
    # facebookresearch/vggt dpt_head.py: _make_fusion_block passes nn.ReLU(inplace=True), so the
    # first activation overwrites x and the skip connection adds relu(x), not x.
    act = nn.ReLU(inplace=True)
    x = x.clone()
    out = act(x)
    out = unit.conv1(out)
    out = act(out)
    out = unit.conv2(out)
    return out + x


def test_residual_conv_unit_matches_released_in_place_relu():
    torch.manual_seed(0)
    unit = ResidualConvUnit(4).eval()
    x = torch.randn(1, 4, 5, 5)
    assert (x < 0).any()
    with torch.no_grad():
        torch.testing.assert_close(unit(x), _official_residual_conv_unit(unit, x))


# ----------------------------------------------------------------------------- loading
def _run(m, images):
    with torch.no_grad():
        return m(images)


def _assert_same_outputs(a, b):
    for key in ("depth", "depth_conf", "world_points", "world_points_conf", "pose_enc"):
        assert torch.equal(a[key], b[key]), key
    assert all(torch.equal(x, y) for x, y in zip(a["pose_enc_list"], b["pose_enc_list"]))


def test_load_folder_roundtrip_bit_exact(tmp_path, model, images):
    sd = model.state_dict()
    save_checkpoint(tmp_path / "ckpt", sd)
    loaded = load_vggt(tmp_path / "ckpt")
    assert not loaded.training
    assert loaded.config == model.config
    lsd = loaded.state_dict()
    assert set(lsd) == set(sd)
    assert all(torch.equal(lsd[k], sd[k]) and lsd[k].device.type == "cpu" for k in sd)
    assert loaded.aggregator._resnet_mean.device.type == "cpu"
    ref = _run(model, images)
    first = _run(loaded, images)
    _assert_same_outputs(ref, first)
    again = load_vggt(str(tmp_path / "ckpt"))  # str paths too
    _assert_same_outputs(first, _run(again, images))
    # the file path itself (config.json from its folder)
    direct = load_vggt(tmp_path / "ckpt" / "model.pt")
    _assert_same_outputs(ref, _run(direct, images))


def test_load_safetensors_and_model_wrapper(tmp_path, model, images):
    sd = model.state_dict()
    ref = _run(model, images)
    save_checkpoint(tmp_path / "st", sd, name="model.safetensors")
    _assert_same_outputs(ref, _run(load_vggt(tmp_path / "st"), images))
    save_checkpoint(tmp_path / "wrapped", {"model": sd, "step": torch.tensor(7)})
    _assert_same_outputs(ref, _run(load_vggt(tmp_path / "wrapped"), images))
    # a folder holding both prefers the safetensors file (the torch file here is not even readable)
    (tmp_path / "st" / "model.pt").write_bytes(b"not a checkpoint")
    _assert_same_outputs(ref, _run(load_vggt(tmp_path / "st"), images))


def test_load_dtype(tmp_path, model):
    save_checkpoint(tmp_path / "c", model.state_dict())
    loaded = load_vggt(tmp_path / "c", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    assert torch.equal(loaded.aggregator.camera_token.float(), model.aggregator.camera_token)


def test_track_head_keys_are_skipped_with_a_note(tmp_path, model, images, caplog):
    sd = dict(model.state_dict())
    sd["track_head.feature_extractor.norm.weight"] = torch.ones(7)
    sd["track_head.tracker.corr_mlp.fc1.weight"] = torch.zeros(3, 5)
    save_checkpoint(tmp_path / "t", sd)
    with caplog.at_level(logging.INFO, logger="archquant.models.vggt.model"):
        loaded = load_vggt(tmp_path / "t")
    notes = [r for r in caplog.records if r.levelno == logging.INFO and "track" in r.getMessage().lower()]
    assert len(notes) == 1 and "2 track-head tensors" in notes[0].getMessage()
    assert not any(k.startswith("track_head.") for k in loaded.state_dict())
    _assert_same_outputs(_run(model, images), _run(loaded, images))


def test_check_state_dict_returns_the_kept_tensors(model):
    sd = dict(model.state_dict())
    kept = check_state_dict(model, {**sd, "track_head.x": torch.zeros(1)}, "f")
    assert set(kept) == set(sd)


# ----------------------------------------------------------------------------- errors
def test_foreign_key_is_refused(tmp_path, model):
    sd = {**model.state_dict(), "aggregator.bogus_block.weight": torch.zeros(3)}
    file = save_checkpoint(tmp_path / "c", sd)
    with pytest.raises(ValueError, match=r"unexpected key 'aggregator\.bogus_block\.weight'") as info:
        load_vggt(tmp_path / "c")
    assert str(file) in str(info.value)


def test_missing_key_is_refused(tmp_path, model):
    sd = dict(model.state_dict())
    del sd["depth_head.norm.bias"]
    save_checkpoint(tmp_path / "c", sd)
    with pytest.raises(ValueError, match=r"missing key 'depth_head\.norm\.bias' \(1 missing\)"):
        load_vggt(tmp_path / "c")


def test_wrong_shape_for_config_sizes_is_refused(tmp_path, model):
    # the tensors are a features=8 model's, config.json says 16
    config = {**TINY, "dpt_head": {**TINY["dpt_head"], "features": 16}}
    save_checkpoint(tmp_path / "c", model.state_dict(), config=config)
    with pytest.raises(ValueError, match=r"'depth_head\.scratch\.layer1_rn\.weight' has shape \(8, 8, 3, 3\)"
                                         r".*give \(16, 8, 3, 3\)"):
        load_vggt(tmp_path / "c")


def test_single_wrong_tensor_shape_is_refused(tmp_path, model):
    sd = {**model.state_dict(), "camera_head.empty_pose_tokens": torch.zeros(1, 1, 8)}
    save_checkpoint(tmp_path / "c", sd)
    with pytest.raises(ValueError, match=r"'camera_head\.empty_pose_tokens' has shape \(1, 1, 8\).*\(1, 1, 9\)"):
        load_vggt(tmp_path / "c")


def test_missing_config_means_full_size(tmp_path, model):
    save_checkpoint(tmp_path / "c", model.state_dict(), config=None)
    # without config.json the sizes are VGGT-1B's: 24 aggregator layers, so layers 2..23 are missing
    with pytest.raises(ValueError, match=r"missing key 'aggregator\.frame_blocks\.10\.attn\.k_norm\.bias' "
                                         r"\(1156 missing\)"):
        load_vggt(tmp_path / "c")


@pytest.mark.parametrize("config, match", [
    ({**TINY, "embed_dims": 32}, r"config\.json: unknown key 'embed_dims'"),
    ({**TINY, "camera_head": {"trunk_depth": 1, "heads": 2}}, r"unknown key camera_head\.'heads'"),
    ({**TINY, "num_heads": 3}, r"embed_dim=32 is not divisible by num_heads=3"),
    ({**TINY, "dpt_head": {"intermediate_layer_idx": [0, 1, 1, 2]}}, r"intermediate_layer_idx=\[0, 1, 1, 2\]"),
    ([1, 2], r"config\.json: expected a JSON object"),
])
def test_bad_config_json_is_refused(tmp_path, model, config, match):
    save_checkpoint(tmp_path / "c", model.state_dict(), config=config)
    with pytest.raises(ValueError, match=match):
        load_vggt(tmp_path / "c")


def test_config_json_that_is_not_json(tmp_path, model):
    save_checkpoint(tmp_path / "c", model.state_dict(), config=None)
    (tmp_path / "c" / "config.json").write_text("{embed_dim: 32,")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "c" / "config.json")) + ": not valid JSON"):
        load_vggt(tmp_path / "c")


def test_folder_without_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors or model\.pt"):
        load_vggt(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_vggt(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["model.pt", "model.safetensors"])
def test_corrupt_checkpoint_names_the_file(tmp_path, name):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY))
    (folder / name).write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                              dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ValueError, match=re.escape(str(folder / name)) + ": not a readable checkpoint"):
        load_vggt(folder)


def test_non_tensor_values_are_refused(tmp_path):
    folder = tmp_path / "c"
    save_checkpoint(folder, {"a": torch.zeros(2), "b": [torch.zeros(1)]})
    with pytest.raises(ValueError, match=re.escape(str(folder / "model.pt")) + ": not a state dict of named tensors"):
        load_vggt(folder)


UNPICKLED: list = []


def _record_unpickling(tag):
    UNPICKLED.append(tag)
    return tag


class Payload:
    """Unpickling this would call _record_unpickling: a stand-in for arbitrary code in a pickle."""

    def __reduce__(self):
        return (_record_unpickling, ("executed",))


def test_pickled_code_is_refused_without_running_it(tmp_path, model):
    folder = tmp_path / "c"
    sd = {**model.state_dict(), "x": Payload()}
    save_checkpoint(folder, sd)
    UNPICKLED.clear()
    with pytest.raises(ValueError, match=re.escape(str(folder / "model.pt")) + ": not a readable checkpoint"):
        load_vggt(folder)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        read_state_dict(folder / "model.pt")
    assert UNPICKLED == []
    # the same file under an ordinary (unsafe) load would have run it: the guard is what stopped it
    torch.load(folder / "model.pt", weights_only=False)
    assert UNPICKLED == ["executed"]


def test_loaded_model_does_not_alias_the_file(tmp_path, model, images):
    folder = tmp_path / "c"
    save_checkpoint(folder, model.state_dict())
    loaded = load_vggt(folder)
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    save_checkpoint(folder, tiny_model(seed=1).state_dict())  # same sizes, other values, same path
    after = loaded.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
