"""NFDS vs random calibration sampling over several seeds, on a VGGT model (QuantVGGT's Table 5 setting).

    python -m archquant.eval.vggt_sampling_study configs/vggt_w4a4.yaml --seeds 0 1 2 3 4 \\
        --write eval/results/vggt_sampling.md

For every seed, the config's recipe is run twice on copies of the FP model: ``quantvggt`` (NFDS picks
``recipe.options.num_samples`` calibration scenes from the pool; the seed drives the draw within
clusters) and ``dsfq`` (the same number of scenes drawn uniformly at random with that seed); everything
else is the config's (bits, pool, evaluation scenes). Both are scored on the config's evaluation split;
the table gives each seed's AUC@30 and Chamfer, then mean and standard deviation over seeds. The data
and the disjointness check are the runner's; nothing is saved.
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
from archquant.api import quantize_
from archquant.config import compare_options, load_config, to_dict
from archquant.data import check_disjoint
from archquant.evaluation import EvalContext

METHODS = {"quantvggt": "NFDS", "dsfq": "random"}
SHOWN = ("auc30", "chamfer", "auc30_vs_fp", "chamfer_vs_fp")


def run(config: str, overrides: list[str], seeds: list[int], threads: int) -> dict:
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
    rows = {m: [] for m in METHODS}
    for seed in seeds:
        for method in METHODS:
            # each method takes the config's options its preset declares, as a compare baseline does
            seeded = dataclasses.replace(cfg.recipe, options={**cfg.recipe.options, "sampling_seed": seed})
            options = compare_options(seeded, method)
            qmodel = quantize_(copy.deepcopy(model), options, calib_data=calib.batches, family=cfg.family,
                               progress=False)
            metrics = adapter.evaluate(qmodel, evaluation, EvalContext(method, fp=fp_ctx.kept))
            rows[method].append({"seed": seed, **metrics})
            print(f"seed {seed} {method:9s} " + " ".join(f"{k} {metrics[k]:.4f}" for k in SHOWN if k in metrics),
                  flush=True)
    return {"fp": fp, "rows": rows, "cfg": cfg}


def _mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def table(result: dict, command: str) -> str:
    cfg = result["cfg"]
    o = cfg.recipe
    lines = [f"# NFDS vs random calibration sampling, W{o.w_bits}A{o.a_bits}", "",
             f"Command: `{command}`", "",
             f"Pool: {cfg.calibration.num_samples} calibration scenes; kept: "
             f"{cfg.recipe.options.get('num_samples', 16)}; evaluation: {cfg.evaluation.num_samples} scenes. "
             f"FP: AUC@30 {result['fp']['auc30']:.4f}, Chamfer {result['fp']['chamfer']:.4f}, "
             f"AbsRel {result['fp']['abs_rel']:.4f}.", "",
             "| seed | " + " | ".join(f"{METHODS[m]} {k}" for m in METHODS for k in SHOWN) + " |",
             "|---|" + "---|" * (len(METHODS) * len(SHOWN))]
    n = len(result["rows"]["quantvggt"])
    for i in range(n):
        cells = [f"{result['rows'][m][i][k]:.4f}" for m in METHODS for k in SHOWN]
        lines.append(f"| {result['rows']['quantvggt'][i]['seed']} | " + " | ".join(cells) + " |")
    cells = [_mean_std([r[k] for r in result["rows"][m]]) for m in METHODS for k in SHOWN]
    lines.append("| mean ± sd | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", default=None, help="write the markdown table here")
    args = p.parse_args(argv)
    command = "python -m archquant.eval.vggt_sampling_study " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = table(run(args.config, args.overrides, args.seeds, args.threads), command)
    print(text)
    if args.write:
        Path(args.write).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
