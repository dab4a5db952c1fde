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
Model section: the committed reference Mamba1 and a random-weight model of mamba-130m's shapes,
FP32 vs W8A8 real (``quamba`` + ``convert_to_real``: whole blocks on int8 codes), prefill of
``--prefill`` tokens and one cached decode step, with the time split into GEMMs (every Linear,
incl. activation quantization in the real model), the selective scan, and the rest.
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

from archquant.report import cpu_name

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
    """Time spent in the GEMM layers and in the selective scan, by wrapping the functions and
    methods that do them. Nested calls (a wrapped method calling another) count once."""

    def __init__(self) -> None:
        self.times = {"gemm": 0.0, "head": 0.0, "scan": 0.0}
        self._depth = {"gemm": 0, "head": 0, "scan": 0}

    def wrap(self, kind: str, fn):
        def timed(*args, **kwargs):
            self._depth[kind] += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth[kind] -= 1
                if self._depth[kind] == 0:
                    self.times[kind] += time.perf_counter() - t0
        return timed


@contextlib.contextmanager
def _instrumented(split: _Split, head: nn.Module):
    """GEMMs: ``nn.Linear.forward`` (FP) and the real Linear's quantize / GEMM / requantize calls
    (activation quantization and epilogue included); scan: the FP selective scan and the int8
    scan and state update (here their torch versions, which the CPU path runs)."""
    from archquant.kernels import mamba_scan
    from archquant.models import mamba as mamba_mod
    from archquant.backends import RealQuantLinear

    patches = [(nn.Linear, "forward", "gemm"), (RealQuantLinear, "forward", "gemm"),
               (RealQuantLinear, "quantize_input", "gemm"), (RealQuantLinear, "matmul_codes", "gemm"),
               (RealQuantLinear, "matmul_requant", "gemm"), (mamba_mod, "selective_scan", "scan"),
               (mamba_scan, "quant_selective_scan_reference", "scan"),
               (mamba_scan, "quant_selective_state_update_reference", "scan")]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    # the LM head is timed on its own (an instance attribute wins over the patched class method)
    head.forward = split.wrap("head", type(head).forward.__get__(head))
    for (obj, name, kind), (_, _, orig) in zip(patches, saved):
        setattr(obj, name, split.wrap(kind, orig))
    try:
        yield
    finally:
        for obj, name, orig in saved:
            setattr(obj, name, orig)
        del head.forward


def _phase_times(run, head: nn.Module, repeats: int, budget_s: float) -> dict:
    """total: median of plain runs; gemm / head / scan / other: medians over instrumented runs."""
    with torch.no_grad():
        total = _time_ms(run, repeats, budget_s)
        parts = {"gemm": [], "head": [], "scan": [], "other": []}
        for _ in range(max(3, min(repeats, 5))):
            split = _Split()
            with _instrumented(split, head):
                t0 = time.perf_counter()
                run()
                t = time.perf_counter() - t0
            for k, v in split.times.items():
                parts[k].append(v)
            parts["other"].append(t - sum(split.times.values()))
    return {"total": total, **{k: 1e3 * statistics.median(v) for k, v in parts.items()}}


def _prefill(model, ids):
    return lambda: model(ids, cache=model.new_cache())


def _prefill_no_cache(model, ids):
    """``model(ids)``: the plain call, no cache object at all."""
    return lambda: model(ids)


def _generate(model, ids, new_tokens: int):
    """``greedy_generate``: a cached prefill of ``ids``, then ``new_tokens`` one-token steps."""
    from archquant.models.mamba import greedy_generate

    return lambda: greedy_generate(model, ids, new_tokens)


def _decode_step(model, ids):
    """One cached decode step after a prefill of ``ids`` (the state advances every call)."""
    cache = model.new_cache()
    with torch.no_grad():
        model(ids, cache=cache)
    tok = ids[:, -1:]
    return lambda: model(tok, cache=cache)


MODELS = {
    "reference": "committed reference model models/reference/mamba1-byte (trained, hidden 192, 4 layers, byte vocabulary)",
    "mamba-130m": "mamba-130m shapes (hidden 768, 24 layers, vocabulary 50280), random weights",
    "mamba-1.4b": "mamba-1.4b shapes (hidden 2048, 48 layers, vocabulary 50280), random weights (about 6 GB in fp32)",
}
#: (hidden, layers) of the random-weight models
RANDOM_SHAPES = {"mamba-130m": (768, 24), "mamba-1.4b": (2048, 48)}


def _models(which: str, calib_tokens: int = 256):
    """(FP32 model, W8A8 real model, summary) for a ``MODELS`` key: Quamba (static W8A8, the
    demo's recipe) then ``convert_to_real``: every block on int8 kernels, the LM head FP."""
    import copy

    import archquant as aq
    from archquant.models.mamba import MambaConfig, MambaLM, init_mamba_weights
    from archquant.backends import convert_to_real

    if which == "reference":
        from archquant.adapters.mamba import reference_model_dir
        from archquant.models.mamba_loading import load_mamba
        fp = load_mamba(str(reference_model_dir("mamba1-byte"))).eval()
    else:
        hidden, layers = RANDOM_SHAPES[which]
        cfg = MambaConfig(arch="mamba1", vocab_size=50280, hidden_size=hidden, num_layers=layers)
        fp = init_mamba_weights(MambaLM(cfg), seed=0).eval()
    vocab = fp.config.vocab_size
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, vocab, (2, calib_tokens // 2), generator=g)]
    real = copy.deepcopy(fp)
    aq.quantize_(real, "quamba", calib_data=calib, family="mamba", progress=False)
    convert_to_real(real)
    return fp, real, real._archquant_real


def bench_model(which: str, prefill: int, repeats: int, budget_s: float) -> list[dict]:
    fp, real, summary = _models(which)
    assert not summary["kept"], summary
    g = torch.Generator().manual_seed(0)
    vocab = fp.config.vocab_size
    prompt = torch.randint(0, vocab, (1, prefill), generator=g)
    batch4 = torch.randint(0, vocab, (4, max(1, prefill // 4)), generator=g)
    context = torch.randint(0, vocab, (1, 64), generator=g)
    context4 = torch.randint(0, vocab, (4, 64), generator=g)
    b4 = f"4x{batch4.shape[1]}"
    rows = []
    # every call path users make: the plain call (no cache), a fresh cache, batch 4, one cached
    # decode step (batch 1 and 4), and greedy_generate (a cached prefill of 64, then 64 steps)
    for phase, make, tokens in (("prefill, no cache", lambda m: _prefill_no_cache(m, prompt), prefill),
                                ("prefill, fresh cache", lambda m: _prefill(m, prompt), prefill),
                                ("prefill batch 4, no cache", lambda m: _prefill_no_cache(m, batch4), b4),
                                ("prefill batch 4, fresh cache", lambda m: _prefill(m, batch4), b4),
                                ("decode step", lambda m: _decode_step(m, context), 1),
                                ("decode step, batch 4", lambda m: _decode_step(m, context4), "4x1"),
                                ("greedy_generate 64 after 64", lambda m: _generate(m, context, 64), 64)):
        for name, model in (("FP32", fp), ("W8A8 real", real)):
            r = {"phase": phase, "tokens": tokens, "model": name,
                 **_phase_times(make(model), model.lm_head, repeats, budget_s)}
            print(_model_line(r, rows[-1] if name != "FP32" else None), flush=True)
            rows.append(r)
    return rows


def _model_header() -> list[str]:
    return ["| phase | tokens | model | total (ms) | block GEMMs (ms) | LM head (ms) | scan (ms) | other (ms) "
            "| speed-up vs FP32 |", "|---|---|---|---|---|---|---|---|---|"]


def _model_line(r: dict, base: dict | None = None) -> str:
    ratio = f"{base['total'] / r['total']:.2f}x" if base else "–"
    return (f"| {r['phase']} | {r['tokens']} | {r['model']} | {r['total']:.2f} | {r['gemm']:.2f} | {r['head']:.2f} "
            f"| {r['scan']:.2f} | {r['other']:.2f} | {ratio} |")


MODEL_NOTE = ("W8A8 real = `quantize_(model, \"quamba\")` then `convert_to_real`: every Mamba block runs on int8 "
              "codes (CPU path: int8 GEMMs, the int8 conv and scan through their torch versions, fp32 state); "
              "the LM head stays FP32, as in every recipe. prefill, no cache: `model(ids)`; fresh cache: a new "
              "`MambaCache` filled by the prompt; batch 4: four sequences of a quarter of the tokens; decode step: "
              "one cached token after a 64-token prefill; greedy_generate: a 64-token prompt, then 64 new tokens "
              "(total over the whole call). block GEMMs: every Linear of the blocks "
              "including the activation quantization, requantization and epilogue of the real ones; LM head: "
              "the (FP32) output projection; scan: the selective "
              "scan / state update; other: the rest (conv, norms, gating, embedding, timing overhead). "
              "The split is the median of instrumented runs, total the median of plain runs.")


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
    p.add_argument("--models", default="reference,mamba-130m",
                   help=f"comma-separated model section(s): {', '.join(MODELS)} (default: reference,mamba-130m)")
    p.add_argument("--write", type=Path, default=None, help="write the markdown tables to this file")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    shapes, ms, prefill, repeats, budget = SHAPES, MS, args.prefill, args.repeats, args.budget
    if args.quick:
        shapes, ms, prefill, repeats, budget = SHAPES[:2], [1, 16], 32, 3, 0.2
        if args.models == "reference,mamba-130m":
            args.models = "reference"
    bad = [m for m in args.models.split(",") if m not in MODELS]
    if bad:
        p.error(f"--models: unknown {bad[0]!r}; choose from {', '.join(MODELS)}")
    if args.ms:
        ms = [int(v) for v in args.ms.split(",")]
    command = "python -m archquant.eval.bench_cpu " + " ".join(sys.argv[1:] if argv is None else argv)
    from archquant.kernels.cpu_int8 import fbgemm_available

    head = [f"# CPU int8 benchmark{' (--quick smoke setting)' if args.quick else ''}", "",
            f"Command: `{command.strip()}`", "",
            f"- {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu_name()}; "
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
        for which in args.models.split(","):
            title = f"## Mamba1 model, {MODELS[which]}, batch 1: FP32 vs W8A8 real (Quamba)"
            print("", title, "", *_model_header(), sep="\n", flush=True)
            rows = bench_model(which, prefill, repeats, budget)
            lines += [title, "", *_model_header()]
            for i in range(0, len(rows), 2):
                lines += [_model_line(rows[i]), _model_line(rows[i + 1], rows[i])]
            lines += [""]
        lines += [MODEL_NOTE, ""]
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text("\n".join(lines))
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
