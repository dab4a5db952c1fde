"""The DiT family: pipeline folders, generation, LRQ-DiT through the runner, reload, bad input."""
import json

import pytest
import torch

import archquant as aq
from archquant.adapters import get_adapter
from archquant.eval.diffusion_metrics import image_item_metrics
from archquant.evaluation import mean_over_items
from archquant.models.dit_loading import DiffusionModel, load_pipeline_folder, save_pipeline_folder

from cli_testing import one_error_line, run_cli


def tiny_dit(seed=0, num_classes=4) -> DiffusionModel:
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=1,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes)
    # diffusers zero-initialises the adaLN-Zero gates and the output: give every weight some signal
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    return DiffusionModel(transformer.eval(), "DDIMScheduler", dict(scheduler.config)).eval()


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit") / "pipeline"
    save_pipeline_folder(tiny_dit(), folder)
    return folder


def write_config(tmp_path, pipeline_dir, **recipe):
    cfg = {
        "family": "dit",
        "model": {"path": str(pipeline_dir)},
        "recipe": {"name": "lrq_dit", "w_bits": 8, "a_bits": 8, "options": {"block_size": 16}, **recipe},
        "calibration": {"source": "classes", "num_samples": 1, "batch_size": 4, "seed": 0,
                        "options": {"num_steps": 3}},
        "evaluation": {"source": "classes", "num_samples": 1, "batch_size": 4, "seed": 100,
                       "options": {"num_steps": 3}},
        "compare": ["rtn_dynamic"],
        "progress": False,
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "job.json"
    path.write_text(json.dumps(cfg))
    return path


def test_a_saved_pipeline_folder_loads_and_generates_per_seed(pipeline_dir):
    model = load_pipeline_folder(pipeline_dir)
    adapter = get_adapter("dit")
    batch = {"class_labels": torch.tensor([1, 2]), "seeds": [5, 6], "num_steps": 3, "guidance_scale": 2.0}
    images = adapter.forward(model, batch)
    assert images.shape == (2, 1, 8, 8) and 0 <= float(images.min()) and float(images.max()) <= 1
    alone = adapter.forward(model, {**batch, "class_labels": torch.tensor([2]), "seeds": [6]})
    assert torch.allclose(alone[0], images[1], atol=1e-5)  # a sample's noise is its own seed's
    assert not torch.allclose(images[0], images[1])


def test_structure_keeps_embedders_adaln_and_output_in_fp(pipeline_dir):
    model = load_pipeline_folder(pipeline_dir)
    s = get_adapter("dit").structure(model)
    assert "transformer.transformer_blocks.0.attn1.to_q" in s.quantize
    assert "transformer.transformer_blocks.1.ff.net.2" in s.quantize
    assert not any("norm1" in n or "proj_out" in n or "emb" in n for n in s.quantize)


def test_lrq_dit_runs_end_to_end_and_reloads_bit_identically(tmp_path, pipeline_dir, capsys):
    code, out, err = run_cli(capsys, write_config(tmp_path, pipeline_dir))
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    q = report["metrics"]["quantized"]
    assert q["psnr_vs_fp"] > 25 and 0.8 < q["ssim_vs_fp"] <= 1.0
    assert report["compare"]["rtn_dynamic"]["metrics"]["psnr_vs_fp"] > 25
    assert report["reload"]["identical"] and report["reload"]["outputs_identical"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "psnr_vs_fp" in md and "samples.png" in md
    assert (tmp_path / "out" / "artifacts" / "lrq_dit" / "samples.png").is_file()
    modules = json.loads((tmp_path / "out" / "checkpoint" / "quantization_config.json").read_text())["modules"]
    labels = [m["input_transform"]["label"] for m in modules.values() if m.get("input_transform")]
    assert labels and all(lab["ars"] in ("hadamard", "duquant") and lab["J"] >= 0 for lab in labels)
    assert all(m["weight"]["spec"]["format"] == "twinlog" for m in modules.values() if m.get("weight"))
    # the report lists what was quantized, each Linear's ARS branch and J, and what stayed FP
    listed = report["quantized_modules"]
    assert sorted(r["module"] for r in listed["modules"]) == sorted(modules)
    assert all(r["label"]["ars"] in ("hadamard", "duquant") for r in listed["modules"])
    assert "transformer.transformer_blocks.0.norm1.linear" in listed["kept_fp_linears"]
    assert "Adaptive rotation branches: hadamard" in md and "| transformer.transformer_blocks.0.attn1.to_q | twinlog8" in md


def test_overlapping_calibration_and_evaluation_seeds_are_refused(tmp_path, pipeline_dir, capsys):
    path = write_config(tmp_path, pipeline_dir)
    code, out, err = run_cli(capsys, path, "evaluation.seed=0")
    assert code == 2
    line = one_error_line(err)
    assert "class 0 seed 0" in line


@pytest.mark.parametrize("override, message", [
    ("evaluation.options.class_ids=[7]", "class id 7 is outside the model's classes 0..3"),
    ("evaluation.options.num_steps=0", "num_steps"),
    ("evaluation.source=prompts", "does not fit a DiTTransformer2DModel, which is class-conditional"),
])
def test_bad_data_options_are_one_line_errors(tmp_path, pipeline_dir, capsys, override, message):
    code, out, err = run_cli(capsys, write_config(tmp_path, pipeline_dir), override)
    assert code == 2 and message in one_error_line(err)


def test_bad_pipeline_folders_are_one_line_errors(tmp_path, pipeline_dir, capsys):
    import shutil

    no_transformer = tmp_path / "no_transformer"
    no_transformer.mkdir()
    (no_transformer / "model_index.json").write_text("{}")
    code, _, err = run_cli(capsys, write_config(tmp_path, pipeline_dir), f"model.path={no_transformer}")
    assert code == 2 and "has no transformer/ folder" in one_error_line(err)

    other = tmp_path / "other"
    shutil.copytree(pipeline_dir, other)
    cfg_path = other / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_class_name"] = "SD3Transformer2DModel"
    cfg_path.write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, write_config(tmp_path, pipeline_dir), f"model.path={other}")
    line = one_error_line(err)
    assert code == 2 and "'SD3Transformer2DModel' is not supported" in line and "DiTTransformer2DModel" in line

    pickled = tmp_path / "pickled"
    shutil.copytree(pipeline_dir, pickled)
    for f in (pickled / "transformer").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    code, _, err = run_cli(capsys, write_config(tmp_path, pipeline_dir), f"model.path={pickled}")
    assert code == 2 and "only pickled weights" in one_error_line(err)


@pytest.mark.parametrize("config", ["dit_w4a8.yaml", "dit_w8a8.yaml", "pixart_w4a8.yaml"])
def test_the_committed_configs_run_on_the_reference_dit(tmp_path, capsys, config):
    from cli_testing import ROOT

    small = ["calibration.num_samples=1", "evaluation.num_samples=1", "calibration.options.num_steps=2",
             "evaluation.options.num_steps=2", "compare=[]", "progress=false", f"output_dir={tmp_path / 'out'}"]
    code, out, err = run_cli(capsys, ROOT / "configs" / config, *small)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["metrics"]["fp"]["class_accuracy"] >= 0.5  # 10 samples of 2 steps: a smoke check
    assert report["metrics"]["quantized"]["psnr_vs_fp"] > 20
    if report.get("real"):
        assert report["real"]["converted"] > 0


def test_fp_kept_linears_can_store_int8_weights(tmp_path, pipeline_dir):
    from archquant.core.modules import QuantLinear
    from archquant.core.presets import RecipeOptions

    adapter = get_adapter("dit")
    batch = {"class_labels": torch.tensor([0, 1]), "seeds": [3, 4], "num_steps": 2, "guidance_scale": 2.0}
    sizes, outputs = {}, {}
    for bits in (None, 8):
        model = load_pipeline_folder(pipeline_dir)
        fp = adapter.forward(model, batch)
        options = {"block_size": 16, **({} if bits is None else {"fp_layers_w_bits": bits})}
        aq.quantize_(model, RecipeOptions(name="lrq_dit", w_bits=4, a_bits=8, options=options), calib_data=[batch],
                     progress=False)
        adaln = model.transformer.transformer_blocks[0].norm1.linear
        if bits is None:
            assert isinstance(adaln, torch.nn.Linear) and not isinstance(adaln, QuantLinear)
        else:  # weight-only int8 per output channel: no input quantizer, no rotation
            assert isinstance(adaln, QuantLinear) and adaln.weight_spec.bits == 8 and adaln.input_quantizer is None
            assert adaln.input_transform is None
            assert not [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n.startswith("transformer")]
        outputs[bits] = adapter.forward(model, batch)
        aq.save_quantized(model, tmp_path / str(bits))
        sizes[bits] = sum(f.stat().st_size for f in (tmp_path / str(bits)).iterdir())
        reloaded = aq.load_quantized(tmp_path / str(bits))
        assert torch.equal(adapter.forward(reloaded, batch), outputs[bits])
        assert mean_over_items(image_item_metrics(outputs[bits], fp), "psnr") > 25
    assert sizes[8] < 0.75 * sizes[None]


def test_weight_only_targets_that_select_nothing_are_refused(pipeline_dir):
    from archquant.core.recipe import QuantizeWeights, Recipe

    model = load_pipeline_folder(pipeline_dir)
    with pytest.raises(ValueError, match="pattern 're:.*no_such' selects no weight-only Linear"):
        aq.quantize_(model, Recipe("w", [QuantizeWeights(targets=["re:.*no_such"])]), progress=False)
