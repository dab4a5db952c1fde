"""End-to-end Mamba generation benchmark: W8A8 (Quamba, real int8 kernels) vs FP16, same framework.

    python -m archquant.eval.bench_e2e --write eval/results/e2e_h100.md     # GPU, Mamba-2.8B shapes
    python -m archquant.eval.bench_e2e --tiny                               # CPU smoke run (interpreter)

Both models are ours (``models/mamba.py``), batch 1, random weights (timing does not depend on
the values; the scales come from a short calibration, so the int8 model computes what a real
Quamba model computes). FP16: the FP model in fp16, its RMSNorm, conv1d+SiLU and selective scan
on the same Triton kernels as the int8 model (fed fp16, no quantization; prefill and decode-step
variants, as mamba_ssm has), cuBLAS GEMMs. W8A8: ``quantize_(model,
"quamba")`` then ``convert_to_real`` (int8 GEMMs with fused epilogues, fused Hadamard+quantize,
int8 conv1d and scan with fp32 state, int8 conv state).

Measured, in this order, on one device in one run:
1. correctness: the real int8 model's prompt logits against its fake-quant twin (relative error)
   and against FP16 (the quantization error itself); a failed check stops the run;
2. TTFT: prefill of the prompt with a fresh cache + argmax of the last logits (median of runs,
   synchronised wall clock);
3. TPOT: one decode step (one token in, logits out, states updated in place) replayed from a
   CUDA graph (median of replays, CUDA events); the eager step is reported beside it;
4. weight memory: bytes of every parameter and buffer, whole model and mixers only.
Targets (issue 5, H100): TPOT >= 1.6x, TTFT (1024 tokens) >= 1.5x, mixer weights <= 0.52x of FP16.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

# Mamba-2.8B (state-spaces/mamba-2.8b): d_model 2560, 64 layers, d_state 16, expand 2, d_conv 4,
# dt_rank 160, vocabulary 50280 (padded to 50280 in the HF config)
FULL = dict(hidden_size=2560, num_layers=64, vocab_size=50280, state_size=16, expand=2, conv_kernel=4, dt_rank=160)
TINY = dict(hidden_size=64, num_layers=2, vocab_size=256, state_size=16, expand=2, conv_kernel=4)
TARGETS = {"TPOT": 1.6, "TTFT": 1.5, "memory": 0.52}


def build_models(shape: dict, dtype: torch.dtype, device: torch.device, calib_tokens: int, kernels: str):
    """(FP model, real W8A8 model, fake-quant twin) on ``device``; the fake twin is returned for the
    correctness check and dropped by the caller afterwards."""
    import archquant as aq
    from archquant.models.mamba import MambaConfig, MambaLM, init_mamba_weights
    from archquant.backends import convert_to_real
    from archquant.backends.fused import apply_fused_kernels

    cfg = MambaConfig(arch="mamba1", tie_embeddings=True, **shape)
    torch.manual_seed(0)
    with torch.device(device):  # build and initialise on the device (2.8B parameters: minutes on a CPU)
        fp = init_mamba_weights(MambaLM(cfg), seed=0)
    fp = fp.to(dtype=dtype).eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, cfg.vocab_size, (1, calib_tokens), generator=g).to(device)]
    fake = copy.deepcopy(fp)
    aq.quantize_(fake, "quamba", calib_data=calib, family="mamba", progress=False)
    real = convert_to_real(copy.deepcopy(fake), kernels=kernels)
    # FP parts (the FP model; the real model's final norm) on the same Triton kernels; the fake twin,
    # the correctness reference, stays plain PyTorch
    apply_fused_kernels(fp, kernels)
    apply_fused_kernels(real, kernels)
    info = real._archquant_real
    if info["kept"] or len(info["blocks"]) != cfg.num_layers:
        raise RuntimeError(f"not every mixer went real: {info}")
    return fp, real, fake


def weight_bytes(model: torch.nn.Module, mixers_only: bool = False) -> int:
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if mixers_only and ".mixer." not in name:
            continue
        total += t.numel() * t.element_size()
    return total


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_ttft(model, prompt: torch.Tensor, reps: int) -> float:
    """Median ms of: fresh cache, prefill, argmax of the last position."""
    dev = prompt.device
    times = []
    for i in range(reps + 1):
        sync(dev)
        t0 = time.perf_counter()
        cache = model.new_cache()
        nxt = model(prompt, cache=cache)[:, -1].argmax(-1)
        nxt.cpu()  # the token is on the host, as a generation loop needs it
        t1 = time.perf_counter()
        if i:  # the first run warms up (Triton compiles, cuBLAS picks algorithms)
            times.append((t1 - t0) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def prefilled_step(model, prompt: torch.Tensor):
    """A cache filled by the prompt and a decode-step function on fixed buffers (graph-capturable)."""
    cache = model.new_cache()
    logits = model(prompt, cache=cache)
    token = logits[:, -1:].argmax(-1)  # (1, 1) input buffer, reused by every step

    def step():
        return model(token, cache=cache)

    step.cache = cache  # the state tensors a captured graph updates in place
    return step


def _snapshot(cache) -> list[torch.Tensor]:
    return [t.clone() for st in cache.layers for t in (st.conv_state, st.ssm_state)]


def _restore(cache, saved: list[torch.Tensor]) -> None:
    tensors = [t for st in cache.layers for t in (st.conv_state, st.ssm_state)]
    for t, v in zip(tensors, saved):
        t.copy_(v)


@torch.no_grad()
def time_tpot_eager(step, device: torch.device, reps: int) -> float:
    times = []
    for i in range(reps + 3):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def time_tpot_graph(step, reps: int) -> tuple[float | None, float]:
    """(median ms of one replay of a CUDA graph holding one decode step, relative difference
    between the replay's logits and an eager step from the same state). Launch overhead is
    excluded, as in a graph-captured generation loop; a replay that does not reproduce the eager
    step (rel. difference > 1e-3) is not timed (None)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compile / autotune outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    saved = _snapshot(step.cache)
    graph.replay()
    replayed = out.float().clone()
    _restore(step.cache, saved)
    diff = rel_err(replayed, step().float())
    if not diff <= 1e-3:
        return None, diff
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), diff


def fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def ratio(fp: float | None, q: float | None) -> str:
    return "n/a" if fp is None or q is None else f"{fp / q:.2f}x"


SMOKE = False  # --tiny: the numbers only show that the pipeline runs; no target applies


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    if SMOKE:
        return "smoke run: no target"
    ok = value >= target if higher_is_better else value <= target
    return f"{'met' if ok else 'MISSED'} (target {'>=' if higher_is_better else '<='} {target})"


def run(args) -> str:
    global SMOKE
    SMOKE = args.tiny
    device = torch.device(args.device)
    tiny = args.tiny
    shape = TINY if tiny else FULL
    dtype = getattr(torch, args.dtype)
    prompt_len = args.prompt
    print(f"[e2e] building models ({'tiny' if tiny else 'Mamba-2.8B'} shapes, {args.dtype}, {device})", flush=True)
    fp, real, fake = build_models(shape, dtype, device, args.calib_tokens, args.kernels)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, shape["vocab_size"], (1, prompt_len), generator=g).to(device)

    print("[e2e] correctness", flush=True)
    with torch.no_grad():
        lf, lq, lr = fp(prompt).float(), fake(prompt).float(), real(prompt).float()
    real_vs_fake, quant_err = rel_err(lr, lq), rel_err(lq, lf)
    top1 = (lr[0].argmax(-1) == lq[0].argmax(-1)).float().mean().item()
    del fake, lf, lq, lr
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not real_vs_fake <= max(1e-2, 0.1 * quant_err):
        raise RuntimeError(f"real int8 model disagrees with its fake-quant twin: rel. error {real_vs_fake:.2e} "
                           f"(quantization error {quant_err:.2e}); not timing a wrong model")

    rows = []
    print("[e2e] TTFT", flush=True)
    ttft = {name: time_ttft(m, prompt, args.reps) for name, m in (("fp", fp), ("w8a8", real))}
    rows.append([f"TTFT, prefill {prompt_len} tokens (ms)", fmt(ttft["fp"]), fmt(ttft["w8a8"]),
                 ratio(ttft["fp"], ttft["w8a8"]), verdict(ttft["fp"] / ttft["w8a8"], TARGETS["TTFT"])])
    print("[e2e] TPOT", flush=True)
    graph_diff: dict[str, float] = {}
    steps = {name: prefilled_step(m, prompt) for name, m in (("fp", fp), ("w8a8", real))}
    if device.type == "cuda" and not args.no_graph:
        graphs = {name: time_tpot_graph(s, args.reps * 10) for name, s in steps.items()}
        tpot = {name: t for name, (t, _) in graphs.items()}
        graph_diff = {name: d for name, (_, d) in graphs.items()}
        if None in tpot.values():
            bad = ", ".join(f"{k} {v:.1e}" for k, v in graph_diff.items())
            rows.append(["TPOT, decode step, CUDA graph (ms)", "WRONG", "WRONG", "-",
                         f"graph replay differs from the eager step ({bad}); not timed"])
        else:
            rows.append(["TPOT, decode step, CUDA graph (ms)", fmt(tpot["fp"], 4), fmt(tpot["w8a8"], 4),
                         ratio(tpot["fp"], tpot["w8a8"]), verdict(tpot["fp"] / tpot["w8a8"], TARGETS["TPOT"])])
    eager = {name: time_tpot_eager(s, device, args.reps) for name, s in steps.items()}
    rows.append(["decode step, eager (ms)", fmt(eager["fp"], 4), fmt(eager["w8a8"], 4),
                 ratio(eager["fp"], eager["w8a8"]), "-"])
    mem_all = (weight_bytes(fp), weight_bytes(real))
    mem_mix = (weight_bytes(fp, True), weight_bytes(real, True))
    rows.append(["weights, mixers (MiB)", fmt(mem_mix[0] / 2**20, 1), fmt(mem_mix[1] / 2**20, 1),
                 f"{mem_mix[1] / mem_mix[0]:.3f} of FP", verdict(mem_mix[1] / mem_mix[0], TARGETS["memory"], False)])
    rows.append(["weights, whole model (MiB)", fmt(mem_all[0] / 2**20, 1), fmt(mem_all[1] / 2**20, 1),
                 f"{mem_all[1] / mem_all[0]:.3f} of FP", "embedding / LM head stay FP"])

    header = ["measure", f"FP ({args.dtype})", "W8A8 real", "FP / W8A8", "target"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    checks = (f"- correctness first: real int8 vs fake-quant twin, prompt logits: rel. error {real_vs_fake:.2e}, "
              f"top-1 agreement {top1:.4f}; fake-quant vs FP (the quantization error): {quant_err:.2e}")
    if graph_diff:
        checks += ("\n- CUDA-graph replay vs eager decode step from the same state, logits rel. difference: "
                   + ", ".join(f"{k} {v:.1e}" for k, v in graph_diff.items()))
    return "\n".join(lines) + "\n\n" + checks + "\n"


def header_block(argv: list[str], args) -> str:
    import triton
    if args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        dev = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    else:
        how = "Triton kernels in the interpreter" if args.kernels == "triton" else "torch CPU int8 ops"
        dev = f"CPU ({platform.processor() or platform.machine()}), {how}; timings not meaningful"
    cmd = "python -m archquant.eval.bench_e2e " + " ".join(argv)
    shape = TINY if args.tiny else FULL
    return (f"# End-to-end Mamba generation: W8A8 real vs FP\n\n```\n{cmd.strip()}\n```\n\n"
            f"- device: {dev}\n- torch {torch.__version__}, triton {triton.__version__}, "
            f"python {platform.python_version()}\n"
            f"- {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; batch 1; shapes {shape}; "
            f"prompt {args.prompt} tokens; medians of {args.reps} runs (TTFT, eager step) / "
            f"{args.reps * 10} graph replays (TPOT)\n")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m archquant.eval.bench_e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny model (smoke run; on a CPU with TRITON_INTERPRET=1)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"),
                   help="FP model dtype (default float16 on CUDA, float32 on a CPU)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 1024; 16 with --tiny)")
    p.add_argument("--reps", type=int, default=None, help="timed runs (default 10; 2 with --tiny)")
    p.add_argument("--calib-tokens", type=int, default=256, help="calibration tokens for the static scales")
    p.add_argument("--kernels", default="auto", choices=("auto", "triton"),
                   help="real backend kernels (triton on a CPU: the interpreter)")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph decode timing")
    p.add_argument("--write", type=Path, metavar="PATH", help="also save the markdown table")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    args.prompt = args.prompt or (16 if args.tiny else 1024)
    args.reps = args.reps or (2 if args.tiny else 10)
    if args.tiny:
        args.calib_tokens = min(args.calib_tokens, 32)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("archquant: error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if not args.device.startswith("cuda") and not args.tiny:
        print("archquant: error: the Mamba-2.8B benchmark needs a GPU; use --tiny for a CPU smoke run",
              file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    text = header_block(argv, args) + "\n" + run(args)
    print(text)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
