"""VGGT recipes over several seeds: NFDS vs random calibration sampling (QuantVGGT's Table 5 setting), or
methods against each other over rotation seeds.

    python -m archquant.eval.vggt_sampling_study configs/vggt_w4a4.yaml --seeds 0 1 2 3 4 \\
        --write eval/results/vggt_sampling.md
    python -m archquant.eval.vggt_sampling_study configs/vggt_w4a4.yaml --vary rotation_seed \\
        --methods rtn_dynamic quarot quantvggt --seeds 0 1 2 3 4 --write eval/results/vggt_w4a4_seeds.md

For every seed, each method runs on a copy of the FP model with the seed written into ``--vary``:

* ``sampling_seed`` (the default, with methods ``quantvggt dsfq``): ``quantvggt`` lets NFDS pick
  ``recipe.options.num_samples`` calibration scenes from the pool (the seed drives the draw within
  clusters), ``dsfq`` draws as many uniformly at random;
* ``rotation_seed``: the seed of every random Hadamard rotation (QuaRot-style and DSFQ alike). One
  rotation is one draw of the method: a difference between methods smaller than the spread over
  seeds is not a difference.

Each method takes the config's recipe options its preset declares, as a ``compare`` baseline does;
everything else is the config's (bits, pool, evaluation scenes). All are scored on the config's
evaluation split; the table gives each seed's metrics, then mean and standard deviation over seeds.
The data and the disjointness check are the runner's; nothing is saved.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import shlex
import statistics
import sys
from pathlib import Path

import torch

from archquant.adapters.base import get_adapter
from archquant.adapters.vggt_recipes import VGGT_PRESETS
from archquant.api import quantize_
from archquant.config import compare_options, load_config, to_dict
from archquant.data import check_disjoint
from archquant.evaluation import EvalContext

LABELS = {"quantvggt": "NFDS", "dsfq": "random"}
SHOWN = ("auc30", "chamfer", "auc30_vs_fp", "chamfer_vs_fp")
VARIED = ("sampling_seed", "rotation_seed")


def _seeded(recipe, vary: str, seed: int):
    """The config's recipe section with ``seed`` in ``vary`` (a preset option or a recipe knob)."""
    if vary == "rotation_seed":
        return dataclasses.replace(recipe, rotation_seed=seed)
    return dataclasses.replace(recipe, options={**recipe.options, vary: seed})


def run(config: str, overrides: list[str], seeds: list[int], threads: int,
        methods: tuple[str, ...] = ("quantvggt", "dsfq"), vary: str = "sampling_seed") -> dict:
    torch.set_num_threads(threads)
    cfg = load_config(config, overrides)
    adapter = get_adapter(cfg.family)
    cfg_dict = to_dict(cfg)
    model, model_config = adapter.load_model(cfg.model.path, dict(cfg.model.options), cfg.model.dtype)
    calib = adapter.load_data(cfg_dict["calibration"], "calibration", model_config)
    evaluation = adapter.load_data(cfg_dict["evaluation"], "evaluation", model_config)
    check_disjoint(calib, evaluation)
    fp_ctx = EvalContext("fp")
    fp = adapter.evaluate(model, evaluation, fp_ctx)
    rows = {m: [] for m in methods}
    for seed in seeds:
        for method in methods:
            options = compare_options(_seeded(cfg.recipe, vary, seed), method)
            qmodel = quantize_(copy.deepcopy(model), options, calib_data=calib.batches, family=cfg.family,
                               progress=False)
            metrics = adapter.evaluate(qmodel, evaluation, EvalContext(method, fp=fp_ctx.kept))
            rows[method].append({"seed": seed, **metrics})
            print(f"{vary} {seed} {method:18s} " + " ".join(f"{k} {metrics[k]:.4f}" for k in SHOWN if k in metrics),
                  flush=True)
    return {"fp": fp, "rows": rows, "cfg": cfg, "vary": vary}


def _mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4g} ± {sd:.2g}"


def _label(method: str, methods) -> str:
    return LABELS[method] if set(methods) <= set(LABELS) else method


def table(result: dict, command: str) -> str:
    cfg, rows = result["cfg"], result["rows"]
    methods = list(rows)
    o = cfg.recipe
    title = ("NFDS vs random calibration sampling" if result["vary"] == "sampling_seed"
             else f"{', '.join(methods)} over {result['vary']}s")
    lines = [f"# {title}, W{o.w_bits}A{o.a_bits}", "",
             f"Command: `{command}`", "",
             f"Pool: {cfg.calibration.num_samples} calibration scenes; kept: "
             f"{cfg.recipe.options.get('num_samples', 16)}; evaluation: {cfg.evaluation.num_samples} scenes. "
             f"FP: AUC@30 {result['fp']['auc30']:.4f}, Chamfer {result['fp']['chamfer']:.4f}, "
             f"AbsRel {result['fp']['abs_rel']:.4f}.", "",
             f"| {result['vary']} | " + " | ".join(f"{_label(m, methods)} {k}" for m in methods for k in SHOWN) + " |",
             "|---|" + "---|" * (len(methods) * len(SHOWN))]
    for i in range(len(rows[methods[0]])):
        cells = [f"{rows[m][i][k]:.4g}" for m in methods for k in SHOWN]
        lines.append(f"| {rows[methods[0]][i]['seed']} | " + " | ".join(cells) + " |")
    cells = [_mean_std([r[k] for r in rows[m]]) for m in methods for k in SHOWN]
    lines.append("| mean ± sd | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--methods", nargs="+", default=["quantvggt", "dsfq"], choices=VGGT_PRESETS,
                   help="presets of the VGGT family")
    p.add_argument("--vary", choices=VARIED, default="sampling_seed", help="which seed the seeds go into")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", default=None, help="write the markdown table here")
    args = p.parse_args(argv)
    command = "python -m archquant.eval.vggt_sampling_study " + shlex.join(argv if argv is not None else sys.argv[1:])
    result = run(args.config, args.overrides, args.seeds, args.threads, tuple(args.methods), args.vary)
    text = table(result, command)
    print(text)
    if args.write:
        Path(args.write).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
