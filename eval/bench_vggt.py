"""Benchmark of VGGT's aggregator: FP32 vs bf16 vs W8A8 on real int8 kernels, on the CPU or a GPU.

    python -m archquant.eval.bench_vggt                                  # CPU: VGGT-1B, 4 frames at 518 px (long)
    python -m archquant.eval.bench_vggt --blocks 2 --frames 2 --image-size 224 --repeats 3   # CPU: a minute
    python -m archquant.eval.bench_vggt --shapes tiny                    # the tests' shape
    python -m archquant.eval.bench_vggt --write eval/results/vggt_cpu.md
    python -m archquant.eval.bench_vggt --device cuda --write eval/results/vggt_gpu.md   # GPU: 10 frames at 518 px

One call is ``Aggregator(images)`` (``archquant.models.vggt.aggregator``) on a batch of one
scene of S frames, random weights, VGGT-1B's layout: hidden 1024, 16 heads, MLP 4096, 24 frame
blocks and 24 global blocks alternating (frame blocks attend over (S, P, C), global ones over
(1, S*P, C)), and the DINOv2 ViT-L/14 patch embedder with 4 registers (24 blocks); at 518 px a
frame is 37 x 37 = 1369 patches + 1 camera + 4 register tokens = 1374 tokens. The weights are
random (VGGT's checkpoint is not available here; timing does not depend on the values), the
LayerScale gammas set to 1 (VGGT initialises them at 0.01: the blocks would barely change the
tokens and the correctness check could not see a wrong block).

``--blocks N`` builds the first N frame+global pairs and, unless ``--dino-blocks`` says
otherwise, the first N of DINOv2's 24 blocks too: the full model's proportions (a DINOv2 block
costs about what a frame block does, on as many tokens), so the ratios approximate the full
model's while a call takes about N/24 of the time. The report says what was timed.

CPU (the default; ``--threads``, default 2):

* fp32: the FP model;
* bf16: the same model cast to bfloat16 (weights and activations, the patch embedder included);
* W8A8 real: ``rtn_dynamic`` (per-channel int8 weights, per-token dynamic int8 activations) on
  the Linears of the frame and global blocks (attn.qkv, attn.proj, mlp.fc1, mlp.fc2), converted
  with ``convert_to_real`` (``archquant/kernels/cpu_int8.py``: oneDNN's prepacked int8 GEMM from
  M = 64 rows on, and a call has S*P rows); everything else (the DINOv2 patch embedder, norms,
  attention, RoPE) stays fp32;
* (``--variants ... w8a8_bf16``) the W8A8 real model with everything but its int8 Linears cast
  to bf16, as on a GPU: not in the default set;
* (``--variants ... w8a8_pe``) W8A8 real with the DINOv2 embedder's Linears on int8 too (a run's
  ``model.options.quantize_also``; outside the paper's scope, so its accuracy cost is the user's to
  check on their data): not in the default set.
The script times the aggregator alone, so it describes its quantized Linears itself (a
``ModelStructure`` with the VGGT adapter's list) and passes it with the preset's ``Recipe`` to ``quantize_``.
The patch embedder is also timed on its own (fp32 and bf16; W8A8 runs the fp32 one): its share
of the total, and the ratios of the alternating blocks alone (total minus patch embed), are
reported below the table. Target: W8A8 >= 1.5x FP32 (printed for the 1b shape).

CUDA (``--device cuda``; 10 frames by default), bf16 activations everywhere, as
``bench_dit --device cuda``:

* bf16: the FP model cast to bfloat16 (the baseline of the target, W8A8 >= 1.5x bf16);
* W8A8 real: as on the CPU, on the Triton kernels (per-token quantize kernel, ``w8a8_gemm``);
  everything outside the int8 Linears (the patch embedder too) cast to bf16 as in the baseline.
Models are built and quantized on the device (``rtn_dynamic`` calibrates nothing). Timing: CUDA
events around each call after warm-up; eager calls and, with ``--cuda-graphs`` (default, all
variants or none), CUDA-graph replays.

Correctness first, on both devices, before any timing: every int8 Linear's output against its
fake-quant twin module on the same input (a gate: a wrong kernel gives 1e-1 and more), the whole
output (every (1, S, P, 2C) output of the aggregator, together) against the fake-quant model and
the FP model in fp32 (reported; the output-vs-fake one gated loosely), and which kernel path the
int8 GEMMs took (on the CPU: counted per call, oneDNN's or another). A variant that fails is
marked WRONG and not timed, and the exit status is 1. Variants are timed interleaved
(round-robin, each round one call per variant) so that a noisy shared machine slows all of them
alike; medians.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from archquant.eval.bench_dit import (capture_all, cast_fp_parts, device_name, fmt_err, fmt_ms, int8_linears_vs_twins,
                                      log, real_int8_linears, synchronize, time_call_ms)
from archquant.report import cpu_name

PATCH = 14
SHAPES = {
    # VGGT-1B (facebook/VGGT-1B): aggregator embed_dim 1024, depth 24, 16 heads, MLP ratio 4, DINOv2 ViT-L/14 reg
    "1b": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, patch_embed="dinov2_vitl14_reg", dino=None,
               frames=4, cuda_frames=10, image_size=518,
               label="VGGT-1B aggregator (hidden 1024, 16 heads, MLP 4096, DINOv2 ViT-L/14 + 4 registers)"),
    # the tests' shape: every code path in seconds (2 x 69 = 138 rows: the CPU's oneDNN int8 route too)
    "tiny": dict(embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0, patch_embed="dinov2_vitl14_reg",
                 dino=dict(embed_dim=64, depth=2, num_heads=2), frames=2, cuda_frames=2, image_size=112,
                 label="tiny VGGT aggregator (hidden 64, 2 heads, DINOv2-style embedder of width 64)"),
}
#: the shape the targets are stated for
TARGET_SHAPES = ("1b",)
TARGET_CPU_VS_FP32 = 1.5
TARGET_CUDA_VS_BF16 = 1.5
#: the Linears of a frame / global block that the W8A8 variants run on int8 kernels
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
#: per int8 Linear, real vs its fake-quant twin on the same input (max relative L2), by activation
#: dtype: fp32 (the CPU's W8A8), where the int8 products are exact and only the fp32 summation order
#: differs (~1e-7); bf16 (CUDA, the CPU's w8a8_bf16): the twin's bf16 roundings, ~3e-3
#: (bench_dit's limit). A wrong scale, layout or rounding in a kernel gives 1e-1 and more.
LINEAR_TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2}
#: the whole output vs the fake-quant model: a one-code difference early on compounds through the
#: blocks, so this only catches an output that is garbage
OUTPUT_TOL = 0.5
CPU_VARIANTS = ("fp32", "bf16", "w8a8", "w8a8_bf16", "w8a8_pe")
DEFAULT_CPU_VARIANTS = ("fp32", "bf16", "w8a8")
LABELS = {"fp32": "FP32", "bf16": "bf16", "w8a8": "W8A8 real (rtn_dynamic)",
          "w8a8_bf16": "W8A8 real, rest in bf16", "w8a8_pe": "W8A8 real, patch embedder's Linears too"}


# ------------------------------------------------------------------------------------------------
# model, inputs, quantization


@dataclass
class Geometry:
    """What one benchmark call covers."""

    shape_name: str
    frames: int
    image_size: int
    blocks: int  # frame+global pairs built
    dino_blocks: int  # DINOv2 blocks built
    full_blocks: int = 0
    full_dino_blocks: int = 0

    @property
    def shape(self) -> dict:
        return SHAPES[self.shape_name]

    @property
    def grid(self) -> int:
        return self.image_size // PATCH

    @property
    def tokens_per_frame(self) -> int:
        return 1 + 4 + self.grid * self.grid  # camera + 4 registers + patches

    @property
    def tokens(self) -> int:
        return self.frames * self.tokens_per_frame

    def describe(self) -> str:
        return (f"{self.frames} frames x {self.image_size} px: {self.grid}x{self.grid} patches + 5 = "
                f"{self.tokens_per_frame} tokens per frame, {self.tokens} in all (frame attention over "
                f"{self.tokens_per_frame}, global over {self.tokens}); timed: {self.blocks} of {self.full_blocks} "
                f"frame+global block pairs, {self.dino_blocks} of {self.full_dino_blocks} DINOv2 blocks")


def geometry(shape_name: str, frames: int | None, image_size: int | None, blocks: int | None,
             dino_blocks: int | None, device: str = "cpu") -> Geometry:
    shape = SHAPES[shape_name]
    frames = frames or (shape["cuda_frames"] if device == "cuda" else shape["frames"])
    image_size = image_size or shape["image_size"]
    if frames < 1:
        raise ValueError(f"--frames must be at least 1, got {frames}")
    if image_size < PATCH or image_size % PATCH:
        raise ValueError(f"--image-size must be a multiple of the patch size {PATCH}, got {image_size}")
    depth = shape["depth"]
    blocks = depth if blocks is None else blocks
    if not 1 <= blocks <= depth:
        raise ValueError(f"--blocks must be in 1..{depth} for shape {shape_name}, got {blocks}")
    full_dino = (shape["dino"] or {}).get("depth") or _dino_depth(shape["patch_embed"])
    if dino_blocks is None:  # the full model's proportions: N of 24 pairs, N of 24 DINOv2 blocks
        dino_blocks = max(1, round(full_dino * blocks / depth))
    if not 0 <= dino_blocks <= full_dino:
        raise ValueError(f"--dino-blocks must be in 0..{full_dino}, got {dino_blocks}")
    return Geometry(shape_name, frames, image_size, blocks, dino_blocks, depth, full_dino)


def _dino_depth(name: str) -> int:
    from archquant.models.vggt.aggregator import DINOV2_CONFIGS

    return DINOV2_CONFIGS[name][1]


def build(geo: Geometry, seed: int = 0):
    """The FP aggregator (fp32, eval) of ``geo``, random weights, LayerScale gammas at 1, on the
    current default device."""
    from archquant.models.vggt.aggregator import Aggregator

    shape = geo.shape
    overrides = dict(shape["dino"] or {})
    if geo.dino_blocks != geo.full_dino_blocks:
        overrides["depth"] = geo.dino_blocks
    torch.manual_seed(seed)
    model = Aggregator(img_size=518, patch_size=PATCH, embed_dim=shape["embed_dim"], depth=geo.blocks,
                       num_heads=shape["num_heads"], mlp_ratio=shape["mlp_ratio"], num_register_tokens=4,
                       patch_embed=shape["patch_embed"], dino_overrides=overrides or None)
    with torch.no_grad():
        for blocks in (model.frame_blocks, model.global_blocks):
            for blk in blocks:
                blk.ls1.gamma.fill_(1.0)
                blk.ls2.gamma.fill_(1.0)
    return model.eval()


def images(geo: Geometry, seed: int = 0) -> torch.Tensor:
    """One scene: (1, S, 3, H, W) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, geo.frames, 3, geo.image_size, geo.image_size, generator=g)


def quantized_linears(model, patch_embed: bool = False) -> list[str]:
    """The Linears of the frame and global blocks (the default scope), and with ``patch_embed`` those of
    the DINOv2 embedder's blocks too (what ``model.options.quantize_also: ["re:aggregator\\.patch_embed\\..*"]``
    adds in a run)."""
    names = [f"{kind}_blocks.{i}.{name}" for i in range(len(model.frame_blocks))
             for kind in ("frame", "global") for name in BLOCK_LINEARS]
    if patch_embed:
        names += [f"patch_embed.blocks.{i}.{name}" for i in range(len(model.patch_embed.blocks))
                  for name in BLOCK_LINEARS]
    return names


def structure(model, patch_embed: bool = False):
    """What ``quantize_`` needs to know about an aggregator alone (the VGGT adapter describes a whole
    VGGT): the Linears to quantize and the blocks in execution order."""
    from archquant.core.structure import ModelStructure

    blocks = [f"{kind}_blocks.{i}" for i in range(len(model.frame_blocks)) for kind in ("frame", "global")]
    return ModelStructure(hidden_size=model.embed_dim, norm_kind="layer",
                          quantize=quantized_linears(model, patch_embed), blocks=blocks)


def recipe():
    """The ``rtn_dynamic`` preset as a ``Recipe`` object (``quantize_`` takes a preset *name* only
    through a family adapter; with an explicit ``structure=`` it takes a ``Recipe``)."""
    from archquant.core.presets import PRESETS, RecipeOptions

    return PRESETS["rtn_dynamic"](RecipeOptions())


def build_w8a8(fp, kernels: str = "auto", patch_embed: bool = False):
    """(fake-quant model, its real twin) on copies of ``fp``, on fp's device."""
    import archquant as aq
    from archquant.backends import convert_to_real

    fake = aq.quantize_(copy.deepcopy(fp), recipe(), structure=structure(fp, patch_embed), progress=False)
    return fake, convert_to_real(copy.deepcopy(fake), kernels=kernels)


def int8_count(summary: dict) -> str:
    """The table's "int8 Linears" cell from a ``convert_to_real`` summary: "16 (0 kept)"."""
    return f"{summary['converted']} ({len(summary['kept'])} kept)"


def forward(model, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return model(x)[0]


def last_output(model, x: torch.Tensor) -> torch.Tensor:
    """The timed call: the aggregator's forward; its last output returned (a graph keeps it)."""
    return forward(model, x)[-1]


def patch_embed_call(model, x: torch.Tensor) -> torch.Tensor:
    """The patch embedder alone, on the normalised frames, as ``Aggregator.forward`` calls it."""
    b, s, _, h, w = x.shape
    with torch.no_grad():
        x = (x - model._resnet_mean.to(x.dtype)) / model._resnet_std.to(x.dtype)
        out = model.patch_embed(x.reshape(b * s, 3, h, w))
        return out["x_norm_patchtokens"] if isinstance(out, dict) else out


def outputs_l2rel(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    """Relative L2 error over all of the aggregator's outputs together."""
    num = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(outs, refs))
    den = sum(float(b.double().pow(2).sum()) for b in refs)
    return math.sqrt(num / den) if den > 0 else float("inf")


class RouteRecorder:
    """Counts the CPU int8 GEMM route (``cpu_int8._cpu_path``: "onednn", "fbgemm", "int_mm") of
    every W8A8 call made while active, with the rows M of each."""

    def __init__(self):
        self.routes: dict[str, int] = {}
        self.rows: set[int] = set()

    def __enter__(self):
        from archquant.kernels import cpu_int8

        self._module, self._orig = cpu_int8, cpu_int8._cpu_path

        def recording(path, m, k, n, w):
            chosen = self._orig(path, m, k, n, w)
            self.routes[chosen] = self.routes.get(chosen, 0) + 1
            self.rows.add(m)
            return chosen

        cpu_int8._cpu_path = recording
        return self

    def __exit__(self, *exc):
        self._module._cpu_path = self._orig
        return False

    def describe(self) -> str:
        if not self.routes:
            return "no CPU int8 GEMM call"
        routes = ", ".join(f"{k} x{v}" for k, v in sorted(self.routes.items()))
        return f"{routes} (rows M = {', '.join(str(m) for m in sorted(self.rows))})"


def per_linear_check(real, fake, x: torch.Tensor) -> tuple[list[torch.Tensor], float]:
    """(the real model's outputs, the largest relative L2 over its int8 Linears between the
    Linear's output and its fake-quant twin module's on the same input)."""
    return int8_linears_vs_twins(real, fake, lambda m: forward(m, x))


# ------------------------------------------------------------------------------------------------
# checks and timing, both devices


@dataclass
class Row:
    variant: str
    label: str
    dtype: torch.dtype
    int8_linears: str = "-"
    per_linear: float | None = None
    vs_fake: float | None = None
    vs_fp32: float | None = None
    route: str = ""
    ok: bool = True
    wrong: str = ""
    ms: float | None = None  # eager median
    graph_ms: float | None = None
    patch_ms: float | None = None  # its patch embedder alone (eager)


@dataclass
class Result:
    geo: Geometry
    device: torch.device
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    repeats: int = 0
    warmup: int = 0
    graphs: bool = False
    build_s: float = 0.0
    cuda_mode: bool = False  # bench_device's bf16 vs W8A8 (on CUDA, or its code path on a CPU)

    def row(self, variant: str) -> Row | None:
        return next((r for r in self.rows if r.variant == variant), None)


def check_real(name: str, real, fake, x: torch.Tensor, fake_out, ref, device: torch.device, row: Row) -> None:
    """Fill ``row``'s errors and verdict: per-Linear gate, output vs fake (gated loosely) and vs FP."""
    with RouteRecorder() as rec:
        out, worst = per_linear_check(real, fake, x)
    out = [o.float() for o in out]
    row.per_linear, row.vs_fake, row.vs_fp32 = worst, outputs_l2rel(out, fake_out), outputs_l2rel(out, ref)
    sample = next(iter(real_int8_linears(real).values()))
    path = sample._path(x)
    row.route = (f"torch CPU int8 ops, per call: {rec.describe()}" if path == "torch"
                 else "Triton per-token quantize + w8a8_gemm")
    tol = LINEAR_TOL[x.dtype]
    row.ok = worst <= tol and row.vs_fake <= OUTPUT_TOL
    if not row.ok:
        row.wrong = (f"WRONG: per-Linear {worst:.1e} (limit {tol}), output vs fake {row.vs_fake:.1e} "
                     f"(limit {OUTPUT_TOL}); not timed")
        log(f"  {name}: {row.wrong}")


def time_variants(calls: dict, device: torch.device, repeats: int, warmup: int, graphs: bool):
    """Median ms per call of each of ``calls`` (name -> fn): ({name: eager ms}, {name: graph ms} or
    {}, a note on the graphs). Interleaved rounds, each one call of every fn (and one replay)."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    replays, note = {}, ""
    if graphs and device.type == "cuda":
        timed_graphs = {k: v for k, v in calls.items() if not k.startswith("patch:")}
        replays, why = capture_all(timed_graphs)
        note = "CUDA graphs used" if replays else f"CUDA graphs not used ({why})"
    eager = {name: [] for name in calls}
    graph = {name: [] for name in replays}
    for _ in range(repeats):
        for name, fn in calls.items():
            eager[name].append(time_call_ms(fn, device))
            if name in replays:
                graph[name].append(time_call_ms(replays[name].replay, device))
    median = lambda times: {k: statistics.median(v) for k, v in times.items() if v}  # noqa: E731
    return median(eager), median(graph), note


def bench_cpu(geo: Geometry, variants=DEFAULT_CPU_VARIANTS, repeats: int = 5, warmup: int = 1) -> Result:
    """The CPU benchmark: fp32 / bf16 / W8A8 real (/ W8A8 with the rest in bf16), checked, then timed."""
    from archquant.backends import convert_to_real

    device = torch.device("cpu")
    t0 = time.perf_counter()
    fp = build(geo)
    x32 = images(geo)
    ref = [o.float() for o in forward(fp, x32)]
    fake, real = build_w8a8(fp)
    summary = real._archquant_real
    fake_out = [o.float() for o in forward(fake, x32)]
    build_s = time.perf_counter() - t0
    log(f"[vggt] built and ran the references in {build_s:.0f} s; checking")
    int8 = int8_count(summary)
    rows, models = [], {}
    for name in variants:
        dtype = torch.float32 if name in ("fp32", "w8a8", "w8a8_pe") else torch.bfloat16
        row = Row(name, LABELS[name], dtype)
        if name == "fp32":
            models[name] = fp
        elif name == "bf16":
            models[name] = copy.deepcopy(fp).to(torch.bfloat16)
            out = [o.float() for o in forward(models[name], x32.to(torch.bfloat16))]
            row.vs_fp32 = outputs_l2rel(out, ref)
            row.ok = all(bool(torch.isfinite(o).all()) for o in out)
            row.wrong = "" if row.ok else "WRONG: non-finite output; not timed"
        elif name == "w8a8_pe":  # its own fake twin: more Linears are quantized
            pe_fake, model = build_w8a8(fp, patch_embed=True)
            row.int8_linears = int8_count(model._archquant_real)
            check_real(name, model, pe_fake, x32, [o.float() for o in forward(pe_fake, x32)], ref, device, row)
            models[name] = model
            del pe_fake
        else:
            # w8a8_bf16: a second conversion (a used real model holds packed weights deepcopy cannot copy)
            model = real if name == "w8a8" else cast_fp_parts(convert_to_real(copy.deepcopy(fake)), torch.bfloat16)
            row.int8_linears = int8
            check_real(name, model, fake, x32.to(dtype), fake_out, ref, device, row)
            models[name] = model
        rows.append(row)
    del fake, fake_out, ref
    log(f"[vggt] checked ({time.perf_counter() - t0:.0f} s); timing")
    calls = {r.variant: (lambda m=models[r.variant], x=x32.to(r.dtype): last_output(m, x)) for r in rows if r.ok}
    # the patch embedder alone: fp32 (the fp32 and W8A8 models run the same one) and bf16
    pe = {"fp32": (fp, torch.float32)}
    if "bf16" in models:
        pe["bf16"] = (models["bf16"], torch.bfloat16)
    if "w8a8_bf16" in models:
        pe.setdefault("bf16", (models["w8a8_bf16"], torch.bfloat16))
    if "w8a8_pe" in models:
        pe["w8a8_pe"] = (models["w8a8_pe"], torch.float32)
    for key, (m, dt) in pe.items():
        calls[f"patch:{key}"] = lambda m=m, x=x32.to(dt): patch_embed_call(m, x)
    eager, _, _ = time_variants(calls, device, repeats, warmup, graphs=False)
    for r in rows:
        r.ms = eager.get(r.variant)
        embedder = "w8a8_pe" if r.variant == "w8a8_pe" else "fp32" if r.dtype == torch.float32 else "bf16"
        r.patch_ms = eager.get(f"patch:{embedder}")
    return Result(geo, device, rows, repeats=repeats, warmup=warmup, build_s=build_s)


def bench_device(geo: Geometry, device: torch.device, repeats: int = 30, warmup: int = 3, graphs: bool = True,
                 kernels: str = "auto") -> Result:
    """The CUDA benchmark: bf16 vs W8A8 real, built on ``device``. On a CPU (tests) with
    ``kernels="triton"`` the same code runs the Triton kernels in the interpreter."""
    t0 = time.perf_counter()
    log(f"[vggt] building FP and W8A8 models on {device}")
    with torch.device(device):
        fp = build(geo)
    x32 = images(geo).to(device)
    ref = [o.float() for o in forward(fp, x32)]
    fake, real = build_w8a8(fp, kernels)
    summary = real._archquant_real
    fake_out = [o.float() for o in forward(fake, x32)]
    synchronize(device)
    build_s = time.perf_counter() - t0
    log(f"[vggt] built and ran the fp32 references in {build_s:.0f} s; checking")
    x16 = x32.to(torch.bfloat16)
    bf16 = cast_fp_parts(fp, torch.bfloat16)  # in place: the FP model becomes the baseline
    real = cast_fp_parts(real, torch.bfloat16)
    base = Row("bf16", "bf16", torch.bfloat16)
    out = [o.float() for o in forward(bf16, x16)]
    base.vs_fp32 = outputs_l2rel(out, ref)
    base.ok = all(bool(torch.isfinite(o).all()) for o in out)
    base.wrong = "" if base.ok else "WRONG: non-finite output; not timed"
    row = Row("w8a8", LABELS["w8a8"], torch.bfloat16, int8_linears=int8_count(summary))
    check_real("w8a8", real, fake, x16, fake_out, ref, device, row)
    del fake, fake_out, out, ref
    rows = [base, row]
    models = {"bf16": bf16, "w8a8": real}
    log(f"[vggt] checked ({time.perf_counter() - t0:.0f} s); timing")
    calls = {r.variant: (lambda m=models[r.variant]: last_output(m, x16)) for r in rows if r.ok}
    calls["patch:bf16"] = lambda: patch_embed_call(bf16, x16)  # both variants run this bf16 embedder
    eager, graph, note = time_variants(calls, device, repeats, warmup, graphs)
    for r in rows:
        r.ms, r.graph_ms, r.patch_ms = eager.get(r.variant), graph.get(r.variant), eager.get("patch:bf16")
    notes = [note] if note else []
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log(f"[vggt] done in {time.perf_counter() - t0:.0f} s")
    return Result(geo, device, rows, notes, repeats, warmup, graphs and device.type == "cuda", build_s,
                  cuda_mode=True)


# ------------------------------------------------------------------------------------------------
# report


def ratio(base: Row | None, row: Row | None, graph: bool = False) -> float | None:
    if base is None or row is None:
        return None
    a, b = (base.graph_ms, row.graph_ms) if graph else (base.ms, row.ms)
    return None if a is None or b is None else a / b


def fmt_ratio(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def verdict(res: Result) -> str:
    """The target line: CPU W8A8 >= 1.5x FP32, CUDA W8A8 >= 1.5x bf16 (graph replays where timed)."""
    cuda = res.device.type == "cuda"
    smoke = res.cuda_mode and not cuda  # the CUDA code path on a CPU
    w8a8 = res.row("w8a8")
    base_name, target = ("bf16", TARGET_CUDA_VS_BF16) if res.cuda_mode else ("fp32", TARGET_CPU_VS_FP32)
    base = res.row(base_name)
    what = f"W8A8 real >= {target}x {'bf16' if base_name == 'bf16' else 'FP32'}"
    if smoke:
        return f"target ({what}): smoke run on {res.device.type}, no target"
    if res.geo.shape_name not in TARGET_SHAPES:
        return f"target ({what}): stated for the 1b shape, not {res.geo.shape_name}"
    if w8a8 is None or base is None or not w8a8.ok:
        return f"target ({what}): not timed"
    mode = "graph" if cuda and w8a8.graph_ms is not None and base.graph_ms is not None else "eager"
    r = ratio(base, w8a8, graph=mode == "graph")
    if r is None:
        return f"target ({what}): not timed"
    part = "" if res.geo.blocks == res.geo.full_blocks else f", {res.geo.blocks} of {res.geo.full_blocks} block pairs"
    return (f"target {what}: {'met' if r >= target else 'MISSED'} "
            f"({'' if mode == 'eager' and not cuda else mode + ' '}{r:.2f}x{part})")


def patch_lines(res: Result) -> list[str]:
    """The patch embedder's share, and the alternating blocks alone (total minus patch embed)."""
    timed = [r for r in res.rows if r.ms is not None and r.patch_ms is not None]
    if not timed:
        return []
    embedders = {}
    for r in timed:
        key = "W8A8 (int8 Linears)" if r.variant == "w8a8_pe" else "fp32" if r.dtype == torch.float32 else "bf16"
        embedders.setdefault(key, r.patch_ms)
    n = res.geo.dino_blocks
    lines = [f"patch embed alone (DINOv2, {n} block{'' if n == 1 else 's'}): "
             + ", ".join(f"{k} {v:.1f} ms" for k, v in embedders.items())
             + (" (the W8A8 model runs the fp32 one)" if not res.cuda_mode else " (both variants run it)")
             + "; share of the total: " + ", ".join(f"{r.label} {100 * r.patch_ms / r.ms:.0f}%" for r in timed)]
    blocks = {r.variant: r.ms - r.patch_ms for r in timed}
    if "w8a8" in blocks and blocks["w8a8"] > 0:
        parts = [f"{fmt_ratio(blocks[b] / blocks['w8a8'])} {LABELS[b]}" for b in ("fp32", "bf16") if b in blocks]
        if parts:
            lines.append("alternating blocks alone (total minus patch embed, eager medians): W8A8 real is "
                         + ", ".join(parts))
    return lines


def render(res: Result, command: str) -> str:
    geo, cuda_path = res.geo, res.cuda_mode
    graphs = any(r.graph_ms is not None for r in res.rows)
    title = ("CUDA" if res.device.type == "cuda" else "CPU (CUDA code path)") if cuda_path else "CPU"
    variants = "bf16 vs W8A8 real" if cuda_path else "FP32 vs bf16 vs W8A8 real"
    when = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    if res.device.type == "cuda" or cuda_path:
        import triton

        env = (f"- device: {device_name(res.device)}\n- torch {torch.__version__}, triton {triton.__version__}, "
               f"Python {platform.python_version()}; {when}")
    else:
        env = (f"- device: CPU, {cpu_name()}; {torch.get_num_threads()} threads; torch {torch.__version__}; "
               f"Python {platform.python_version()}; {when}")
    if cuda_path:
        what = ("- one `Aggregator(images)` call, batch 1, random weights, bf16 activations; W8A8: the frame and "
                "global blocks' qkv / proj / fc1 / fc2 on int8 (Triton per-token quantize + `w8a8_gemm`), the "
                "patch embedder, norms and attention in bf16 as in the baseline")
        timing = (("eager calls and CUDA-graph replays (one graph per variant, all or none)" if res.graphs
                   else "eager calls only") + f"; CUDA events around each call, synchronised before it, after "
                  f"{res.warmup} warm-up calls; medians of {res.repeats} interleaved rounds")
    else:
        what = ("- one `Aggregator(images)` call, batch 1, random weights; W8A8: the frame and global blocks' qkv / "
                "proj / fc1 / fc2 on int8 (`archquant/kernels/cpu_int8.py`), the DINOv2 patch embedder, norms and "
                "attention in fp32; bf16: the whole model in bf16")
        timing = f"host clock; {res.warmup} warm-up round(s); medians of {res.repeats} interleaved rounds"
    header = ["variant", "int8 Linears", "ms" if not graphs else "eager ms"]
    header += ["graph ms"] if graphs else []
    header += ["patch embed ms (share)"]
    header += ["vs bf16 eager", "vs bf16 graph"] if cuda_path else ["vs FP32", "vs bf16"]
    header += ["per-Linear real vs fake (max l2rel)", "output real vs fake l2rel", "output vs FP32 l2rel"]
    lines = [f"# VGGT aggregator on {title}: {variants}", "", f"`{command}`", "", env,
             f"- shape: {geo.shape['label']}", f"- tokens: {geo.describe()}", what, f"- timing: {timing}",
             f"- correctness first: per-Linear limit {LINEAR_TOL[torch.float32]} (fp32 activations) / "
             f"{LINEAR_TOL[torch.bfloat16]} (bf16), whole output vs its fake twin limit {OUTPUT_TOL}; a variant "
             "that fails is not timed",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    fp32, bf16 = res.row("fp32"), res.row("bf16")
    for r in res.rows:
        share = "-" if r.patch_ms is None else (f"{r.patch_ms:.1f}" if r.ms is None
                                                 else f"{r.patch_ms:.1f} ({100 * r.patch_ms / r.ms:.0f}%)")
        cells = [r.label, r.int8_linears, fmt_ms(r.ms)] + ([fmt_ms(r.graph_ms)] if graphs else []) + [share]
        if cuda_path:
            cells += ["-", "-"] if r.variant == "bf16" else [fmt_ratio(ratio(bf16, r)), fmt_ratio(ratio(bf16, r, True))]
        else:
            cells += ["-" if r.variant == "fp32" else fmt_ratio(ratio(fp32, r)),
                      "-" if r.variant == "bf16" else fmt_ratio(ratio(bf16, r))]
        cells += [fmt_err(r.per_linear), fmt_err(r.vs_fake), fmt_err(r.vs_fp32)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for r in res.rows:
        if r.wrong:
            lines.append(f"- {r.label}: {r.wrong}")
    checked = [r for r in res.rows if r.per_linear is not None]
    if checked and all(r.ok for r in checked):
        lines.append("- correctness check passed: " + "; ".join(
            f"{r.label}: per-Linear {r.per_linear:.1e}, output vs fake {r.vs_fake:.1e}" for r in checked))
    for r in checked:
        lines.append(f"- {r.label}: int8 GEMM route {r.route}")
    lines += [f"- {n}" for n in patch_lines(res) + res.notes]
    lines.append(f"- {verdict(res)}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(prog="python -m archquant.eval.bench_vggt", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: fp32 / bf16 / W8A8 on torch's int8 ops; cuda: bf16 / W8A8 on the Triton kernels")
    p.add_argument("--shapes", choices=sorted(SHAPES), default="1b", help="1b: VGGT-1B's widths; tiny: the tests'")
    p.add_argument("--frames", type=int, default=None, help="frames of the scene (default 4 on the CPU, 10 on CUDA)")
    p.add_argument("--image-size", type=int, default=None, help="square frames, a multiple of 14 (default 518)")
    p.add_argument("--blocks", type=int, default=None,
                   help="build and time the first N frame+global block pairs (default all 24)")
    p.add_argument("--dino-blocks", type=int, default=None,
                   help="DINOv2 blocks of the patch embedder (default: in proportion to --blocks, 24 at 24)")
    p.add_argument("--variants", nargs="+", choices=CPU_VARIANTS, default=list(DEFAULT_CPU_VARIANTS),
                   help="CPU: the variants timed (w8a8_bf16: W8A8 with the rest in bf16); CUDA: bf16 and w8a8")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5 on the CPU, 30 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 1 on the CPU, 3 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2 on the CPU; CUDA: unchanged)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA: also time CUDA-graph replays (default on; off for all if any variant fails)")
    p.add_argument("--write", help="also write the table to this file (markdown)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.repeats = args.repeats or (30 if cuda else 5)
    args.warmup = (3 if cuda else 1) if args.warmup is None else args.warmup
    if args.threads is None and not cuda:
        args.threads = 2
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("archquant: error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    try:
        geo = geometry(args.shapes, args.frames, args.image_size, args.blocks, args.dino_blocks, args.device)
    except ValueError as e:
        print(f"archquant: error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    command = ("python -m archquant.eval.bench_vggt " + " ".join(argv)).strip()
    log(f"[vggt] {geo.shape['label']}; {geo.describe()}")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references in full precision
        torch.backends.cudnn.allow_tf32 = False
        res = bench_device(geo, torch.device("cuda"), args.repeats, args.warmup, args.cuda_graphs)
    else:
        res = bench_cpu(geo, tuple(args.variants), args.repeats, args.warmup)
    table = render(res, command)
    print(table)
    if args.write:
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(table)
    return 0 if all(r.ok for r in res.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
