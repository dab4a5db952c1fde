"""Optional bridge to EleutherAI's lm-evaluation-harness (zero-shot tasks; needs the network).

    pip install -e ".[lm-eval]"
    python -m archquant.run configs/mamba_w8a8.yaml model.path=state-spaces/mamba-130m-hf \
        'evaluation.lm_eval_tasks=[lambada_openai,hellaswag,piqa,arc_easy,arc_challenge,winogrande]'

The scoring itself (``loglikelihoods``, ``rolling_loglikelihood``) is plain PyTorch and is
tested offline; only ``run_lm_eval`` imports ``lm_eval``, whose task data comes from the hub.
Mamba papers report HellaSwag and ARC-Challenge as acc_norm, the others as acc.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from archquant.models.mamba import greedy_generate

ModelFn = Callable[[torch.Tensor], torch.Tensor]
STANDARD_TASKS = ("lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande")
#: the metric each task is usually reported with
TASK_METRIC = {"hellaswag": "acc_norm", "arc_challenge": "acc_norm"}


@torch.no_grad()
def loglikelihoods(model_fn: ModelFn, tokenizer, pairs: Sequence[tuple[str, str]],
                   max_len: int = 2048) -> list[tuple[float, bool]]:
    """For each (context, continuation): log P(continuation | context) and whether greedy decoding
    would produce exactly the continuation (lm-eval's ``loglikelihood`` contract)."""
    out = []
    for context, continuation in pairs:
        ctx = tokenizer.encode(context.encode())
        full = tokenizer.encode((context + continuation).encode())
        # score the continuation's own tokens; fall back to separate encoding if BPE merged across the boundary
        cont = full[len(ctx):] if full[:len(ctx)] == ctx else tokenizer.encode(continuation.encode())
        ids = (ctx + cont)[-(max_len + 1):]
        n = len(cont)
        if n == 0:
            out.append((0.0, True))
            continue
        inp = torch.tensor(ids[:-1] if len(ids) > 1 else ids, dtype=torch.long)[None]
        logits = model_fn(inp).float()[0, -n:]
        logp = F.log_softmax(logits, dim=-1)
        target = torch.tensor(cont[-n:], dtype=torch.long)
        out.append((logp.gather(1, target[:, None]).sum().item(), bool((logits.argmax(-1) == target).all())))
    return out


@torch.no_grad()
def rolling_loglikelihood(model_fn: ModelFn, tokenizer, text: str, window: int = 2048) -> float:
    """Total log-likelihood of ``text`` in disjoint windows (lm-eval's ``loglikelihood_rolling``)."""
    ids = tokenizer.encode(text.encode())
    total = 0.0
    for start in range(0, max(len(ids) - 1, 0), window):
        chunk = torch.tensor(ids[start:start + window + 1], dtype=torch.long)[None]
        if chunk.shape[1] < 2:
            break
        logp = F.log_softmax(model_fn(chunk[:, :-1]).float(), dim=-1)
        total += logp.gather(2, chunk[:, 1:, None]).sum().item()
    return total


def generate_until(model, tokenizer, context: str, until: Sequence[str], max_new_tokens: int = 64) -> str:
    """lm-eval's ``generate_until``: the greedy continuation of ``context``, cut before the first
    of the ``until`` strings it contains.

    The tokens come from the model's own ``greedy_generate`` (``models/mamba.py``: one prefill,
    then one recurrent step per token), so ``model`` must have ``new_cache()``: every MambaLM,
    FP or quantized, does. It generates all ``max_new_tokens`` and cuts the text afterwards, which
    for a recurrent model costs one cheap step per token, instead of re-running the whole
    sequence after each token to check the stop strings."""
    if not hasattr(model, "new_cache"):
        raise ValueError(f"generation needs a model with a recurrent cache (new_cache()), got {type(model).__name__}")
    ids = torch.tensor(tokenizer.encode(context.encode()), dtype=torch.long)[None]
    generated = greedy_generate(model, ids, max_new_tokens)[0].tolist()
    text = tokenizer.decode(generated).decode(errors="replace")
    cuts = [text.index(stop) for stop in until if stop and stop in text]
    return text[:min(cuts)] if cuts else text


def run_lm_eval(model_fn: ModelFn, tokenizer, tasks: Sequence[str], limit: int | None = None,
                num_fewshot: int = 0) -> dict[str, float]:  # pragma: no cover - needs lm_eval and the hub
    """Run lm-eval tasks on ``model_fn``; returns {task: metric} with each task's usual metric."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.api.model import LM
    except ImportError:
        raise ValueError("evaluation.lm_eval_tasks needs lm-eval: pip install -e '.[lm-eval]' (and network access)") from None

    class ArchquantLM(LM):
        def loglikelihood(self, requests):
            return loglikelihoods(model_fn, tokenizer, [r.args for r in requests])

        def loglikelihood_rolling(self, requests):
            return [rolling_loglikelihood(model_fn, tokenizer, r.args[0]) for r in requests]

        def generate_until(self, requests):
            return [generate_until(model_fn, tokenizer, r.args[0], r.args[1].get("until", [])) for r in requests]

    try:
        results = simple_evaluate(model=ArchquantLM(), tasks=list(tasks), num_fewshot=num_fewshot, limit=limit)
    except Exception as e:
        raise ValueError(f"lm-eval failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    metrics = {}
    for task, res in results["results"].items():
        key = TASK_METRIC.get(task, "acc")
        value = res.get(f"{key},none", res.get(key))
        if value is not None:
            metrics[f"{task}/{key}"] = float(value)
    return metrics
