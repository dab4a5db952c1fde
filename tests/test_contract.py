"""The family contract: what a family declares is all the config loader, the runner and the report
need. A family defined in this file (never named in config.py, run.py or report.py) runs end to
end with its own data options, an FP-relative metric, a non-reproducible metric and an artifact."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from archquant.adapters import FamilyAdapter, register_adapter
from archquant.core.structure import ModelStructure
from archquant.data import DataSplit, digest_tensor, label_digests
from archquant.evaluation import EvalContext, Metric, snr_db
from archquant.options import Option

from cli_testing import FAST_TOY, TOY_CONFIG, run_cli

ROOT = Path(__file__).resolve().parent.parent


class TinyRegressor(nn.Module):
    """Two Linears: the smallest model with something to quantize."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.width = width
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@register_adapter
class PluginAdapter(FamilyAdapter):
    name = "plugin_regression"
    model_options = {"width": Option(16, minimum=4)}
    data_options = {"noise": Option(0.1, minimum=0.0), "pattern": Option("gauss", allowed=("gauss", "uniform")),
                    "write_samples": Option(False, roles=("evaluation",))}
    data_sources = ("synthetic",)
    metrics = (Metric("mse", lower_is_better=True),
               Metric("snr_vs_fp", lower_is_better=False, unit="dB", relative_to_fp=True),
               # pretends to be a sampler on nondeterministic kernels: a new value every call
               Metric("jitter", reproducible=False))
    calls = 0

    def load_model(self, path, options, dtype):
        torch.manual_seed(0)
        model = TinyRegressor(options.get("width", 16)).eval()
        return model, {"width": model.width}

    def model_config(self, model):
        return {"width": model.width}

    def build_model(self, model_config):
        return TinyRegressor(model_config["width"]).eval()

    def matches(self, model):
        return isinstance(model, TinyRegressor)

    def structure(self, model):
        return ModelStructure(hidden_size=model.width, quantize=["up", "down"])

    def load_data(self, data_cfg: dict, role: str, model_config: dict) -> DataSplit:
        opts = self.data_options_of(data_cfg, role)
        g = torch.Generator().manual_seed(data_cfg["seed"] + (0 if role == "calibration" else 10_000))
        n, w = data_cfg["num_samples"], model_config["width"]
        x = torch.randn(n, w, generator=g) if opts["pattern"] == "gauss" else torch.rand(n, w, generator=g)
        x = x + opts["noise"] * torch.randn(n, w, generator=g)
        digests = label_digests((digest_tensor(x[i]), f"{role}[{i}]") for i in range(n))
        return DataSplit(f"synthetic/{role}", list(x.split(data_cfg["batch_size"])), frozenset((role, i) for i in range(n)),
                         digests=digests, extra={"options": opts})

    def evaluate(self, model, data, ctx: EvalContext | None = None):
        with torch.no_grad():
            y = torch.cat([model(x) for x in data.batches])
        PluginAdapter.calls += 1
        metrics = {"mse": float(y.pow(2).mean()), "jitter": float(PluginAdapter.calls)}
        if ctx is not None and ctx.is_fp:
            ctx.keep(y)
        elif ctx is not None and ctx.fp is not None:
            metrics["snr_vs_fp"] = snr_db(ctx.fp, y)
            if data.extra["options"]["write_samples"] and (path := ctx.artifact_path("outputs.pt.txt")):
                path.write_text("\n".join(f"{v:.6f}" for v in y[:8, 0].tolist()))
                ctx.add_artifact(path, f"first outputs of {ctx.label}")
        return metrics


def write_config(tmp_path: Path, **sections) -> Path:
    cfg = {"family": "plugin_regression", "recipe": {"name": "rtn_dynamic"},
           "calibration": {"source": "synthetic", "num_samples": 32, "batch_size": 8},
           "evaluation": {"source": "synthetic", "num_samples": 64, "batch_size": 16,
                          "options": {"write_samples": True}},
           "compare": ["static_minmax"], "output_dir": str(tmp_path / "out"), "progress": False}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def test_a_family_declared_outside_the_runner_runs_end_to_end(tmp_path, capsys):
    code, out, err = run_cli(capsys, write_config(tmp_path), "calibration.options.noise=0.2")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    fp, q = report["metrics"]["fp"], report["metrics"]["quantized"]
    # the FP-relative metric exists for quantized rows only, and comes from FP outputs computed once
    assert "snr_vs_fp" not in fp and 20 < q["snr_vs_fp"] < 80
    assert 20 < report["compare"]["static_minmax"]["metrics"]["snr_vs_fp"] < 80
    assert report["metrics_info"]["snr_vs_fp"] == {"name": "snr_vs_fp", "lower_is_better": False, "unit": "dB",
                                                   "relative_to_fp": True, "reproducible": True, "description": ""}
    assert report["config"]["calibration"]["options"] == {"noise": 0.2, "pattern": "gauss"}
    assert report["config"]["evaluation"]["options"] == {"noise": 0.1, "pattern": "gauss", "write_samples": True}
    md = (tmp_path / "out" / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| model |"))
    assert "snr_vs_fp (dB) ↑" in header and "mse ↓" in header
    fp_row = next(line for line in md.splitlines() if line.startswith("| FP |"))
    cells = [c.strip() for c in fp_row.strip("|").split("|")]
    assert cells[2] == "–"  # FP has no SNR against itself
    q_row = next(line for line in md.splitlines() if line.startswith("| **rtn_dynamic** |"))
    q_cells = [c.strip() for c in q_row.strip("|").split("|")]
    assert q_cells[2] == f"{q['snr_vs_fp']:.4f}"  # no "% vs FP" on a metric that is already vs FP
    # a metric that is not bit-reproducible differs on reload without failing the run
    assert report["reload"]["outputs_identical"] is True
    assert report["reload"]["not_reproducible"] == ["jitter"]
    assert "not bit-reproducible, not checked: jitter" in md
    # artifacts: written into the output dir, one per quantized evaluation, linked from the report
    paths = sorted(a["path"] for a in report["artifacts"])
    assert paths == ["artifacts/rtn_dynamic/outputs.pt.txt", "artifacts/static_minmax/outputs.pt.txt"]
    for p in paths:
        assert (tmp_path / "out" / p).is_file() and f"]({p})" in md


@pytest.mark.parametrize("override, message", [
    ("calibration.options.nosie=0.1",
     "unknown config key 'calibration.options.nosie' for family 'plugin_regression': allowed keys are noise, pattern"),
    ("calibration.options.pattern=zigzag",
     "config key 'calibration.options.pattern' has value 'zigzag': allowed values are gauss, uniform"),
    ("calibration.options.noise=-1", "config key 'calibration.options.noise' has value -1.0: allowed values are >= 0.0"),
    ("calibration.options.noise=loud", "config key 'calibration.options.noise' must be a number, got 'loud'"),
    ("calibration.options.write_samples=true",
     "config key 'calibration.options.write_samples' is only meaningful under 'evaluation'"),
    ("model.options.width=2", "config key 'model.options.width' has value 2: allowed values are >= 4"),
    ("calibration.noise=0.3", None),  # the older, flat form of a declared data option still works
    ("calibration.sequence=3", "unknown config key 'calibration.sequence': allowed keys under 'calibration' are"),
])
def test_family_options_are_validated_by_the_family_declaration(tmp_path, capsys, override, message):
    code, _, err = run_cli(capsys, write_config(tmp_path), override)
    if message is None:
        assert code == 0, err
        report = json.loads((tmp_path / "out" / "report.json").read_text())
        assert report["config"]["calibration"]["options"]["noise"] == 0.3
        return
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err


def test_an_old_data_key_given_twice_names_its_new_name(tmp_path, capsys):
    cfg = write_config(tmp_path, calibration={"noise": 0.3, "options": {"noise": 0.2}})
    code, _, err = run_cli(capsys, cfg)
    assert code == 2 and "'calibration.noise' is given twice" in err and "'calibration.options.noise'" in err


def test_mamba_configs_in_the_older_flat_form_still_load(tmp_path):
    from archquant.config import load_config

    flat = (ROOT / "configs" / "mamba_w8a8.yaml").read_text()
    flat = flat.replace("  options:                  # the Mamba family's data options (adapters/mamba.py data_options)\n", "")
    flat = flat.replace("\n    seq_len", "\n  seq_len").replace("\n    shuffle", "\n  shuffle")
    flat = flat.replace("\n    task_examples", "\n  task_examples")
    assert "  seq_len: 512" in flat and "options:\n    seq_len" not in flat
    (tmp_path / "flat.yaml").write_text(flat)
    old = load_config(tmp_path / "flat.yaml", ["evaluation.seq_len=64"])
    new = load_config(ROOT / "configs" / "mamba_w8a8.yaml", ["evaluation.options.seq_len=64"])
    assert old.calibration == new.calibration and old.evaluation == new.evaluation
    assert new.evaluation.options["seq_len"] == 64 and new.calibration.options["seq_len"] == 512
    # an override in the old form still beats the file's new form
    mixed = load_config(ROOT / "configs" / "mamba_w8a8.yaml", ["evaluation.seq_len=64"])
    assert mixed.evaluation == new.evaluation


PLANTED = """
import sys
from archquant.core import transform_steps
def broken(self, model, ctx):
    raise ValueError("planted bug in an algorithm")
transform_steps.SmoothQuant.apply = broken
from archquant.run import main
sys.exit(main(sys.argv[1:]))
"""


def _toy_config(tmp_path) -> Path:
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(TOY_CONFIG.read_text())
    return cfg


def test_a_bug_inside_an_algorithm_keeps_its_traceback_and_exits_1(tmp_path):
    r = subprocess.run([sys.executable, "-c", PLANTED, str(_toy_config(tmp_path)), *FAST_TOY,
                        "recipe.name=smoothquant", f"output_dir={tmp_path / 'out'}"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 1, r.stderr
    assert "Traceback (most recent call last)" in r.stderr and "ValueError: planted bug in an algorithm" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing published
    # while a bad config value is still one line and exit code 2
    r = subprocess.run([sys.executable, "-c", PLANTED, str(_toy_config(tmp_path)), "recipe.w_bits=16"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "'recipe.w_bits' has value 16" in r.stderr


def test_a_bad_model_file_is_still_an_input_error(tmp_path, capsys):
    """ValueErrors while *loading* stay one-line exit-2 errors (the stage is input-facing)."""
    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    (bad / "model.safetensors").write_bytes(b"")
    code, _, err = run_cli(capsys, _toy_config(tmp_path), *FAST_TOY, f"model.path={bad}",
                           f"output_dir={tmp_path / 'out'}")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err


def test_snr_db_against_an_independent_formula():
    ref = torch.tensor([3.0, 4.0])
    assert snr_db(ref, ref) == math.inf
    assert snr_db(ref, ref + torch.tensor([0.3, 0.4])) == pytest.approx(20.0)  # |noise| = |signal| / 10
    assert snr_db(ref, torch.tensor([math.nan, 0.0])) != snr_db(ref, torch.tensor([math.nan, 0.0]))  # nan


def test_a_metric_only_quantized_rows_have_renders_without_the_fp_value():
    from archquant.report import render_markdown

    report = {"family": "f", "method": {"name": "m"}, "model": {"path": None, "fp_bytes": 10},
              "data": {"calibration": "c", "calibration_items": 1, "evaluation": "e", "evaluation_items": 1},
              "metrics": {"fp": {"ppl": 2.0}, "quantized": {"ppl": 1e106, "kl_vs_fp": float("inf")}},
              "metrics_info": {"ppl": {"lower_is_better": True}, "kl_vs_fp": {"relative_to_fp": True}},
              "timings": {}, "checkpoint": None, "reload": None}
    md = render_markdown(report)
    row = next(line for line in md.splitlines() if line.startswith("| **m** |"))
    assert "1.000e+106" in row and "inf" in row and len(row) < 120


def test_a_model_quantized_without_a_family_gets_a_clear_save_error(tmp_path):
    import archquant as aq

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    recipe = aq.Recipe("w8", [aq.Quantize(weight=aq.QuantSpec(bits=8, granularity="channel"))])
    aq.quantize_(model, recipe, structure=ModelStructure(hidden_size=8, quantize=["0", "2"]))
    with pytest.raises(ValueError, match=r"^cannot save a Sequential: no family adapter recognises it.*pass family="):
        aq.save_quantized(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
