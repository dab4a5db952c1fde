"""The lm-eval bridge's scoring runs offline; only lm_eval's task data needs the network."""
import math

import torch

from archquant.eval.lm import ByteTokenizer
from archquant.eval.lm_eval_harness import greedy_generate, loglikelihoods, rolling_loglikelihood


def bigram_model(next_byte: dict[int, int], vocab: int = 256, peak: float = 5.0):
    """A fake LM: after byte b it strongly predicts next_byte[b] (else uniform)."""
    def model_fn(ids):
        logits = torch.zeros(*ids.shape, vocab)
        for (i, j), b in zip(torch.cartesian_prod(torch.arange(ids.shape[0]), torch.arange(ids.shape[1])).tolist(),
                             ids.flatten().tolist()):
            if b in next_byte:
                logits[i, j, next_byte[b]] = peak
        return logits
    return model_fn


def test_loglikelihood_matches_hand_computation_and_greedy_flag():
    tok = ByteTokenizer()
    model = bigram_model({ord("a"): ord("b"), ord("b"): ord("c")})
    (lp, greedy), (lp2, greedy2) = loglikelihoods(model, tok, [("xa", "bc"), ("xa", "bd")])
    p_peak = math.exp(5.0) / (math.exp(5.0) + 255)
    assert math.isclose(lp, 2 * math.log(p_peak), rel_tol=1e-5) and greedy
    assert math.isclose(lp2, math.log(p_peak) + math.log(1 / (math.exp(5.0) + 255)), rel_tol=1e-5) and not greedy2


def test_rolling_loglikelihood_of_uniform_model():
    tok = ByteTokenizer()
    uniform = lambda ids: torch.zeros(*ids.shape, 256)  # noqa: E731
    text = "hello world, " * 10
    assert math.isclose(rolling_loglikelihood(uniform, tok, text, window=16), -(len(text) - 1) * math.log(256), rel_tol=1e-6)


def test_greedy_generation_stops_at_until():
    tok = ByteTokenizer()
    model = bigram_model({ord("a"): ord("b"), ord("b"): ord("a")})
    assert greedy_generate(model, tok, "a", until=[], max_new_tokens=4) == "baba"
    out = greedy_generate(model, tok, "a", until=["aba"], max_new_tokens=10)
    assert out == "b"
