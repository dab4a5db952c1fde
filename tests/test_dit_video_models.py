"""Video DiTs (Wan, CogVideoX): generation against diffusers' own pipelines, structure, LRQ-DiT through
the runner with MP4 / GIF / frame-strip outputs and bit-identical reload (bfloat16 Wan too), video
metrics, bad input."""
import json

import pytest
import torch

from archquant.adapters import get_adapter
from archquant.eval.diffusion_metrics import video_item_metrics
from archquant.models.dit_loading import save_pipeline_folder

from cli_testing import one_error_line, run_cli
from diffusion_testing import tiny_cogvideox, tiny_wan, write_prompt_job

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["a red cat", "a blue dog"]


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_pipelines")
    dirs = {"wan": root / "wan", "cogvideox": root / "cogvideox"}
    save_pipeline_folder(tiny_wan(), dirs["wan"])
    save_pipeline_folder(tiny_cogvideox(), dirs["cogvideox"])
    return dirs


def _pipeline(model):
    from diffusers import CogVideoXPipeline, WanPipeline

    pe = model.prompt_encoder
    cls = WanPipeline if model.kind == "wan" else CogVideoXPipeline
    pipe = cls(tokenizer=pe.tokenizers[0], text_encoder=pe.encoders[0], vae=model.vae, transformer=model.transformer,
               scheduler=model.new_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("build", [tiny_wan, tiny_cogvideox, lambda: tiny_cogvideox(dpm=True)],
                         ids=["wan", "cogvideox_ddim", "cogvideox_dpm_sde"])
def test_generation_equals_the_diffusers_pipeline_from_the_same_seeds(build):
    model = build()
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    reference = _pipeline(model)(PROMPTS, num_frames=5, height=16, width=16, num_inference_steps=3,
                                 guidance_scale=2.0, generator=generators, output_type="pt",
                                 max_sequence_length=8).frames
    ours = model.generate([1, 2], num_steps=3, guidance_scale=2.0, prompts=PROMPTS, resolution=16, num_frames=5)
    assert ours.shape == reference.shape and ours.dim() == 5  # (B, F, C, H, W)
    assert torch.allclose(ours, reference, atol=1e-6)
    # the SDE sampler draws step noise too: still each sample's own stream
    alone = model.generate([2], num_steps=3, guidance_scale=2.0, prompts=PROMPTS[1:], resolution=16, num_frames=5)
    assert torch.allclose(alone[0], ours[1], atol=1e-5)


def test_pixel_space_wan_generates_any_frame_count():
    model = tiny_wan(with_vae=False)
    out = model.generate([0], num_steps=2, guidance_scale=1.0, prompts=PROMPTS[:1], resolution=8, num_frames=6)
    assert out.shape == (1, 6, 1, 8, 8) and 0 <= out.min() and out.max() <= 1


def test_structures_follow_the_spec_fp_lists():
    adapter = get_adapter("dit")
    wan = tiny_wan()
    q = set(adapter.structure(wan).quantize)
    assert {"transformer.blocks.0.attn2.to_k", "transformer.blocks.1.ffn.net.0.proj", "transformer.blocks.1.ffn.net.2",
            "transformer.blocks.0.attn1.to_out.0"} <= q
    assert not any("condition_embedder" in n or n == "transformer.proj_out" for n in q)
    cog = tiny_cogvideox()
    q = set(adapter.structure(cog).quantize)
    assert "transformer.transformer_blocks.1.ff.net.2" in q and "transformer.transformer_blocks.0.attn1.to_v" in q
    assert not any(n.endswith(("norm1.linear", "norm2.linear")) or "time_embedding" in n or "patch_embed" in n
                   or n.startswith("transformer.norm_out") for n in q)


def test_temporal_metric_sees_flicker_that_frame_psnr_does_not():
    torch.manual_seed(0)
    fp = torch.rand(1, 6, 1, 8, 8) * 0.5 + 0.25
    steady = fp + 0.05  # the same error on every frame
    flicker = fp + 0.05 * torch.tensor([1, -1, 1, -1, 1, -1.0]).view(1, 6, 1, 1, 1)  # same size, alternating
    s, f = video_item_metrics(steady, fp)[0], video_item_metrics(flicker, fp)[0]
    assert s["frame_psnr"] == pytest.approx(f["frame_psnr"], abs=1e-4)  # per-frame PSNR cannot tell them apart
    assert s["temporal_rmse"] < 1e-6 and f["temporal_rmse"] == pytest.approx(0.1, rel=1e-4)


def write_config(tmp_path, folder, **overrides):
    return write_prompt_job(tmp_path, folder, PROMPTS, ["a small dog", "the digit three"],
                            {"num_steps": 2, "resolution": 16, "num_frames": 5}, **overrides)


@pytest.mark.parametrize("kind, dtype", [("wan", "float32"), ("wan", "bfloat16"), ("cogvideox", "float32")])
def test_lrq_dit_runs_on_videos_writes_mp4s_and_reloads_bit_identically(tmp_path, pipeline_dirs, capsys, kind, dtype):
    code, out, err = run_cli(capsys, write_config(tmp_path, pipeline_dirs[kind]), f"model.dtype={dtype}")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["reload"]["identical"] and report["reload"]["outputs_identical"]
    q = report["metrics"]["quantized"]
    assert {"psnr_vs_fp", "frame_psnr_vs_fp", "ssim_vs_fp", "temporal_rmse_vs_fp"} <= set(q)
    assert q["psnr_vs_fp"] > 10 and q["temporal_rmse_vs_fp"] >= 0
    assert any(n.startswith("fvd_vs_fp skipped: no fvd_network given") for n in report["evaluation_notes"])
    files = {a["path"] for a in report["artifacts"]}
    for model in ("fp", "lrq_dit", "rtn_dynamic"):
        assert f"artifacts/{model}/item000_seed100.mp4" in files and f"artifacts/{model}/item001_seed100.gif" in files
    assert "artifacts/lrq_dit/item001_seed100_strip.png" in files
    import imageio.v2 as iio

    frames = iio.mimread(tmp_path / "out" / "artifacts" / "lrq_dit" / "item000_seed100.mp4")
    assert len(frames) == {"wan": 5, "cogvideox": 4}[kind]  # CogVideoX's VAE decodes 2 latent frames to 4, as its pipeline
    md = (tmp_path / "out" / "report.md").read_text()
    assert "temporal_rmse_vs_fp" in md
    # a table per model, a row per (prompt, seed): MP4, GIF and (quantized models) the frame strip
    assert ("| 'a red cat', seed 100 | [MP4](artifacts/lrq_dit/item000_seed100.mp4) | "
            "[GIF](artifacts/lrq_dit/item000_seed100.gif) | "
            "[frames, FP above](artifacts/lrq_dit/item000_seed100_strip.png) |") in md


def test_mp4_frames_are_padded_to_macro_blocks_not_rescaled(tmp_path, caplog):
    import imageio.v2 as iio

    from archquant.eval.media import write_video

    clip = torch.zeros(4, 1, 24, 24)
    clip[:, :, 8:16, 8:16] = 1.0  # a white square: enlarged 5x by whole pixels to 120, padded to 128
    mp4, gif = write_video(tmp_path / "clip", clip)
    frames = iio.mimread(mp4)
    assert len(frames) == 4 and frames[0].shape == (128, 128, 3)
    assert frames[0][:4].max() < 20 and frames[0][64, 64].min() > 230  # black border, square centred
    assert iio.mimread(gif)[0].shape[:2] == (120, 120)  # the GIF is not padded
    assert "macro_block_size" not in caplog.text  # imageio-ffmpeg logs a warning when it has to rescale


@pytest.mark.parametrize("override, message", [
    ("evaluation.options.num_frames=8", "num_frames=8 is not 4k+1 frames (the VAE's temporal factor is 4)"),
    ("evaluation.options.resolution=12", "resolution=12 is not a multiple of 16 (VAE factor 8 x patch size 2)"),
])
def test_bad_video_input_is_a_one_line_error(tmp_path, pipeline_dirs, capsys, override, message):
    code, _, err = run_cli(capsys, write_config(tmp_path, pipeline_dirs["wan"]), override)
    assert code == 2 and message in one_error_line(err)


SMALL_RUN = ["calibration.options.prompts=[the digit 3 moves up,the digit 8 moves left]",
             "evaluation.options.prompts=[a one moving right,a seven moving down]",
             "calibration.options.num_steps=3", "evaluation.options.num_steps=3", "compare=[]", "progress=false"]


@pytest.mark.parametrize("config", ["wan_w4a8.yaml", "wan_w8a8.yaml"])
def test_the_committed_configs_run_on_the_reference_wan(tmp_path, capsys, config):
    from cli_testing import ROOT

    code, out, err = run_cli(capsys, ROOT / "configs" / config, *SMALL_RUN, f"output_dir={tmp_path / 'out'}")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["metrics"]["fp"]["direction_accuracy"] == 1.0  # 2 clips of 3 steps: a smoke check
    q = report["metrics"]["quantized"]
    assert q["psnr_vs_fp"] > 20 and q["temporal_rmse_vs_fp"] < 0.2
    assert report["reload"]["identical"] and report["reload"]["outputs_identical"]
    if report.get("real"):
        assert report["real"]["converted"] == 40  # every quantized Linear on int8 GEMMs
    assert (tmp_path / "out" / "artifacts" / "fp" / "item001_seed1000.mp4").is_file()


def test_frames_the_reference_wans_temporal_patch_does_not_divide_are_one_line_errors(tmp_path, capsys):
    from cli_testing import ROOT

    code, _, err = run_cli(capsys, ROOT / "configs" / "wan_w4a8.yaml", *SMALL_RUN, "evaluation.options.num_frames=7",
                           f"output_dir={tmp_path / 'out'}")
    assert code == 2 and "num_frames=7 gives 7 latent frames, which the temporal patch 2 does not divide" in one_error_line(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config", ["wan_w4a8.yaml", "wan_w8a8.yaml"])
def test_the_committed_video_configs_split_into_enough_batches_for_the_readmes_torchrun(config):
    from omegaconf import OmegaConf

    from cli_testing import ROOT

    evaluation = OmegaConf.load(ROOT / "configs" / config).evaluation
    items = len(evaluation.options.prompts) * evaluation.num_samples
    assert -(-items // evaluation.batch_size) >= 4  # `torchrun --nproc_per_node 4` refuses fewer batches
