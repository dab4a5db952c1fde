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
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .adapters import get_adapter
from .api import load_quantized, resolve_recipe
from .config import ConfigError, RunConfig, load_config, to_dict
from .core.calibration import NonFiniteActivationError, check_finite_parameters
from .core.recipe import Recipe, apply_recipe
from .core.safe_io import StagedDir
from .core.serialization import CheckpointError, save_checkpoint
from .data import DataOverlapError, check_disjoint
from .real import check_kernels, convert_to_real
from .report import CHECKPOINT_DIR, environment, is_legacy_output, model_size_bytes, write_reports

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


class RunFailed(RuntimeError):
    """The work ran but its result cannot be trusted or written; nothing was published."""


def run(cfg: RunConfig, log=print) -> dict:
    """Run the whole job for a validated config; returns the report dict.

    Everything (checkpoint, reports) is built in a hidden staging directory beside
    ``output_dir`` and published in one step, only after the reload check passed
    (``core.safe_io.StagedDir``): a run that fails or is interrupted leaves ``output_dir`` as it was.
    """
    torch.manual_seed(cfg.seed)
    adapter = get_adapter(cfg.family)
    if cfg.backend == "real":
        check_kernels(cfg.real_kernels)  # before any work: "triton" without CUDA needs the interpreter
    # The output directory is checked (ours or new, writable) before the model is even loaded.
    with StagedDir(cfg.output_dir, legacy=is_legacy_output, what="output_dir") as stage:
        for path in stage.swept:
            log(f"[archquant] removed the leftover of an interrupted run: {path}", flush=True)
        for path in stage.kept:
            log(f"[archquant] a leftover of an interrupted run held other files; kept them at {path}", flush=True)
        report = _run_staged(cfg, adapter, stage, log)
        try:
            stage.publish()
        except OSError as e:
            raise RunFailed(f"could not publish the results to {stage.target}: {_first_line(e)}; "
                            f"{stage.target} was left as it was") from None
    if stage.moved_aside:
        log(f"[archquant] files someone added to the previous {stage.target} were kept at {stage.moved_aside}",
            flush=True)
    return report


def _run_staged(cfg: RunConfig, adapter, stage: StagedDir, log) -> dict:
    timer = Timer()
    out, staged = stage.target, stage.path
    cfg_dict = to_dict(cfg)

    recipe = resolve_recipe(cfg.recipe, adapter)
    baselines = [resolve_recipe(dataclasses.replace(cfg.recipe, name=name), adapter) for name in cfg.compare]
    with timer.stage("load model", log):
        model, model_config = adapter.load_model(cfg.model.path, dict(cfg.model.options), cfg.model.dtype)
        for r in (*baselines, recipe):  # a recipe for another architecture is refused before any work
            adapter.check_model(model, r)
        check_finite_parameters(model)
    with timer.stage("load data", log):
        calib = adapter.load_data(cfg_dict["calibration"], "calibration", model_config)
        evaluation = adapter.load_data(cfg_dict["evaluation"], "evaluation", model_config)
        disjointness = check_disjoint(calib, evaluation)
    with timer.stage("evaluate FP", log):
        fp_metrics = adapter.evaluate(model, evaluation)
    fp_size = model_size_bytes(model)

    def quantize(recipe: Recipe, fp_model):
        qmodel = copy.deepcopy(fp_model)
        with timer.stage(f"quantize ({recipe.name})", log):
            # qmodel is a throw-away copy: no snapshot needed to undo a failed recipe
            steps = apply_recipe(qmodel, recipe, adapter.structure(qmodel), calib_batches=calib.batches,
                                 forward_fn=adapter.forward, progress=cfg.progress,
                                 validate_batch=adapter.validate_batch, restore_on_failure=False)
        with timer.stage(f"evaluate {recipe.name}", log):
            metrics = adapter.evaluate(qmodel, evaluation)
        return qmodel, metrics, steps

    compared = {}
    for name, other in zip(cfg.compare, baselines):  # baselines first: the saved model is the last in memory
        cmodel, cmetrics, _ = quantize(other, model)
        compared[name] = {"metrics": cmetrics, "bytes": model_size_bytes(cmodel), "method": other.to_dict(),
                          "seconds": timer.times[f"quantize ({other.name})"]}
        del cmodel
    qmodel, q_metrics, step_times = quantize(recipe, model)
    del model

    ckpt_bytes, reload = None, None
    if cfg.save:
        with timer.stage("save", log):
            try:
                save_checkpoint(qmodel, staged / CHECKPOINT_DIR, family=adapter.name,
                                model_config=adapter.model_config(qmodel), recipe=recipe.to_dict(),
                                metadata={"config": cfg_dict})
            except OSError as e:
                raise RunFailed(f"could not save the checkpoint: {_first_line(e)}; "
                                f"nothing was published to {out}") from None
            ckpt_bytes = sum(f.stat().st_size for f in (staged / CHECKPOINT_DIR).iterdir())
        if cfg.verify_reload:
            with timer.stage("verify reload", log):
                reloaded_metrics = adapter.evaluate(load_quantized(staged / CHECKPOINT_DIR), evaluation)
                reload = {"metrics": reloaded_metrics, "identical": reloaded_metrics == q_metrics}
            if not reload["identical"]:
                raise RunFailed(f"the saved checkpoint reloaded to different metrics ({reloaded_metrics} vs "
                                f"{q_metrics}); nothing was published to {out}")

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
                 "evaluation": evaluation.description, "evaluation_items": len(evaluation.item_ids),
                 "disjointness": disjointness},
        "metrics": {"fp": fp_metrics, "quantized": q_metrics, **({"real": real["metrics"]} if real else {})},
        "real": real,
        "compare": compared,
        "headline_metric": next(iter(adapter.metrics), None),
        "lower_is_better": adapter.metrics,
        "checkpoint": None if not cfg.save else {"path": str(out / CHECKPOINT_DIR), "bytes": ckpt_bytes},
        "reload": reload,
        "output": {"dir": str(out), "removed_leftovers": stage.swept, "kept_leftovers": stage.kept,
                   "kept_aside": str(aside) if (aside := stage.planned_aside()) else None},
        "timings": {**timer.times, "recipe_steps": {k: round(v, 3) for k, v in step_times.items()}},
        "environment": environment(),
    }
    try:
        write_reports(report, staged)
    except OSError as e:
        raise RunFailed(f"could not write the report: {_first_line(e)}; nothing was published to {out}") from None
    return report




EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: staging is cleaned up on the way out."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def _error(msg: str) -> None:
    print(f"archquant: error: {msg}", file=sys.stderr, flush=True)


def _first_line(e: BaseException) -> str:
    """The one line shown for an error: an OS error's cause and path, else its message's first line."""
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.strerror}: {e.filename}"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"missing key {msg}" if isinstance(e, KeyError) else msg


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print(__doc__.strip().splitlines()[0])
        return 0 if argv else EXIT_USAGE
    cfg = report = None
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if _main_thread() else None
    try:
        cfg = load_config(argv[0], argv[1:])
        report = run(cfg)
        print(Path(report["config"]["output_dir"], "report.md").read_text())
        return 0
    except KeyboardInterrupt as e:
        where = f"; nothing was published to {cfg.output_dir}, which was left as it was" if cfg else ""
        what = "terminated" if isinstance(e, _Terminated) else "interrupted"
        print(f"archquant: {what}" + ("" if report is not None else where), file=sys.stderr, flush=True)
        return 128 + signal.SIGTERM if isinstance(e, _Terminated) else EXIT_INTERRUPTED
    except RunFailed as e:
        if os.environ.get("ARCHQUANT_DEBUG"):
            raise
        _error(_first_line(e))
        return EXIT_FAILED
    except USER_ERRORS as e:
        if os.environ.get("ARCHQUANT_DEBUG"):
            raise
        _error(_first_line(e))
        return EXIT_USAGE
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
