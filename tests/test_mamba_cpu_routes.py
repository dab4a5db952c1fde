"""Which kernel every int8 GEMM of a real (Quamba W8A8) Mamba takes on the CPU, on every call path users
make: prefill with and without a cache, batch 1 and 4, a cached decode step and ``greedy_generate``.

Issue 14: a prefill without a cache ran 11x slower than FP32 on a CPU without AMX, because oneDNN's int8
linear fell back to its reference kernel there, and the benchmark only timed other paths. These checks pin
the dispatch: a regression shows up as a wrong route, not as a slow run nobody timed."""
import copy

import pytest
import torch

import archquant as aq
from archquant.backends import convert_to_real
from archquant.core.modules import QuantLinear
from archquant.kernels import cpu_int8 as K
from archquant.kernels import mamba_conv1d, mamba_scan
from archquant.models.mamba import MambaConfig, MambaLM, greedy_generate, init_mamba_weights

pytestmark = pytest.mark.usefixtures("single_thread")

HIDDEN, LAYERS, VOCAB = 64, 2, 97
#: per layer, the int8 GEMMs of a real Mamba1 mixer: in_proj, x_proj, dt_proj, out_proj
GEMMS_PER_LAYER = 4


@pytest.fixture(scope="module")
def real_model():
    cfg = MambaConfig(arch="mamba1", vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS)
    fp = init_mamba_weights(MambaLM(cfg), seed=0).eval()
    g = torch.Generator().manual_seed(1)
    q = aq.quantize_(copy.deepcopy(fp), "quamba", calib_data=[torch.randint(0, VOCAB, (2, 64), generator=g)],
                     family="mamba", progress=False)
    real = convert_to_real(q)
    assert not real._archquant_real["kept"] and len(real._archquant_real["blocks"]) == LAYERS
    return real


class Routes:
    """Records (path, M) of every CPU int8 GEMM, and fails on a Triton kernel or a fake-quant Linear."""

    def __init__(self, monkeypatch):
        self.calls = []
        choose = K._cpu_path

        def recording(path, m, k, n, w):
            chosen = choose(path, m, k, n, w)
            self.calls.append((chosen, m, k, n))
            return chosen

        monkeypatch.setattr(K, "_cpu_path", recording)

        def forbidden(name):
            def fail(*a, **k):
                raise AssertionError(f"{name} ran on a CPU tensor (the Triton interpreter path)")
            return fail

        for module, name in ((mamba_scan, "quant_selective_scan"), (mamba_scan, "quant_selective_state_update"),
                             (mamba_conv1d, "quant_causal_conv1d_update")):
            monkeypatch.setattr(module, name, forbidden(name))
        monkeypatch.setattr(QuantLinear, "forward", forbidden("a fake-quant QuantLinear"))

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def check_routes(calls, rows: int, gemms: int) -> None:
    """``gemms`` int8 GEMMs of ``rows`` rows, each on the route ``choose_path`` measured fastest for its shape
    here, among the candidates for that M (oneDNN only from ONEDNN_MIN_M rows, and only where it passed
    the probe)."""
    assert [m for _, m, _, _ in calls] == [rows] * gemms
    for path, m, k, n in calls:
        assert path == K.choose_path(m, k, n) and path in K.path_candidates(m), (path, m, k, n)


CALL_PATHS = {
    # name: (batch, tokens, cached)
    "prefill, no cache": (1, 80, False),
    "prefill, fresh cache": (1, 80, True),
    "batch 4, no cache": (4, 20, False),
    "batch 4, fresh cache": (4, 20, True),
    "short prefill": (1, 8, False),
}


@pytest.mark.parametrize("name", CALL_PATHS)
def test_every_prefill_path_runs_all_gemms_on_the_dispatched_int8_route(real_model, monkeypatch, name):
    batch, tokens, cached = CALL_PATHS[name]
    routes = Routes(monkeypatch)
    ids = torch.randint(0, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        real_model(ids, cache=real_model.new_cache() if cached else None)
    check_routes(routes.take(), batch * tokens, GEMMS_PER_LAYER * LAYERS)


def test_decode_and_greedy_generate_run_on_the_small_m_route(real_model, monkeypatch):
    routes = Routes(monkeypatch)
    ids = torch.randint(0, VOCAB, (4, 80), generator=torch.Generator().manual_seed(3))
    cache = real_model.new_cache()
    with torch.no_grad():
        real_model(ids, cache=cache)
        routes.take()
        real_model(ids[:, -1:], cache=cache)  # one cached step of 4 sequences: M = 4
        check_routes(routes.take(), 4, GEMMS_PER_LAYER * LAYERS)
        out = greedy_generate(real_model, ids[:1], 3)
    assert out.shape == (1, 3)
    calls, per_call = routes.take(), GEMMS_PER_LAYER * LAYERS
    check_routes(calls[:per_call], 80, per_call)
    check_routes(calls[per_call:], 1, 3 * per_call)
