"""How close a real int8 Mamba is to its fake-quant twin, on a model of realistic width.

    python -m archquant.eval.fake_vs_real                        # 768-wide random Mamba1, quamba and mambaquant
    python -m archquant.eval.fake_vs_real --hidden 192 --noise 0 --presets quamba --write out.md

The real model (``backends.convert_to_real``) multiplies the same integer codes as the fake one;
the two differ only where an fp32 summation order moves a value across a rounding boundary of a
*later* quantizer, which then carries one code of difference forward (through the following
layers and, along the sequence, through the scan). How much that adds up to depends on the model,
so this script measures it: a random Mamba1 (standard init plus Gaussian noise of ``--noise`` on
every parameter, so the mixers matter), calibrated on the calibration split of the stdlib corpus
and evaluated on windows of the evaluation split (byte tokens), for each preset: logits l2rel
(real vs fake, and fake vs FP for scale), argmax agreement, perplexity of both. The committed
reference models are measured by the runner itself (``backend: real`` in configs/mamba_w8a8.yaml).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time

import torch

import archquant as aq
from archquant.backends import convert_to_real
from archquant.eval.corpus import describe_environment, stdlib_documents
from archquant.eval.lm import ByteTokenizer, calibration_windows, eval_windows, perplexity
from archquant.models.mamba import MambaConfig, MambaLM, init_mamba_weights
from archquant.report import cpu_name

PRESETS = ("quamba", "mambaquant")


def random_mamba(hidden: int, layers: int, noise: float, seed: int = 0) -> MambaLM:
    """Standard init plus ``noise`` * N(0, 1) on every parameter (norms, A_log, D, biases too)."""
    model = init_mamba_weights(MambaLM(MambaConfig(arch="mamba1", vocab_size=256, hidden_size=hidden,
                                                   num_layers=layers)), seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g))
    return model.eval()


def _l2rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def measure(preset: str, args, calib: torch.Tensor, windows: torch.Tensor) -> dict:
    model = random_mamba(args.hidden, args.layers, args.noise, args.seed)
    probe = windows[: args.batch_size]
    with torch.no_grad():
        fp_logits = model(probe)
        aq.quantize_(model, preset, calib_data=list(calib.split(args.batch_size)), family="mamba", progress=False)
        fake_logits = model(probe)
        fake_ppl = perplexity(model, windows, args.batch_size)
        real = convert_to_real(copy.deepcopy(model))
        del model
        real_logits = real(probe)
        real_ppl = perplexity(real, windows, args.batch_size)
    summary = real._archquant_real
    return dict(preset=preset, converted=summary["converted"], blocks=len(summary["blocks"]),
                kept=len(summary["kept"]), real_vs_fake=_l2rel(real_logits, fake_logits),
                fake_vs_fp=_l2rel(fake_logits, fp_logits),
                agreement=float((real_logits.argmax(-1) == fake_logits.argmax(-1)).float().mean()),
                fake_ppl=fake_ppl, real_ppl=real_ppl)


def render(rows: list[dict], command: str, args) -> str:
    lines = [f"# Real int8 vs fake-quant on a random Mamba1 (d_model {args.hidden}, {args.layers} layers)", "",
             f"`{command}`", "", f"torch {torch.__version__}, {cpu_name()} ({platform.machine()}), {os.cpu_count()} CPUs, "
             f"{torch.get_num_threads()} threads; {describe_environment()}", "",
             f"Model: standard init + {args.noise} * N(0,1) on every parameter (seed {args.seed}); "
             f"calibration {args.calib} x {args.seq_len} bytes of the stdlib calibration split, evaluation "
             f"{args.windows} x {args.seq_len} bytes of the evaluation split; logits compared on the first "
             f"{args.batch_size} windows.", "",
             "| preset | Linears real | whole blocks | kept fake | logits l2rel real vs fake | (fake vs FP) "
             "| argmax agreement | perplexity fake | perplexity real | ppl difference |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = (r["real_ppl"] - r["fake_ppl"]) / r["fake_ppl"]
        lines.append(f"| {r['preset']} | {r['converted']} | {r['blocks']} | {r['kept']} | {r['real_vs_fake']:.2e} "
                     f"| {r['fake_vs_fp']:.2e} | {r['agreement']:.4f} | {r['fake_ppl']:.6g} | {r['real_ppl']:.6g} "
                     f"| {diff:+.3%} |")
    return "\n".join(lines) + "\n"


def load_data(args) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration windows, evaluation windows) of the stdlib corpus' two disjoint splits."""
    tok = ByteTokenizer()
    calib, _ = calibration_windows(stdlib_documents("calibration"), tok, args.seq_len, args.calib, seed=0)
    return calib, eval_windows(stdlib_documents("evaluation"), tok, args.seq_len, args.windows)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m archquant.eval.fake_vs_real", description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib", type=int, default=16, help="calibration windows")
    p.add_argument("--windows", type=int, default=16, help="evaluation windows")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--write", help="also write the table to this file (markdown)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    calib, windows = load_data(args)
    rows = []
    for preset in args.presets:
        start = time.perf_counter()
        rows.append(measure(preset, args, calib, windows))
        print(f"{preset}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    table = render(rows, " ".join(["python -m archquant.eval.fake_vs_real", *argv]), args)
    print(table)
    if args.write:
        with open(args.write, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
