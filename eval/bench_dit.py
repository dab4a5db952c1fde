"""Benchmark of one DiT denoising step: FP vs W8A8 on real int8 kernels, on the CPU or a GPU.

    python -m archquant.eval.bench_dit                       # CPU: DiT-XL/2 shapes and a small DiT (minutes)
    python -m archquant.eval.bench_dit --shapes small --repeats 3   # CPU: seconds
    python -m archquant.eval.bench_dit --write eval/results/dit_cpu.md
    python -m archquant.eval.bench_dit --device cuda --write eval/results/dit_gpu.md   # GPU (H100 / H200)

A step is one ``transformer(x, t, class_labels)`` call on random weights with DiT-XL/2's layout
(hidden 1152 = 16 heads x 72, 28 blocks, 32x32x4 latents in 2x2 patches = 256 tokens, batch 2) or
a small one. Variants are timed interleaved (round-robin over the variants, each round one call
per variant) so that a noisy shared machine slows all of them alike; medians.

CPU (the default):

* fp32: the FP model;
* bf16: the same model cast to bfloat16 (weights and activations);
* W8A8 real: ``rtn_dynamic`` (per-channel int8 weights, per-token dynamic int8 activations) on the
  attention and feed-forward Linears, converted with ``convert_to_real`` (torch's CPU int8 GEMMs);
  embedders, adaLN and the output stay fp32, as the DiT family keeps them.
Correctness first: the W8A8 real output is checked against its fake-quant twin before timing.

CUDA (``--device cuda``; batches 2 and 8 by default), bf16 activations everywhere:

* bf16: the FP model cast to bfloat16 (the baseline of the target, W8A8 >= 1.4x);
* W8A8 real (``rtn_dynamic``): as on the CPU, on the Triton kernels (per-token quantize kernel,
  ``w8a8_gemm``); the Linears the family keeps in FP are cast to bf16 as in the baseline;
* W8A8 real + online Hadamard (``quarot``: a full-width random Hadamard on every quantized input),
  the Hadamard fused into the quantize kernel (``archquant/kernels/hadamard_quant.py``; 1152 =
  36 x 32 and 4608 = 36 x 128 are both supported sizes). The output says in how many Linears.
Correctness first, per variant and batch, before any timing: every int8 Linear's output against
its fake-quant twin module on the same input (the kernels' check, gated), and the whole step
against the fake-quant model and the FP model in fp32 (reported). Timing: CUDA events around each
call, synchronised before it, after warm-up (Triton compiles on the first call); eager calls and,
with ``--cuda-graphs`` (the default, if every variant captures and replays correctly), replays of
one CUDA graph per variant.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from archquant.report import cpu_name

SHAPES = {
    "xl": dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, sample_size=32, in_channels=4,
               out_channels=8, num_embeds_ada_norm=1000, label="DiT-XL/2 (hidden 1152, 28 blocks, 256 tokens)"),
    "small": dict(num_attention_heads=4, attention_head_dim=32, num_layers=4, sample_size=16, in_channels=1,
                  out_channels=1, num_embeds_ada_norm=10, label="small DiT (hidden 128, 4 blocks, 64 tokens)"),
    # the tests' shape: every code path at interpreter speed
    "tiny": dict(num_attention_heads=2, attention_head_dim=32, num_layers=2, sample_size=8, in_channels=1,
                 out_channels=1, num_embeds_ada_norm=10, label="tiny DiT (hidden 64, 2 blocks, 16 tokens)"),
    # Wan 2.1 T2V 1.3B's transformer; a 17-frame 240 x 320 clip: 5 x 30 x 40 latents in 1x2x2 patches = 1500
    # video tokens, 512 text tokens (the pipeline pads to 512); batch 1, as WanPipeline's two calls per step
    "wan": dict(model="wan", num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, latent=(5, 30, 40), text_tokens=512,
                label="Wan 2.1 1.3B (hidden 1536, 30 blocks, 1500 video + 512 text tokens)"),
    "wan_tiny": dict(model="wan", num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                     text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2, latent=(2, 4, 4), text_tokens=8,
                     label="tiny Wan (hidden 32, 2 blocks, 8 video + 8 text tokens)"),
}
#: shape keys that are not constructor arguments
_SHAPE_KEYS = ("model", "label", "latent", "text_tokens")
#: the shapes the issue's GPU target (W8A8 >= 1.4x bf16) is stated for
TARGET_SHAPES = ("xl", "wan")
TARGET_VS_BF16 = 1.4
#: the W8A8 variants of the CUDA benchmark: name -> (preset, label)
W8A8_VARIANTS = {
    "w8a8": ("rtn_dynamic", "W8A8 real (rtn_dynamic)"),
    "w8a8_hadamard": ("quarot", "W8A8 real + online Hadamard (quarot)"),
}
#: an int8 Linear's output vs its fake-quant twin's on the same bf16 input: the twin's bf16
#: rounding of its dequantized operands and output gives ~3e-3 (small DiT, both presets); a wrong
#: scale, layout or rounding in a kernel gives 1e-1 and more
LINEAR_TOL = 2e-2
#: the whole step vs the fake-quant model: errors compound through the blocks (1.7e-2 in fp32 on
#: the CPU at DiT-XL/2, plus bf16 noise), so this only catches a step that is garbage
STEP_TOL = 0.5
#: a graph replay must give the eager call's output (same kernels, same inputs)
GRAPH_TOL = 1e-3


def build(shape: dict, seed: int = 0):
    """A ``DiffusionModel`` of ``shape`` with random weights (no text encoder: the benchmark feeds
    the transformer its inputs directly)."""
    import diffusers

    from archquant.models.dit_loading import DiffusionModel

    cfg = {k: v for k, v in shape.items() if k not in _SHAPE_KEYS}
    torch.manual_seed(seed)
    if shape.get("model") == "wan":
        transformer = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), rope_max_seq_len=1024, **cfg)
        scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True)
    else:
        transformer = diffusers.DiTTransformer2DModel(patch_size=2, **cfg)
        scheduler = diffusers.DDIMScheduler()
    with torch.no_grad():  # diffusers zero-initialises the adaLN-Zero gates: give them signal
        for p in transformer.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return DiffusionModel(transformer.eval(), type(scheduler).__name__, dict(scheduler.config)).eval()


def step_inputs(model, batch: int, seed: int = 0) -> dict:
    """The keyword arguments of one transformer call: noisy latents, timestep, and class labels (DiT)
    or text features (Wan)."""
    cfg = model.transformer.config
    g = torch.Generator().manual_seed(seed)
    t = torch.full((batch,), 500, dtype=torch.long)
    if model.kind == "wan":
        shape = next(s for s in SHAPES.values() if s.get("model") == "wan" and s["num_layers"] == cfg.num_layers
                     and s["text_dim"] == cfg.text_dim)
        f, h, w = shape["latent"]
        return {"hidden_states": torch.randn(batch, cfg.in_channels, f, h, w, generator=g), "timestep": t,
                "encoder_hidden_states": torch.randn(batch, shape["text_tokens"], cfg.text_dim, generator=g)}
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    labels = torch.randint(0, cfg.num_embeds_ada_norm, (batch,), generator=g)
    return {"hidden_states": x, "timestep": t, "class_labels": labels}


def one_step(model, inputs: dict):
    """The calibration forward (and the timed call): one transformer call on ``inputs``."""
    return model.transformer(**inputs).sample


def build_w8a8(fp, preset: str, calib_batch, kernels: str = "auto"):
    """(fake-quant model, its real twin) of ``preset`` on copies of ``fp``, on fp's device. The
    rotation presets calibrate (their rotation step collects input statistics) on ``calib_batch``."""
    import archquant as aq
    from archquant.backends import convert_to_real

    fake = aq.quantize_(copy.deepcopy(fp), preset, family="dit", calib_data=[calib_batch], forward_fn=one_step,
                        progress=False)
    return fake, convert_to_real(copy.deepcopy(fake), kernels=kernels)


def l2rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def bench(shape_name: str, batch: int, repeats: int) -> dict:
    import archquant as aq
    from archquant.backends import convert_to_real

    shape = SHAPES[shape_name]
    fp = build(shape)
    inputs = step_inputs(fp, batch)

    def step(model, dtype=torch.float32):
        with torch.no_grad():
            return one_step(model, moved(inputs, "cpu", dtype)).float()

    # one model at a time beside the FP one (Wan 1.3B is 5 GB in fp32): the fake twin is converted in place
    fake = aq.quantize_(copy.deepcopy(fp), "rtn_dynamic", family="dit", forward_fn=one_step, progress=False)
    ref, out_fake = step(fp), step(fake)
    real = convert_to_real(fake)
    summary = real._archquant_real
    out_real = step(real)
    bf16 = copy.deepcopy(fp).to(torch.bfloat16)
    variants = {"fp32": lambda: step(fp), "bf16": lambda: step(bf16, torch.bfloat16), "w8a8_real": lambda: step(real)}
    for fn in variants.values():  # warm-up
        fn()
    times = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return dict(shape=shape["label"], batch=batch, ms=med, converted=summary["converted"], kept=len(summary["kept"]),
                real_vs_fake=l2rel(out_real, out_fake), fake_vs_fp=l2rel(out_fake, ref), repeats=repeats)


def render(rows: list[dict], command: str) -> str:
    lines = [f"# Diffusion transformer denoising step on CPU: FP32 vs bf16 vs W8A8 real", "", f"`{command}`", "",
             f"- {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu_name()}; "
             f"{torch.get_num_threads()} threads; torch {torch.__version__}; Python {platform.python_version()}",
             "- one transformer call (DiT: latents, timestep, class labels; Wan: latents, timestep, text features), "
             "random weights; medians of interleaved rounds",
             "", "| shape | batch | int8 Linears | fp32 ms | bf16 ms | W8A8 real ms | W8A8 vs fp32 | W8A8 vs bf16 | "
             "real vs fake l2rel | fake vs FP l2rel |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["ms"]
        lines.append(f"| {r['shape']} | {r['batch']} | {r['converted']} ({r['kept']} kept) | {ms['fp32']:.1f} | "
                     f"{ms['bf16']:.1f} | {ms['w8a8_real']:.1f} | {ms['fp32'] / ms['w8a8_real']:.2f}x | "
                     f"{ms['bf16'] / ms['w8a8_real']:.2f}x | {r['real_vs_fake']:.2e} | {r['fake_vs_fp']:.2e} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# CUDA mode (the same code runs on a CPU for the tests: Triton kernels in the interpreter)
# ------------------------------------------------------------------------------------------------


def real_int8_linears(model) -> dict:
    from archquant.backends.linear import RealQuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, RealQuantLinear)}


def fused_hadamard_count(model) -> int:
    """How many real int8 Linears apply their online Hadamard inside the quantize kernel."""
    return sum(m._fused_hadamard() is not None for m in real_int8_linears(model).values())


def cast_fp_parts(model, dtype: torch.dtype):
    """Cast the floating-point parameters and buffers to ``dtype``, except inside the real int8
    Linears: their fp32 weight scales (and bias, Hadamard signs) are what the kernels read, and
    ``Module.to(dtype)`` would round the scales to bf16. The bf16 baseline is cast with this
    same function (it has no real Linear: everything goes to ``dtype``)."""
    real_parts = {id(sub) for m in real_int8_linears(model).values() for sub in m.modules()}
    for module in model.modules():
        if id(module) in real_parts:
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point():
                module._buffers[name] = b.to(dtype)
    return model


@dataclass
class W8A8Variant:
    """A W8A8 variant while it is checked: the real model (timed) and its fake-quant twin."""

    name: str
    preset: str
    label: str
    fake: torch.nn.Module
    real: torch.nn.Module
    converted: int
    kept: int
    fused: int = 0  # Linears with the Hadamard fused into the quantize kernel
    hadamard: int = 0  # Linears with any online transform


def build_variants(shape_name: str, kernels: str = "auto", names=tuple(W8A8_VARIANTS)):
    """The FP model (fp32) and the W8A8 variants ``names`` (of ``W8A8_VARIANTS``) of one shape,
    built on the CPU: the core's rotation step keeps its statistics and factors on the CPU, so
    quantizing there is the path that works for every preset (quarot at DiT-XL/2 is the slow
    one: 223 s on 2 slow cores, mostly float64 products of 4608 x 4608 matrices). The caller
    moves them to the device."""
    fp = build(SHAPES[shape_name])
    calib_batch = step_inputs(fp, 2, seed=1)  # not the timed inputs (seed 0)
    variants = {}
    for name in names:
        preset, label = W8A8_VARIANTS[name]
        t0 = time.perf_counter()
        fake, real = build_w8a8(fp, preset, calib_batch, kernels)
        summary = real._archquant_real
        v = W8A8Variant(name, preset, label, fake, real, summary["converted"], len(summary["kept"]))
        v.fused = fused_hadamard_count(real)
        v.hadamard = sum(m.input_transform is not None for m in real_int8_linears(real).values())
        variants[name] = v
        log(f"  {name} ({preset}): {v.converted} int8 Linears, {v.kept} kept, online transforms {v.hadamard}, "
            f"fused Hadamard {v.fused}; {time.perf_counter() - t0:.0f} s")
    return fp, variants


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call_ms(fn, device: torch.device) -> float:
    """ms of one call: CUDA events around it on a GPU (idle gaps while the host launches
    count, as a user waits for them), the host clock on a CPU; synchronised before."""
    synchronize(device)
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def capture_all(steps: dict) -> tuple[dict, str]:
    """One graph per step, each replay checked against an eager call; all or none: ({}, why)
    when any step cannot be captured or replays differently (so every variant is timed alike)."""
    from archquant.eval.bench_gpu import capture_graph

    graphs = {}
    try:
        for name, fn in steps.items():
            graph, out = capture_graph(fn)
            graph.replay()
            diff = l2rel(out.float(), fn().float())
            if not diff <= GRAPH_TOL:
                return {}, f"{name}: replay differs from the eager call by {diff:.1e}"
            graphs[name] = graph
    except Exception as exc:  # noqa: BLE001 - a variant that cannot be captured falls back to eager for all
        return {}, f"{name}: capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    return graphs, ""


@torch.no_grad()
def per_linear_error(real, fake, batch) -> tuple[torch.Tensor, float]:
    """(the real model's step output, the largest relative L2 over its int8 Linears between the
    Linear's output and its fake-quant twin module's on the same input). Per Linear, not per
    step: through 28 random-weight blocks one-code differences compound. The twin runs in the
    input's dtype (bf16), as the real Linear does: it rounds the rotated activations to bf16
    before quantizing them as the fused kernel does (an fp32 twin would not: ~6% of the codes
    one apart, 6.5e-3), and its dequantized operands and output to bf16 (~3e-3 in all)."""
    return int8_linears_vs_twins(real, fake, lambda m: one_step(m, batch))


@torch.no_grad()
def int8_linears_vs_twins(real, fake, run):
    """(``run(real)``, the largest relative L2 over ``real``'s int8 Linears between each Linear's
    output and its fake-quant twin module's (``fake``'s module of the same name) on the same input)."""
    fakes = dict(fake.named_modules())
    worst = [0.0]

    def hook(name):
        def check(module, args, out):
            err = l2rel(out, fakes[name](args[0])) if torch.isfinite(out).all() else float("inf")
            worst[0] = max(worst[0], err)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in real_int8_linears(real).items()]
    try:
        out = run(real)
    finally:
        for h in handles:
            h.remove()
    return out, worst[0]


def moved(inputs: dict, device, dtype) -> dict:
    """``inputs`` on ``device``, their floating tensors in ``dtype``."""
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}


@dataclass
class DeviceRow:
    shape: str
    shape_name: str
    batch: int
    variant: str
    label: str
    int8_linears: str = "-"
    per_linear: float | None = None
    vs_fake: float | None = None
    vs_fp32: float | None = None
    ok: bool = True
    eager_ms: float | None = None
    graph_ms: float | None = None
    wrong: str = ""  # why the correctness check failed (then the row is not timed)


@torch.no_grad()
def check_variants(fp, variants: dict, shape_name: str, batches: list[int], device: torch.device):
    """Correctness first, on ``device``: per batch the FP fp32 reference and each fake twin's
    output, then everything cast to bf16 activations (the FP model becomes the bf16 baseline)
    and each real model checked. Returns (bf16 model, {name: real model}, rows)."""
    shape = SHAPES[shape_name]
    inputs = {b: step_inputs(fp, b) for b in batches}
    fp = fp.to(device)
    ref = {b: one_step(fp, moved(inputs[b], device, torch.float32)).float() for b in batches}
    fake_out = {}
    for name, v in variants.items():
        v.fake.to(device)
        fake_out[name] = {b: one_step(v.fake, moved(inputs[b], device, torch.float32)).float() for b in batches}
    bf16 = cast_fp_parts(fp, torch.bfloat16)
    reals = {name: cast_fp_parts(v.real.to(device), torch.bfloat16) for name, v in variants.items()}
    rows = []
    for b in batches:
        x16 = moved(inputs[b], device, torch.bfloat16)
        out = one_step(bf16, x16).float()
        row = DeviceRow(shape["label"], shape_name, b, "bf16", "bf16", vs_fp32=l2rel(out, ref[b]))
        row.ok = bool(torch.isfinite(out).all())
        row.wrong = "" if row.ok else "WRONG: non-finite output; not timed"
        rows.append(row)
        for name, v in variants.items():
            out, worst = per_linear_error(reals[name], v.fake, x16)
            out = out.float()
            row = DeviceRow(shape["label"], shape_name, b, name, v.label, per_linear=worst,
                            vs_fake=l2rel(out, fake_out[name][b]), vs_fp32=l2rel(out, ref[b]))
            row.int8_linears = f"{v.converted} ({v.kept} kept)"
            if v.hadamard:
                row.int8_linears += f"; Hadamard fused in {v.fused} of {v.hadamard}"
            row.ok = worst <= LINEAR_TOL and row.vs_fake <= STEP_TOL
            if not row.ok:
                row.wrong = (f"WRONG: per-Linear {worst:.1e} (limit {LINEAR_TOL}), step vs fake {row.vs_fake:.1e} "
                             f"(limit {STEP_TOL}); not timed")
                log(f"  {name} batch {b}: {row.wrong}")
            rows.append(row)
    for v in variants.values():
        v.fake = None  # the twins are not timed: free them
    return bf16, reals, rows


def time_batch(models: dict, inputs, device: torch.device, repeats: int, graphs: bool):
    """Median ms per call of each model on ``inputs``: ({name: eager ms}, {name: graph ms} or {},
    a note on the graphs). Interleaved rounds; each round times every model once (and replays
    its graph once)."""
    steps = {name: (lambda m=m: one_step(m, inputs)) for name, m in models.items()}
    for fn in steps.values():  # warm-up: Triton compiles, the allocator and cuBLAS settle
        for _ in range(3):
            fn()
    replays, note = {}, ""
    if graphs and device.type == "cuda":
        replays, why = capture_all(steps)
        note = "CUDA graphs used" if replays else f"CUDA graphs not used ({why})"
    eager = {name: [] for name in steps}
    graph = {name: [] for name in replays}
    for _ in range(repeats):
        for name, fn in steps.items():
            eager[name].append(time_call_ms(fn, device))
            if replays:
                graph[name].append(time_call_ms(replays[name].replay, device))
    median = lambda times: {k: statistics.median(v) for k, v in times.items()}  # noqa: E731
    return median(eager), median(graph), note


@torch.no_grad()
def time_rows(models: dict, rows: list[DeviceRow], batches: list[int], device: torch.device, repeats: int,
              graphs: bool) -> list[str]:
    """Fill in the rows' eager (and graph) ms, batch by batch, timing only the variants that
    passed the correctness check. Returns notes on the graphs."""
    notes = []
    for b in batches:
        timed = {r.variant: r for r in rows if r.batch == b and r.ok}
        inputs = moved(step_inputs(models["bf16"], b), device, torch.bfloat16)
        eager, graph, note = time_batch({name: models[name] for name in timed}, inputs, device, repeats, graphs)
        for name, row in timed.items():
            row.eager_ms, row.graph_ms = eager[name], graph.get(name)
        if note:
            notes.append(f"batch {b}: {note}")
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the graphs' memory pools go with them
    return notes


def hadamard_note(v: W8A8Variant) -> str:
    return f"{v.label}: online Hadamard fused into the quantize kernel in {v.fused} of {v.converted} int8 Linears"


def bench_device(shape_name: str, batches: list[int], device: torch.device, repeats: int, graphs: bool = True,
                 kernels: str = "auto", names=tuple(W8A8_VARIANTS)) -> tuple[list[DeviceRow], list[str]]:
    """The CUDA benchmark of one shape: build (CPU), check, time. On a CPU (tests) with
    ``kernels="triton"`` the same code runs the Triton kernels in the interpreter."""
    t0 = time.perf_counter()
    log(f"[dit] {shape_name}: building FP and W8A8 models on the CPU")
    fp, variants = build_variants(shape_name, kernels, names)
    log(f"[dit] {shape_name}: built in {time.perf_counter() - t0:.0f} s; correctness on {device}")
    bf16, reals, rows = check_variants(fp, variants, shape_name, batches, device)
    notes = [hadamard_note(v) for v in variants.values() if v.hadamard]
    if reals:  # which kernels the int8 Linears chose for this device's tensors ("triton" or "torch")
        sample = next(iter(real_int8_linears(next(iter(reals.values()))).values()))
        notes.append(f"int8 Linears' kernel path for {device.type} tensors: "
                     f"{sample._path(torch.empty(1, device=device))}")
    log(f"[dit] {shape_name}: checked ({time.perf_counter() - t0:.0f} s); timing")
    notes += time_rows({"bf16": bf16, **reals}, rows, batches, device, repeats, graphs)
    log(f"[dit] {shape_name}: done in {time.perf_counter() - t0:.0f} s")
    return rows, notes


def fmt_ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def fmt_err(v: float | None) -> str:
    return "-" if v is None else f"{v:.2e}"


def speedup(base: float | None, ours: float | None) -> str:
    return "n/a" if base is None or ours is None else f"{base / ours:.2f}x"


def verdict(row: DeviceRow, base: DeviceRow | None, smoke: bool) -> str:
    """The target on the W8A8 rows of DiT-XL/2 and Wan 1.3B: on graph replays where timed, else eager."""
    if row.variant == "bf16" or base is None:
        return "-"
    if smoke:
        return "smoke run: no target"
    if row.shape_name not in TARGET_SHAPES:
        return "-"
    mode = "graph" if row.graph_ms is not None and base.graph_ms is not None else "eager"
    ours, ref = (row.graph_ms, base.graph_ms) if mode == "graph" else (row.eager_ms, base.eager_ms)
    if ours is None or ref is None:
        return "not timed"
    ratio = ref / ours
    return f"{'met' if ratio >= TARGET_VS_BF16 else 'MISSED'} ({mode} {ratio:.2f}x, target >= {TARGET_VS_BF16}x)"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB), "
                f"CUDA {torch.version.cuda}")
    return f"{cpu_name()} (no GPU: the CUDA code path as a smoke run; timings not meaningful)"


def render_device(rows: list[DeviceRow], notes: list[str], command: str, device: torch.device, repeats: int,
                  graphs: bool) -> str:
    import triton

    smoke = device.type != "cuda"
    graph_note = ("eager calls and CUDA-graph replays (one graph per variant and batch, all or none)" if graphs
                  else "eager calls only (--no-cuda-graphs)")
    header = ["shape", "batch", "variant", "int8 Linears", "eager ms", "graph ms", "vs bf16 eager", "vs bf16 graph",
              "per-Linear real vs fake (max l2rel)", "step real vs fake l2rel", "step vs FP32 l2rel", "target"]
    lines = [f"# DiT denoising step on {'CUDA' if not smoke else 'CPU (CUDA code path)'}: bf16 vs W8A8 real",
             "", f"`{command}`", "",
             f"- device: {device_name(device)}",
             f"- torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}; "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             "- one `transformer(x, t, class_labels)` call, random weights, bf16 activations; W8A8: int8 attention "
             "and feed-forward Linears (Triton per-token quantize + `w8a8_gemm`), embedders / adaLN / output in "
             "bf16 as in the baseline",
             f"- timing: {graph_note}; CUDA events around each call, synchronised before it, after 3 warm-up "
             f"calls; medians of {repeats} interleaved rounds",
             f"- correctness first: per-Linear limit {LINEAR_TOL}, whole step vs its fake twin limit {STEP_TOL} "
             "(errors compound through the blocks); a variant that fails is not timed",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = {r.batch: r for r in rows if r.variant == "bf16"}
    for r in rows:
        b = base.get(r.batch)
        vs_eager = "-" if r.variant == "bf16" else speedup(b and b.eager_ms, r.eager_ms)
        vs_graph = "-" if r.variant == "bf16" else speedup(b and b.graph_ms, r.graph_ms)
        target = r.wrong or verdict(r, b, smoke)
        lines.append(f"| {r.shape} | {r.batch} | {r.label} | {r.int8_linears} | {fmt_ms(r.eager_ms)} | "
                     f"{fmt_ms(r.graph_ms)} | {vs_eager} | {vs_graph} | {fmt_err(r.per_linear)} | "
                     f"{fmt_err(r.vs_fake)} | {fmt_err(r.vs_fp32)} | {target} |")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(prog="python -m archquant.eval.bench_dit", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: fp32 / bf16 / W8A8 on torch's int8 ops; cuda: bf16 / W8A8 / W8A8 + Hadamard on Triton")
    p.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES),
                   help="default: xl small on the CPU, xl on CUDA")
    p.add_argument("--batch", nargs="+", type=int, default=None, help="default: 2 on the CPU, 2 8 on CUDA")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5 on the CPU, 30 on CUDA)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--variants", nargs="+", choices=list(W8A8_VARIANTS), default=list(W8A8_VARIANTS),
                   help="CUDA: the W8A8 variants beside bf16 (default all; quarot's build is the slow part)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA: also time CUDA-graph replays (default on; off for all if any variant fails)")
    p.add_argument("--write", help="also write the table to this file (markdown)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.shapes = args.shapes or (["xl"] if cuda else ["xl", "small"])
    args.batch = args.batch or ([2, 8] if cuda else [2])
    args.repeats = args.repeats or (30 if cuda else 5)
    return args


def refusal(args) -> str | None:
    """One line saying why this run cannot start here, or None."""
    import importlib.util

    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda but no CUDA device is available"
    if importlib.util.find_spec("diffusers") is None:
        return ("the DiT benchmark needs diffusers, which is not installed (on a device machine: carry its wheel, "
                "see eval/gpu_session.sh)")
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    why = refusal(args)
    if why:
        print(f"archquant: error: {why}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    command = ("python -m archquant.eval.bench_dit " + " ".join(argv)).strip()
    if args.device == "cuda":
        table = run_cuda(args, command)
    else:
        table = run_cpu(args, command)
    print(table)
    if args.write:
        from pathlib import Path

        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(table)
    return 0


def run_cpu(args, command: str) -> str:
    rows = []
    for name in args.shapes:
        for batch in args.batch:
            t0 = time.perf_counter()
            rows.append(bench(name, batch, args.repeats))
            print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return render(rows, command)


def run_cuda(args, command: str) -> str:
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references in full precision
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")
    rows, notes = [], []
    for name in args.shapes:
        r, n = bench_device(name, args.batch, device, args.repeats, args.cuda_graphs, names=args.variants)
        rows += r
        notes += n
        torch.cuda.empty_cache()
    return render_device(rows, notes, command, device, args.repeats, args.cuda_graphs)


if __name__ == "__main__":
    sys.exit(main())
