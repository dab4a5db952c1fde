"""CPU benchmark: one denoising step of a DiT, FP32 vs bf16 vs W8A8 on real int8 kernels.

    python -m archquant.eval.bench_dit                       # DiT-XL/2 shapes and a small DiT (minutes)
    python -m archquant.eval.bench_dit --shapes small --repeats 3   # seconds
    python -m archquant.eval.bench_dit --write eval/results/dit_cpu.md

A step is one ``transformer(x, t, class_labels)`` call on random weights with DiT-XL/2's layout
(hidden 1152 = 16 heads x 72, 28 blocks, 32x32x4 latents in 2x2 patches = 256 tokens, batch 2) or
a small one. Variants, timed interleaved (round-robin over the variants, each round one call per
variant) so that a noisy shared machine slows all of them alike; medians:

* fp32: the FP model;
* bf16: the same model cast to bfloat16 (weights and activations);
* W8A8 real: ``rtn_dynamic`` (per-channel int8 weights, per-token dynamic int8 activations) on the
  attention and feed-forward Linears, converted with ``convert_to_real`` (torch's CPU int8 GEMMs);
  embedders, adaLN and the output stay fp32, as the DiT family keeps them.

Correctness first: the W8A8 real output is checked against its fake-quant twin before timing.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import sys
import time

import torch

from archquant.report import cpu_name

SHAPES = {
    "xl": dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, sample_size=32, in_channels=4,
               out_channels=8, num_embeds_ada_norm=1000, label="DiT-XL/2 (hidden 1152, 28 blocks, 256 tokens)"),
    "small": dict(num_attention_heads=4, attention_head_dim=32, num_layers=4, sample_size=16, in_channels=1,
                  out_channels=1, num_embeds_ada_norm=10, label="small DiT (hidden 128, 4 blocks, 64 tokens)"),
}


def build(shape: dict, seed: int = 0):
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    from archquant.models.dit_loading import DiffusionModel

    cfg = {k: v for k, v in shape.items() if k != "label"}
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(patch_size=2, **cfg)
    with torch.no_grad():  # diffusers zero-initialises the adaLN-Zero gates: give them signal
        for p in transformer.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return DiffusionModel(transformer.eval(), "DDIMScheduler", dict(DDIMScheduler().config)).eval()


def step_inputs(model, batch: int, seed: int = 0):
    cfg = model.transformer.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    t = torch.full((batch,), 500, dtype=torch.long)
    labels = torch.randint(0, cfg.num_embeds_ada_norm, (batch,), generator=g)
    return x, t, labels


def bench(shape_name: str, batch: int, repeats: int) -> dict:
    import archquant as aq
    from archquant.backends import convert_to_real

    shape = SHAPES[shape_name]
    fp = build(shape)
    x, t, labels = step_inputs(fp, batch)

    def step(model, dtype=torch.float32):
        with torch.no_grad():
            return model.transformer(x.to(dtype), timestep=t, class_labels=labels).sample.float()

    fake = aq.quantize_(copy.deepcopy(fp), "rtn_dynamic", family="dit", progress=False)
    real = convert_to_real(copy.deepcopy(fake))
    summary = real._archquant_real
    ref, out_fake, out_real = step(fp), step(fake), step(real)
    l2 = lambda a, b: float((a - b).norm() / b.norm())
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
                real_vs_fake=l2(out_real, out_fake), fake_vs_fp=l2(out_fake, ref), repeats=repeats)


def render(rows: list[dict], command: str) -> str:
    lines = [f"# DiT denoising step on CPU: FP32 vs bf16 vs W8A8 real", "", f"`{command}`", "",
             f"- {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu_name()}; "
             f"{torch.get_num_threads()} threads; torch {torch.__version__}; Python {platform.python_version()}",
             "- one `transformer(x, t, class_labels)` call, random weights; medians of interleaved rounds",
             "", "| shape | batch | int8 Linears | fp32 ms | bf16 ms | W8A8 real ms | W8A8 vs fp32 | W8A8 vs bf16 | "
             "real vs fake l2rel | fake vs FP l2rel |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["ms"]
        lines.append(f"| {r['shape']} | {r['batch']} | {r['converted']} ({r['kept']} kept) | {ms['fp32']:.1f} | "
                     f"{ms['bf16']:.1f} | {ms['w8a8_real']:.1f} | {ms['fp32'] / ms['w8a8_real']:.2f}x | "
                     f"{ms['bf16'] / ms['w8a8_real']:.2f}x | {r['real_vs_fake']:.2e} | {r['fake_vs_fp']:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["xl", "small"], choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--write", help="also write the table to this file (markdown)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python -m archquant.eval.bench_dit " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = []
    for name in args.shapes:
        t0 = time.perf_counter()
        rows.append(bench(name, args.batch, args.repeats))
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    table = render(rows, command.strip())
    print(table)
    if args.write:
        from pathlib import Path

        Path(args.write).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
