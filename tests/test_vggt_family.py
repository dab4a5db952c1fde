"""The VGGT family end to end: configs through the runner on tiny checkpoints the tests write,
NFDS inside a recipe, DSFQ's exactness on the model, and the one-line refusals of bad input."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from archquant.adapters.base import get_adapter
from archquant.core.blocks import capture_block_inputs
from archquant.core.calibration_select import SelectCalibration
from archquant.core.dsfq import DualSmoothing, LearnableClipping
from archquant.core.recipe import Recipe, apply_recipe
from archquant.models.synthetic_scenes import render_scene, scene_seeds
from archquant.models.vggt.model import VGGT, VGGTConfig
from cli_testing import ROOT, one_error_line, run_cli
from test_reconstruction_datasets import write_fake_co3d

TINY = {"img_size": 28, "patch_size": 14, "embed_dim": 32, "depth": 2, "num_heads": 2, "patch_embed": "conv",
        "camera_head": {"trunk_depth": 1, "num_heads": 2},
        "dpt_head": {"features": 8, "out_channels": [8, 16, 32, 32], "intermediate_layer_idx": [0, 1, 1, 1]},
        "enable_track": False}
FAST = ["calibration.num_samples=6", "recipe.options.num_samples=3", "recipe.options.num_clusters=2",
        "evaluation.num_samples=4", "evaluation.batch_size=2", "progress=false"]


def tiny_model(seed: int = 0) -> VGGT:
    torch.manual_seed(seed)
    model = VGGT(VGGTConfig.from_dict(TINY)).eval()
    with torch.no_grad():  # visible special tokens, as trained models have
        model.aggregator.camera_token.normal_()
        model.aggregator.register_token.normal_()
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vggt_tiny")
    torch.save(tiny_model().state_dict(), folder / "model.pt")
    (folder / "config.json").write_text(json.dumps(TINY))
    return folder


def run(capsys, tmp_path, config, checkpoint, *extra):
    return run_cli(capsys, ROOT / "configs" / config, f"model.path={checkpoint}", f"output_dir={tmp_path / 'out'}",
                   *FAST, *extra)


def test_w8a8_config_runs_on_real_int8_kernels_writes_clouds_and_reloads_bit_identically(tmp_path, capsys, checkpoint):
    code, out, err = run(capsys, tmp_path, "vggt_w8a8.yaml", checkpoint)
    assert code == 0, err
    report = (tmp_path / "out" / "report.md").read_text()
    assert "reloaded: probe-batch outputs bit-identical" in report
    assert "16 Linears on int8 kernels" in report  # 4 per block x (2 frame + 2 global)
    assert re.search(r"calibration \(NFDS\): \d+ of 6 pool samples flagged", report)
    metrics = json.loads((tmp_path / "out" / "report.json").read_text())["metrics"]
    assert {"auc30", "abs_rel", "chamfer"} <= set(metrics["fp"]) and "chamfer_vs_fp" in metrics["real"]
    art = tmp_path / "out" / "artifacts"
    for label in ("fp", "quantvggt", "real"):
        ply = art / label / "scene000_points.ply"
        assert ply.read_bytes().startswith(b"ply\n")
        assert (art / label / "scene000_clouds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_w4a4_config_compares_dsfq_with_its_baselines(tmp_path, capsys, checkpoint):
    code, out, err = run(capsys, tmp_path, "vggt_w4a4.yaml", checkpoint, "compare=[rtn_dynamic,quarot,dsfq]")
    assert code == 0, err
    report = (tmp_path / "out" / "report.md").read_text()
    for name in ("rtn_dynamic", "quarot", "dsfq", "quantvggt"):
        assert f"| {name}" in report or f"**{name}**" in report
    assert "calibration: 3 of 6 pool samples drawn at random" in report


@pytest.mark.parametrize("override, message", [
    ("evaluation.options.num_frames=1", "camera poses are scored on frame pairs"),
    ("evaluation.options.image_size=30", "image_size=30 is not a multiple of the patch size 14"),
    # the calibration pool drawn from the evaluation seed range: the same scenes, refused by content
    ("calibration.split=evaluation", "overlap in"),
    ("recipe.options.num_samples=9", "exceeds the calibration pool of 6"),
])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, checkpoint, override, message):
    code, out, err = run(capsys, tmp_path, "vggt_w8a8.yaml", checkpoint, override)
    assert code == 2
    assert message in one_error_line(err)


def test_a_checkpoint_of_another_model_or_other_sizes_is_refused(tmp_path, capsys, checkpoint):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    torch.save({"encoder.layer.0.weight": torch.zeros(2, 2)}, foreign / "model.pt")
    (foreign / "config.json").write_text(json.dumps(TINY))
    code, _, err = run(capsys, tmp_path, "vggt_w8a8.yaml", foreign)
    assert code == 2 and "unexpected key 'encoder.layer.0.weight'" in one_error_line(err)

    resized = tmp_path / "resized"
    resized.mkdir()
    torch.save(tiny_model().state_dict(), resized / "model.pt")
    (resized / "config.json").write_text(json.dumps({**TINY, "embed_dim": 64}))
    code, _, err = run(capsys, tmp_path, "vggt_w8a8.yaml", resized)
    line = one_error_line(err)
    assert code == 2 and "has shape" in line and "config.json" in line


def test_co3d_without_annotations_and_mixed_sizes_are_one_line_errors(tmp_path, capsys, checkpoint):
    co3d_dir, anno_dir, _ = write_fake_co3d(tmp_path, {"apple": {"s1": 4}}, image_hw=(28, 28))
    empty = tmp_path / "no_annotations"
    empty.mkdir()
    base = ["evaluation.source=co3d", f"evaluation.options.co3d_dir={co3d_dir}", "evaluation.options.min_frames=4"]
    code, _, err = run(capsys, tmp_path, "vggt_w8a8.yaml", checkpoint, *base,
                       f"evaluation.options.co3d_anno_dir={empty}")
    assert code == 2 and "Co3D folder without annotations" in one_error_line(err)

    # one frame of another aspect ratio: the scene's frames would come out at different sizes
    from PIL import Image

    Image.new("RGB", (56, 28)).save(co3d_dir / "apple/s1/images/frame000002.png")
    code, _, err = run(capsys, tmp_path, "vggt_w8a8.yaml", checkpoint, *base,
                       f"evaluation.options.co3d_anno_dir={anno_dir}", "evaluation.options.num_frames=4")
    assert code == 2 and "frame000002.png" in one_error_line(err)


def test_co3d_evaluation_runs_without_depth(tmp_path, capsys, checkpoint):
    co3d_dir, anno_dir, _ = write_fake_co3d(tmp_path, {"apple": {"s1": 4, "s2": 4}}, image_hw=(28, 28))
    code, _, err = run(capsys, tmp_path, "vggt_w8a8.yaml", checkpoint, "evaluation.source=co3d",
                       f"evaluation.options.co3d_dir={co3d_dir}", f"evaluation.options.co3d_anno_dir={anno_dir}",
                       "evaluation.options.min_frames=4", "evaluation.batch_size=1", "compare=[]")
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "report.json").read_text())["metrics"]
    assert {"auc30", "rra15", "rta15"} <= set(metrics["fp"])
    assert not {"abs_rel", "chamfer"} & set(metrics["fp"])  # Co3D has no depth: no depth or point metrics
    assert "auc30_vs_fp" in metrics["quantized"]


# ----------------------------------------------------------------------------- recipes on the model


def scene_batches(count: int, split: str = "calibration", frames: int = 3) -> list[dict]:
    out = []
    for seed in scene_seeds(split, count):
        s = render_scene(seed, num_frames=frames, height=28, width=28)
        out.append({"images": s.images[None], "scenes": [{"name": str(seed)}], "items": [len(out)]})
    return out


def test_nfds_really_removes_the_samples_it_flags():
    model = tiny_model()
    adapter = get_adapter("vggt")
    pool = scene_batches(10)
    # a saturated scene: its deep activations sit far from the rest of the pool
    pool[4] = {**pool[4], "images": torch.ones_like(pool[4]["images"]) * 40.0}
    step = SelectCalibration(method="nfds", num_samples=4, num_clusters=2, drop_fraction=0.2)
    recipe = Recipe("select", [step])
    apply_recipe(model, recipe, adapter.structure(model), calib_batches=pool,
                 forward_fn=adapter.forward, progress=False)
    assert step.selection["filtered"] == 2 and 4 not in step.selection["chosen"]
    assert len(step.selection["chosen"]) == 4
    kept_step = SelectCalibration(method="nfds", num_samples=9, num_clusters=2, apply_filter=False)
    apply_recipe(model, Recipe("select", [kept_step]), adapter.structure(model), calib_batches=pool,
                 forward_fn=adapter.forward, progress=False)
    assert kept_step.selection["filtered"] == 0 and kept_step.selection["flagged"] == 2


def test_dsfq_without_quantization_leaves_the_model_exact():
    model = tiny_model()
    images = scene_batches(1, "evaluation")[0]["images"]
    before = model(images)
    adapter = get_adapter("vggt")
    for order in ("rotate_then_smooth", "smooth_then_rotate"):
        m = tiny_model()
        apply_recipe(m, Recipe("dsfq", [DualSmoothing(order=order)]), adapter.structure(m),
                     calib_batches=scene_batches(2), forward_fn=adapter.forward, progress=False)
        after = m(images)
        for key in ("pose_enc", "depth", "world_points"):
            torch.testing.assert_close(after[key], before[key], atol=1e-5, rtol=1e-5)


def test_global_blocks_are_calibrated_on_all_frames_tokens_together():
    model = tiny_model()
    adapter = get_adapter("vggt")
    blocks = adapter.structure(model).blocks
    assert blocks[:2] == ["aggregator.frame_blocks.0", "aggregator.global_blocks.0"]
    calls = capture_block_inputs(model, scene_batches(1, frames=3), blocks, adapter.forward)
    tokens = 1 + 4 + 2 * 2  # camera + registers + 2x2 patches per frame
    assert tuple(calls["aggregator.frame_blocks.0"][0].args[0].shape) == (3, tokens, 32)
    assert tuple(calls["aggregator.global_blocks.0"][0].args[0].shape) == (1, 3 * tokens, 32)


def test_the_p2_reproduction_regroups_global_calls_per_frame():
    model = tiny_model()
    adapter = get_adapter("vggt")
    s = adapter.structure(model)
    calls = capture_block_inputs(model, scene_batches(1, frames=3), s.blocks, adapter.forward)
    tokens = 1 + 4 + 2 * 2
    assert s.per_frame_call("aggregator.frame_blocks.0", calls["aggregator.frame_blocks.0"][0]) is None
    glob = calls["aggregator.global_blocks.0"][0]
    per_frame = s.per_frame_call("aggregator.global_blocks.0", glob)
    assert tuple(per_frame.args[0].shape) == (3, tokens, 32)
    # the same tokens and positions as the frame block gets: frame attention, the reference code's shape
    frame = calls["aggregator.frame_blocks.0"][0]
    assert torch.equal(per_frame.kwargs["pos"], frame.kwargs["pos"])
    assert torch.equal(per_frame.args[0].reshape(1, 3 * tokens, 32), glob.args[0])
    block = model.get_submodule("aggregator.global_blocks.0")
    with torch.no_grad():  # frame by frame: each row alone gives its own output
        whole = per_frame.run(block)
        one = block(per_frame.args[0][1:2], pos=per_frame.kwargs["pos"][1:2])
        assert torch.allclose(whole[1:2], one, atol=1e-6)
        assert not torch.allclose(whole.reshape(1, 3 * tokens, 32), glob.run(block), atol=1e-4)
    losses = {}
    for mode in ("global", "per_frame"):
        m = tiny_model()
        step = LearnableClipping(steps=2, global_calls=mode)
        apply_recipe(m, Recipe("p2", [DualSmoothing(), step]), adapter.structure(m),
                     calib_batches=scene_batches(2), forward_fn=adapter.forward, progress=False)
        losses[mode] = step.block_losses
    assert losses["global"]["aggregator.frame_blocks.0"] == losses["per_frame"]["aggregator.frame_blocks.0"]
    assert losses["global"]["aggregator.global_blocks.0"] != losses["per_frame"]["aggregator.global_blocks.0"]


def test_structure_quantizes_the_block_linears_and_patterns_add_more():
    model = tiny_model()
    adapter = get_adapter("vggt")
    s = adapter.structure(model)
    assert len(s.quantize) == 16 and all(".attn." in n or ".mlp." in n for n in s.quantize)
    assert not any(n.startswith(("aggregator.patch_embed", "camera_head")) for n in s.quantize)
    model.quantize_also = ["re:camera_head\\.trunk\\..*"]
    extra = [n for n in adapter.structure(model).quantize if n.startswith("camera_head")]
    assert extra == ["camera_head.trunk.0.attn.proj", "camera_head.trunk.0.attn.qkv",
                     "camera_head.trunk.0.mlp.fc1", "camera_head.trunk.0.mlp.fc2"]


def test_the_safetensors_reference_layout_loads(tmp_path):
    model = tiny_model()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    loaded, config = get_adapter("vggt").load_model(str(tmp_path), {"reference": "unused"}, "float32")
    images = scene_batches(1)[0]["images"]
    assert torch.equal(loaded(images)["depth"], model(images)["depth"])
    assert config["vggt"]["embed_dim"] == 32


def test_the_committed_reference_beats_the_trivial_baselines():
    from archquant.eval.reconstruction_eval import decode_predictions, scene_metrics, trivial_baselines
    from archquant.evaluation import merge_item_means

    model, _ = get_adapter("vggt").load_model(None, {"reference": "vggt-scenes"}, "float32")
    rows, base = [], []
    for seed in scene_seeds("evaluation", 6):
        s = render_scene(seed, num_frames=4, height=112, width=112, background_valid=False)
        gt = {"extrinsics": s.extrinsics, "depth": s.depth, "world_points": s.world_points}
        with torch.no_grad():
            pred = {k: v[0] for k, v in decode_predictions(model(s.images[None]), (112, 112)).items()}
        rows.append(scene_metrics(pred, gt, s.valid))
        base.append(trivial_baselines(gt, s.valid))
    ours, trivial = merge_item_means(rows), merge_item_means(base)
    assert ours["auc30"] > trivial["auc30"] + 0.05  # identity cameras
    assert ours["abs_rel"] < 0.5 * trivial["abs_rel"]  # each image's mean depth


@pytest.mark.parametrize("config", ["vggt_w8a8.yaml", "vggt_w4a4.yaml"])
def test_the_committed_configs_run_on_the_reference_model(tmp_path, capsys, config):
    code, _, err = run_cli(capsys, ROOT / "configs" / config, f"output_dir={tmp_path / 'out'}", "progress=false",
                           "calibration.num_samples=4", "recipe.options.num_samples=2",
                           "recipe.options.num_clusters=2", "evaluation.num_samples=2", "evaluation.batch_size=2",
                           "recipe.options.clipping_steps=3", "compare=[]")
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "report.json").read_text())["metrics"]
    assert metrics["fp"]["auc30"] > 0 and "chamfer_vs_fp" in metrics["quantized"]


def test_the_seed_study_varies_the_rotation_and_nothing_else(checkpoint):
    from archquant.eval.vggt_sampling_study import run as study, table

    result = study(str(ROOT / "configs" / "vggt_w4a4.yaml"),
                   [f"model.path={checkpoint}", *FAST, "recipe.options.clipping_steps=2"], [0, 1], 1,
                   ("rtn_dynamic", "quarot", "quantvggt"), "rotation_seed")
    rows = result["rows"]
    # RTN has no rotation: the same model for every seed; the rotating methods draw a new one each time
    assert rows["rtn_dynamic"][0]["chamfer_vs_fp"] == rows["rtn_dynamic"][1]["chamfer_vs_fp"]
    for method in ("quarot", "quantvggt"):
        assert rows[method][0]["chamfer_vs_fp"] != rows[method][1]["chamfer_vs_fp"], method
    text = table(result, "cmd")
    assert "# rtn_dynamic, quarot, quantvggt over rotation_seeds, W4A4" in text
    assert "| rotation_seed | rtn_dynamic auc30 |" in text and text.count("\n| mean ± sd |") == 1
