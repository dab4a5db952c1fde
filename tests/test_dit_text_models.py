"""Text-to-image DiTs (PixArt, FLUX): loading, generation against diffusers' own pipelines, LRQ-DiT
through the runner with reload, FP-exact rotations, structure, bad input."""
import json

import pytest
import torch

import archquant as aq
from archquant.adapters import get_adapter
from archquant.core import ars
from archquant.core.modules import QuantLinear
from archquant.core.recipe import Recipe
from archquant.models.dit_loading import load_pipeline_folder, save_pipeline_folder

from cli_testing import one_error_line, run_cli
from conftest import rel_err
from diffusion_testing import tiny_flux, tiny_pixart, write_prompt_job

pytestmark = pytest.mark.usefixtures("single_thread")

BUILDERS = {"pixart": tiny_pixart, "flux": tiny_flux}
PROMPTS = ["a handwritten seven", "a red cat"]


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_pipelines")
    dirs = {}
    for name, build in BUILDERS.items():
        dirs[name] = root / name
        save_pipeline_folder(build(), dirs[name])
    return dirs


def _pipeline(kind, model):
    """diffusers' own pipeline over the same components (the independent reference)."""
    from diffusers import FluxPipeline, PixArtSigmaPipeline

    pe = model.prompt_encoder
    if kind == "pixart":
        pipe = PixArtSigmaPipeline(tokenizer=pe.tokenizers[0], text_encoder=pe.encoders[0], vae=model.vae,
                                   transformer=model.transformer, scheduler=model.new_scheduler())
    else:
        pipe = FluxPipeline(scheduler=model.new_scheduler(), vae=model.vae, text_encoder=pe.encoders[0],
                            tokenizer=pe.tokenizers[0], text_encoder_2=pe.encoders[1], tokenizer_2=pe.tokenizers[1],
                            transformer=model.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", ["pixart", "flux"])
def test_generation_equals_the_diffusers_pipeline_from_the_same_seeds(kind):
    model = BUILDERS[kind]()
    extra = {"use_resolution_binning": False, "clean_caption": False} if kind == "pixart" else {}
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    reference = _pipeline(kind, model)(PROMPTS, num_inference_steps=3, guidance_scale=2.0, height=16, width=16,
                                       generator=generators, output_type="pt", max_sequence_length=8, **extra).images
    ours = model.generate([1, 2], num_steps=3, guidance_scale=2.0, prompts=PROMPTS, resolution=16)
    assert ours.shape == (2, 3, 16, 16)
    assert torch.allclose(ours, reference, atol=1e-6)
    alone = model.generate([2], num_steps=3, guidance_scale=2.0, prompts=PROMPTS[1:], resolution=16)
    assert torch.allclose(alone[0], ours[1], atol=1e-5)  # a sample's noise and text are its own


@pytest.mark.parametrize("kind", ["pixart", "flux"])
def test_a_saved_folder_reloads_with_its_text_encoders_and_generates_the_same(kind, pipeline_dirs):
    model = load_pipeline_folder(pipeline_dirs[kind], max_sequence_length=8)
    assert model.prompt_encoder.describe()["source"] == {"path": str(pipeline_dirs[kind].resolve())}
    again = get_adapter("dit").build_model(get_adapter("dit").model_config(model))
    again.load_state_dict(model.state_dict())
    a = model.generate([3], num_steps=2, guidance_scale=2.0, prompts=PROMPTS[:1], resolution=16)
    b = again.generate([3], num_steps=2, guidance_scale=2.0, prompts=PROMPTS[:1], resolution=16)
    assert torch.equal(a, b)
    # the text encoders are not part of the quantizable model nor of its state dict
    assert not any(k.startswith(("prompt_encoder", "text_encoder")) for k in model.state_dict())


def test_flux_structure_quantizes_joint_and_single_blocks_and_keeps_modulation_in_fp():
    model = tiny_flux()
    s = get_adapter("dit").structure(model)
    q = set(s.quantize)
    for name in ("transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.to_add_out",
                 "transformer_blocks.0.ff_context.net.2", "single_transformer_blocks.0.proj_mlp",
                 "single_transformer_blocks.0.proj_out", "single_transformer_blocks.0.attn.to_q"):
        assert f"transformer.{name}" in q
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    kept = linears - q
    assert {"transformer.proj_out", "transformer.x_embedder", "transformer.context_embedder",
            "transformer.transformer_blocks.0.norm1.linear", "transformer.transformer_blocks.0.norm1_context.linear",
            "transformer.single_transformer_blocks.0.norm.linear", "transformer.norm_out.linear"} <= kept
    assert not any(n.startswith("transformer.time_text_embed") for n in q)
    model.feed_forward = False  # LRQ-DiT's FLUX scripts: attention only
    q_attn = set(get_adapter("dit").structure(model).quantize)
    assert "transformer.single_transformer_blocks.0.proj_mlp" not in q_attn
    assert "transformer.transformer_blocks.0.ff.net.0.proj" not in q_attn
    assert "transformer.transformer_blocks.0.attn.to_q" in q_attn


def test_pixart_structure_keeps_adaln_single_and_caption_projection_in_fp():
    model = tiny_pixart()
    q = set(get_adapter("dit").structure(model).quantize)
    assert "transformer.transformer_blocks.1.attn2.to_k" in q  # cross-attention reads T5 features
    assert not any(("adaln_single" in n) or ("caption_projection" in n) or n == "transformer.proj_out" for n in q)


@pytest.mark.parametrize("kind", ["pixart", "flux"])
def test_adaptive_rotation_is_fp_exact(kind):
    model = BUILDERS[kind]()
    adapter = get_adapter("dit")
    batch = {"prompts": PROMPTS, "seeds": [4, 5], "num_steps": 2, "guidance_scale": 2.0, "resolution": 16}
    fp = adapter.forward(model, batch)
    targets = adapter.structure(model).quantize
    aq.quantize_(model, Recipe("ars", [ars.AdaptiveRotation(threshold=1.0, block_size=16)]), calib_data=[batch],
                 progress=False)
    rotated = [m for m in model.modules() if isinstance(m, QuantLinear) and m.input_transform is not None]
    assert len(rotated) == len(targets)
    assert rel_err(adapter.forward(model, batch), fp) < 1e-5


def write_config(tmp_path, folder, **overrides):
    return write_prompt_job(tmp_path, folder, PROMPTS, ["a blue dog", "the digit three"],
                            {"num_steps": 2, "resolution": 16}, **overrides)


@pytest.mark.parametrize("kind", ["pixart", "flux"])
def test_lrq_dit_w4a8_runs_through_the_cli_and_reloads_bit_identically(tmp_path, pipeline_dirs, capsys, kind):
    code, out, err = run_cli(capsys, write_config(tmp_path, pipeline_dirs[kind]))
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["reload"]["identical"] and report["reload"]["outputs_identical"]
    assert report["metrics"]["quantized"]["psnr_vs_fp"] > 10
    assert "psnr_vs_fp" in report["compare"]["rtn_dynamic"]["metrics"]
    # FID / LPIPS / CLIP need weights this machine lacks: absent and explained, never made up
    for row in (report["metrics"]["fp"], report["metrics"]["quantized"]):
        assert not {"fid", "fid_vs_fp", "lpips_vs_fp", "clip_score"} & set(row)
    notes = report["evaluation_notes"]
    assert any(n.startswith("clip_score skipped: CLIP model 'openai/clip-vit-base-patch16'") for n in notes)
    assert any(n.startswith("lpips_vs_fp skipped") for n in notes) and len(notes) == len(set(notes))
    assert (tmp_path / "out" / "artifacts" / "lrq_dit" / "samples.png").is_file()
    ckpt = tmp_path / "out" / "checkpoint"
    qconfig = json.loads((ckpt / "quantization_config.json").read_text())
    weights = [m["weight"]["spec"]["format"] for m in qconfig["modules"].values() if m.get("weight")]
    assert weights and set(weights) == {"twinlog"}
    assert qconfig["model_config"]["text"]["source"] == {"path": str(pipeline_dirs[kind].resolve())}
    from safetensors import safe_open

    with safe_open(str(next(ckpt.glob("*.safetensors"))), "pt") as f:
        assert not any("text_encoder" in k or k.startswith("prompt_encoder") for k in f.keys())


@pytest.mark.parametrize("override, message", [
    ('evaluation.options.prompts=[]', "evaluation.options.prompts is empty"),
    ('evaluation.options.prompts=["A  blue dog"]', "overlap in 1 item(s), e.g. calibration prompt 'a blue dog'"),
    ("evaluation.options.resolution=18", "resolution=18 is not a multiple of 4 (VAE factor 2 x patch size 2)"),
    ("evaluation.options.fid_reference=/no/such/folder", "fid_reference folder /no/such/folder does not exist"),
    ("calibration.options.fid_reference=/tmp", "'calibration.options.fid_reference' is only meaningful under 'evaluation'"),
    ("evaluation.source=classes", "does not fit a PixArtTransformer2DModel, which is text-to-image: use source "
                                  "'prompts'"),
])
def test_bad_prompt_data_is_a_one_line_error(tmp_path, pipeline_dirs, capsys, override, message):
    code, _, err = run_cli(capsys, write_config(tmp_path, pipeline_dirs["pixart"]), override)
    assert code == 2 and message in one_error_line(err)


def test_flux_resolution_must_allow_the_2x2_packing(tmp_path, pipeline_dirs, capsys):
    code, _, err = run_cli(capsys, write_config(tmp_path, pipeline_dirs["flux"]), "evaluation.options.resolution=14")
    assert code == 2 and "not a multiple of 4 (VAE factor 2 x patch size 1 x FLUX's 2x2 latent packing)" in \
        one_error_line(err)


def test_text_encoders_must_be_safetensors(tmp_path, pipeline_dirs, capsys):
    import shutil

    pickled = tmp_path / "pickled"
    shutil.copytree(pipeline_dirs["pixart"], pickled)
    for f in (pickled / "text_encoder").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    code, _, err = run_cli(capsys, write_config(tmp_path, pipeline_dirs["pixart"]), f"model.path={pickled}")
    assert code == 2 and "text encoder" in one_error_line(err) and "only pickled weights" in one_error_line(err)


def test_an_offline_hub_id_is_a_one_line_error(tmp_path, pipeline_dirs, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(capsys, write_config(tmp_path, pipeline_dirs["pixart"]),
                           "model.path=nobody-here/no-such-pixart")
    line = one_error_line(err)
    assert code == 2 and "'nobody-here/no-such-pixart': not a local folder, and the hub download failed" in line


def test_the_committed_flux_config_runs_on_a_tiny_flux_folder(tmp_path, pipeline_dirs, capsys):
    from cli_testing import ROOT

    small = [f"model.path={pipeline_dirs['flux']}", "model.options.max_sequence_length=8",
             "calibration.options.resolution=16", "evaluation.options.resolution=16", "calibration.options.num_steps=2",
             "evaluation.options.num_steps=2", "compare=[]", "progress=false", f"output_dir={tmp_path / 'out'}"]
    code, out, err = run_cli(capsys, ROOT / "configs" / "flux_w4a8.yaml", *small)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["reload"]["identical"] and report["reload"]["outputs_identical"]
    quantized = [r["module"] for r in report["quantized_modules"]["modules"]]
    # the config keeps LRQ-DiT's FLUX scope: attention projections only, in bfloat16
    assert "transformer.transformer_blocks.0.attn.add_q_proj" in quantized
    assert not any(".ff" in n or "proj_mlp" in n or n.endswith("single_transformer_blocks.0.proj_out")
                   for n in quantized)
    assert report["model"]["config"]["text"]["dtype"] == "bfloat16"
