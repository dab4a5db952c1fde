"""GPU benchmark of the Triton kernels (H100 / H200): medians and ratios measured side by side.

    python -m archquant.eval.bench_gpu --write eval/results/gpu_h100.md
    python -m archquant.eval.bench_gpu --only gemm          # one section (gemm|sweep|hadamard|mamba|w4|twinlog|memory)
    python -m archquant.eval.bench_gpu --rep 50             # shorter timing window per measurement

Every number in a table comes from this one run on one device, so the ratios compare like with
like.  Each row first checks the kernel against its ``*_reference`` on the very inputs that are
timed; a wrong kernel turns the row into a ``WRONG: ...`` message and is not timed.  Timings
are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs); the w4
section replays CUDA graphs, because decode-size GEMMs are otherwise dominated by launch cost.

Sections: gemm (W8A8 int8 / FP8 GEMM vs cuBLAS bf16, ``torch._int_mm`` + epilogue,
``torch._scaled_mm``), hadamard (fused Hadamard+quantize vs matmul+quantize and a plain copy),
mamba (quantized conv1d+SiLU and selective scan, Mamba-2.8B shapes), w4 (W4A16 decode GEMM),
twinlog (twin-log W4 LUT GEMM vs fp16 at DiT-XL/2 Linear shapes), memory (weight bytes of a W8A8
Mamba-2.8B layer vs fp16).
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import torch

SECTIONS = ("gemm", "sweep", "hadamard", "mamba", "w4", "twinlog", "memory")
GEMM_MS = (1, 16, 256, 2048, 8192)
GEMM_KN = ((1536, 768), (5120, 2560), (1152, 4608), (4096, 4096), (8192, 8192))
HAD_MS = (2048, 8192)
HAD_NS = (1536, 4096, 5120)
W4_MS = (1, 4, 16)
W4_KN = ((4096, 4096), (8192, 8192), (5120, 2560))
W4_GROUP = 128
# DiT-XL/2 Linears (hidden 1152, MLP 4608): qkv/proj/adaLN-sized (1152, 1152), fc1 (1152, 4608),
# fc2 (4608, 1152); M: one token, a small batch, a 256-token image x 2 (classifier-free guidance)
TLQ_MS = (1, 16, 512)
TLQ_KN = ((1152, 1152), (1152, 4608), (4608, 1152))
# Mamba-2.8B: d_model 2560, d_inner 5120, d_state 16, dt_rank 160, d_conv 4, 64 layers.
MAMBA = dict(d_model=2560, d_inner=5120, d_state=16, dt_rank=160, d_conv=4, layers=64, batch=1, seq=1024)

REP_MS = 100  # do_bench timing window per measurement (ms); --rep overrides


# --------------------------------------------------------------------------- timing helpers


def median_ms(fn) -> float:
    """Median time of ``fn()`` in ms (CUDA events via triton's do_bench, L2 flushed per run)."""
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=max(10, REP_MS // 4), rep=REP_MS, return_mode="median"))


def capture_graph(fn):
    """(graph, its output tensor) of one call of ``fn``, captured after warm-up on a side stream
    (Triton compiles and autotunes, cuBLAS picks its algorithms, outside the capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def graph_median_ms(fn) -> float:
    """Median time of one replay of a CUDA graph holding ``fn()``: a replay has no Python or
    launch overhead, as in a graph-captured decode loop."""
    graph, _ = capture_graph(fn)
    return median_ms(graph.replay)


def try_time(fn, graph: bool = False) -> float | None:
    """Time a baseline; None (printed as n/a) when the baseline is unsupported here."""
    try:
        return graph_median_ms(fn) if graph else median_ms(fn)
    except Exception as exc:  # noqa: BLE001 - a missing baseline must not end the run
        print(f"    (baseline unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
        return None


def mismatch(got: torch.Tensor, want: torch.Tensor, rtol: float, atol_rel: float) -> str | None:
    """None if ``got`` ~ ``want`` (atol scaled by max|want|), else a one-line description."""
    got, want = got.float(), want.float()
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    atol = atol_rel * want.abs().max().item()
    err = (got - want).abs()
    bad = err > atol + rtol * want.abs()
    if not torch.isfinite(got).all():
        return "non-finite output"
    if bad.any():
        return f"{int(bad.sum())} of {bad.numel()} elements off, max |diff| {err.max().item():.3g}"
    return None


def codes_mismatch(got: torch.Tensor, want: torch.Tensor, max_frac: float = 1e-3) -> str | None:
    """int8 codes: allow off-by-one at rounding ties (fp32 summation order), nothing larger."""
    diff = (got.to(torch.int16) - want.to(torch.int16)).abs()
    if diff.max().item() > 1:
        return f"codes differ by up to {diff.max().item()}"
    frac = (diff > 0).float().mean().item()
    return None if frac <= max_frac else f"{frac:.2%} of the codes off by one"


def fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def ratio(num: float | None, den: float | None) -> str:
    return "n/a" if num is None or den is None else f"{num / den:.2f}x"


def _cell_ratio(num: str, den: str) -> str:
    """Ratio of two formatted ms cells (n/a unless both are numbers)."""
    try:
        return ratio(float(num), float(den))
    except ValueError:
        return "n/a"


def table(title: str, header: list[str], rows: list[list[str]], notes: list[str] = ()) -> str:
    """A markdown section: title, pipe table, notes."""
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def wrong_row(label: list[str], width: int, msg: str) -> list[str]:
    print(f"    WRONG: {msg}")
    return label + [f"WRONG: {msg}"] + [""] * (width - len(label) - 1)


def free_memory():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


# --------------------------------------------------------------------------- 1. gemm


def _gemm_inputs(m, k, n, dev):
    g = torch.Generator(device=dev).manual_seed(m * 7 + k * 3 + n)
    a_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=dev, generator=g)
    b_q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev, generator=g)
    a_s = torch.rand(m, 1, device=dev, generator=g) * 1e-2 + 1e-3  # per-token
    b_s = torch.rand(n, device=dev, generator=g) * 1e-2 + 1e-3      # per-output-channel
    return a_q, b_q, a_s, b_s


def _int_mm_with_epilogue(a_q, b_q, a_s, b_s, m):
    """torch._int_mm needs M > 16: pad the activation rows once (outside the timing)."""
    pad = max(0, 17 - m)
    a_pad = torch.cat([a_q, a_q.new_zeros(pad, a_q.shape[1])]) if pad else a_q
    s_pad = torch.cat([a_s, a_s.new_ones(pad, 1)]) if pad else a_s
    b_t = b_q.t()  # (K, N) column-major view: the layout cuBLASLt's int8 path wants

    def run():
        # separate epilogue kernels: int32 -> fp32, * row scale, * column scale, -> bf16
        return (torch._int_mm(a_pad, b_t).float() * s_pad * b_s).to(torch.bfloat16)
    return run


def _fp8_rows(m, k, n, a_s, b_s, dev) -> tuple[str, str]:
    """Table cells (ours fp8 ms, _scaled_mm ms): e4m3 operands, each checked before timing."""
    from archquant.kernels.w8a8_gemm import fp8_gemm, fp8_gemm_reference
    if torch.cuda.get_device_capability() < (8, 9):
        return "n/a (sm_89+)", "n/a"
    g = torch.Generator(device=dev).manual_seed(m + k + n)
    a8 = (torch.randn(m, k, device=dev, generator=g) * 2).to(torch.float8_e4m3fn)
    b8 = (torch.randn(n, k, device=dev, generator=g) * 2).to(torch.float8_e4m3fn)
    want = fp8_gemm_reference(a8, b8, a_s, b_s, out_dtype=torch.bfloat16)
    ours = lambda: fp8_gemm(a8, b8, a_s, b_s, out_dtype=torch.bfloat16)  # noqa: E731
    bad = mismatch(ours(), want, rtol=2e-2, atol_rel=1e-2)  # fast (reduced-precision) accumulation
    if bad:
        print(f"    WRONG: fp8_gemm: {bad}")
    t_ours = None if bad else median_ms(ours)
    # cuBLASLt FP8 with rowwise scales: A (M, K) row-major, B as a column-major (K, N) view.
    scaled = lambda: torch._scaled_mm(a8, b8.t(), scale_a=a_s, scale_b=b_s.view(1, -1),  # noqa: E731
                                      out_dtype=torch.bfloat16, use_fast_accum=True)
    t_scaled = None
    try:
        if mismatch(scaled(), want, rtol=2e-2, atol_rel=1e-2) is None:
            t_scaled = median_ms(scaled)
        else:
            print("    _scaled_mm disagrees with the fp8 reference; not timed")
    except Exception as exc:  # noqa: BLE001 - rowwise scaling is missing on older torch/GPUs
        print(f"    (_scaled_mm rowwise unavailable: {type(exc).__name__})")
    return ("WRONG" if bad else fmt(t_ours)), fmt(t_scaled)


def bench_gemm(dev) -> str:
    from archquant.kernels.w8a8_gemm import w8a8_gemm, w8a8_gemm_reference
    header = ["K x N", "M", "ours int8 ms", "bf16 ms", "_int_mm+epi ms", "ours fp8 ms", "_scaled_mm ms",
              "bf16/ours", "(int_mm+epi)/ours", "_scaled_mm/ours fp8", "target bf16/ours"]
    rows = []
    for k, n in GEMM_KN:
        for m in GEMM_MS:
            print(f"  gemm K={k} N={n} M={m}")
            label = [f"{k} x {n}", str(m)]
            a_q, b_q, a_s, b_s = _gemm_inputs(m, k, n, dev)
            ours = lambda: w8a8_gemm(a_q, b_q, a_s, b_s, out_dtype=torch.bfloat16)  # noqa: E731
            want = w8a8_gemm_reference(a_q, b_q, a_s, b_s, out_dtype=torch.bfloat16)
            bad = mismatch(ours(), want, rtol=8e-3, atol_rel=1e-6)  # exact int32 acc: <= 1 bf16 ulp
            if bad:
                rows.append(wrong_row(label, len(header), f"w8a8_gemm: {bad}"))
                continue
            t_ours = median_ms(ours)
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
            t_bf16 = median_ms(lambda: torch.matmul(x, w.t()))
            int_mm = _int_mm_with_epilogue(a_q, b_q, a_s, b_s, m)
            t_int = None
            try:
                if mismatch(int_mm()[:m], want, rtol=8e-3, atol_rel=1e-6) is None:
                    t_int = try_time(int_mm)
            except Exception as exc:  # noqa: BLE001
                print(f"    (_int_mm unavailable: {type(exc).__name__})")
            c_fp8, c_scaled = _fp8_rows(m, k, n, a_s, b_s, dev)
            target = "-"
            if m >= 2048 and k >= 4096 and n >= 4096:
                target = ">= 1.70x " + ("(met)" if t_bf16 / t_ours >= 1.7 else "(MISSED)")
            rows.append(label + [fmt(t_ours), fmt(t_bf16), fmt(t_int),
                                 c_fp8, c_scaled, ratio(t_bf16, t_ours), ratio(t_int, t_ours),
                                 _cell_ratio(c_scaled, c_fp8), target])
            a_q = b_q = x = w = want = None  # free the GPU buffers (the lambdas above are done with them)
            free_memory()
    notes = ["ours int8 = `w8a8_gemm` with its per-token x per-channel scale epilogue, bf16 out; "
             "bf16 = `torch.matmul(x, w.T)` (cuBLAS); `_int_mm`+epi = `torch._int_mm` then separate "
             "fp32 scale kernels (M padded to 17 where M <= 16); fp8 = e4m3 operands, `fp8_gemm` vs "
             "`torch._scaled_mm` rowwise scales, fast accumulation in both.",
             "Ratios > 1 mean our kernel is faster.  Target: >= 1.7x over bf16 at M >= 2048 for K, N >= 4096."]
    return table("W8A8 / FP8 GEMM", header, rows, notes)


SWEEP_SHAPES = ((2048, 4096, 4096), (8192, 8192, 8192), (2048, 2560, 10240))  # (M, K, N)


def bench_gemm_sweep(dev) -> str:
    """The default large-M config against the alternatives in ``GEMM_SWEEP`` (tuning data)."""
    from archquant.kernels.w8a8_gemm import GEMM_CONFIGS, GEMM_SWEEP, w8a8_gemm, w8a8_gemm_reference
    default = GEMM_CONFIGS[-1][1]
    configs = [("default", default)] + [(f"sweep {i}", c) for i, c in enumerate(GEMM_SWEEP)]
    rows = []
    for m, k, n in SWEEP_SHAPES:
        print(f"  gemm sweep M={m} K={k} N={n}")
        a_q, b_q, a_s, b_s = _gemm_inputs(m, k, n, dev)
        want = w8a8_gemm_reference(a_q, b_q, a_s, b_s, out_dtype=torch.bfloat16)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        t_bf16 = median_ms(lambda: torch.matmul(x, w.t()))
        for name, cfg in configs:
            label = [f"{m} x {k} x {n}", name, " ".join(f"{key}={v}" for key, v in cfg.items())]
            run = lambda: w8a8_gemm(a_q, b_q, a_s, b_s, out_dtype=torch.bfloat16, config=cfg)  # noqa: E731
            try:
                bad = mismatch(run(), want, rtol=8e-3, atol_rel=1e-6)
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is data too
                rows.append(label + [f"fails: {type(exc).__name__}", "-"])
                continue
            if bad:
                rows.append(wrong_row(label, 5, bad))
                continue
            t = median_ms(run)
            rows.append(label + [fmt(t), ratio(t_bf16, t)])
        a_q = b_q = x = w = want = None  # free the GPU buffers
        free_memory()
    return table("W8A8 GEMM config sweep (large M)", ["M x K x N", "config", "blocks", "ms", "bf16/ours"], rows,
                 ["Tuning data for `GEMM_CONFIGS` in archquant/kernels/w8a8_gemm.py (bf16 out).  The default row is what "
                  "the gemm table and the models use."])


# --------------------------------------------------------------------------- 2. hadamard


def _copy_gbps(nbytes_moved: int, dev) -> tuple[float, float]:
    """(ms, GB/s) of a device copy whose read + write traffic is ``nbytes_moved``."""
    src = torch.empty(nbytes_moved // 2, dtype=torch.uint8, device=dev).random_(0, 255)
    dst = torch.empty_like(src)
    t = median_ms(lambda: dst.copy_(src))
    return t, nbytes_moved / t / 1e6


def bench_hadamard(dev) -> str:
    from archquant.core.hadamard import hadamard_matrix
    from archquant.kernels.hadamard_quant import hadamard_quant_int8, hadamard_quant_int8_reference
    from archquant.kernels.quantize import quantize_per_token_int8
    header = ["M", "n", "fused ms", "x@H + quant ms", "x.clone() ms", "3 B/elem copy ms", "fused GB/s",
              "copy GB/s", "% of copy (target >= 80%)", "speedup vs unfused (target >= 3x)"]
    rows = []
    for n in HAD_NS:
        h = hadamard_matrix(n, dtype=torch.bfloat16, device=dev)
        for m in HAD_MS:
            print(f"  hadamard M={m} n={n}")
            label = [str(m), str(n)]
            x = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
            fused = lambda: hadamard_quant_int8(x)  # noqa: E731
            (q, s), (q_ref, s_ref) = fused(), hadamard_quant_int8_reference(x)
            bad = codes_mismatch(q, q_ref) or mismatch(s, s_ref, rtol=1e-2, atol_rel=0)
            if bad:
                rows.append(wrong_row(label, len(header), f"hadamard_quant_int8: {bad}"))
                continue
            t_fused = median_ms(fused)
            t_unfused = median_ms(lambda: quantize_per_token_int8(x @ h))
            t_clone = median_ms(lambda: x.clone())
            moved = 3 * m * n  # fused kernel traffic: read 2 B (bf16) + write 1 B (int8) per element
            t_copy, copy_gbps = _copy_gbps(moved, dev)
            gbps = moved / t_fused / 1e6
            pct = 100 * gbps / copy_gbps
            speed = t_unfused / t_fused
            rows.append(label + [fmt(t_fused), fmt(t_unfused), fmt(t_clone), fmt(t_copy), f"{gbps:.0f}",
                                 f"{copy_gbps:.0f}", f"{pct:.0f}% " + ("(met)" if pct >= 80 else "(MISSED)"),
                                 f"{speed:.2f}x " + ("(met)" if speed >= 3 else "(MISSED)")])
            x = q = q_ref = None  # free the GPU buffers
            free_memory()
    notes = ["fused = `hadamard_quant_int8` (per-token dynamic scales, bf16 input); unfused = bf16 "
             "`x @ H` with the dense normalized matrix, then `quantize_per_token_int8`.",
             "GB/s = (2 + 1) bytes x M x n / time; copy GB/s = the same 3 B/elem of read + write "
             "traffic moved by `dst.copy_(src)` (uint8).  `x.clone()` (4 B/elem) shown for reference."]
    return table("Fused Hadamard + int8 quantization", header, rows, notes)


# --------------------------------------------------------------------------- 3. mamba


def _conv_rows(dev, b, d, l, kw) -> list[list[str]]:
    import torch.nn.functional as F
    from archquant.kernels.mamba_conv1d import quant_causal_conv1d_silu, quant_causal_conv1d_silu_reference
    x_q = torch.randint(-127, 128, (b, d, l), dtype=torch.int8, device=dev)
    w_q = torch.randint(-127, 128, (d, kw), dtype=torch.int8, device=dev)
    w_s = torch.rand(d, device=dev) * 1e-2 + 1e-3
    bias = torch.randn(d, device=dev) * 0.1
    x_s = torch.tensor([0.02], device=dev)
    o_s = torch.tensor([0.01], device=dev)
    ours = lambda: quant_causal_conv1d_silu(x_q, x_s, w_q, w_s, bias, o_s)  # noqa: E731
    bad = codes_mismatch(ours(), quant_causal_conv1d_silu_reference(x_q, x_s, w_q, w_s, bias, o_s))
    label = ["conv1d+SiLU"]
    if bad:
        return [wrong_row(label, 5, f"quant_causal_conv1d_silu: {bad}")]
    t_ours = median_ms(ours)
    x16, w16, b16 = (x_q.half() * 0.02), (w_q.half() * 1e-2)[:, None, :], bias.half()
    t_fp16 = median_ms(lambda: F.silu(F.conv1d(x16, w16, b16, padding=kw - 1, groups=d)[..., :l]))
    rows = [label + ["ours int8 (Triton)", fmt(t_ours), "1.00x", "-"],
            label + ["fp16 F.conv1d + silu", fmt(t_fp16), ratio(t_fp16, t_ours), "-"]]
    try:
        from causal_conv1d import causal_conv1d_fn
        t_cc = try_time(lambda: causal_conv1d_fn(x16, w16[:, 0], b16, activation="silu"))
        rows.append(label + ["fp16 causal_conv1d_fn", fmt(t_cc), ratio(t_cc, t_ours), "-"])
    except ImportError:
        pass
    return rows


def _scan_inputs(dev, b, d, l, n):
    g = torch.Generator(device=dev).manual_seed(0)
    q = lambda *s: torch.randint(-127, 128, s, dtype=torch.int8, device=dev, generator=g)  # noqa: E731
    t = dict(u_q=q(b, d, l), u_scale=0.02, dt_q=q(b, d, l), dt_scale=0.02,
             dt_bias=torch.randn(d, device=dev, generator=g) * 0.5 - 3.0,
             A=-torch.exp(torch.rand(d, n, device=dev, generator=g) * 2),
             B_q=q(b, n, l), B_scale=0.01, C_q=q(b, n, l), C_scale=0.01,
             D=torch.randn(d, device=dev, generator=g), z_q=q(b, d, l), z_scale=0.02)
    # Scales as one-element device tensors: no host->device copy inside the timed call.
    for key in ("u_scale", "dt_scale", "B_scale", "C_scale", "z_scale"):
        t[key] = torch.tensor([t[key]], device=dev)
    return t


def _scan_rows(dev, b, d, l, n) -> list[list[str]]:
    import torch.nn.functional as F
    from archquant.kernels.mamba_scan import quant_selective_scan, quant_selective_scan_reference
    from archquant.models.mamba import selective_scan
    t = _scan_inputs(dev, b, d, l, n)
    ours = lambda: quant_selective_scan(**t, out_dtype=torch.float16)  # noqa: E731
    bad = mismatch(ours(), quant_selective_scan_reference(**t, out_dtype=torch.float16), rtol=1e-2, atol_rel=1e-3)
    label = ["selective scan"]
    if bad:
        return [wrong_row(label, 5, f"quant_selective_scan: {bad}")]
    t_ours = median_ms(ours)
    # Float baselines on the dequantized values, in our model's (b, l, d) layout.
    deq = lambda c, s: (c.float() * s).transpose(1, 2).contiguous()  # noqa: E731
    u, z = deq(t["u_q"], t["u_scale"]), deq(t["z_q"], t["z_scale"])
    dt = F.softplus(deq(t["dt_q"], t["dt_scale"]) + t["dt_bias"])
    Bf, Cf = deq(t["B_q"], t["B_scale"]), deq(t["C_q"], t["C_scale"])
    rows = [label + ["ours int8 in, fp16 out (Triton)", fmt(t_ours), "1.00x", "-"]]
    # The same Triton kernel fed fp16 (the FP16 model's scan on CUDA): isolates what int8 inputs buy.
    from archquant.kernels.mamba_scan import selective_scan_triton
    ch16 = lambda v: v.half().transpose(1, 2)  # noqa: E731 - (b, l, c) fp16 seen as (b, c, l), as the model passes it
    u16, dtr16 = ch16(u), ch16(deq(t["dt_q"], t["dt_scale"]))
    B16, C16, z16 = ch16(Bf), ch16(Cf), ch16(z)
    fp16_kernel = lambda: selective_scan_triton(u16, None, dtr16, None, t["dt_bias"], t["A"], B16, None,  # noqa: E731
                                                C16, None, t["D"], z16, None, out_dtype=torch.float16)
    tk = try_time(fp16_kernel)
    rows.append(label + ["same Triton kernel, fp16 in (FP16 model's scan)", fmt(tk), ratio(tk, t_ours), "-"])
    for name, dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
        args = [v.to(dtype) for v in (u, dt)] + [t["A"]] + [v.to(dtype) for v in (Bf, Cf)]
        zz = z.to(dtype)
        tm = try_time(lambda: selective_scan(*args, D=t["D"]) * F.silu(zz))
        rows.append(label + [f"models.mamba.selective_scan {name} (PyTorch)", fmt(tm), ratio(tm, t_ours), "-"])
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        ch = lambda v: v.transpose(1, 2).contiguous().half()  # noqa: E731 - (b, d|n, l) layout
        u16, dt16, B16, C16, z16 = ch(u), ch(deq(t["dt_q"], t["dt_scale"])), ch(Bf), ch(Cf), ch(z)
        tm = try_time(lambda: selective_scan_fn(u16, dt16, t["A"], B16, C16, t["D"], z16,
                                                t["dt_bias"], delta_softplus=True))
        rows.append(label + ["mamba_ssm selective_scan_fn fp16 (CUDA)", fmt(tm), ratio(tm, t_ours), "-"])
    except ImportError:
        rows.append(label + ["mamba_ssm selective_scan_fn", "not installed", "n/a", "-"])
    return rows


def bench_mamba(dev) -> str:
    b, d, l, n, kw = MAMBA["batch"], MAMBA["d_inner"], MAMBA["seq"], MAMBA["d_state"], MAMBA["d_conv"]
    print(f"  mamba conv1d b={b} d={d} l={l}")
    rows = _conv_rows(dev, b, d, l, kw)
    free_memory()
    print(f"  mamba selective scan b={b} d={d} l={l} n={n}")
    rows += _scan_rows(dev, b, d, l, n)
    free_memory()
    header = ["op", "implementation", "ms", "time / ours", "note"]
    notes = [f"Mamba-2.8B prefill shapes: batch {b}, seq {l}, d_inner {d}, d_state {n}, d_conv {kw}.",
             "time / ours > 1 means our kernel is faster.  The PyTorch scan loops over the sequence in "
             "Python (latency-bound); the fp16 variant still accumulates in fp32 inside."]
    return table("Mamba conv1d and selective scan", header, rows, notes)


# --------------------------------------------------------------------------- 4. w4


def bench_w4(dev) -> str:
    from archquant.kernels.w4a16_gemm import pack_int4, w4a16_gemm, w4a16_gemm_reference
    header = ["K x N", "M", "w4a16 ms (graph)", "bf16 ms (graph)", "bf16/w4a16"]
    rows = []
    for k, n in W4_KN:
        codes = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=dev)
        w_packed = pack_int4(codes)
        scales = (torch.rand(n, k // W4_GROUP, device=dev) * 1e-2 + 1e-3).to(torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        for m in W4_MS:
            print(f"  w4 K={k} N={n} M={m}")
            label = [f"{k} x {n}", str(m)]
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)  # fixed buffer for the graph
            ours = lambda: w4a16_gemm(x, w_packed, scales, W4_GROUP, out=out)  # noqa: E731
            bad = mismatch(ours(), w4a16_gemm_reference(x, w_packed, scales, W4_GROUP), rtol=1e-2, atol_rel=1e-2)
            if bad:
                rows.append(wrong_row(label, len(header), f"w4a16_gemm: {bad}"))
                continue
            t_ours = graph_median_ms(ours)
            t_bf16 = try_time(lambda: torch.matmul(x, w.t()), graph=True)
            rows.append(label + [fmt(t_ours, 4), fmt(t_bf16, 4), ratio(t_bf16, t_ours)])
        codes = w_packed = w = None  # free the GPU buffers
        free_memory()
    notes = [f"bf16 activations, int4 weights with bf16 scales per group of {W4_GROUP}; both sides "
             "replayed from CUDA graphs (decode: launch overhead excluded)."]
    return table("W4A16 decode GEMM", header, rows, notes)


# --------------------------------------------------------------------------- 4b. twin-log LUT GEMM


def _twinlog_weight(n: int, k: int, dev):
    """A W4 twin-log weight fitted to a DiT-like (heavy-tailed) random matrix: packed codes and
    the per-row level table (small search grid: the timing does not depend on the fit)."""
    from archquant.core import formats
    from archquant.core.formats import QuantSpec
    from archquant.core.modules import pack_nibbles
    from archquant.core.twinlog import fit_twinlog
    from archquant.kernels.twinlog_gemm import twinlog_lut

    spec = QuantSpec(format="twinlog", bits=4, granularity="channel", axis=0)
    g = torch.Generator(device=dev).manual_seed(0)
    chi2 = torch.randn(n, k, 4, device=dev, generator=g).pow(2).sum(-1)
    w = 0.02 * torch.randn(n, k, device=dev, generator=g) / torch.sqrt(chi2 / 4)
    params = fit_twinlog(w, spec, etas=(0.0, 0.01, 0.05), percentiles=(0.99, 0.999))
    codes = formats.quantize(w, spec, params)
    return pack_nibbles(codes, signed=False).contiguous(), twinlog_lut(params, spec.bits)


def bench_twinlog(dev) -> str:
    from archquant.kernels.twinlog_gemm import dequantize_twinlog_reference, twinlog_gemm, twinlog_gemm_reference
    header = ["K x N", "M", "twinlog W4 ms (graph)", "fp16 ms (graph)", "fp16/twinlog", "weight bytes vs fp16"]
    rows = []
    for k, n in TLQ_KN:
        w_packed, lut = _twinlog_weight(n, k, dev)
        w16 = dequantize_twinlog_reference(w_packed, lut).to(torch.float16)  # the same weight for cuBLAS
        bytes_ratio = (w_packed.numel() + lut.numel() * lut.element_size()) / (w16.numel() * 2)
        for m in TLQ_MS:
            print(f"  twinlog K={k} N={n} M={m}")
            label = [f"{k} x {n}", str(m)]
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            out = torch.empty(m, n, device=dev, dtype=torch.float16)  # fixed buffer for the graph
            ours = lambda: twinlog_gemm(x, w_packed, lut, out=out)  # noqa: E731
            # fp16 levels (2^-11 relative) and fp32 summation order: far inside 1e-2
            bad = mismatch(ours(), twinlog_gemm_reference(x, w_packed, lut), rtol=1e-2, atol_rel=1e-2)
            if bad:
                rows.append(wrong_row(label, len(header), f"twinlog_gemm: {bad}"))
                continue
            t_ours = graph_median_ms(ours)
            t_fp16 = try_time(lambda: torch.matmul(x, w16.t()), graph=True)
            rows.append(label + [fmt(t_ours, 4), fmt(t_fp16, 4), ratio(t_fp16, t_ours), f"{bytes_ratio:.3f}"])
        w_packed = lut = w16 = None  # free the GPU buffers
        free_memory()
    notes = ["fp16 activations; twin-log W4 weights (LRQ-DiT's TLQ: a sign bit + 3 bits of log2 magnitude, two "
             "codes per byte) with a 16-entry fp32 level table per output row, looked up inside the GEMM; the "
             "baseline multiplies by the same weight dequantized to fp16 (cuBLAS). Both sides replayed from CUDA "
             "graphs. Bytes: packed codes + tables vs the fp16 weight.",
             "Untuned launch defaults (BLOCK_M 16 for M <= 16 else 64, BLOCK_N 32, SUB 32, 4 warps)."]
    return table("Twin-log W4A16 LUT GEMM (DiT-XL/2 shapes)", header, rows, notes)


# --------------------------------------------------------------------------- 5. memory


def bench_memory(dev=None) -> str:
    """Weight bytes only (no GPU work): int8 codes + fp32 per-channel scales vs fp16."""
    dm, di, dr, ds, kw = MAMBA["d_model"], MAMBA["d_inner"], MAMBA["dt_rank"], MAMBA["d_state"], MAMBA["d_conv"]
    # (name, out features, in features): nn.Linear weight (out, in); conv is depthwise (d_inner, k).
    mats = [("in_proj", 2 * di, dm), ("x_proj", dr + 2 * ds, di), ("dt_proj", di, dr),
            ("out_proj", dm, di), ("conv1d", di, kw)]
    rows, tot16, tot8 = [], 0, 0
    for name, out_f, in_f in mats:
        b16 = 2 * out_f * in_f
        b8 = out_f * in_f + 4 * out_f  # int8 codes + one fp32 scale per output channel
        tot16, tot8 = tot16 + b16, tot8 + b8
        rows.append([name, f"{in_f} x {out_f}", f"{b16:,}", f"{b8:,}", f"{b8 / b16:.3f}"])
    r = tot8 / tot16
    rows.append(["**layer total**", "", f"{tot16:,}", f"{tot8:,}", f"**{r:.3f}** " + ("(met)" if r <= 0.52 else "(MISSED)")])
    layers = MAMBA["layers"]
    rows.append([f"x {layers} layers (GiB)", "", f"{tot16 * layers / 2**30:.2f}", f"{tot8 * layers / 2**30:.2f}", f"{r:.3f}"])
    notes = ["Target ratio <= 0.52.  Counted: the listed weight matrices only; biases, A_log, D, norms "
             "and the (tied) embedding stay in floating point and are excluded here."]
    return table("Weight memory: W8A8 int8 vs fp16 (Mamba-2.8B layer)", ["weight", "in x out", "fp16 bytes",
                 "int8 + scales bytes", "ratio"], rows, notes)


# --------------------------------------------------------------------------- driver


BENCHES = {"gemm": bench_gemm, "sweep": bench_gemm_sweep, "hadamard": bench_hadamard, "mamba": bench_mamba, "w4": bench_w4,
           "twinlog": bench_twinlog, "memory": bench_memory}

END_NOTE = ("## End to end\n\n- TPOT / TTFT of a whole Mamba-2.8B-shaped model (W8A8 real vs FP16, CUDA-graph "
            "decode): `python -m archquant.eval.bench_e2e --write eval/results/e2e_h100.md`.\n")


def header_block(argv: list[str]) -> str:
    props = torch.cuda.get_device_properties(0)
    import triton
    cmd = "python -m archquant.eval.bench_gpu " + " ".join(argv)
    return (f"# GPU kernel benchmark\n\n```\n{cmd.strip()}\n```\n\n"
            f"- device: {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)\n"
            f"- torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
            f"python {platform.python_version()}\n"
            f"- {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; medians of "
            f"`triton.testing.do_bench` (rep {REP_MS} ms)\n")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m archquant.eval.bench_gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=SECTIONS, action="append",
                   help="run only this section (repeatable); default: all")
    p.add_argument("--write", type=Path, metavar="PATH", help="also save the markdown (e.g. eval/results/gpu_h100.md)")
    p.add_argument("--rep", type=int, default=REP_MS, help=f"do_bench timing window in ms (default {REP_MS})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    global REP_MS
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    REP_MS = args.rep
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # baselines in their nominal precision
    parts = [header_block(argv)]
    for name in args.only or SECTIONS:
        print(f"[{name}]", flush=True)
        parts.append(BENCHES[name](dev))
        print(parts[-1], flush=True)
    parts.append(END_NOTE)
    text = "\n".join(parts)
    print(END_NOTE)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
