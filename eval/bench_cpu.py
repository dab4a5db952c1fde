"""CPU benchmark of the real int8 backend: W8A8 Linear vs fp32/bf16 matmul, and a Mamba1 model.

    python -m archquant.eval.bench_cpu                      # full run (a few minutes on 2 cores)
    python -m archquant.eval.bench_cpu --quick              # smoke setting (seconds)
    python -m archquant.eval.bench_cpu --write eval/results/cpu.md

Linear section: for Mamba shapes (K, N) and M tokens, the median time of
* fp32 / bf16: ``torch.matmul(x, w.T)`` with the weight already in that dtype;
* int8: the whole W8A8 Linear as the real backend runs it for dynamic per-token inputs,
  ``int8_linear_dynamic(x, weight)``: per-token quantization of x (fp32), the int8 GEMM on
  the path ``choose_path`` picks, and the scale epilogue, in one call (bit-identical to
  ``quantize_per_token_int8_torch`` + ``int8_linear``, ~2 us less per call at M = 1);
  ``--paths`` adds columns with each int8 operator forced (the data ``choose_path`` is based on).
Model section: random-weight ``MambaLM`` (mamba-130m widths, 2 layers), FP32 vs W8A8 real
(``rtn_dynamic`` + ``convert_to_real``), prefill of ``--prefill`` tokens and one decode step,
with the time split into GEMMs (every Linear, incl. activation quantization in the real
model), the selective scan, and the rest (conv, norms, gating, embedding).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

SHAPES = [(768, 3072, "mamba-130m in_proj"), (1536, 768, "mamba-130m out_proj"), (2560, 10240, "mamba-2.8b in_proj"),
          (5120, 2560, "mamba-2.8b out_proj")]
MS = [1, 16, 256, 1024]


def _time_ms(fn, repeats: int, budget_s: float, warmup: int = 2) -> float:
    """Median wall time (ms) of ``fn()`` over up to ``repeats`` runs (fewer if over ``budget_s``)."""
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------------------
# Linear
# ----------------------------------------------------------------------------------------


def bench_linear(shapes, ms, repeats: int, budget_s: float, paths: bool) -> list[dict]:
    from archquant.kernels.cpu_int8 import Int8Weight, choose_path, fbgemm_available, int8_linear_dynamic

    forced = ["int_mm"] + (["fbgemm"] if fbgemm_available() else []) if paths else []
    rows = []
    for k, n, label in shapes:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(n, k, generator=g) * 0.02
        w_bf16 = w.bfloat16()
        scale = w.abs().amax(dim=1) / 127
        weight = Int8Weight(torch.round(w / scale[:, None]).to(torch.int8), scale)
        for m in ms:
            x = torch.randn(m, k, generator=g)
            x_bf16 = x.bfloat16()

            def int8(path=None):
                return int8_linear_dynamic(x, weight, path=path)

            row = {"K": k, "N": n, "M": m, "label": label, "path": choose_path(m, k, n),
                   "fp32": _time_ms(lambda: torch.matmul(x, w.T), repeats, budget_s),
                   "bf16": _time_ms(lambda: torch.matmul(x_bf16, w_bf16.T), repeats, budget_s),
                   "int8": _time_ms(int8, repeats, budget_s)}
            for p in forced:
                row[f"int8:{p}"] = _time_ms(lambda p=p: int8(p), repeats, budget_s)
            rows.append(row)
            print(_linear_line(row, forced), flush=True)
    return rows


def _linear_header(forced) -> list[str]:
    extra = "".join(f" int8 {p} (ms) |" for p in forced)
    return ["| K x N | layer | M | fp32 (ms) | bf16 (ms) | W8A8 int8 (ms) | int8 path |" + extra
            + " fp32/int8 | bf16/int8 |",
            "|---|---|---|---|---|---|---|" + "---|" * len(forced) + "---|---|"]


def _linear_line(r: dict, forced) -> str:
    extra = "".join(f" {r[f'int8:{p}']:.3f} |" for p in forced)
    return (f"| {r['K']}x{r['N']} | {r['label']} | {r['M']} | {r['fp32']:.3f} | {r['bf16']:.3f} | {r['int8']:.3f} "
            f"| {r['path']} |{extra} {r['fp32'] / r['int8']:.2f}x | {r['bf16'] / r['int8']:.2f}x |")


# ----------------------------------------------------------------------------------------
# Mamba model
# ----------------------------------------------------------------------------------------


class _Split:
    """Accumulates time spent in Linear-like modules and in the selective scan."""

    def __init__(self) -> None:
        self.gemm = self.scan = 0.0
        self._t0: dict[int, float] = {}

    def pre(self, module, args):
        self._t0[id(module)] = time.perf_counter()

    def post(self, module, args, out):
        self.gemm += time.perf_counter() - self._t0.pop(id(module))


@contextlib.contextmanager
def _instrumented(model: nn.Module, split: _Split):
    from archquant.core.modules import QuantLinear
    from archquant.models import mamba as mamba_mod
    from archquant.real import RealQuantLinear

    handles = []
    for m in model.modules():
        if isinstance(m, (nn.Linear, QuantLinear, RealQuantLinear)):
            handles += [m.register_forward_pre_hook(split.pre), m.register_forward_hook(split.post)]
    scan = mamba_mod.selective_scan

    def timed_scan(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return scan(*args, **kwargs)
        finally:
            split.scan += time.perf_counter() - t0

    mamba_mod.selective_scan = timed_scan
    try:
        yield
    finally:
        mamba_mod.selective_scan = scan
        for h in handles:
            h.remove()


def _model_times(model: nn.Module, ids: torch.Tensor, repeats: int, budget_s: float) -> dict:
    with torch.no_grad():
        total = _time_ms(lambda: model(ids), repeats, budget_s)
        gemm, scan, other = [], [], []
        for _ in range(max(3, min(repeats, 10))):
            split = _Split()
            with _instrumented(model, split):
                t0 = time.perf_counter()
                model(ids)
                t = time.perf_counter() - t0
            gemm.append(split.gemm)
            scan.append(split.scan)
            other.append(t - split.gemm - split.scan)
    # total: uninstrumented runs; the split: medians over instrumented runs
    return {"total": total, "gemm": 1e3 * statistics.median(gemm), "scan": 1e3 * statistics.median(scan),
            "other": 1e3 * statistics.median(other)}


def bench_model(hidden: int, layers: int, prefill: int, repeats: int, budget_s: float) -> list[dict]:
    import archquant as aq
    from archquant.models.mamba import MambaConfig, MambaLM, init_mamba_weights
    from archquant.real import convert_to_real

    cfg = MambaConfig(arch="mamba1", vocab_size=256, hidden_size=hidden, num_layers=layers)
    fp = init_mamba_weights(MambaLM(cfg), seed=0).eval()
    real = init_mamba_weights(MambaLM(cfg), seed=0).eval()
    aq.quantize_(real, "rtn_dynamic", family="mamba", progress=False)
    convert_to_real(real)
    g = torch.Generator().manual_seed(0)
    rows = []
    for phase, ids in (("prefill", torch.randint(0, 256, (1, prefill), generator=g)),
                       ("decode step", torch.randint(0, 256, (1, 1), generator=g))):
        for name, model in (("FP32", fp), ("W8A8 real", real)):
            r = {"phase": phase, "tokens": ids.shape[1], "model": name, **_model_times(model, ids, repeats, budget_s)}
            print(_model_line(r, rows[-1] if name != "FP32" else None), flush=True)
            rows.append(r)
    return rows


def _model_header() -> list[str]:
    return ["| phase | tokens | model | total (ms) | GEMMs (ms) | scan (ms) | other (ms) | speed-up vs FP32 |",
            "|---|---|---|---|---|---|---|---|"]


def _model_line(r: dict, base: dict | None = None) -> str:
    ratio = f"{base['total'] / r['total']:.2f}x" if base else "–"
    return (f"| {r['phase']} | {r['tokens']} | {r['model']} | {r['total']:.2f} | {r['gemm']:.2f} | {r['scan']:.2f} "
            f"| {r['other']:.2f} | {ratio} |")


# ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per entry; the median is reported")
    p.add_argument("--budget", type=float, default=2.0, help="max seconds of timed runs per entry (>= 3 runs)")
    p.add_argument("--quick", action="store_true", help="tiny smoke setting (2 shapes, M in {1, 16}, 32-token prefill)")
    p.add_argument("--paths", action="store_true", help="also time each int8 operator forced")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--ms", type=str, default=None, help="comma-separated M values (default 1,16,256,1024)")
    p.add_argument("--no-model", action="store_true", help="skip the model section")
    p.add_argument("--write", type=Path, default=None, help="write the markdown tables to this file")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    shapes, ms, prefill, repeats, budget = SHAPES, MS, args.prefill, args.repeats, args.budget
    if args.quick:
        shapes, ms, prefill, repeats, budget = SHAPES[:2], [1, 16], 32, 3, 0.2
    if args.ms:
        ms = [int(v) for v in args.ms.split(",")]
    command = "python -m archquant.eval.bench_cpu " + " ".join(sys.argv[1:] if argv is None else argv)
    from archquant.kernels.cpu_int8 import fbgemm_available

    head = [f"# CPU int8 benchmark{' (--quick smoke setting)' if args.quick else ''}", "",
            f"Command: `{command.strip()}`", "",
            f"- {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {_cpu_name()}; "
            f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}); threads {torch.get_num_threads()}; "
            f"fbgemm path {'on' if fbgemm_available() else 'off'}",
            f"- medians of up to {repeats} runs (at least 3, at most {budget:g} s of runs per entry), ms", ""]
    print("\n".join(head), flush=True)

    forced = (["int_mm"] + (["fbgemm"] if fbgemm_available() else [])) if args.paths else []
    print("\n".join(_linear_header(forced)), flush=True)
    lin = bench_linear(shapes, ms, repeats, budget, args.paths)
    lines = head + ["## W8A8 Linear (activation quantization + int8 GEMM + epilogue) vs fp32 / bf16 matmul", ""]
    lines += _linear_header(forced) + [_linear_line(r, forced) for r in lin] + [""]

    if not args.no_model:
        print(flush=True)
        title = ("## Mamba1 model, hidden 768 (mamba-130m widths), 2 layers, random weights, batch 1: "
                 "FP32 vs W8A8 real (rtn_dynamic + convert_to_real)")
        print(title, "", *_model_header(), sep="\n", flush=True)
        rows = bench_model(768, 2, prefill, repeats, budget)
        lines += [title, "", *_model_header()]
        for i in range(0, len(rows), 2):
            lines += [_model_line(rows[i]), _model_line(rows[i + 1], rows[i])]
        lines += ["", "GEMMs: every Linear (in/x/dt/out_proj, lm_head), timed by forward hooks; in the real "
                  "model this includes activation quantization and the epilogue. scan: `selective_scan`. other: "
                  "the rest (conv, norms, gating, embedding, hook overhead); the split is the median of "
                  "instrumented runs, total the median of plain runs. The model has no "
                  "recurrent cache, so the decode step is the forward of a single token (M = 1 for every "
                  "Linear, one scan step), which is what a cached decode step costs apart from the state "
                  "bookkeeping.", ""]
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text("\n".join(lines))
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
