"""The lm-eval bridge's scoring runs offline; only lm_eval's task data needs the network."""
import math

import pytest
import torch

from archquant.eval.lm import ByteTokenizer
from archquant.eval.lm_eval_harness import generate_until, loglikelihoods, rolling_loglikelihood
from archquant.models.mamba import MambaConfig, MambaLM, init_mamba_weights


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


class CachedBigram:
    """``bigram_model`` with the recurrent-cache interface of MambaLM: a bigram's only state
    is the last token, so one-token steps with a (dummy) cache are exact."""

    def __init__(self, next_byte: dict[int, int]):
        self.model_fn = bigram_model(next_byte)

    def new_cache(self):
        return object()

    def __call__(self, ids, cache=None):
        return self.model_fn(ids)


def test_generation_stops_before_the_first_until_string():
    tok = ByteTokenizer()
    model = CachedBigram({ord("a"): ord("b"), ord("b"): ord("a")})
    assert generate_until(model, tok, "a", until=[], max_new_tokens=4) == "baba"
    assert generate_until(model, tok, "a", until=["aba"], max_new_tokens=10) == "b"
    # the text is cut at the earliest occurrence of any stop, whatever its place in the list
    assert generate_until(model, tok, "a", until=["abab", "bab", "zz"], max_new_tokens=10) == ""
    assert generate_until(model, tok, "a", until=["zz", "ab"], max_new_tokens=10) == "b"
    assert generate_until(model, tok, "a", until=["", "zz"], max_new_tokens=3) == "bab"


@torch.no_grad()
def test_generation_matches_uncached_argmax_decoding_of_a_mamba():
    """The model's recurrent greedy_generate, cut at the stop, equals re-running the whole sequence
    after each token (what the bridge did before it used the model's own generator)."""
    model = init_mamba_weights(MambaLM(MambaConfig(arch="mamba1", vocab_size=256, hidden_size=32, num_layers=2)),
                               seed=4).eval()
    tok = ByteTokenizer()
    ids = tok.encode(b"def f(x):")
    for _ in range(12):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    reference = tok.decode(ids[len(b"def f(x):"):]).decode(errors="replace")
    assert generate_until(model, tok, "def f(x):", until=[], max_new_tokens=12) == reference
    stop = reference[5:7]
    cut = reference[:reference.index(stop)]
    assert generate_until(model, tok, "def f(x):", until=[stop], max_new_tokens=12) == cut


def test_generation_needs_a_model_with_a_cache():
    with pytest.raises(ValueError, match="new_cache"):
        generate_until(bigram_model({}), ByteTokenizer(), "a", until=[])
