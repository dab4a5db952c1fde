"""archquant.kernels.mamba_conv1d / mamba_scan: quantized Mamba1 kernels vs PyTorch references.

Interpreter on CPU by default; ``TRITON_INTERPRET=0 pytest tests/test_kernels_mamba.py`` on a
CUDA machine runs everything on the GPU (plus the ``gpu``-marked tests).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from archquant.kernels._triton_utils import INTERPRET_MODE  # noqa: E402
from kernel_testing import DEVICE, needs_gpu, requires_backend, run_aot  # noqa: E402
from archquant.kernels.mamba_conv1d import (  # noqa: E402
    causal_conv1d_silu_triton,
    causal_conv1d_update_triton,
    quant_causal_conv1d_silu,
    quant_causal_conv1d_silu_reference,
    quant_causal_conv1d_update,
    quant_causal_conv1d_update_reference,
)
from archquant.kernels.mamba_scan import (  # noqa: E402
    _softplus,
    quant_selective_scan,
    quant_selective_scan_reference,
    quant_selective_state_update,
    quant_selective_state_update_reference,
)

pytestmark = requires_backend
POISON_Q = -128  # never produced (restricted range [-127, 127])
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def codes(*shape, g):
    return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8).to(DEVICE)


# =========================================================================== conv1d


def conv_operands(b, d, l, k, seed=0, weight="int8_channel", bias=True):
    g = gen(seed)
    x_q = codes(b, d, l, g=g)
    if weight == "int8_channel":
        w, w_s = codes(d, k, g=g), (torch.rand(d, generator=g) * 0.01 + 1e-3).to(DEVICE)
    elif weight == "int8_tensor":
        w, w_s = codes(d, k, g=g), 0.004
    else:  # float weight of this dtype, no scale
        w, w_s = (torch.randn(d, k, generator=g) * 0.5).to(weight).to(DEVICE), None
    b_ = (torch.randn(d, generator=g) * 0.5).to(DEVICE) if bias else None
    return x_q, 0.02, w, w_s, b_, 0.015  # x_scale, out_scale: ~5% of the outputs saturate


def conv_magnitude(x_q, x_scale, w, w_scale, bias, conv_state=None):
    """sum_j |x w| + |bias| per output: bounds the fp32 error of the tap sum."""
    from archquant.kernels.mamba_conv1d import _ref_weight

    d = x_q.shape[1]
    wf = _ref_weight(w, w_scale, d).abs()
    x_scale = 1.0 if x_scale is None else x_scale  # float x without scale
    x = x_q.float().abs() * x_scale
    if conv_state is not None:
        x = torch.cat([conv_state[..., 1:].float().abs() * x_scale, x], dim=-1)
    else:
        x = F.pad(x, (wf.shape[1] - 1, 0))
    mag = F.conv1d(x, wf[:, None, :], groups=d)
    return mag + (bias.abs().float()[:, None] if bias is not None else 0.0)


def assert_codes_match(q, q_ref, silu_ref, mag, out_scale):
    """Codes equal, except +-1 where silu / out_scale is within fp32 noise of a .5 tie."""
    assert q.dtype == torch.int8 and q.shape == q_ref.shape
    assert int(q.min()) >= -127  # also: no poisoned (-128) element left
    diff = (q.int() - q_ref.int()).abs()
    assert int(diff.max()) <= 1
    v = silu_ref.double() / out_scale
    dist_to_tie = ((v.abs() - v.abs().floor()) - 0.5).abs()
    band = 1e-6 * (mag.double() / out_scale + v.abs()) + 1e-9
    assert bool((dist_to_tie[diff == 1] <= band[diff == 1]).all())
    return int((diff == 1).sum())


@pytest.mark.parametrize("weight", ["int8_channel", "int8_tensor", torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1, 4), (2, 37, 45, 4), (3, 20, 7, 3), (1, 16, 33, 2)])
def test_conv_matches_reference(shape, weight):
    b, d, l, k = shape
    x_q, xs, w, ws, bias, os_ = conv_operands(b, d, l, k, weight=weight, bias=d != 16)
    out = torch.full((b, d, l), POISON_Q, dtype=torch.int8, device=DEVICE)
    q = quant_causal_conv1d_silu(x_q, xs, w, ws, bias, os_, out=out, block_d=16, block_l=16)
    q_ref, y_ref = quant_causal_conv1d_silu_reference(x_q, xs, w, ws, bias, os_, return_float=True)
    assert q.data_ptr() == out.data_ptr()
    assert_codes_match(q, q_ref, y_ref, conv_magnitude(x_q, xs, w, ws, bias), os_)


def test_conv_default_blocks_strided_layout_and_saturation():
    b, d, l, k = 2, 70, 100, 4
    x_q, xs, w, ws, bias, _ = conv_operands(b, d, l, k, seed=1)
    x_bld = x_q.transpose(1, 2).contiguous()  # the model's (b, l, d) memory layout
    x_view = x_bld.transpose(1, 2)
    assert not x_view.is_contiguous()
    os_ = 0.002  # most outputs saturate at +-127
    out_big = torch.full((b, d, 2 * l), POISON_Q, dtype=torch.int8, device=DEVICE)
    q = quant_causal_conv1d_silu(x_view, xs, w[:, None, :], ws, bias, os_, out=out_big[..., ::2])
    q_ref, y_ref = quant_causal_conv1d_silu_reference(x_q, xs, w, ws, bias, os_, return_float=True)
    assert_codes_match(q, q_ref, y_ref, conv_magnitude(x_q, xs, w, ws, bias), os_)
    assert (q == 127).float().mean() > 0.3
    assert bool((out_big[..., 1::2] == POISON_Q).all())  # untouched


def test_conv_mismatches_are_rare():
    x_q, xs, w, ws, bias, os_ = conv_operands(4, 64, 128, 4, seed=2)
    q = quant_causal_conv1d_silu(x_q, xs, w, ws, bias, os_)
    q_ref, y_ref = quant_causal_conv1d_silu_reference(x_q, xs, w, ws, bias, os_, return_float=True)
    n_diff = assert_codes_match(q, q_ref, y_ref, conv_magnitude(x_q, xs, w, ws, bias), os_)
    assert n_diff <= 8  # of 32768 codes (interpreter: 1 in 786k on similar data)


@pytest.mark.parametrize("k", [4, 3])
def test_conv_update_token_by_token_equals_prefill(k):
    b, d, l = 2, 37, 11
    x_q, xs, w, ws, bias, os_ = conv_operands(b, d, l, k, seed=3)
    g = gen(4)
    init = codes(b, d, k, g=g)

    st_full = init.clone()
    q_full = quant_causal_conv1d_silu(x_q, xs, w, ws, bias, os_, st_full, block_d=16, block_l=16)
    # the state holds the last k inputs of history ++ x
    assert torch.equal(st_full, torch.cat([init, x_q], dim=-1)[..., -k:])

    st_tok, st_ref = init.clone(), init.clone()
    for t in range(l):
        out = torch.full((b, d), POISON_Q, dtype=torch.int8, device=DEVICE)
        q_t = quant_causal_conv1d_update(x_q[:, :, t], st_tok, xs, w, ws, bias, os_, out=out, block_d=16)
        assert torch.equal(q_t, q_full[:, :, t])  # same fp32 ops, same order: bit exact
        q_r, y_r = quant_causal_conv1d_update_reference(x_q[:, :, t], st_ref, xs, w, ws, bias, os_,
                                                         return_float=True)
        assert torch.equal(st_tok, st_ref)
        mag = conv_magnitude(x_q[:, :, t:t + 1], xs, w, ws, bias, st_ref)[..., 0]
        assert_codes_match(q_t, q_r, y_r, mag, os_)
    assert torch.equal(st_tok, st_full)

    # With a state, prefill == reference with the same history.
    st_ref = init.clone()
    q_ref, y_ref = quant_causal_conv1d_silu_reference(x_q, xs, w, ws, bias, os_, st_ref, return_float=True)
    assert torch.equal(st_ref, st_full)
    assert_codes_match(q_full, q_ref, y_ref, conv_magnitude(x_q, xs, w, ws, bias, init), os_)


def test_conv_zero_state_and_chunked_prefill():
    b, d, l, k = 2, 20, 23, 4
    x_q, xs, w, ws, bias, os_ = conv_operands(b, d, l, k, seed=5)
    q_nostate = quant_causal_conv1d_silu(x_q, xs, w, ws, bias, os_, block_l=16)
    st = torch.zeros(b, d, k, dtype=torch.int8, device=DEVICE)
    assert torch.equal(quant_causal_conv1d_silu(x_q, xs, w, ws, bias, os_, st, block_l=16), q_nostate)
    # chunks shorter than k - 1 exercise state columns that survive a prefill
    st = torch.zeros(b, d, k, dtype=torch.int8, device=DEVICE)
    parts, t0 = [], 0
    for t1 in (2, 3, 20, 23):
        parts.append(quant_causal_conv1d_silu(x_q[..., t0:t1], xs, w, ws, bias, os_, st, block_l=16))
        t0 = t1
    assert torch.equal(torch.cat(parts, dim=-1), q_nostate)
    assert torch.equal(st, x_q[..., -k:])


def test_conv_state_strided_view():
    b, d, l, k = 2, 24, 6, 4
    x_q, xs, w, ws, bias, os_ = conv_operands(b, d, l, k, seed=6)
    cache = torch.zeros(b, k, d + 3, dtype=torch.int8, device=DEVICE)
    st = cache[..., :d].transpose(1, 2)  # (b, d, k), non-contiguous
    st_ref = torch.zeros(b, d, k, dtype=torch.int8, device=DEVICE)
    q = quant_causal_conv1d_silu(x_q[..., :4], xs, w, ws, bias, os_, st)
    quant_causal_conv1d_silu_reference(x_q[..., :4], xs, w, ws, bias, os_, st_ref)
    assert torch.equal(st, st_ref)
    for t in range(4, l):
        q = quant_causal_conv1d_update(x_q[:, :, t], st, xs, w, ws, bias, os_)
        quant_causal_conv1d_update_reference(x_q[:, :, t], st_ref, xs, w, ws, bias, os_)
        assert torch.equal(st, st_ref)
    assert q.shape == (b, d)
    assert bool((cache[..., d:] == 0).all())


def test_conv_argument_checks():
    x_q, xs, w, ws, bias, os_ = conv_operands(2, 8, 5, 4)
    with pytest.raises(TypeError):  # (float16/bfloat16/float32 x is valid: see the float tests)
        quant_causal_conv1d_silu(x_q.double(), xs, w, ws, bias, os_)
    with pytest.raises(TypeError, match=r"x_q must be an int8 tensor \(b, d, l\), got torch.int8 \(2, 8\)"):
        quant_causal_conv1d_silu(x_q[..., 0], xs, w, ws, bias, os_)
    with pytest.raises(ValueError):
        quant_causal_conv1d_silu(x_q, xs, w, None, bias, os_)  # int8 weight without scale
    with pytest.raises(ValueError):
        quant_causal_conv1d_silu(x_q, xs, w[:4], ws, bias, os_)
    with pytest.raises(ValueError):
        quant_causal_conv1d_silu(x_q, torch.ones(2), w, ws, bias, os_)  # per-tensor only
    with pytest.raises(ValueError):
        quant_causal_conv1d_silu(x_q, xs, w, ws, bias, os_, torch.zeros(2, 8, 3, dtype=torch.int8))
    with pytest.raises(ValueError):
        quant_causal_conv1d_update(x_q[..., 0], torch.zeros(2, 8, 4), xs, w, ws, bias, os_)
    assert quant_causal_conv1d_silu(x_q[..., :0], xs, w, ws, bias, os_).shape == (2, 8, 0)


# =========================================================================== conv1d, float inputs / outputs
# The same kernels serve the unquantized (FP16 baseline) model: x may be float16 / bfloat16 /
# float32 (x_scale None = 1.0, or a value), the output float (out_scale None, out_dtype), and
# conv_state then holds x's float dtype.

CONV_FLOAT = [torch.float16, torch.bfloat16, torch.float32]


def conv_float_operands(b, d, l, k, dtype, seed=0, *, bias=True, param_dtype=None):
    """x (b, d, l) of ``dtype`` laid out (b, l, d) in memory (the model's ``.transpose(1, 2)``
    view), depthwise weight (d, k) and bias of ``param_dtype`` (default: ``dtype``)."""
    g = gen(seed)
    pdt = param_dtype or dtype
    x = (torch.randn(b, l, d, generator=g) * 1.5).to(dtype).to(DEVICE).transpose(1, 2)
    w = (torch.randn(d, k, generator=g) * 0.5).to(pdt).to(DEVICE)
    b_ = (torch.randn(d, generator=g) * 0.5).to(pdt).to(DEVICE) if bias else None
    return x, w, b_


def float_state(b, d, k, dtype, seed):
    return (torch.randn(b, d, k, generator=gen(seed)) * 1.5).to(dtype).to(DEVICE)


def assert_conv_float_close(y, y_ref, silu_ref, mag):
    """fp32: within ~1e-6 of the tap-sum magnitude; 16-bit: within one ulp of the output dtype
    of the (correctly rounded) reference, plus the same fp32 noise."""
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    assert not torch.isnan(y).any()  # also: no poisoned (NaN) element left
    yf, rf = y.double(), y_ref.double()
    tol = 2e-6 * mag.double() + ULP[y.dtype] * rf.abs() + 1e-30
    assert bool(((yf - rf).abs() <= tol).all()), float((yf - rf).abs().max())
    if y.dtype == torch.float32:  # ~1e-6 relative to the unrounded SiLU value itself
        assert bool(((yf - silu_ref.double()).abs() <= 2e-6 * mag.double() + 1e-30).all())


def test_conv_float_names_compute_causal_conv1d_fn():
    """The float names do mamba_ssm's ``causal_conv1d_fn(x, w, bias, activation="silu")`` (here
    its definition in float64: SiLU of the causal depthwise conv, zero history), and the update
    name continues it token by token from a zero state."""
    import archquant.kernels.mamba_conv1d as C

    assert {"causal_conv1d_silu_triton", "causal_conv1d_update_triton"} <= set(C.__all__)
    b, d, l, k = 2, 12, 9, 4
    x, w, bias = conv_float_operands(b, d, l, k, torch.float32, seed=40)
    x64 = F.pad(x.double(), (k - 1, 0))
    want = F.silu(sum(x64[..., j:j + l] * w.double()[:, j, None] for j in range(k)) + bias.double()[:, None])
    got = causal_conv1d_silu_triton(x, None, w, None, bias, None)
    assert got.dtype == torch.float32
    assert bool(((got.double() - want).abs() <= 1e-5 * (1 + want.abs())).all())
    state = torch.zeros(b, d, k, device=DEVICE)
    steps = torch.stack([causal_conv1d_update_triton(x[..., t], state, None, w, None, bias, None)
                         for t in range(l)], dim=-1)
    assert torch.equal(steps, got)  # same arithmetic, same order (see the module docstring)


@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_dtype", CONV_FLOAT)
def test_conv_float_matches_reference(in_dtype, out_dtype):
    b, d, l, k = 2, 40, 13, 4
    x, w, bias = conv_float_operands(b, d, l, k, in_dtype, seed=30)
    assert not x.is_contiguous() and x.stride(1) == 1  # (b, l, d) memory
    y_dtype = out_dtype or in_dtype
    out = torch.full((b, d, l), float("nan"), dtype=y_dtype, device=DEVICE)
    y = causal_conv1d_silu_triton(x, None, w, None, bias, None, out_dtype=out_dtype, out=out,
                                  block_d=16, block_l=16)
    y_ref, s_ref = quant_causal_conv1d_silu_reference(x, None, w, None, bias, None, out_dtype=out_dtype,
                                                      return_float=True)
    assert y.data_ptr() == out.data_ptr() and y_ref.dtype == y_dtype
    assert_conv_float_close(y, y_ref, s_ref, conv_magnitude(x, None, w, None, bias))
    # default blocks and a new output (contiguous (b, d, l), like the int8 path)
    y2 = causal_conv1d_silu_triton(x, None, w, None, bias, None, out_dtype=out_dtype)
    assert y2.dtype == y_dtype and y2.is_contiguous()
    assert_conv_float_close(y2, y_ref, s_ref, conv_magnitude(x, None, w, None, bias))


@pytest.mark.parametrize("variant", ["k3_no_bias", "fp32_params_scaled", "bf16_int8_weight", "b1_d1"])
def test_conv_float_options(variant):
    b, d, l, k, dt, xs = 2, 24, 9, 4, torch.float16, None
    x, w, bias = conv_float_operands(b, d, l, k, dt, seed=31)
    ws = None
    if variant == "k3_no_bias":
        x, w, bias = conv_float_operands(b, d, l, 3, dt, seed=31, bias=False)
    elif variant == "fp32_params_scaled":  # fp32 weight / bias, an x scale and a weight multiplier
        x, w, bias = conv_float_operands(b, d, l, k, dt, seed=31, param_dtype=torch.float32)
        xs, ws = 0.5, torch.rand(d, generator=gen(32)).to(DEVICE) + 0.5
    elif variant == "bf16_int8_weight":  # bf16 activations, int8 weight codes with per-channel scales
        x, _, bias = conv_float_operands(b, d, l, k, torch.bfloat16, seed=31)
        _, _, w, ws, _, _ = conv_operands(b, d, l, k, seed=33)
    else:
        x, w, bias = conv_float_operands(1, 1, l, k, dt, seed=31)
        w = w[:, None, :]  # nn.Conv1d weight (d, 1, k)
    y = quant_causal_conv1d_silu(x, xs, w, ws, bias, None, out_dtype=torch.float32, block_d=16, block_l=16)
    y_ref, s_ref = quant_causal_conv1d_silu_reference(x, xs, w, ws, bias, None, out_dtype=torch.float32,
                                                      return_float=True)
    assert_conv_float_close(y, y_ref, s_ref, conv_magnitude(x, xs, w, ws, bias))


@pytest.mark.parametrize("in_dtype", CONV_FLOAT)
def test_conv_float_input_int8_output(in_dtype):
    # float activations in, int8 codes out (out_scale given): as the int8 path, same checks
    b, d, l, k = 2, 40, 13, 4
    x, w, bias = conv_float_operands(b, d, l, k, in_dtype, seed=34)
    os_ = 0.01
    out = torch.full((b, d, l), POISON_Q, dtype=torch.int8, device=DEVICE)
    q = quant_causal_conv1d_silu(x, None, w, None, bias, os_, out=out, block_d=16, block_l=16)
    q_ref, y_ref = quant_causal_conv1d_silu_reference(x, None, w, None, bias, os_, return_float=True)
    assert q.data_ptr() == out.data_ptr()
    assert_codes_match(q, q_ref, y_ref, conv_magnitude(x, None, w, None, bias), os_)
    st = torch.zeros(b, d, k, dtype=in_dtype, device=DEVICE)
    q_t = quant_causal_conv1d_update(x[..., 0], st, None, w, None, bias, os_, out_dtype=torch.int8)
    assert torch.equal(q_t, q[..., 0]) and torch.equal(st[..., -1], x[..., 0])


@pytest.mark.parametrize("out_dtype", CONV_FLOAT)
def test_conv_int8_input_float_output(out_dtype):
    b, d, l, k = 2, 40, 13, 3
    x_q, xs, w, ws, bias, _ = conv_operands(b, d, l, k, seed=35)
    out = torch.full((b, d, l), float("nan"), dtype=out_dtype, device=DEVICE)
    y = quant_causal_conv1d_silu(x_q, xs, w, ws, bias, None, out_dtype=out_dtype, out=out, block_d=16,
                                 block_l=16)
    y_ref, s_ref = quant_causal_conv1d_silu_reference(x_q, xs, w, ws, bias, None, out_dtype=out_dtype,
                                                      return_float=True)
    assert y.data_ptr() == out.data_ptr()
    assert_conv_float_close(y, y_ref, s_ref, conv_magnitude(x_q, xs, w, ws, bias))
    # the int8 state and the update, with a float output
    st = codes(b, d, k, g=gen(36))
    st_full, st_tok = st.clone(), st.clone()
    y_full = quant_causal_conv1d_silu(x_q, xs, w, ws, bias, None, st_full, out_dtype=out_dtype)
    for t in range(4):
        y_t = quant_causal_conv1d_update(x_q[..., t], st_tok, xs, w, ws, bias, None, out_dtype=out_dtype)
        assert y_t.dtype == out_dtype and torch.equal(y_t, y_full[..., t])


@pytest.mark.parametrize("in_dtype", CONV_FLOAT)
def test_conv_float_codes_with_scale_equal_int8(in_dtype):
    # float tensors holding the int8 codes, with the same x_scale: the same fp32 values and
    # operations, so codes, float outputs and states are bit-identical to the int8 path
    b, d, l, k = 2, 20, 11, 4
    x_q, xs, w, ws, bias, os_ = conv_operands(b, d, l, k, seed=37)
    x_f = x_q.to(in_dtype)
    for o_s, o_dt in ((os_, None), (None, torch.float32)):
        st_i, st_f = torch.zeros(b, d, k, dtype=torch.int8, device=DEVICE), torch.zeros(b, d, k, dtype=in_dtype,
                                                                                        device=DEVICE)
        y_i = quant_causal_conv1d_silu(x_q, xs, w, ws, bias, o_s, st_i, out_dtype=o_dt)
        y_f = quant_causal_conv1d_silu(x_f, xs, w, ws, bias, o_s, st_f, out_dtype=o_dt)
        assert torch.equal(y_f, y_i) and torch.equal(st_f.float(), st_i.float())
        u_i = quant_causal_conv1d_update(x_q[..., 3], st_i, xs, w, ws, bias, o_s, out_dtype=o_dt)
        u_f = quant_causal_conv1d_update(x_f[..., 3], st_f, xs, w, ws, bias, o_s, out_dtype=o_dt)
        assert torch.equal(u_f, u_i) and torch.equal(st_f.float(), st_i.float())


@pytest.mark.parametrize("in_dtype,k", [(torch.float16, 4), (torch.bfloat16, 3), (torch.float32, 4)])
def test_conv_float_state_chunks_and_token_by_token(in_dtype, k):
    b, d, l = 2, 40, 13
    x, w, bias = conv_float_operands(b, d, l, k, in_dtype, seed=38)
    init = float_state(b, d, k, in_dtype, seed=39)

    st_full = init.clone()
    y_full = causal_conv1d_silu_triton(x, None, w, None, bias, None, st_full, block_d=16, block_l=16)
    assert y_full.dtype == in_dtype
    assert torch.equal(st_full, torch.cat([init, x], dim=-1)[..., -k:])  # values copied as they are
    st_ref = init.clone()
    y_ref, s_ref = quant_causal_conv1d_silu_reference(x, None, w, None, bias, None, st_ref, return_float=True)
    assert torch.equal(st_ref, st_full)
    assert_conv_float_close(y_full, y_ref, s_ref, conv_magnitude(x, None, w, None, bias, init))

    # chunked prefill (chunks shorter than k - 1 too) == one call; the state a strided cache view
    cache = torch.zeros(b, k, d + 3, dtype=in_dtype, device=DEVICE)
    st = cache[..., :d].transpose(1, 2)
    st.copy_(init)
    parts, t0 = [], 0
    for t1 in (1, 3, 9, 13):
        parts.append(causal_conv1d_silu_triton(x[..., t0:t1], None, w, None, bias, None, st, block_l=16))
        t0 = t1
    assert torch.equal(torch.cat(parts, dim=-1), y_full)
    assert torch.equal(st, st_full) and bool((cache[..., d:] == 0).all())

    # token by token == prefill, bit for bit (same fp32 ops in the same order)
    st_tok, st_ref = init.clone(), init.clone()
    for t in range(l):
        out = torch.full((b, d), float("nan"), dtype=in_dtype, device=DEVICE)
        y_t = causal_conv1d_update_triton(x[..., t], st_tok, None, w, None, bias, None, out=out, block_d=16)
        assert y_t.data_ptr() == out.data_ptr()
        assert torch.equal(y_t, y_full[..., t])
        st_before = st_ref.clone()
        y_r, s_r = quant_causal_conv1d_update_reference(x[..., t], st_ref, None, w, None, bias, None,
                                                        return_float=True)
        assert torch.equal(st_tok, st_ref)
        mag = conv_magnitude(x[..., t:t + 1], None, w, None, bias, st_before)[..., 0]
        assert_conv_float_close(y_t, y_r, s_r, mag)
    assert torch.equal(st_tok, st_full)


def test_conv_float_argument_checks():
    b, d, l, k = 2, 8, 5, 4
    x, w, bias = conv_float_operands(b, d, l, k, torch.float16)
    x_q, xs, w_q, ws, bias_q, os_ = conv_operands(b, d, l, k)
    st16 = torch.zeros(b, d, k, dtype=torch.float16, device=DEVICE)
    # the state's dtype follows x
    for bad in (torch.zeros(b, d, k, device=DEVICE), torch.zeros(b, d, k, dtype=torch.int8, device=DEVICE)):
        with pytest.raises(ValueError, match=r"conv_state must be a torch.float16 tensor of shape \(2, 8, 4\)"):
            quant_causal_conv1d_silu(x, None, w, None, bias, None, bad)
        with pytest.raises(ValueError, match="conv_state must be a torch.float16 tensor"):
            quant_causal_conv1d_update(x[..., 0], bad, None, w, None, bias, None)
    with pytest.raises(ValueError, match=r"conv_state must be an int8 tensor of shape \(2, 8, 4\), got torch.float16"):
        quant_causal_conv1d_silu(x_q, xs, w_q, ws, bias_q, os_, st16)  # int8 message unchanged
    with pytest.raises(ValueError, match="conv_state must be an int8 tensor"):
        quant_causal_conv1d_update(x_q[..., 0], st16, xs, w_q, ws, bias_q, os_)
    # int8 x needs its scale; a float output from int8 x needs out_dtype
    with pytest.raises(ValueError, match="x_scale is required for int8 x_q"):
        quant_causal_conv1d_silu(x_q, None, w_q, ws, bias_q, os_)
    with pytest.raises(ValueError, match="x_scale is required for int8 x_q"):
        quant_causal_conv1d_update(x_q[..., 0], torch.zeros(b, d, k, dtype=torch.int8, device=DEVICE), None,
                                   w_q, ws, bias_q, os_)
    with pytest.raises(ValueError, match="with int8 x_q: pass out_dtype"):
        quant_causal_conv1d_silu(x_q, xs, w_q, ws, bias_q, None)
    with pytest.raises(ValueError, match="out_dtype must be one of"):
        quant_causal_conv1d_silu(x, None, w, None, bias, None, out_dtype=torch.int8)
    with pytest.raises(ValueError, match="out_scale is given"):
        quant_causal_conv1d_silu(x, None, w, None, bias, os_, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="x_scale must be one float"):
        quant_causal_conv1d_silu(x, torch.ones(2), w, None, bias, None)
    # other x dtypes / ranks; a preallocated out of the wrong dtype
    with pytest.raises(TypeError, match="x_q must be int8 .*float16/bfloat16/float32 .*got torch.float64"):
        quant_causal_conv1d_silu(x.double(), None, w, None, bias, None)
    with pytest.raises(TypeError, match="x_q must be int8 .*got torch.int32"):
        quant_causal_conv1d_update(x[..., 0].int(), st16, None, w, None, bias, None)
    with pytest.raises(TypeError, match=r"x_q must be a float tensor \(b, d\)"):
        quant_causal_conv1d_update(x, st16, None, w, None, bias, None)
    with pytest.raises(ValueError, match="out must be a torch.float16 tensor"):
        quant_causal_conv1d_silu(x, None, w, None, bias, None, out=torch.empty(b, d, l, device=DEVICE))
    with pytest.raises(ValueError, match="out must be a torch.int8 tensor"):
        quant_causal_conv1d_silu(x, None, w, None, bias, os_, out=torch.empty(b, d, l, device=DEVICE))
    # empty input
    y = quant_causal_conv1d_silu(x[..., :0], None, w, None, bias, None, st16)
    assert y.shape == (b, d, 0) and y.dtype == torch.float16 and not st16.any()


# =========================================================================== selective scan


def scan_operands(b, d, n, l, seed=0, *, dt_bias=True, D=True, z=True):
    g = gen(seed)
    u_q, dt_q = codes(b, d, l, g=g), codes(b, d, l, g=g)
    B_q, C_q = codes(b, n, l, g=g), codes(b, n, l, g=g)
    z_q = codes(b, d, l, g=g) if z else None
    A = (-torch.exp(torch.randn(d, n, generator=g))).to(DEVICE)
    Dv = torch.randn(d, generator=g).to(DEVICE) if D else None
    dtb = (torch.randn(d, generator=g) - 3.0).to(DEVICE) if dt_bias else None
    # (u, u_s, dt, dt_s, dt_bias, A, B, B_s, C, C_s, D, z, z_s)
    return [u_q, 0.02, dt_q, 0.01, dtb, A, B_q, 0.02, C_q, 0.03, Dv, z_q, 0.03 if z else None]


def assert_scan_close(y, y_ref, rel=1e-5):
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    assert not torch.isnan(y).any()
    yf, rf = y.double(), y_ref.double()
    tol = rel * rf.abs().max() + ULP[y.dtype] * rf.abs() + 1e-30
    assert bool(((yf - rf).abs() <= tol).all()), float((yf - rf).abs().max())


def assert_same_as_prefill(step_value, prefill_value):
    """A decode step against the prefill: bit for bit in the interpreter (the same jit step
    function on the same tiles); on a GPU the sum over n may be ordered differently."""
    if INTERPRET_MODE:
        assert torch.equal(step_value, prefill_value)
    else:
        assert_scan_close(step_value, prefill_value, rel=1e-6)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 37, 16, 45), (3, 20, 5, 9)])
def test_scan_matches_reference(shape, out_dtype):
    ops = scan_operands(*shape)
    b, d, n, l = shape
    out = torch.full((b, d, l), float("nan"), dtype=out_dtype, device=DEVICE)
    y, h = quant_selective_scan(*ops, out_dtype=out_dtype, return_state=True, out=out, block_d=16)
    y_ref, h_ref = quant_selective_scan_reference(*ops, out_dtype=out_dtype, return_state=True)
    assert y.data_ptr() == out.data_ptr()
    assert_scan_close(y, y_ref)
    assert_scan_close(h, h_ref)


@pytest.mark.parametrize("variant", ["no_D", "no_z", "no_dt_bias", "h0", "no_softplus"])
def test_scan_options(variant):
    b, d, n, l = 2, 24, 8, 13
    ops = scan_operands(b, d, n, l, seed=1, D=variant != "no_D", z=variant != "no_z",
                        dt_bias=variant != "no_dt_bias")
    kw = {}
    if variant == "h0":
        kw["h0"] = torch.randn(b, d, n, generator=gen(2)).to(DEVICE)
    if variant == "no_softplus":
        ops[2], ops[3], ops[4] = ops[2].abs(), 1e-3, None  # dt = code * 1e-3 in [0, 0.127]
        kw["dt_softplus"] = False
    y, h = quant_selective_scan(*ops, out_dtype=torch.float32, return_state=True, block_d=16, **kw)
    y_ref, h_ref = quant_selective_scan_reference(*ops, out_dtype=torch.float32, return_state=True, **kw)
    assert_scan_close(y, y_ref)
    assert_scan_close(h, h_ref)


def test_scan_model_layout_views_and_default_block():
    # (b, l, d) activations and B, C as column slices of one x_proj-like output
    b, d, n, l, r = 2, 40, 16, 20, 3
    g = gen(3)
    u_bld, dt_bld, z_bld = (codes(b, l, d, g=g) for _ in range(3))
    xproj = codes(b, l, r + 2 * n, g=g)
    B_v, C_v = xproj[..., r:r + n].transpose(1, 2), xproj[..., r + n:].transpose(1, 2)
    ops = scan_operands(b, d, n, l, seed=4)
    ops[0], ops[2], ops[11] = u_bld.transpose(1, 2), dt_bld.transpose(1, 2), z_bld.transpose(1, 2)
    ops[6], ops[8] = B_v, C_v
    y = quant_selective_scan(*ops, out_dtype=torch.float16)
    assert y.stride() == ops[0].stride()  # laid out like u: (b, l, d) memory
    ref_ops = [o.contiguous() if isinstance(o, torch.Tensor) else o for o in ops]
    assert_scan_close(y, quant_selective_scan_reference(*ref_ops, out_dtype=torch.float16))


@triton.jit
def _softplus_test_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < N, other=0.0)
    tl.store(y_ptr + offs, _softplus(x), mask=offs < N)


def test_softplus_matches_torch():
    x = torch.cat([torch.linspace(-100, 100, 2001), torch.tensor([19.999, 20.0, 20.001, -17.0, -30.0]),
                   torch.randn(500) * 3]).to(DEVICE)
    y = torch.empty_like(x)
    _softplus_test_kernel[(triton.cdiv(x.numel(), 512),)](x, y, x.numel(), BLOCK=512, enable_fp_fusion=False)
    ref = F.softplus(x.double())
    # interpreter: numpy exp/log (< 1 ulp) + the log1p correction; GPU: ex2.approx of the
    # rounded product x * log2(e) has ~|x| * 2^-24 relative error, and subnormals may flush
    rel, floor = (4e-7, 1e-45) if INTERPRET_MODE else (4e-6, 1e-37)
    assert bool(((y.double() - ref).abs() <= rel * ref.abs() + floor).all())


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_state_update_token_by_token_equals_scan(out_dtype):
    b, d, n, l = 2, 37, 16, 12
    ops = scan_operands(b, d, n, l, seed=5)
    h0 = torch.randn(b, d, n, generator=gen(6)).to(DEVICE)
    y_full, h_full = quant_selective_scan(*ops, out_dtype=out_dtype, h0=h0, return_state=True, block_d=16)
    u, us, dt, dts, dtb, A, B, Bs, C, Cs, D, z, zs = ops
    st, st_ref = h0.clone(), h0.clone()
    for t in range(l):
        step = (u[..., t], us, dt[..., t], dts, dtb, A, B[..., t], Bs, C[..., t], Cs, D, z[..., t], zs)
        out = torch.full((b, d), float("nan"), dtype=out_dtype, device=DEVICE)
        y_t = quant_selective_state_update(st, *step, out_dtype=out_dtype, out=out, block_d=16)
        y_r = quant_selective_state_update_reference(st_ref, *step, out_dtype=out_dtype)
        assert_scan_close(y_t, y_r)
        assert_scan_close(st, st_ref)
        assert_same_as_prefill(y_t, y_full[..., t])
    assert_same_as_prefill(st, h_full)


def test_scan_chunked_prefill_with_state():
    b, d, n, l = 1, 20, 4, 17
    ops = scan_operands(b, d, n, l, seed=7)
    y_full, h_full = quant_selective_scan(*ops, out_dtype=torch.float32, return_state=True, block_d=16)
    cut = lambda o, s: o[..., s] if isinstance(o, torch.Tensor) and o.dim() == 3 else o  # noqa: E731
    y1, h1 = quant_selective_scan(*[cut(o, slice(0, 6)) for o in ops], out_dtype=torch.float32,
                                  return_state=True, block_d=16)
    y2, h2 = quant_selective_scan(*[cut(o, slice(6, l)) for o in ops], out_dtype=torch.float32,
                                  h0=h1, return_state=True, block_d=16)
    assert torch.equal(torch.cat([y1, y2], dim=-1), y_full)
    assert torch.equal(h2, h_full)


def test_scan_argument_checks():
    ops = scan_operands(2, 8, 4, 5)
    with pytest.raises(ValueError):
        quant_selective_scan(*ops, out_dtype=torch.int8)
    bad = list(ops)
    bad[6] = ops[6][:, :3]
    with pytest.raises(ValueError):
        quant_selective_scan(*bad)
    bad = list(ops)
    bad[1] = torch.ones(8)
    with pytest.raises(ValueError):
        quant_selective_scan(*bad)
    with pytest.raises(ValueError):
        quant_selective_scan(*ops, h0=torch.zeros(2, 8, 3))
    y, h = quant_selective_scan(*[o[..., :0] if isinstance(o, torch.Tensor) and o.dim() == 3 else o
                                  for o in ops], return_state=True)
    assert y.shape == (2, 8, 0) and torch.equal(h, torch.zeros(2, 8, 4, device=DEVICE))


# =========================================================================== selective scan, float inputs
# The same kernels serve the unquantized (FP16 baseline) model: u, dt, B, C, z may each be
# float16 / bfloat16 / float32, with scale None (= 1.0) or a value.

FLOAT_IN = [torch.float16, torch.bfloat16, torch.float32]
INPUT_POS = {"u": (0, 1), "dt": (2, 3), "B": (6, 7), "C": (8, 9), "z": (11, 12)}


def floatify(ops, dtype, which=tuple(INPUT_POS), keep_scale=False):
    """Inputs ``which`` as ``dtype`` tensors: the dequantized values with scale None, or
    (``keep_scale``) the codes themselves (exact in every float dtype) with their scale."""
    ops = list(ops)
    for name in which:
        i, j = INPUT_POS[name]
        if ops[i] is None:
            continue
        if keep_scale:
            ops[i] = ops[i].to(dtype)
        else:
            ops[i], ops[j] = (ops[i].float() * ops[j]).to(dtype), None
    return ops


def bld(t):
    """Same values, the model's (b, l, d) memory layout: a ``.transpose(1, 2)`` view."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def test_float_names_compute_the_gated_recurrence():
    """The float names run the Mamba1 scan on float inputs without scales: checked against the
    recurrence written out in float64 (h = exp(dt A) h + dt u B, y = (C h + D u) SiLU(z), dt =
    softplus(dt_raw + dt_bias)); the update name continues it step by step."""
    import archquant.kernels.mamba_scan as S

    assert {"selective_scan_triton", "selective_state_update_triton"} <= set(S.__all__)
    b, d, n, l = 2, 6, 4, 7
    g = gen(41)
    u, dtr, z = (torch.randn(b, d, l, generator=g).to(DEVICE) for _ in range(3))
    B, C = (torch.randn(b, n, l, generator=g).to(DEVICE) for _ in range(2))
    A = -torch.exp(torch.randn(d, n, generator=g)).to(DEVICE)
    D, dtb = torch.randn(d, generator=g).to(DEVICE), (torch.randn(d, generator=g) - 1).to(DEVICE)
    y, h = S.selective_scan_triton(u, None, dtr, None, dtb, A, B, None, C, None, D, z, None,
                                   out_dtype=torch.float32, return_state=True)
    h64 = torch.zeros(b, d, n, dtype=torch.float64)
    want = []
    for t in range(l):
        dt = F.softplus(dtr[..., t].double() + dtb.double())  # (b, d)
        dBu = (dt * u[..., t].double())[..., None] * B[:, None, :, t].double()
        h64 = torch.exp(dt[..., None] * A.double()) * h64 + dBu
        yt = (h64 * C[:, None, :, t].double()).sum(-1) + D.double() * u[..., t].double()
        want.append(yt * F.silu(z[..., t].double()))
    want = torch.stack(want, dim=-1)
    assert bool(((y.double() - want).abs() <= 1e-5 * (1 + want.abs())).all())
    assert torch.allclose(h.double(), h64, rtol=1e-5, atol=1e-6)
    state = torch.zeros(b, d, n, device=DEVICE)
    steps = torch.stack([S.selective_state_update_triton(state, u[..., t], None, dtr[..., t], None, dtb, A,
                                                         B[..., t], None, C[..., t], None, D, z[..., t], None,
                                                         out_dtype=torch.float32) for t in range(l)], dim=-1)
    assert torch.allclose(steps, y, rtol=1e-6, atol=1e-6) and torch.allclose(state, h, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_dtype", FLOAT_IN)
def test_scan_float_inputs_match_reference(in_dtype, out_dtype):
    b, d, n, l = 2, 37, 5, 19
    ops = floatify(scan_operands(b, d, n, l, seed=20), in_dtype)
    for i in (0, 2, 6, 8, 11):  # (b, l, d) / (b, l, n) memory, passed as views
        ops[i] = bld(ops[i])
        assert not ops[i].is_contiguous() and ops[i].dtype == in_dtype
    h0 = torch.randn(b, d, n, generator=gen(21)).to(DEVICE)
    y, h = quant_selective_scan(*ops, out_dtype=out_dtype, h0=h0, return_state=True)
    y_ref, h_ref = quant_selective_scan_reference(*ops, out_dtype=out_dtype, h0=h0, return_state=True)
    assert y.stride() == ops[0].stride()  # laid out like u
    assert_scan_close(y, y_ref)
    assert_scan_close(h, h_ref)


@pytest.mark.parametrize("in_dtype", FLOAT_IN)
def test_scan_float_codes_with_scales_equal_int8(in_dtype):
    # float tensors holding the int8 codes, with the same scales: the same fp32 values
    # and operations, so the outputs are bit-identical to the int8 path
    b, d, n, l = 2, 20, 16, 9
    ops = scan_operands(b, d, n, l, seed=22)
    f_ops = floatify(ops, in_dtype, keep_scale=True)
    y_i, h_i = quant_selective_scan(*ops, out_dtype=torch.float32, return_state=True, block_d=16)
    y_f, h_f = quant_selective_scan(*f_ops, out_dtype=torch.float32, return_state=True, block_d=16)
    assert torch.equal(y_f, y_i) and torch.equal(h_f, h_i)
    step = [o[..., 3] if isinstance(o, torch.Tensor) and o.dim() == 3 else o for o in ops]
    f_step = [o[..., 3] if isinstance(o, torch.Tensor) and o.dim() == 3 else o for o in f_ops]
    st_i, st_f = h_i.clone(), h_i.clone()
    assert torch.equal(quant_selective_state_update(st_f, *f_step, out_dtype=torch.float32),
                       quant_selective_state_update(st_i, *step, out_dtype=torch.float32))
    assert torch.equal(st_f, st_i)


@pytest.mark.parametrize("mix", ["u_z_int8", "bf16_with_scale"])
def test_scan_mixed_int8_and_float_inputs(mix):
    b, d, n, l = 2, 24, 16, 11
    ops = scan_operands(b, d, n, l, seed=23)
    if mix == "u_z_int8":  # dt, B, C fp16 without scale; u, z int8 codes
        ops = floatify(ops, torch.float16, which=("dt", "B", "C"))
    else:  # u, C bf16 with a scale (not 1), the rest int8
        ops = floatify(ops, torch.bfloat16, which=("u", "C"))
        ops[0], ops[1] = (ops[0].float() * 4.0).to(torch.bfloat16), 0.25
        ops[8], ops[9] = ops[8].to(torch.bfloat16), 0.03
    y, h = quant_selective_scan(*ops, out_dtype=torch.float32, return_state=True, block_d=16)
    y_ref, h_ref = quant_selective_scan_reference(*ops, out_dtype=torch.float32, return_state=True)
    assert_scan_close(y, y_ref)
    assert_scan_close(h, h_ref)


@pytest.mark.parametrize("variant", ["no_z", "no_softplus"])
def test_scan_float_options(variant):
    b, d, n, l = 2, 24, 5, 10
    ops = floatify(scan_operands(b, d, n, l, seed=24, z=variant != "no_z"), torch.float16)
    kw = {}
    if variant == "no_softplus":
        ops[2], ops[4] = ops[2].abs(), None  # dt in [0, 1.27]
        kw["dt_softplus"] = False
    assert ops[12] is None
    y, h = quant_selective_scan(*ops, out_dtype=torch.float32, return_state=True, block_d=16, **kw)
    y_ref, h_ref = quant_selective_scan_reference(*ops, out_dtype=torch.float32, return_state=True, **kw)
    assert_scan_close(y, y_ref)
    assert_scan_close(h, h_ref)
    st, st_ref = h.clone(), h.clone()
    step = [o[..., 0] if isinstance(o, torch.Tensor) and o.dim() == 3 else o for o in ops]
    y_t = quant_selective_state_update(st, *step, out_dtype=torch.float32, block_d=16, **kw)
    assert_scan_close(y_t, quant_selective_state_update_reference(st_ref, *step, out_dtype=torch.float32, **kw))
    assert_scan_close(st, st_ref)


@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                                (torch.float32, torch.float32)])
def test_state_update_float_token_by_token_equals_scan(in_dtype, out_dtype):
    b, d, n, l = 2, 37, 16, 8
    ops = floatify(scan_operands(b, d, n, l, seed=25), in_dtype)
    h0 = torch.randn(b, d, n, generator=gen(26)).to(DEVICE)
    y_full, h_full = quant_selective_scan(*ops, out_dtype=out_dtype, h0=h0, return_state=True, block_d=16)
    st, st_ref = h0.clone(), h0.clone()
    for t in range(l):
        step = [o[..., t] if isinstance(o, torch.Tensor) and o.dim() == 3 else o for o in ops]
        out = torch.full((b, d), float("nan"), dtype=out_dtype, device=DEVICE)
        y_t = quant_selective_state_update(st, *step, out_dtype=out_dtype, out=out, block_d=16)
        assert y_t.data_ptr() == out.data_ptr()
        assert_scan_close(y_t, quant_selective_state_update_reference(st_ref, *step, out_dtype=out_dtype))
        assert_scan_close(st, st_ref)
        assert_same_as_prefill(y_t, y_full[..., t])
    assert_same_as_prefill(st, h_full)


def test_scan_float_argument_checks():
    b, d, n, l = 2, 8, 4, 5
    ops = scan_operands(b, d, n, l)
    f_ops = floatify(ops, torch.float16)
    step = lambda o: [x[..., 0] if isinstance(x, torch.Tensor) and x.dim() == 3 else x for x in o]  # noqa: E731
    st = torch.zeros(b, d, n, device=DEVICE)
    for pos, name, dtype in ((0, "u_q", torch.int32), (6, "B_q", torch.float64), (11, "z_q", torch.uint8)):
        bad = list(f_ops)
        bad[pos] = bad[pos].to(dtype)
        with pytest.raises(ValueError, match=f"{name} must be int8 .*float16/bfloat16/float32, got {dtype}"):
            quant_selective_scan(*bad)
        with pytest.raises(ValueError, match=f"{name} must be int8"):
            quant_selective_state_update(st, *step(bad))
    for pos, name in ((1, "u_scale"), (3, "dt_scale"), (7, "B_scale"), (9, "C_scale"), (12, "z_scale")):
        bad = list(ops)  # int8 codes, scale None
        bad[pos] = None
        with pytest.raises(ValueError, match=f"{name} is required for int8 {name[:-6]}_q"):
            quant_selective_scan(*bad)
        with pytest.raises(ValueError, match=f"{name} is required"):
            quant_selective_state_update(st, *step(bad))
    bad = list(f_ops)
    bad[8] = bad[8][:, :3]  # float C with a wrong shape
    with pytest.raises(ValueError, match="C_q must be a tensor of shape"):
        quant_selective_scan(*bad)
    bad = list(f_ops)
    bad[7] = torch.ones(3)  # a float input's scale, when given, is still one value
    with pytest.raises(ValueError, match="B_scale must be one float"):
        quant_selective_scan(*bad)
    with pytest.raises(ValueError, match="u_q must be an int8 or float tensor"):
        quant_selective_scan(f_ops[0][..., 0], *f_ops[1:])
    # the int8 messages are unchanged
    with pytest.raises(ValueError, match=r"u_q must be an int8 tensor \(b, d, l\)"):
        quant_selective_scan(ops[0][..., 0], *ops[1:])
    bad = list(ops)
    bad[6] = ops[6][:, :3]
    with pytest.raises(ValueError, match=r"B_q must be an int8 tensor of shape \(2, 4, 5\), got torch.int8"):
        quant_selective_scan(*bad)
    # empty float inputs
    y, h = quant_selective_scan(*[o[..., :0] if isinstance(o, torch.Tensor) and o.dim() == 3 else o
                                  for o in f_ops], return_state=True)
    assert y.shape == (2, 8, 0) and torch.equal(h, torch.zeros(2, 8, 4, device=DEVICE))


# =========================================================================== GPU


@pytest.mark.gpu
@needs_gpu
def test_gpu_conv_large():
    b, d, l, k = 2, 1536, 1000, 4
    x_q, xs, w, ws, bias, os_ = conv_operands(b, d, l, k, seed=10)
    st = torch.zeros(b, d, k, dtype=torch.int8, device=DEVICE)
    q = quant_causal_conv1d_silu(x_q, xs, w, ws, bias, os_, st)
    q_ref, y_ref = quant_causal_conv1d_silu_reference(x_q, xs, w, ws, bias, os_, return_float=True)
    n_diff = assert_codes_match(q, q_ref, y_ref, conv_magnitude(x_q, xs, w, ws, bias), os_)
    assert n_diff <= 1e-4 * q.numel()
    assert torch.equal(st, x_q[..., -k:])
    g = gen(11)
    for _ in range(8):
        x_t = codes(b, d, g=g)
        st_before, st_ref = st.clone(), st.clone()
        q_t = quant_causal_conv1d_update(x_t, st, xs, w, ws, bias, os_)
        q_r, y_r = quant_causal_conv1d_update_reference(x_t, st_ref, xs, w, ws, bias, os_, return_float=True)
        assert torch.equal(st, st_ref)
        mag = conv_magnitude(x_t[..., None], xs, w, ws, bias, st_before)[..., 0]
        assert_codes_match(q_t, q_r, y_r, mag, os_)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16])
def test_gpu_conv_float_large(in_dtype):
    # the FP16 / BF16 baseline at Mamba sizes: (b, l, d) activations, float state, float output
    b, d, l, k = 2, 1536, 1000, 4
    x, w, bias = conv_float_operands(b, d, l, k, in_dtype, seed=40)
    st = torch.zeros(b, d, k, dtype=in_dtype, device=DEVICE)
    out = torch.empty(b, l, d, dtype=in_dtype, device=DEVICE).transpose(1, 2)
    y = causal_conv1d_silu_triton(x, None, w, None, bias, None, st, out=out)
    y_ref, s_ref = quant_causal_conv1d_silu_reference(x, None, w, None, bias, None, return_float=True)
    assert_conv_float_close(y, y_ref, s_ref, conv_magnitude(x, None, w, None, bias))
    assert torch.equal(st, x[..., -k:])
    g = gen(41)
    for _ in range(8):
        x_t = (torch.randn(b, d, generator=g) * 1.5).to(in_dtype).to(DEVICE)
        st_before, st_ref = st.clone(), st.clone()
        y_t = causal_conv1d_update_triton(x_t, st, None, w, None, bias, None)
        y_r, s_r = quant_causal_conv1d_update_reference(x_t, st_ref, None, w, None, bias, None, return_float=True)
        assert torch.equal(st, st_ref)
        mag = conv_magnitude(x_t[..., None], None, w, None, bias, st_before)[..., 0]
        assert_conv_float_close(y_t, y_r, s_r, mag)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_scan_large(out_dtype):
    b, d, n, l = 2, 1536, 16, 512
    ops = scan_operands(b, d, n, l, seed=12)
    y, h = quant_selective_scan(*ops, out_dtype=out_dtype, return_state=True)
    y_ref, h_ref = quant_selective_scan_reference(*ops, out_dtype=out_dtype, return_state=True)
    assert_scan_close(y, y_ref, rel=1e-4)  # GPU exp/log are approximate (a few ulp)
    assert_scan_close(h, h_ref, rel=1e-4)
    st, st_ref = h.clone(), h.clone()
    u, us, dt, dts, dtb, A, B, Bs, C, Cs, D, z, zs = ops
    step = (u[..., 0], us, dt[..., 0], dts, dtb, A, B[..., 0], Bs, C[..., 0], Cs, D, z[..., 0], zs)
    y_t = quant_selective_state_update(st, *step, out_dtype=out_dtype)
    y_r = quant_selective_state_update_reference(st_ref, *step, out_dtype=out_dtype)
    assert_scan_close(y_t, y_r, rel=1e-4)
    assert_scan_close(st, st_ref, rel=1e-4)


# =========================================================================== sm_90 AOT compile (CPU)



MAMBA_AOT_BODY = r'''
from archquant.kernels import mamba_conv1d as C, mamba_scan as S

i8 = {n: "i8" for n in ("x_ptr", "w_ptr", "st_ptr", "y_ptr", "u_ptr", "dt_ptr", "z_ptr", "b_ptr", "c_ptr")}
# conv: X_SCALED / W_SCALED (x, weight multiplied by a scale), OUT_CODE -1 = int8 codes, 0/1/2 = fp32/fp16/bf16
Q8 = dict(X_SCALED=True, W_SCALED=True, OUT_CODE=-1)
for has_state in (False, True):
    aot(C._conv1d_silu_kernel, dict(KW=4, HAS_BIAS=True, HAS_STATE=has_state, QMAX=127, BLOCK_D=32, BLOCK_L=32, **Q8),
        i8, ones=("s_xl", "s_wk", "s_ws", "s_sk", "s_yl"))
aot(C._conv1d_silu_kernel, dict(KW=3, HAS_BIAS=False, HAS_STATE=True, QMAX=127, BLOCK_D=16, BLOCK_L=16,
                                X_SCALED=True, W_SCALED=False, OUT_CODE=-1),
    dict(i8, w_ptr="fp32"))  # generic strides, fp32 weight
aot(C._conv_state_write_kernel, dict(KW=4, KW_PAD=4, BLOCK_D=32), i8, ones=("s_xl", "s_sk"))
aot(C._conv1d_update_kernel, dict(KW=4, KW_PAD=4, HAS_BIAS=True, QMAX=127, BLOCK_D=64, **Q8), i8,
    ones=("s_xd", "s_wk", "s_sk", "s_yd"))
# conv, float: the FP16 baseline (fp16 x / weight / bias / state / output, no scales; x and out
# in the model's (b, l, d) memory), bf16 with an x scale, and the mixed int8 <-> float cases
for ty, code in (("fp16", 1), ("bf16", 2)):
    fl = dict(x_ptr=ty, w_ptr=ty, bias_ptr=ty, st_ptr=ty, y_ptr=ty)
    for has_state in (False, True):
        aot(C._conv1d_silu_kernel, dict(KW=4, HAS_BIAS=True, HAS_STATE=has_state, QMAX=127, BLOCK_D=32, BLOCK_L=32,
                                        X_SCALED=ty == "bf16", W_SCALED=False, OUT_CODE=code),
            fl, ones=("s_xd", "s_wk", "s_sk", "s_yd"))  # state (b, d, k) contiguous, as the model's
    aot(C._conv1d_silu_kernel, dict(KW=3, HAS_BIAS=False, HAS_STATE=True, QMAX=127, BLOCK_D=16, BLOCK_L=16,
                                    X_SCALED=False, W_SCALED=False, OUT_CODE=0), dict(fl, y_ptr="fp32"))  # generic
    aot(C._conv_state_write_kernel, dict(KW=4, KW_PAD=4, BLOCK_D=32), fl, ones=("s_xd", "s_sk"))
    aot(C._conv1d_update_kernel, dict(KW=4, KW_PAD=4, HAS_BIAS=True, QMAX=127, BLOCK_D=64,
                                      X_SCALED=ty == "bf16", W_SCALED=False, OUT_CODE=code),
        fl, ones=("s_xd", "s_wk", "s_sk", "s_yd"))
aot(C._conv1d_silu_kernel, dict(KW=4, HAS_BIAS=True, HAS_STATE=True, QMAX=127, BLOCK_D=32, BLOCK_L=32,
                                X_SCALED=False, W_SCALED=False, OUT_CODE=-1),
    dict(x_ptr="fp16", w_ptr="fp16", bias_ptr="fp16", st_ptr="fp16", y_ptr="i8"), ones=("s_xd", "s_wk", "s_sk", "s_yd"))
aot(C._conv1d_silu_kernel, dict(KW=4, HAS_BIAS=True, HAS_STATE=False, QMAX=127, BLOCK_D=32, BLOCK_L=32,
                                X_SCALED=True, W_SCALED=True, OUT_CODE=0), dict(i8, y_ptr="fp32"),
    ones=("s_xl", "s_wk", "s_ws", "s_yl"))
# SCALED: bit mask of the inputs with a scale (u 1, dt 2, B 4, C 8, z 16); 31 = all int8
for out_code, y_ty in ((0, "fp32"), (1, "fp16"), (2, "bf16")):
    aot(S._selective_scan_kernel,
        dict(HAS_D=True, HAS_Z=True, HAS_DT_BIAS=True, DT_SOFTPLUS=True, HAS_H0=True, STORE_STATE=True,
             OUT_CODE=out_code, SCALED=31, BLOCK_D=32 if out_code else 16, BLOCK_N=16),
        dict(i8, y_ptr=y_ty), ones=("s_ud", "s_dtd", "s_zd", "s_bn", "s_cn", "s_an", "s_hn", "s_yd", "s_on"))
    aot(S._state_update_kernel,
        dict(HAS_D=True, HAS_Z=True, HAS_DT_BIAS=True, DT_SOFTPLUS=True, OUT_CODE=out_code, SCALED=31,
             BLOCK_D=16, BLOCK_N=16),
        dict(i8, y_ptr=y_ty), ones=("s_ud", "s_dtd", "s_zd", "s_bn", "s_cn", "s_an", "s_sn", "s_yd"))
aot(S._selective_scan_kernel,
    dict(HAS_D=False, HAS_Z=False, HAS_DT_BIAS=False, DT_SOFTPLUS=False, HAS_H0=False, STORE_STATE=False,
         OUT_CODE=1, SCALED=15, BLOCK_D=32, BLOCK_N=2), dict(i8, y_ptr="fp16"))  # n = 1, generic strides
# float inputs (the FP16 baseline: no scales), and bf16 inputs with scales
for in_ty, scaled in (("fp16", 0), ("bf16", 31)):
    fl = {n: in_ty for n in ("u_ptr", "dt_ptr", "z_ptr", "b_ptr", "c_ptr")}
    for bd in (16, 32):
        aot(S._selective_scan_kernel,
            dict(HAS_D=True, HAS_Z=True, HAS_DT_BIAS=True, DT_SOFTPLUS=True, HAS_H0=False, STORE_STATE=True,
                 OUT_CODE=1, SCALED=scaled, BLOCK_D=bd, BLOCK_N=16),
            dict(fl, y_ptr="fp16"), ones=("s_ud", "s_dtd", "s_zd", "s_bn", "s_cn", "s_an", "s_yd", "s_on"))
    aot(S._state_update_kernel,
        dict(HAS_D=True, HAS_Z=True, HAS_DT_BIAS=True, DT_SOFTPLUS=True, OUT_CODE=1, SCALED=scaled,
             BLOCK_D=16, BLOCK_N=16),
        dict(fl, y_ptr="fp16"), ones=("s_ud", "s_dtd", "s_zd", "s_bn", "s_cn", "s_an", "s_sn", "s_yd"))
'''


def test_kernels_compile_for_sm90(tmp_path):
    run_aot(tmp_path, MAMBA_AOT_BODY)
