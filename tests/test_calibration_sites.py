"""collect_stats gathers the inputs and outputs of different modules in a single pass."""
import copy

import pytest
import torch

from archquant.adapters import get_adapter
from archquant.adapters.mamba_recipes import MambaQuantSmooth
from archquant.core.calibration import collect_stats, default_forward
from archquant.core.observers import ChannelAbsMaxObserver
from archquant.core.recipe import Recipe, apply_recipe
from archquant.core.transforms import RunningCovariance

from conftest import perturbed_mamba

pytestmark = pytest.mark.usefixtures("single_thread")

L0 = "backbone.layers.0.mixer"
L1 = "backbone.layers.1.mixer"


class Counting:
    """A forward_fn that counts the model runs."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model, batch):
        self.calls += 1
        return default_forward(model, batch)


def _batches(n=3):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 256, (2, 12), generator=g) for _ in range(n)]


def test_mixed_sites_in_one_pass_equal_separate_passes():
    model, batches = perturbed_mamba("mamba1"), _batches()
    outputs = {f"{L0}.in_proj": ChannelAbsMaxObserver(), f"{L1}.x_proj": ChannelAbsMaxObserver()}
    inputs = {f"{L0}.out_proj": ChannelAbsMaxObserver(), f"{L0}.in_proj": RunningCovariance()}
    collect_stats(model, batches, outputs, where="output", progress=False)
    collect_stats(model, batches, inputs, where="input", progress=False)

    count = Counting()
    one = collect_stats(model, batches, {
        f"{L0}.in_proj:output": ChannelAbsMaxObserver(), f"{L1}.x_proj:output": ChannelAbsMaxObserver(),
        f"{L0}.out_proj": ChannelAbsMaxObserver(),  # a bare name takes `where` (input)
        f"{L0}.in_proj:input": RunningCovariance()}, forward_fn=count, progress=False)
    assert count.calls == len(batches)
    assert torch.equal(one[f"{L0}.in_proj:output"].amax, outputs[f"{L0}.in_proj"].amax)
    assert torch.equal(one[f"{L1}.x_proj:output"].amax, outputs[f"{L1}.x_proj"].amax)
    assert torch.equal(one[f"{L0}.out_proj"].amax, inputs[f"{L0}.out_proj"].amax)
    assert torch.equal(one[f"{L0}.in_proj:input"].covariance(), inputs[f"{L0}.in_proj"].covariance())
    # input and output of one module really are different tensors (in_proj: hidden → 2·d_inner)
    cfg = model.config
    assert one[f"{L0}.in_proj:input"].sum.numel() == cfg.hidden_size
    assert one[f"{L0}.in_proj:output"].amax.numel() == 2 * cfg.d_inner


def test_bad_site_is_refused_naming_it():
    model = perturbed_mamba("mamba1")
    with pytest.raises(ValueError, match=r"site '.*in_proj:inputs': 'inputs' not allowed"):
        collect_stats(model, _batches(1), {f"{L0}.in_proj:inputs": ChannelAbsMaxObserver()}, progress=False)
    with pytest.raises(KeyError, match="no module named 'nope'"):
        collect_stats(model, _batches(1), {"nope:output": ChannelAbsMaxObserver()}, progress=False)


def test_mambaquant_smooth_runs_the_data_once_and_matches_two_passes():
    model, batches = perturbed_mamba("mamba1"), _batches()
    ref = copy.deepcopy(model)
    # the statistics the step used before, from two passes: outputs of in_proj/x_proj, then out_proj inputs
    mixers = {n: m for n, m in ref.named_modules() if n.endswith("mixer")}
    outputs = collect_stats(ref, batches, {f"{n}.{p}": ChannelAbsMaxObserver() for n in mixers
                                           for p in ("in_proj", "x_proj")}, where="output", progress=False)
    inputs = collect_stats(ref, batches, {f"{n}.out_proj": ChannelAbsMaxObserver() for n in mixers}, progress=False)
    step = MambaQuantSmooth(alpha=0.5)
    for n, m in mixers.items():
        step._smooth_mixer(m, outputs[f"{n}.in_proj"].amax, inputs[f"{n}.out_proj"].amax, outputs[f"{n}.x_proj"].amax)

    count = Counting()
    apply_recipe(model, Recipe("s", [step]), get_adapter("mamba").structure(model), calib_batches=batches,
                 forward_fn=count, progress=False)
    assert count.calls == len(batches)
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
