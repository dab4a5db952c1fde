"""QuantVGGT's DSFQ (core/dsfq.py): dual smoothing (Hadamard, then smoothing in the rotated space) and
learnable weight clipping, on a small VGGT-like toy: LayerNorm -> Linear(64->128) -> GELU ->
Linear(128->64) blocks, a few large norm channels, and a few special tokens far larger than the rest."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from archquant.core import dsfq
from archquant.core import transforms as T
from archquant.core.blocks import capture_block_inputs
from archquant.core.formats import QuantSpec
from archquant.backends.real import convert_to_real
from archquant.core.modules import ActQuantizer, QuantLinear
from archquant.core.quantize_step import LEARNED_INPUT_CLIP
from archquant.core.recipe import Quantize, Recipe, apply_recipe, steps_from_config
from archquant.core.serialization import (read_checkpoint_config, read_checkpoint_tensors, restore_quantized,
                                          save_checkpoint)
from archquant.core.structure import ModelStructure

from conftest import rel_err

pytestmark = pytest.mark.usefixtures("single_thread")

C, HIDDEN, TOKENS, SPECIAL = 64, 128, 32, 2
W4 = QuantSpec(bits=4, granularity="channel", axis=0)
A4 = QuantSpec(bits=4, granularity="token", axis=-1)
SITES = [f"blocks.{i}.{p}" for i in range(2) for p in ("fc1", "fc2")]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(C)
        self.fc1 = nn.Linear(C, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, C)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def toy(seed=0) -> Toy:
    g = torch.Generator().manual_seed(seed)
    model = Toy()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for b in model.blocks:  # a few channels large in every token, as VGGT's norm outputs
            b.norm.weight.abs_().add_(0.5)
            b.norm.weight[torch.randperm(C, generator=g)[:3]] *= 20.0
    return model.eval()


def data(n=10, seed=100):
    """n batches (4 samples x 32 tokens x 64); the first tokens of each sample are "special": huge
    on two channels, so that after the LayerNorm they are spikes much larger than the patch tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(4, TOKENS, C, generator=g)
        x[:, :SPECIAL, 5:7] += 60.0
        out.append(x)
    return out


def structure() -> ModelStructure:
    return ModelStructure(hidden_size=C, quantize=list(SITES), blocks=["blocks.0", "blocks.1"])


def run(model, steps, batches=None):
    apply_recipe(model, Recipe("test", steps), structure(), calib_batches=batches or data(), progress=False)
    return model


def linear_inputs(model, batches):
    """name -> the FP inputs of each quantized Linear, one tensor per call."""
    seen = {n: [] for n in SITES}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach()))
             for n in SITES]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    return seen


def mse(a, b):
    return float((a.double() - b.double()).pow(2).mean())


# --------------------------------------------------------------------------- DualSmoothing


@pytest.mark.parametrize("options", [
    {}, {"weight_max": "unrotated"}, {"order": "smooth_then_rotate"}, {"smooth": False}, {"rotate": False},
    {"act_stat": "ema"}, {"order": "smooth_then_rotate", "weight_max": "unrotated"},
])
def test_dual_smoothing_is_fp_exact(options):
    model = toy()
    x = torch.cat(data(2, seed=7))
    with torch.no_grad():
        fp = model(x)
    step = dsfq.DualSmoothing(**options)
    run(model, [step])
    with torch.no_grad():
        assert rel_err(model(x), fp) < 1e-5
    for name in SITES:
        m = model.get_submodule(name)
        assert isinstance(m, QuantLinear) and m.input_transform.label["dsfq"] == step.arrangement
        kinds = [type(p) for p in m.input_transform.parts]
        expected = {"rotate_then_smooth": [T.HadamardTransform, T.ChannelScale],
                    "smooth_then_rotate": [T.ChannelScale, T.HadamardTransform],
                    "rotate_only": [T.HadamardTransform], "smooth_only": [T.ChannelScale]}[step.arrangement]
        assert kinds == expected


@pytest.mark.parametrize("weight_max", ["rotated", "unrotated"])
def test_smoothing_scale_is_the_rotated_space_formula(weight_max):
    model, batches = toy(), data()
    original = copy.deepcopy(model)
    xs = linear_inputs(original, batches)
    alpha = 0.4
    run(model, [dsfq.DualSmoothing(alpha=alpha, weight_max=weight_max, seed=3)], batches)
    for name in SITES:
        w = original.get_submodule(name).weight.detach().double()
        h = T.HadamardTransform(w.shape[1], seed=3).matrix()
        x = torch.cat([t.reshape(-1, w.shape[1]) for t in xs[name]]).double()
        act = (x @ h).abs().amax(dim=0)
        wmax = (w @ h if weight_max == "rotated" else w).abs().amax(dim=0)
        expected = act.pow(alpha) / wmax.pow(1 - alpha)
        q = model.get_submodule(name)
        rotation, scale = q.input_transform.parts
        assert rotation.seed == 3
        assert torch.allclose(scale.scale.double(), expected, rtol=1e-5)
        # the weight took W H diag(c)
        assert torch.allclose(q.weight.double(), (w @ h) * scale.scale.double()[None, :], rtol=1e-5, atol=1e-6)
    if weight_max == "unrotated":  # P1 really is another scale
        other = run(toy(), [dsfq.DualSmoothing(alpha=alpha, seed=3)], batches)
        assert not torch.allclose(other.blocks[0].fc1.input_transform.parts[1].scale,
                                  model.blocks[0].fc1.input_transform.parts[1].scale, rtol=1e-3)


def test_smooth_then_rotate_takes_statistics_before_the_rotation():
    model, batches = toy(), data()
    xs = linear_inputs(copy.deepcopy(model), batches)
    w = model.blocks[1].fc2.weight.detach().double()
    run(model, [dsfq.DualSmoothing(order="smooth_then_rotate")], batches)
    x = torch.cat([t.reshape(-1, HIDDEN) for t in xs["blocks.1.fc2"]]).double()
    expected = x.abs().amax(dim=0).sqrt() / w.abs().amax(dim=0).sqrt()
    scale, rotation = model.blocks[1].fc2.input_transform.parts
    assert torch.allclose(scale.scale.double(), expected, rtol=1e-5)
    assert isinstance(rotation, T.HadamardTransform)


def test_ema_statistic_is_the_reference_running_average():
    model, batches = toy(), data(10)
    xs = linear_inputs(copy.deepcopy(model), batches[:2])  # max(1, 10 // 5) = 2 batches
    w = model.blocks[0].fc2.weight.detach().double()
    run(model, [dsfq.DualSmoothing(act_stat="ema", seed=1)], batches)
    h = T.HadamardTransform(HIDDEN, seed=1).matrix()
    ema = None
    for x in xs["blocks.0.fc2"]:  # (4, 32, 128) per call
        cur = (x.double() @ h).abs().amax(dim=-2).mean(dim=0)  # token max per sample, mean over samples
        ema = cur if ema is None else 0.95 * ema + 0.05 * cur
    expected = ema.sqrt() / (w @ h).abs().amax(dim=0).sqrt()
    assert torch.allclose(model.blocks[0].fc2.input_transform.parts[1].scale.double(), expected, rtol=1e-5)


def test_dsfq_beats_rtn_at_w4a4_on_outliers_and_special_tokens():
    x = torch.cat(data(4, seed=55))
    for seed in range(3):
        fp_model = toy(seed)
        with torch.no_grad():
            fp = fp_model(x)
        errors = {}
        for name, steps in {"rtn": [], "hadamard": [dsfq.DualSmoothing(smooth=False)],
                            "dsfq": [dsfq.DualSmoothing()]}.items():
            q = run(copy.deepcopy(fp_model), steps + [Quantize(weight=W4, activation=A4, dynamic=True)])
            with torch.no_grad():
                errors[name] = mse(q(x), fp)
        # measured over seeds 0-4: dsfq / rtn 0.51-0.59, dsfq / hadamard-only 0.83-0.92
        assert errors["dsfq"] < 0.7 * errors["rtn"], (seed, errors)
        assert errors["dsfq"] < 0.95 * errors["hadamard"], (seed, errors)


# --------------------------------------------------------------------------- LearnableClipping


def test_learnable_clipping_lowers_the_block_error_and_bakes_exactly(tmp_path):
    model, batches = toy(), data()
    original = copy.deepcopy(model)
    x = torch.cat(data(4, seed=55))
    quantize = Quantize(weight=W4, activation=A4, dynamic=True)
    plain = run(copy.deepcopy(model), [dsfq.DualSmoothing(), quantize])
    clip = dsfq.LearnableClipping(weight=W4, activation=A4)  # the default 200 steps
    run(model, [dsfq.DualSmoothing(), clip, quantize], batches)
    for name, losses in clip.block_losses.items():  # measured: 0.78 and 0.84 of the minmax loss
        assert losses["kept"] and losses["learned"] < 0.9 * losses["plain"], (name, losses)
    with torch.no_grad():
        fp = original(x)
        assert mse(model(x), fp) < mse(plain(x), fp)
    # what training measured is what the quantized model does: block 0 on its FP inputs
    calls = capture_block_inputs(original, batches, ["blocks.0"])["blocks.0"]
    with torch.no_grad():
        deployed = sum(mse(c.run(model.blocks[0]), c.run(original.blocks[0])) for c in calls) / len(calls)
    assert deployed == pytest.approx(clip.block_losses["blocks.0"]["learned"], rel=1e-3)
    # the frozen scales are the clipped ones: never above the minmax scales
    q = model.blocks[0].fc1
    assert q.frozen and float(q.weight_params.scale.max()) <= float(plain.blocks[0].fc1.weight_params.scale.max())
    # saved and rebuilt from the checkpoint files: bit-identical
    with torch.no_grad():
        before = model(x)
    save_checkpoint(model, tmp_path / "ckpt", family="dsfq_toy", model_config={})
    qconfig = read_checkpoint_config(tmp_path / "ckpt")
    assert qconfig["modules"]["blocks.0.fc1"]["input_transform"]["label"]["dsfq"] == "rotate_then_smooth"
    tensors = read_checkpoint_tensors(tmp_path / "ckpt", qconfig)
    rebuilt = restore_quantized(Toy(), qconfig, tmp_path / "ckpt", tensors=tensors)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), before)


def test_a_clip_that_does_not_help_is_not_kept():
    smoothed = run(toy(), [dsfq.DualSmoothing()])
    clip = dsfq.LearnableClipping(steps=1, init=-2.0)  # gamma = 0.12: far too much clipping
    model = run(toy(), [dsfq.DualSmoothing(), clip])
    assert all(not losses["kept"] and losses["learned"] > losses["plain"] for losses in clip.block_losses.values())
    for name in SITES:
        assert torch.equal(model.get_submodule(name).weight, smoothed.get_submodule(name).weight)
        assert not model.get_submodule(name).weight.requires_grad


def test_sequential_inputs_follow_the_earlier_clips():
    runs = {}
    for sequential in (False, True):
        clip = dsfq.LearnableClipping(steps=20, sequential=sequential)
        runs[sequential] = (run(toy(), [dsfq.DualSmoothing(), clip]), clip.block_losses)
    (flat, flat_losses), (seq, seq_losses) = runs[False], runs[True]
    assert flat_losses["blocks.0"] == seq_losses["blocks.0"]  # block 0 reads the model's inputs either way
    assert torch.equal(flat.blocks[0].fc1.weight, seq.blocks[0].fc1.weight)
    assert flat_losses["blocks.1"] != seq_losses["blocks.1"]  # block 1 reads clipped block 0's output


def test_clipped_weight_matches_quantize_of_the_clamped_weight():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=g)
    theta = torch.randn(16, 1, generator=g)
    top = torch.sigmoid(theta) * w.abs().amax(dim=1, keepdim=True)
    lin = nn.Linear(32, 16)
    with torch.no_grad():
        lin.weight.copy_(w)
    wrapper = dsfq._TrainableLinear(lin, 4, None, 0.0, weight_clip=True, act_clip=False, smoothing=False)
    with torch.no_grad():
        wrapper.weight_theta.copy_(theta)
    wrapper.bake(lin)
    assert torch.equal(lin.weight.abs().amax(dim=1, keepdim=True), top)
    q = QuantLinear.from_float(lin, weight_spec=W4)
    q.freeze_weight()
    assert torch.equal(dsfq.clipped_weight(w, theta, 4), q.effective_weight())
    # the gradient reaches the clip factors through the scale (straight-through rounding)
    t = theta.clone().requires_grad_(True)
    dsfq.clipped_weight(w, t, 4).pow(2).sum().backward()
    assert t.grad is not None and bool((t.grad != 0).all())


def test_clipped_activation_is_what_a_dynamic_quantizer_with_that_clip_does():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 32, generator=g) * torch.rand(3, 7, 1, generator=g) * 5
    ratio = torch.sigmoid(torch.tensor(0.7))
    quantizer = ActQuantizer(A4, dynamic=True, clip_ratio=float(ratio))
    assert torch.equal(dsfq.clipped_activation(x, ratio, 4), quantizer(x))
    assert torch.equal(dsfq.clipped_activation(x, None, 4), ActQuantizer(A4, dynamic=True)(x))
    assert float((quantizer(x) - x).abs().max()) > float((ActQuantizer(A4, dynamic=True)(x) - x).abs().max())
    t = ratio.clone().requires_grad_(True)  # the gradient reaches the ratio through the scale
    (dsfq.clipped_activation(x, t, 4) - x).pow(2).sum().backward()
    assert t.grad is not None and float(t.grad) != 0.0


def test_activation_clip_ratios_are_checked():
    with pytest.raises(ValueError, match=r"activation clip_ratio=1.5 not allowed: allowed numbers in \(0, 1\]"):
        ActQuantizer(A4, dynamic=True, clip_ratio=1.5)
    with pytest.raises(ValueError, match="only allowed for a dynamic quantizer"):
        ActQuantizer(A4, dynamic=False, clip_ratio=0.9)
    config = ActQuantizer(A4, dynamic=True, clip_ratio=0.8).to_config()
    assert config["clip_ratio"] == 0.8 and ActQuantizer.from_config(config).clip_ratio == 0.8
    assert "clip_ratio" not in ActQuantizer(A4, dynamic=True).to_config()  # older checkpoints read the same
    with pytest.raises(ValueError, match="clip_ratio=0 not allowed"):
        ActQuantizer.from_config({**config, "clip_ratio": 0})


def test_learned_smoothing_is_exact_with_quantization_off():
    model, original = toy(), toy()
    step = dsfq.LearnableClipping(steps=30, weight_clip=False, smoothing=True, smoothing_lr=5e-2)
    run(model, [dsfq.DualSmoothing(), step])
    assert all(losses["kept"] for losses in step.block_losses.values())
    scale = model.blocks[0].fc1.input_transform.parts[-1].scale
    smoothed_only = run(toy(), [dsfq.DualSmoothing()]).blocks[0].fc1.input_transform.parts[-1].scale
    assert not torch.allclose(scale, smoothed_only)  # the scales moved
    x = torch.cat(data(2, seed=7))
    with torch.no_grad():
        assert rel_err(model(x), original(x)) < 1e-5


def test_full_block_calibration_beats_weight_clipping_alone_and_reloads_bit_identically(tmp_path):
    batches, x = data(), torch.cat(data(4, seed=55))
    quantize = Quantize(weight=W4, activation=A4, dynamic=True)
    lwc = dsfq.LearnableClipping(steps=60)
    full = dsfq.LearnableClipping(steps=60, act_clip=True, smoothing=True)
    lwc_model = run(toy(), [dsfq.DualSmoothing(), lwc, copy.deepcopy(quantize)], batches)
    model = run(toy(), [dsfq.DualSmoothing(), full, quantize], batches)
    for name in ("blocks.0", "blocks.1"):  # measured: 0.87 / 0.83 of LWC's loss
        assert full.block_losses[name]["learned"] < 0.92 * lwc.block_losses[name]["learned"]
    original = toy()
    with torch.no_grad():
        fp = original(x)
        assert mse(model(x), fp) < mse(lwc_model(x), fp)
    ratios = [model.get_submodule(n).input_quantizer.clip_ratio for n in SITES]
    assert all(0.0 < r < 1.0 for r in ratios), ratios
    # what training measured is what the quantized model does: block 0 on its FP inputs
    calls = capture_block_inputs(original, batches, ["blocks.0"])["blocks.0"]
    with torch.no_grad():
        deployed = sum(mse(c.run(model.blocks[0]), c.run(original.blocks[0])) for c in calls) / len(calls)
    assert deployed == pytest.approx(full.block_losses["blocks.0"]["learned"], rel=1e-3)
    with torch.no_grad():
        before = model(x)
    save_checkpoint(model, tmp_path / "ckpt", family="dsfq_toy", model_config={})
    qconfig = read_checkpoint_config(tmp_path / "ckpt")
    assert qconfig["modules"]["blocks.0.fc1"]["input_quantizer"]["clip_ratio"] == ratios[0]
    rebuilt = restore_quantized(Toy(), qconfig, tmp_path / "ckpt",
                                tensors=read_checkpoint_tensors(tmp_path / "ckpt", qconfig))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), before)


def test_a_learned_activation_clip_reaches_the_quantizer_and_keeps_the_linear_fake_quant_under_real():
    W8, A8 = QuantSpec(bits=8, granularity="channel", axis=0), QuantSpec(bits=8, granularity="token", axis=-1)
    model = toy()
    setattr(model.blocks[0].fc1, LEARNED_INPUT_CLIP, 0.9)  # as LearnableClipping(act_clip=True) leaves it
    run(model, [Quantize(weight=W8, activation=A8, dynamic=True)])
    assert model.blocks[0].fc1.input_quantizer.clip_ratio == 0.9
    assert model.blocks[0].fc2.input_quantizer.clip_ratio == 1.0
    convert_to_real(model)
    kept = dict(model._archquant_real["kept"])
    assert "with a learned clip (0.900)" in kept["blocks.0.fc1"] and "blocks.0.fc2" not in kept


def test_a_learned_activation_clip_needs_a_dynamic_quantizer():
    model = toy()
    setattr(model.blocks[0].fc1, LEARNED_INPUT_CLIP, 0.9)
    with pytest.raises(ValueError, match=r"'blocks.0.fc1:input' has a learned activation clip .* set dynamic: true"):
        run(model, [Quantize(weight=W4, activation=QuantSpec(bits=4), dynamic=False)])


@pytest.mark.parametrize("steps,message", [
    ([dsfq.LearnableClipping(steps=1, smoothing=True)], r"'blocks.0.fc1' has no smoothing scale to refine"),
    ([dsfq.DualSmoothing(order="smooth_then_rotate"), dsfq.LearnableClipping(steps=1, smoothing=True)],
     r"learnable_clipping.smoothing: 'blocks.0.fc1' has no smoothing scale"),
])
def test_block_calibration_refusals(steps, message):
    with pytest.raises(ValueError, match=message):
        run(toy(), steps)


def test_activation_clipping_needs_per_token_activations():
    with pytest.raises(ValueError, match=r"learnable_clipping.act_clip needs a symmetric int activation spec per token"):
        dsfq.LearnableClipping(act_clip=True, activation=QuantSpec(bits=4)).validate()
    with pytest.raises(ValueError, match=r"weight_clip, act_clip and smoothing are all false"):
        dsfq.LearnableClipping(weight_clip=False).validate()


def test_learnable_clipping_after_quantize_is_refused():
    with pytest.raises(ValueError, match="before the Quantize step"):
        run(toy(), [Quantize(weight=W4, activation=A4, dynamic=True), dsfq.LearnableClipping(steps=1)])


# --------------------------------------------------------------------------- configuration


def test_steps_are_written_in_yaml_and_compose():
    steps = steps_from_config([{"DualSmoothing": {"order": "smooth_then_rotate", "act_stat": "ema"}},
                               {"LearnableClipping": {"steps": 10, "weight": {"bits": 4, "granularity": "channel"}}},
                               {"Quantize": {"weight": {"bits": 4, "granularity": "channel"}}}])
    assert isinstance(steps[0], dsfq.DualSmoothing) and steps[0].order == "smooth_then_rotate"
    assert isinstance(steps[1], dsfq.LearnableClipping) and steps[1].steps == 10
    recipe = Recipe("dsfq", dsfq.dsfq_steps(clip_steps=5, weight_max="unrotated"))
    assert Recipe.from_dict(recipe.to_dict()).to_dict() == recipe.to_dict()
    assert [s.kind for s in recipe.steps] == ["dual_smoothing", "learnable_clipping", "quantize"]
    assert any("P1" in n for n in recipe.notes())


@pytest.mark.parametrize("step,options,message", [
    ("DualSmoothing", {"order": "rot_first"}, r"DualSmoothing.order has value 'rot_first': allowed values are "
                                              r"rotate_then_smooth, smooth_then_rotate"),
    ("DualSmoothing", {"weight_max": "raw"}, r"DualSmoothing.weight_max has value 'raw'"),
    ("DualSmoothing", {"act_stat": "mean"}, r"DualSmoothing.act_stat has value 'mean'"),
    ("DualSmoothing", {"alpha": 1.5}, r"DualSmoothing.alpha has value 1.5: allowed values are in \[0.0, 1.0\]"),
    ("DualSmoothing", {"momentum": 1.0}, r"DualSmoothing.momentum has value 1.0"),
    ("DualSmoothing", {"rotate": False, "smooth": False}, r"rotate and .*smooth are both false"),
    ("DualSmoothing", {"ignore": ["re:("]}, r"DualSmoothing.ignore\[0\]: pattern 're:\(' is not a valid"),
    ("LearnableClipping", {"steps": 0}, r"LearnableClipping.steps has value 0"),
    ("LearnableClipping", {"lr": 0}, r"LearnableClipping.lr has value 0"),
    ("LearnableClipping", {"min_lr": 1.0}, r"LearnableClipping.min_lr has value 1.0"),
    ("LearnableClipping", {"weight": {"bits": 4, "granularity": "group", "group_size": 32}},
     r"LearnableClipping.weight must be a symmetric int spec per output channel"),
    ("LearnableClipping", {"weight": {"bits": 4, "symmetric": False, "granularity": "channel"}},
     r"LearnableClipping.weight must be a symmetric int spec"),
])
def test_bad_options_are_one_line_errors(step, options, message):
    with pytest.raises(ValueError, match=message) as e:
        steps_from_config([{step: options}])
    assert "\n" not in str(e.value)
