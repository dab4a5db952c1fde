"""ModelStructure.blocks and core.blocks: each block's captured FP inputs replay it exactly."""
import copy

import pytest
import torch
from torch import nn

from archquant.adapters import get_adapter
from archquant.core.blocks import block_inputs, capture_block_inputs
from archquant.core.calibration import collect_stats

pytestmark = pytest.mark.usefixtures("single_thread")


class _Last:
    """Records the input of the module that reads the last block's output."""

    def __init__(self):
        self.seen = []

    def update(self, x):
        self.seen.append(x.detach().clone())


def _check_chain(model, batches, blocks, reader, forward_fn=None):
    """Block i run on each captured call gives exactly block i+1's captured input (and the last
    block gives what ``reader`` receives)."""
    calls = capture_block_inputs(model, batches, blocks, forward_fn)
    last = collect_stats(model, batches, {reader: _Last()}, forward_fn=forward_fn, progress=False)[reader]
    modules = dict(model.named_modules())
    with torch.no_grad():
        for i, name in enumerate(blocks):
            nxt = [c.args[0] for c in calls[blocks[i + 1]]] if i + 1 < len(blocks) else last.seen
            outs = [c.run(modules[name]) for c in calls[name]]
            assert len(outs) == len(nxt) == len(batches)
            for out, want in zip(outs, nxt):
                assert torch.equal(out.to(want.dtype), want), f"block {name!r} does not reproduce the next input"
    return calls


def test_toy_blocks_replay_exactly(toy_model, toy_batches):
    s = get_adapter("toy").structure(toy_model)
    assert s.blocks == ["layers.0", "layers.1"]
    _check_chain(toy_model, toy_batches, s.blocks, "norm_f")


def test_mamba_reference_blocks_replay_exactly():
    adapter = get_adapter("mamba")
    model, _ = adapter.load_model(None, {}, "float32")
    s = adapter.structure(model)
    assert s.blocks == [f"backbone.layers.{i}" for i in range(model.config.num_layers)]
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (1, 24), generator=g) for _ in range(2)]
    _check_chain(model, batches, s.blocks, "backbone.norm_f")


class CondBlock(nn.Module):
    """A DiT-like block: positional x, keyword conditioning, and an in-place update of its input."""

    def __init__(self, d=8):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.mod = nn.Linear(4, d)

    def forward(self, x, *, c, gain=1.0):
        x = x.mul_(2.0)  # in place: the captured input must be a copy taken before the call
        return x + gain * torch.tanh(self.fc(x) * (1 + self.mod(c)))


class Sampler(nn.Module):
    """Calls every block at each of ``steps`` steps (a diffusion loop) with keyword arguments."""

    def __init__(self, steps=3):
        super().__init__()
        self.steps = steps
        self.blocks = nn.ModuleList(CondBlock() for _ in range(3))
        self.out = nn.Linear(8, 8)

    def forward(self, x, c):
        for t in range(self.steps):
            h = x
            for block in self.blocks:
                h = block(h, c=c * (t + 1), gain=0.5)
            x = x - 0.1 * self.out(h)
        return x


def _sampler_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 5, 8, generator=g), torch.randn(2, 1, 4, generator=g)) for _ in range(2)]


def test_keyword_arguments_and_repeated_calls_are_captured_in_order():
    torch.manual_seed(0)
    model, batches = Sampler(steps=3), _sampler_batches()
    pristine = copy.deepcopy(batches)  # the first block doubles the batch's x in place
    names = ["blocks.0", "blocks.1", "blocks.2"]
    calls = capture_block_inputs(model, batches, names)
    assert all(len(calls[n]) == 3 * len(batches) for n in names)  # one call per step per batch
    assert calls["blocks.0"][1].kwargs["gain"] == 0.5
    assert torch.equal(calls["blocks.0"][1].kwargs["c"], pristine[0][1] * 2)  # step 2 of batch 0
    assert torch.equal(calls["blocks.0"][0].args[0], pristine[0][0])  # not the tensor doubled in place
    with torch.no_grad():
        for a, b in zip(names, names[1:]):
            for ca, cb in zip(calls[a], calls[b]):
                assert torch.equal(ca.run(model.get_submodule(a)), cb.args[0])


@pytest.mark.parametrize("sequential", [False, True])
def test_sequential_inputs_follow_earlier_changes(toy_model, toy_batches, sequential):
    """Sequential: block 1's inputs come from block 0 as changed by the loop; otherwise from the FP model."""
    fp = copy.deepcopy(toy_model)
    names = ["layers.0", "layers.1"]
    seen = {}
    for name, block, calls in block_inputs(toy_model, toy_batches, names, sequential=sequential):
        seen[name] = calls
        if name == "layers.0":
            with torch.no_grad():
                block.down_proj.weight.mul_(0.5)  # what a calibration step would do to the block
    with torch.no_grad():
        source = toy_model if sequential else fp
        want = [source.layers[0](c.args[0]) for c in seen["layers.0"]]
    assert all(torch.equal(c.args[0], w) for c, w in zip(seen["layers.1"], want))


def test_bad_block_names_are_refused(toy_model, toy_batches):
    with pytest.raises(ValueError, match="block 'layers.7' is not a module of ToyResMLP"):
        capture_block_inputs(toy_model, toy_batches, ["layers.0", "layers.7"])
    toy_model.unused = nn.LayerNorm(4)  # a module the forward never calls
    with pytest.raises(ValueError, match="block 'unused' never ran during the forward pass"):
        capture_block_inputs(toy_model, toy_batches, ["layers.0", "unused"])
    with pytest.raises(ValueError, match="declares none"):
        capture_block_inputs(toy_model, toy_batches, [])
