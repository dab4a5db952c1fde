"""``python -m archquant.run CONFIG.yaml [key=value ...]``: the config-driven quantization job.

Stages: load model → load calibration and evaluation data (checked disjoint) → quantize
(the recipe calibrates what it needs) → evaluate FP and quantized → save → verify the saved
checkpoint reloads to the same metrics → (``backend=real``: evaluate a copy running on int8
kernels) → report. The runner only wires stages together and turns user mistakes into
one-line errors (exit code 2); the algorithms live in the core and the family adapters.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .adapters import get_adapter
from .api import load_quantized, resolve_recipe
from .config import ConfigError, RunConfig, load_config, to_dict
from .core.calibration import NonFiniteActivationError
from .core.recipe import Recipe, apply_recipe
from .core.serialization import CheckpointError, save_checkpoint
from .data import DataOverlapError, check_disjoint
from .real import check_kernels, convert_to_real
from .report import environment, model_size_bytes, write_reports

EXIT_USAGE = 2
USAGE = "usage: python -m archquant.run CONFIG.yaml [key=value ...]"

# Errors that mean "the input is wrong", reported in one line. Anything else is a bug and
# keeps its traceback. ARCHQUANT_DEBUG=1 shows the traceback for these too.
USER_ERRORS = (ConfigError, DataOverlapError, CheckpointError, NonFiniteActivationError, FileNotFoundError,
               ValueError, KeyError, OSError)


class Timer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, log=print):
        log(f"[archquant] {name} ...", flush=True)
        t0 = time.perf_counter()
        yield
        self.times[name] = round(time.perf_counter() - t0, 3)


def run(cfg: RunConfig, log=print) -> dict:
    """Run the whole job for a validated config; returns the report dict."""
    torch.manual_seed(cfg.seed)
    adapter = get_adapter(cfg.family)
    if cfg.backend == "real":
        check_kernels(cfg.real_kernels)  # before any work: "triton" without CUDA needs the interpreter
    timer = Timer()
    out = Path(cfg.output_dir)
    cfg_dict = to_dict(cfg)

    with timer.stage("load model", log):
        model, model_config = adapter.load_model(cfg.model.path, dict(cfg.model.options), cfg.model.dtype)
    with timer.stage("load data", log):
        calib = adapter.load_data(cfg_dict["calibration"], "calibration", model_config)
        evaluation = adapter.load_data(cfg_dict["evaluation"], "evaluation", model_config)
        check_disjoint(calib, evaluation)
    recipe = resolve_recipe(cfg.recipe, adapter)
    with timer.stage("evaluate FP", log):
        fp_metrics = adapter.evaluate(model, evaluation)
    fp_size = model_size_bytes(model)

    def quantize(recipe: Recipe, fp_model):
        qmodel = copy.deepcopy(fp_model)
        with timer.stage(f"quantize ({recipe.name})", log):
            steps = apply_recipe(qmodel, recipe, adapter.structure(qmodel), calib_batches=calib.batches,
                                 forward_fn=adapter.forward, progress=cfg.progress)
        with timer.stage(f"evaluate {recipe.name}", log):
            metrics = adapter.evaluate(qmodel, evaluation)
        return qmodel, metrics, steps

    compared = {}
    for name in cfg.compare:  # baselines first, so the saved model is the last one in memory
        other = resolve_recipe(dataclasses.replace(cfg.recipe, name=name), adapter)
        cmodel, cmetrics, _ = quantize(other, model)
        compared[name] = {"metrics": cmetrics, "bytes": model_size_bytes(cmodel), "method": other.to_dict(),
                          "seconds": timer.times[f"quantize ({name})"]}
        del cmodel
    qmodel, q_metrics, step_times = quantize(recipe, model)
    del model

    checkpoint_dir, ckpt_bytes, reload = None, None, None
    if cfg.save:
        with timer.stage("save", log):
            checkpoint_dir = save_checkpoint(qmodel, out / "checkpoint", family=adapter.name,
                                             model_config=adapter.model_config(qmodel), recipe=recipe.to_dict(),
                                             metadata={"config": cfg_dict})
            ckpt_bytes = sum(f.stat().st_size for f in checkpoint_dir.iterdir())
        if cfg.verify_reload:
            with timer.stage("verify reload", log):
                reloaded_metrics = adapter.evaluate(load_quantized(checkpoint_dir), evaluation)
                reload = {"metrics": reloaded_metrics, "identical": reloaded_metrics == q_metrics}

    real = None
    if cfg.backend == "real":  # the fake-quant checkpoint stays the saved format; a copy runs in int8
        with timer.stage("convert to real", log):
            rmodel = convert_to_real(copy.deepcopy(qmodel), kernels=cfg.real_kernels)
        with timer.stage("evaluate real", log):
            real_metrics = adapter.evaluate(rmodel, evaluation)
        real = {**rmodel._archquant_real, "metrics": real_metrics, "bytes": model_size_bytes(rmodel),
                "eval_seconds": {"fake": timer.times[f"evaluate {recipe.name}"], "real": timer.times["evaluate real"]}}
        del rmodel

    report = {
        "config": cfg_dict,
        "family": adapter.name,
        "model": {"path": cfg.model.path, "config": model_config, "fp_bytes": fp_size},
        "method": recipe.to_dict(),
        "data": {"calibration": calib.description, "calibration_items": len(calib.item_ids),
                 "evaluation": evaluation.description, "evaluation_items": len(evaluation.item_ids)},
        "metrics": {"fp": fp_metrics, "quantized": q_metrics, **({"real": real["metrics"]} if real else {})},
        "real": real,
        "compare": compared,
        "headline_metric": next(iter(adapter.metrics), None),
        "lower_is_better": adapter.metrics,
        "checkpoint": None if checkpoint_dir is None else {"path": str(checkpoint_dir), "bytes": ckpt_bytes},
        "reload": reload,
        "timings": {**timer.times, "recipe_steps": {k: round(v, 3) for k, v in step_times.items()}},
        "environment": environment(),
    }
    write_reports(report, out)
    if reload is not None and not reload["identical"]:
        raise RuntimeError(f"reloaded checkpoint gave different metrics: {reload['metrics']} vs {q_metrics}")
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print(__doc__.strip().splitlines()[0])
        return 0 if argv else EXIT_USAGE
    try:
        cfg = load_config(argv[0], argv[1:])
        report = run(cfg)
    except USER_ERRORS as e:
        if os.environ.get("ARCHQUANT_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, KeyError):
            msg = f"missing key {msg}"
        print(f"archquant: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    print(Path(report["config"]["output_dir"], "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
