"""Train the small byte-level reference Mambas that the offline demo and tests quantize.

    python -m archquant.models.train_mamba --arch mamba1 --out models/reference/mamba1-byte
    python -m archquant.models.train_mamba --arch mamba2 --out models/reference/mamba2-byte

Data: the train split of the Python standard library's sources (``archquant.eval.corpus``),
disjoint by file from the calibration and evaluation splits. Tokens are raw bytes (vocab 256).
Writes an HF-format checkpoint (config.json + model.safetensors, loadable by
``transformers.MambaForCausalLM`` too) and ``training.json`` with the command, the final
evaluation perplexity and the unigram baseline it must beat.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time

import torch
import torch.nn.functional as F

from archquant.eval import lm
from archquant.eval.corpus import describe_environment, stdlib_documents
from archquant.models.mamba import MambaConfig, MambaLM, init_mamba_weights
from archquant.models.mamba_loading import save_mamba_hf

PRESETS = {
    # d_inner = 384 = 12·32: the reference model exercises the non-power-of-two Hadamard
    "mamba1": dict(arch="mamba1", hidden_size=192, num_layers=4, state_size=16),
    "mamba2": dict(arch="mamba2", hidden_size=192, num_layers=4, state_size=32, head_dim=48, n_groups=2,
                   chunk_size=64),
}


def corpus_tensor(split: str) -> torch.Tensor:
    """All documents of a split, concatenated (one separating newline), as a uint8 tensor."""
    data = b"\n".join(d.text for d in stdlib_documents(split))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def unigram_perplexity(train: torch.Tensor, evaluation: torch.Tensor) -> float:
    """Perplexity of the add-one-smoothed byte unigram model of ``train`` on ``evaluation``."""
    counts = torch.bincount(train.long(), minlength=256).double() + 1
    logp = torch.log(counts / counts.sum())
    return math.exp(-logp[evaluation.long()].mean().item())


def eval_perplexity(model: MambaLM, data: torch.Tensor, seq_len: int = 512, max_windows: int = 64,
                    batch_size: int = 16) -> float:
    """Perplexity (``eval.lm.perplexity``) over the first ``max_windows`` windows of ``data``.

    Window i holds bytes [i·seq_len, (i+1)·seq_len]: consecutive windows share their boundary
    byte (input of one, last target of the other), so every byte after the first is a target
    exactly once. These are the windows behind the perplexities recorded in training.json."""
    n = min(max_windows, (data.numel() - 1) // seq_len)
    windows = data[: n * seq_len + 1].long().unfold(0, seq_len + 1, seq_len)
    return lm.perplexity(model, windows, batch_size=batch_size)


def train(args) -> dict:
    torch.manual_seed(args.seed)
    cfg = MambaConfig(vocab_size=256, tokenizer="bytes", **PRESETS[args.arch])
    model = init_mamba_weights(MambaLM(cfg), seed=args.seed)
    train_data, eval_data = corpus_tensor("train"), corpus_tensor("evaluation")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, train_data.numel() - args.seq_len - 1, (args.batch_size,), generator=gen)
        batch = torch.stack([train_data[s:s + args.seq_len + 1] for s in starts.tolist()]).long()
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr:.2e}  {time.time() - t0:.0f}s", flush=True)
    model.eval()
    result = {
        "command": "python -m archquant.models.train_mamba " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "arch": args.arch,
        "config": cfg.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr, "seed": args.seed,
        "train_bytes": int(train_data.numel()),
        "data": describe_environment() + " (train split; evaluation split for the numbers below)",
        "eval_perplexity": eval_perplexity(model, eval_data),
        "unigram_perplexity": unigram_perplexity(train_data, eval_data[: 64 * 512 + 1]),
        "train_seconds": round(time.time() - t0, 1),
        "torch": torch.__version__,
    }
    return model, result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=sorted(PRESETS), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, result = train(args)
    out = save_mamba_hf(model, args.out)
    (out / "training.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("eval_perplexity", "unigram_perplexity", "train_seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
