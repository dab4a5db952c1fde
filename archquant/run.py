"""``python -m archquant.run CONFIG.yaml [key=value ...]``: the config-driven quantization job.

Stages: load model → load calibration and evaluation data (checked disjoint) → evaluate FP
(its outputs kept for the FP-relative metrics) → quantize each baseline and the recipe (the
recipe calibrates what it needs) and evaluate them against FP → save → verify that the saved
checkpoint reloads to bit-identical probe outputs and the same metrics → (``backend=real``:
the model converted to int8 kernels, evaluated) → report. The runner only wires stages
together; what is family-specific comes from the adapter (options, data, metrics, artifacts).
Mistakes in the input (config, model files, data) are one-line errors with exit code 2; a
failure inside an algorithm is a bug and keeps its traceback (exit code 1).
"""
from __future__ import annotations

import copy
import math
import os
import signal
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from .adapters import get_adapter
from .api import load_quantized, resolve_recipe
from .config import ConfigError, RunConfig, compare_options, load_config, to_dict
from .core.calibration import NonFiniteActivationError, check_finite_parameters
from .core.recipe import Recipe, apply_recipe
from .core.safe_io import OutputExistsError, StagedDir
from .core.serialization import CheckpointError, save_checkpoint
from .data import DataOverlapError, check_disjoint
from .evaluation import EvalContext, metric_table
from .backends import check_kernels, convert_to_real
from .distributed import RankFailed, Ranks
from .sharded import checkpoint_files, load_checkpoint_files, shard_split, share_quantized, state_digest
from .report import (CHECKPOINT_DIR, environment, is_legacy_output, model_size_bytes, quantized_modules,
                     write_reports)

EXIT_USAGE = 2
USAGE = "usage: python -m archquant.run CONFIG.yaml [key=value ...]"


class InputError(ValueError):
    """A problem with what the user gave (config, model files, data), found while reading it."""


# Errors that mean "the input is wrong", reported in one line with exit code 2: these classes
# anywhere, and any ValueError / KeyError / OSError raised while the input-facing stages read
# the config, the model and the data (``_input_stage``). Anything else is a bug: it keeps its
# traceback and exits 1. ARCHQUANT_DEBUG=1 shows the traceback for these too.
USER_ERRORS = (ConfigError, InputError, DataOverlapError, CheckpointError, NonFiniteActivationError,
               OutputExistsError)


@contextmanager
def _input_stage():
    """Inside, a ValueError / KeyError / OSError is the user's input being wrong, not a bug."""
    try:
        yield
    except USER_ERRORS:
        raise
    except (ValueError, KeyError, OSError) as e:
        raise InputError(_first_line(e)) from e


class Timer:
    """Seconds per stage, and the process's peak resident memory when each stage ended."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.peak_rss_mib: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, log=print):
        log(f"[archquant] {name} ...", flush=True)
        t0 = time.perf_counter()
        yield
        self.times[name] = round(time.perf_counter() - t0, 3)
        self.peak_rss_mib[name] = _peak_rss_mib()


def _peak_rss_mib() -> float | None:
    try:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return round(kib / (2**20 if sys.platform == "darwin" else 2**10), 1)
    except (ImportError, OSError):
        return None


class RunFailed(RuntimeError):
    """The work ran but its result cannot be trusted or written; nothing was published."""


def run(cfg: RunConfig, log=print, ranks: Ranks | None = None) -> dict | None:
    """Run the whole job for a validated config; returns the report dict (rank 0; None on the other
    ranks of a torchrun job, which only generate their shard of the evaluation).

    Everything (checkpoint, artifacts, reports) is built in a hidden staging directory beside
    ``output_dir`` and published in one step, only after the reload check passed
    (``core.safe_io.StagedDir``): a run that fails or is interrupted leaves ``output_dir`` as it was.
    """
    ranks = ranks or Ranks()
    torch.manual_seed(cfg.seed)
    adapter = get_adapter(cfg.family)
    with ExitStack() as stack:
        held: dict = {}

        def open_stage() -> str:
            with _input_stage():
                if cfg.backend == "real":
                    check_kernels(cfg.real_kernels)  # before any work: "triton" without CUDA needs the interpreter
                # The output directory is checked (ours or new, writable) before the model is even loaded.
                held["stage"] = stack.enter_context(StagedDir(cfg.output_dir, legacy=is_legacy_output,
                                                              what="output_dir"))
            return str(held["stage"].path)

        staged = Path(ranks.broadcast_from_main(open_stage, classify_error))  # the other ranks write files there
        stage = held.get("stage")
        if stage is not None:
            for path in stage.swept:
                log(f"[archquant] removed the leftover of an interrupted run: {path}", flush=True)
            for path in stage.kept:
                log(f"[archquant] a leftover of an interrupted run held other files; kept them at {path}", flush=True)
        report = _run_staged(cfg, adapter, stage, staged, log, ranks)
        if stage is None:
            return None
        try:
            stage.publish()
        except OSError as e:
            raise RunFailed(f"could not publish the results to {stage.target}: {_first_line(e)}; "
                            f"{stage.target} was left as it was") from None
    if stage.moved_aside:
        log(f"[archquant] files someone added to the previous {stage.target} were kept at {stage.moved_aside}",
            flush=True)
    return report


def _run_staged(cfg: RunConfig, adapter, stage: StagedDir | None, staged: Path, log, ranks: Ranks) -> dict | None:
    timer = Timer()
    out = Path(cfg.output_dir)
    cfg_dict = to_dict(cfg)
    artifacts: list[dict] = []
    eval_notes: list[str] = []
    items: dict[str, list] = {}
    digests: list[str] = []

    def load_inputs():
        with _input_stage():
            recipe = resolve_recipe(cfg.recipe, adapter)
            baselines = [resolve_recipe(compare_options(cfg.recipe, name), adapter) for name in cfg.compare]
            with timer.stage("load model", log):
                model, model_config = adapter.load_model(cfg.model.path, dict(cfg.model.options), cfg.model.dtype)
                for r in (*baselines, recipe):  # a recipe for another architecture is refused before any work
                    adapter.check_model(model, r)
                check_finite_parameters(model)
            with timer.stage("load data", log):
                calib = adapter.load_data(cfg_dict["calibration"], "calibration", model_config)
                evaluation = adapter.load_data(cfg_dict["evaluation"], "evaluation", model_config)
                disjointness = check_disjoint(calib, evaluation)
                for r in (*baselines, recipe):  # e.g. a calibration selection larger than the pool
                    r.check_calibration(len(calib.batches))
                _check_sharding(adapter, evaluation, ranks)
        return recipe, baselines, model, model_config, calib, evaluation, disjointness

    # every rank reads its inputs; a failure on any of them stops all (one line, that rank's)
    recipe, baselines, model, model_config, calib, evaluation, disjointness = \
        ranks.all_ranks(load_inputs, classify_error)[ranks.rank]
    shard = shard_split(evaluation, ranks) if ranks.distributed else evaluation

    def evaluate(label: str, m, fp=None, keep_files: bool = True) -> tuple[dict, EvalContext]:
        ctx = EvalContext(label=label, fp=fp, output_dir=staged if keep_files else None)
        with timer.stage(f"evaluate {'FP' if label == 'fp' else label}", log):
            if ranks.distributed:  # each rank its shard; the items come back in order, merged as in one process
                parts = ranks.all_ranks(lambda: (adapter.evaluate_items(m, shard, ctx), ctx.artifacts, ctx.notes),
                                        classify_error)
                ctx.items = [row for rows, _, _ in parts for row in rows]
                ctx.artifacts = [a for _, arts, _ in parts for a in arts]
                ctx.notes = list(dict.fromkeys(n for _, _, notes in parts for n in notes))
                metrics = adapter.merge_items(ctx.items)
            else:
                metrics = adapter.evaluate(m, evaluation, ctx)
        artifacts.extend(ctx.artifacts)
        eval_notes.extend(n for n in ctx.notes if n not in eval_notes)  # the same note from every model: once
        if ctx.items is not None:
            items[label] = ctx.items
        return metrics, ctx

    fp_metrics, fp_ctx = evaluate("fp", model)
    fp_outputs = fp_ctx.kept  # computed once (per rank: its shard); every quantized evaluation is compared with it
    fp_size = model_size_bytes(model)

    def save(qmodel, directory: Path, **extra) -> None:
        save_checkpoint(qmodel, directory, family=adapter.name, model_config=adapter.model_config(qmodel), **extra)

    def quantize(recipe: Recipe, make_model):
        def on_main():  # the model is a throw-away copy (or the FP model, used last): no snapshot to undo a failure
            qmodel = make_model()
            steps = apply_recipe(qmodel, recipe, adapter.structure(qmodel), calib_batches=calib.batches,
                                 forward_fn=adapter.forward, progress=cfg.progress and ranks.is_main,
                                 validate_batch=adapter.validate_batch, restore_on_failure=False)
            return qmodel, steps

        with timer.stage(f"quantize ({recipe.name})", log):
            if ranks.distributed:  # calibrated once, on rank 0; the others load what it saved
                qmodel, steps = share_quantized(ranks, on_main, save, classify_error)
                _check_same_everywhere(ranks, qmodel, digests)
            else:
                qmodel, steps = on_main()
        metrics, _ = evaluate(recipe.name, qmodel, fp_outputs)
        return qmodel, metrics, steps or {}

    compared = {}
    for name, other in zip(cfg.compare, baselines):  # one copy at a time, dropped before the next
        cmodel, cmetrics, _ = quantize(other, lambda: copy.deepcopy(model))
        compared[name] = {"metrics": cmetrics, "bytes": model_size_bytes(cmodel), "method": other.to_dict(),
                          "notes": _notes(other), "seconds": timer.times[f"quantize ({other.name})"]}
        del cmodel
    # the saved model is quantized from the FP model itself: FP outputs are kept, the FP weights are not needed
    qmodel, q_metrics, step_times = quantize(recipe, lambda: model)
    del model
    quantized = quantized_modules(qmodel)

    ckpt_bytes, reload = None, None
    if cfg.save:
        def save_final():
            with timer.stage("save", log):
                try:
                    save(qmodel, staged / CHECKPOINT_DIR, recipe=recipe.to_dict(), metadata={"config": cfg_dict})
                except OSError as e:
                    raise RunFailed(f"could not save the checkpoint: {_first_line(e)}; "
                                    f"nothing was published to {out}") from None
            directory = staged / CHECKPOINT_DIR
            size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
            # read into memory only to send to the other ranks, for their reload check
            files = checkpoint_files(directory) if ranks.distributed and cfg.verify_reload else None
            return files, size

        files, ckpt_bytes = ranks.broadcast_from_main(save_final, classify_error)
        if cfg.verify_reload:
            with timer.stage("verify reload", log):
                reloaded = load_quantized(staged / CHECKPOINT_DIR) if ranks.is_main else load_checkpoint_files(files)
                reload = _verify_reload(adapter, qmodel, reloaded, shard, evaluate, q_metrics, fp_outputs, out)

    real = None
    if cfg.backend == "real":  # the fake-quant checkpoint stays the saved format; the model now runs in int8
        with timer.stage("convert to real", log):
            rmodel = convert_to_real(qmodel, kernels=cfg.real_kernels)  # in place: no second copy
        real_metrics, _ = evaluate("real", rmodel, fp_outputs)
        real = {**rmodel._archquant_real, "metrics": real_metrics, "bytes": model_size_bytes(rmodel),
                "eval_seconds": {"fake": timer.times[f"evaluate {recipe.name}"], "real": timer.times["evaluate real"]}}
    del qmodel
    if not ranks.is_main:
        return None

    report = {
        "config": cfg_dict,
        "family": adapter.name,
        "model": {"path": cfg.model.path, "config": model_config, "fp_bytes": fp_size},
        "method": recipe.to_dict(),
        "method_notes": _notes(recipe),
        "evaluation_notes": eval_notes,
        "quantized_modules": quantized,
        "data": {"calibration": calib.description, "calibration_items": len(calib.item_ids),
                 "evaluation": evaluation.description, "evaluation_items": len(evaluation.item_ids),
                 "disjointness": disjointness},
        "metrics": {"fp": fp_metrics, "quantized": q_metrics, **({"real": real["metrics"]} if real else {})},
        "metrics_info": metric_table(adapter.metrics),
        "real": real,
        "compare": compared,
        "artifacts": artifacts,
        "checkpoint": None if not cfg.save else {"path": str(out / CHECKPOINT_DIR), "bytes": ckpt_bytes},
        "reload": reload,
        "items": items,
        "ranks": {"world": ranks.world, "backend": ranks.backend, "quantized_state_sha256": digests} if ranks.distributed
        else None,
        "output": {"dir": str(out), "removed_leftovers": stage.swept, "kept_leftovers": stage.kept,
                   "kept_aside": str(aside) if (aside := stage.planned_aside()) else None},
        "timings": {**timer.times, "recipe_steps": {k: round(v, 3) for k, v in step_times.items()}},
        "peak_rss_mib": timer.peak_rss_mib,
        "environment": environment(),
    }
    try:
        write_reports(report, staged)
    except OSError as e:
        raise RunFailed(f"could not write the report: {_first_line(e)}; nothing was published to {out}") from None
    return report


def _notes(recipe: Recipe) -> list[str]:
    notes = getattr(recipe, "notes", None)
    return list(notes()) if callable(notes) else []


def _verify_reload(adapter, qmodel, reloaded, evaluation, evaluate, q_metrics: dict, fp_outputs, out) -> dict:
    """The saved checkpoint, reloaded, must give bit-identical outputs on a fixed probe batch
    (``torch.equal``) and the same metrics; a metric its family declares not bit-reproducible
    (``Metric.reproducible``) is compared for the report only. ``evaluation`` is this rank's shard,
    ``evaluate`` the runner's (sharded when the job is)."""
    probe = adapter.probe_batch(evaluation)
    with torch.no_grad():
        same_outputs = _outputs_equal(adapter.forward(qmodel, probe), adapter.forward(reloaded, probe))
    if not same_outputs:
        raise RunFailed(f"the saved checkpoint reloaded to a model with different outputs on the probe batch; "
                        f"nothing was published to {out}")
    metrics, _ = evaluate("reload", reloaded, fp_outputs, keep_files=False)
    del reloaded
    loose = {m.name for m in adapter.metrics if not m.reproducible}
    differ = sorted(k for k in set(metrics) | set(q_metrics) if not _same(metrics.get(k), q_metrics.get(k)))
    strict = [k for k in differ if k not in loose]
    if strict:
        k = strict[0]
        raise RunFailed(f"the saved checkpoint reloaded to different metrics ({k}: {metrics.get(k)} vs "
                        f"{q_metrics.get(k)}); nothing was published to {out}")
    return {"metrics": metrics, "identical": not differ, "outputs_identical": True,
            "not_reproducible": [k for k in differ if k in loose]}


def _check_sharding(adapter, evaluation, ranks: Ranks) -> None:
    """A sharded evaluation needs a family that scores items one by one, and an item for every rank."""
    if not ranks.distributed:
        return
    if not adapter.shards_evaluation:
        raise InputError(f"family {adapter.name!r} does not shard its evaluation across processes: run it "
                         "without torchrun (one process)")
    if ranks.world > len(evaluation.batches):
        raise InputError(f"torchrun started {ranks.world} ranks, but the evaluation has {len(evaluation.batches)} "
                         f"batch(es) ({len(evaluation.item_ids)} items): use at most {len(evaluation.batches)} "
                         "processes, or a smaller evaluation.batch_size")


def _check_same_everywhere(ranks: Ranks, qmodel, digests: list) -> None:
    """Every rank must hold the same quantized tensors (what rank 0 calibrated); the digests go into
    the report."""
    found = ranks.all_ranks(lambda: state_digest(qmodel), classify_error)
    if len(set(found)) != 1:
        raise RunFailed(f"the ranks hold different quantized models ({', '.join(d[:12] for d in found)})")
    digests[:] = found


def classify_error(e: BaseException) -> tuple[str, int]:
    """(the one line a failure shows, its exit code) when it is reported from another rank."""
    if isinstance(e, RankFailed):
        return str(e).split(": ", 1)[1], e.exit_code
    if isinstance(e, RunFailed):
        return _first_line(e), EXIT_FAILED
    if isinstance(e, USER_ERRORS):
        return _first_line(e), EXIT_USAGE
    return f"{type(e).__name__}: {_first_line(e)}", EXIT_FAILED


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _tensors(x) -> list[torch.Tensor]:
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return [t for v in vars(x).values() for t in _tensors(v)] if hasattr(x, "__dict__") else []


def _outputs_equal(a, b) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return len(ta) == len(tb) and bool(ta) and all(x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
                                                   for x, y in zip(ta, tb))


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
    ranks = Ranks()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if _main_thread() else None
    try:
        ranks = Ranks.from_env()  # torchrun: join the other processes (one process: nothing to join)
        with _input_stage():
            cfg = load_config(argv[0], argv[1:])
        report = run(cfg, log=print if ranks.is_main else _quiet, ranks=ranks)
        if ranks.is_main:
            print(Path(report["config"]["output_dir"], "report.md").read_text())
        return 0
    except KeyboardInterrupt as e:
        where = f"; nothing was published to {cfg.output_dir}, which was left as it was" if cfg else ""
        what = "terminated" if isinstance(e, _Terminated) else "interrupted"
        print(f"archquant: {what}" + ("" if report is not None else where), file=sys.stderr, flush=True)
        return 128 + signal.SIGTERM if isinstance(e, _Terminated) else EXIT_INTERRUPTED
    except RankFailed as e:  # another rank's failure: rank 0 says which and why, every rank exits alike
        if ranks.is_main:
            _error(str(e))
        return e.exit_code
    except RunFailed as e:
        if os.environ.get("ARCHQUANT_DEBUG"):
            raise
        if ranks.is_main:
            _error(_first_line(e))
        return EXIT_FAILED
    except USER_ERRORS as e:
        if os.environ.get("ARCHQUANT_DEBUG"):
            raise
        if ranks.is_main:
            _error(_first_line(e))
        return EXIT_USAGE
    finally:
        ranks.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _quiet(*args, **kwargs) -> None:
    """The log of the ranks other than 0: rank 0 says what the job does."""


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
