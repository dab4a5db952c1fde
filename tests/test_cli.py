"""The runner: end-to-end job, report contents, and one-line exit-2 errors for bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import archquant as aq
from cli_testing import run_cli

ROOT = Path(__file__).resolve().parent.parent
FAST = ["model.options.train_steps=20", "calibration.num_samples=64", "evaluation.num_samples=256", "progress=false"]


@pytest.fixture
def config(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text((ROOT / "configs" / "toy_w8a8.yaml").read_text())
    return cfg


def test_end_to_end_run_writes_reports_and_a_reloadable_checkpoint(config, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, config, *FAST, f"output_dir={out_dir}")
    assert code == 0, err
    report = json.loads((out_dir / "report.json").read_text())
    assert set(report["metrics"]) == {"fp", "quantized"}
    assert set(report["metrics"]["fp"]) == {"accuracy", "cross_entropy"}
    assert report["config"]["recipe"]["name"] == "hadamard_static"
    assert report["method"]["steps"][0]["kind"] == "rotate_residual"
    assert report["reload"]["identical"] is True
    assert {"load model", "evaluate FP", "save"} <= set(report["timings"])
    assert report["environment"]["torch"] == torch.__version__
    from archquant.report import cpu_name
    assert report["environment"]["cpu"] == cpu_name() and cpu_name()
    md = (out_dir / "report.md").read_text()
    assert "| FP |" in md and "| **hadamard_static** |" in md and md in out
    # the last digits of fp32 results follow the CPU, so the readable report names it
    assert f"Environment: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}" in md
    model = aq.load_quantized(out_dir / "checkpoint")
    assert sorted(p.name for p in (out_dir / "checkpoint").iterdir()) == [".archquant", "model.safetensors",
                                                                           "quantization_config.json"]
    assert [p.name for p in out_dir.iterdir() if p.name.startswith(".")] == [".archquant"]  # no temp files left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml", "out"]  # nor staging beside it
    assert model.layers[0].down_proj.input_transform is not None


BAD = [
    (["recipe.alhpa=0.5"], "unknown config key 'recipe.alhpa'"),
    (["recipe.name=quambaa"], "'recipe.name' has value 'quambaa': allowed values are"),
    (["family=llama"], "'family' has value 'llama': allowed values are"),
    (["recipe.w_bits=16"], "'recipe.w_bits' has value 16"),
    (["recipe.w_bits=eight"], "'recipe.w_bits' must be an integer"),
    (["recipe.a_observer=histogram"], "'recipe.a_observer' has value 'histogram'"),
    (["model.dtype=float64"], "'model.dtype' has value 'float64'"),
    (["backend=cuda"], "'backend' has value 'cuda'"),
    (["backend=real", "real_kernels=cuda"], "'real_kernels' has value 'cuda': allowed values are auto, triton"),
    (["model.options.hidden_size=wide"], "'model.options.hidden_size' must be an integer"),
    (["model.options.hiden_size=8"], "unknown config key 'model.options.hiden_size'"),
    (["model.path=/no/such/model"], "file not found for 'model.path': /no/such/model"),
    (["calibration.path=/no/such/file.txt"], "file not found for 'calibration.path'"),
    (["calibration.batch_size=0"], "'calibration.batch_size' must be positive"),
    (["calibration.split=evaluation"], "overlap"),
    (["recipe.rotation=givens"], "'recipe.rotation' has value 'givens'"),
    (["justaword"], "not of the form key=value"),
    (["recipe.w_group_size=-5"], "'recipe.w_group_size' has value -5: allowed values are positive"),
    (["compare=[unclosed"], "cannot parse override 'compare=[unclosed'"),
    (["recipe=5"], "config key 'recipe' must be a mapping"),
    (["model.options.num_layers=0"], "nothing to quantize: ToyResMLP has no layers"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_input_exits_2_with_one_line(config, tmp_path, capsys, overrides, message):
    code, out, err = run_cli(capsys, config, *FAST, f"output_dir={tmp_path / 'o'}", *overrides)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("archquant: error:"), err
    assert message in lines[0]
    assert not (tmp_path / "o" / "checkpoint").exists()


def test_missing_and_corrupt_config_files(tmp_path, capsys):
    code, _, err = run_cli(capsys, tmp_path / "missing.yaml")
    assert code == 2 and "config file not found" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("family: toy\nrecipe: [unclosed\n")
    code, _, err = run_cli(capsys, bad)
    assert code == 2 and "cannot parse config" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (b"# only a comment\n", "is empty"),
    (b"- family: toy\n- recipe: {}\n", "must be a mapping of keys"),
    (b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)), "is not a YAML text file"),
    (b"family: toy\nrecipe: {name: \xff\xfe}\n", "is not a YAML text file"),
])
@pytest.mark.parametrize("with_overrides", [False, True])
def test_unusable_config_files_are_named_in_one_line(tmp_path, capsys, content, message, with_overrides):
    path = tmp_path / "job.yaml"
    path.write_bytes(content)
    overrides = [*FAST, f"output_dir={tmp_path / 'o'}"] if with_overrides else []
    code, _, err = run_cli(capsys, path, *overrides)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0] and str(path) in lines[0], err
    assert not (tmp_path / "o").exists()


def test_no_arguments_prints_usage(capsys):
    code, out, _ = run_cli(capsys)
    assert code == 2 and "usage:" in out


def test_subprocess_bad_key_has_no_traceback(config, tmp_path):
    r = subprocess.run([sys.executable, "-m", "archquant.run", str(config), "recipe.nmae=x",
                        f"output_dir={tmp_path}"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "unknown config key 'recipe.nmae'" in r.stderr
