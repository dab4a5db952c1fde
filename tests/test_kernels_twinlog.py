"""archquant.kernels.twinlog_gemm: the twin-log LUT GEMM vs its reference, and the real module
``RealTwinLogLinear`` that ``convert_to_real`` builds from it vs the fake-quant twin.

Interpreter on CPU by default; ``TRITON_INTERPRET=0 pytest tests/test_kernels_twinlog.py`` on a
CUDA machine runs the kernel tests on the GPU.

Tolerances. fp32: the kernel and the reference sum the same K fp32 products in different orders,
each within gamma_K * sum |x| |W| (gamma_K ~ K * 2^-24), so |y - ref| <= (2K + 8) * 2^-24 *
(|x| @ |W|^T). 16-bit x: the kernel's dot rounds each level to x's dtype (nearest even: relative
2^-11 fp16, 2^-8 bf16 of each product) and both sides round the output once (2^-10 / 2^-7 of
|ref| together). Against a reference given the levels already rounded to x's dtype the level
term goes away; one-hot rows (a single 1.0 per row of x) read each level back exactly, and
two-hot rows add two of them exactly, which pins down the nibble order, the table lookup and the
rounding of the levels (to nearest, before the sum) bit for bit.

Levels vs the core: ``twinlog_lut`` is the core's dequantize, but torch's CPU exp2 differs by one
ulp between its vectorized and scalar loops, so levels are compared to one ulp of the power.
"""

import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import archquant as aq  # noqa: E402
from archquant.backends import LINEAR_KERNELS, RealTwinLogLinear, convert_to_real  # noqa: E402
from archquant.core import formats, twinlog  # noqa: E402
from archquant.core.formats import QuantSpec  # noqa: E402
from archquant.core.modules import QuantLinear, pack_nibbles  # noqa: E402
from archquant.core.recipe import Quantize, Recipe, get_submodule  # noqa: E402
from archquant.models.toy import ToyConfig, init_toy_model, toy_task  # noqa: E402
from kernel_testing import DEVICE, requires_backend, run_aot  # noqa: E402
from archquant.kernels.twinlog_gemm import (  # noqa: E402
    dequantize_twinlog_reference,
    twinlog_gemm,
    twinlog_gemm_reference,
    twinlog_lut,
)

pytestmark = requires_backend
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: two roundings of the output dtype (the kernel's and the reference's), relative to |ref|
OUT_ROUNDING = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
#: one rounding of a level to x's dtype (unit roundoff), relative to |x| |W|
LEVEL_ROUNDING = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def tlq_spec(bits: int) -> QuantSpec:
    return QuantSpec(format="twinlog", bits=bits, granularity="channel", axis=0)


def heavy_tailed(rows, cols, seed=0):
    """DiT-like weights (Student t with 4 degrees of freedom), as in tests/test_twinlog.py."""
    g = gen(seed)
    normal = torch.randn(rows, cols, generator=g)
    chi2 = torch.randn(rows, cols, 4, generator=g).pow(2).sum(-1)
    return 0.02 * normal / torch.sqrt(chi2 / 4)


def operands(m, n, k, levels, dtype, seed=0):
    """x (M, K), packed random codes (N, K/2), and a table of distinct random fp32 levels (N, L):
    any mix-up of codes, rows or nibbles picks a different value."""
    g = gen(seed)
    codes = torch.randint(0, levels, (n, k), generator=g, dtype=torch.uint8)
    lut = torch.randn(n, levels, generator=g) * 0.05
    x = torch.randn(m, k, generator=g).to(dtype)
    return x.to(DEVICE), pack_nibbles(codes, signed=False).to(DEVICE), lut.to(DEVICE)


def assert_same_levels(got, want, eta):
    """Levels equal up to one fp32 ulp of the power 2^((q + zero) * delta) = |level| + eta: torch's
    CPU exp2 gives 1-ulp different results in its vectorized and its scalar loop (which one an
    element takes depends on its position in the tensor), so the core's own dequantize is not
    bit-reproducible across tensor shapes."""
    assert got.shape == want.shape and got.dtype == want.dtype == torch.float32
    err = (got.double() - want.double()).abs()
    assert bool((err <= 2.0**-22 * (want.double().abs() + eta.double())).all()), float(err.max())


def assert_gemm_close(y, ref, x, w_packed, lut, levels_rounded: bool):
    """The module docstring's bound; ``levels_rounded``: the reference got levels in x's dtype."""
    dtype, k = x.dtype, x.shape[1]
    mag = x.float().abs() @ dequantize_twinlog_reference(w_packed, lut).abs().T
    rel = (2 * k + 8) * 2.0**-24 + (0.0 if levels_rounded else LEVEL_ROUNDING[dtype])
    tol = rel * mag + OUT_ROUNDING[dtype] * ref.float().abs() + 1e-30
    assert y.dtype == ref.dtype == dtype and y.shape == ref.shape
    assert not torch.isnan(y).any()
    err = (y.float() - ref.float()).abs()
    assert bool((err <= tol).all()), float((err / tol).max())


# --------------------------------------------------------------------------- the level table


@pytest.mark.parametrize("bits", [3, 4])
def test_lut_is_the_core_dequantization_of_every_code(bits):
    w = heavy_tailed(12, 64, seed=bits)
    params = twinlog.fit_twinlog(w, tlq_spec(bits), per_row=True)  # rows with their own (eta, delta, zero)
    lut = twinlog_lut(params, bits)
    assert lut.dtype == torch.float32 and lut.shape == (12, 2**bits)
    eta = params["eta"]
    for c in range(2**bits):  # column c is code c, through the core's dequantize
        codes = torch.full((12, 1), c, dtype=torch.uint8)
        assert_same_levels(lut[:, c:c + 1], formats.dequantize(codes, tlq_spec(bits), params), eta)
    # a weight's codes, looked up, are the weight the core dequantizes (the fake module's)
    codes = formats.quantize(w, tlq_spec(bits), params)
    assert_same_levels(lut.gather(1, codes.long()), formats.dequantize(codes, tlq_spec(bits), params), eta)
    # and each level is the codebook written out in float64 (sign bit, then 2^(e) - eta with
    # e = (q + zero) * delta): fp32 rounds e once (2^-24 |e|, times ln 2 < 1 in the power), exp2 and
    # the subtraction once each (2^-23 of the power together, 2^-22 allowed)
    half = 2 ** (bits - 1)
    for n in range(12):
        for c in range(2**bits):
            side = "neg" if c >= half else "pos"
            delta, zero, eta_n = (float(params[key][n, 0]) for key in (f"delta_{side}", f"zero_{side}", "eta"))
            exponent = (c % half + zero) * delta
            power = 2.0**exponent
            want = max(power - eta_n, 0.0) * (-1 if c >= half else 1)
            assert abs(lut[n, c].item() - want) <= (abs(exponent) * 2.0**-24 + 2.0**-22) * power, (n, c)


def test_lut_refuses_bad_params_and_bits():
    params = twinlog.fit_twinlog(heavy_tailed(4, 16), tlq_spec(4))
    with pytest.raises(ValueError, match="allowed 2..8"):
        twinlog_lut(params, 9)
    with pytest.raises(ValueError, match="lack zero_neg"):
        twinlog_lut({k: v for k, v in params.items() if k != "zero_neg"}, 4)
    with pytest.raises(ValueError, match="row count"):
        twinlog_lut({**params, "eta": params["eta"][:2]}, 4)


# --------------------------------------------------------------------------- kernel vs reference


SHAPES = [  # (M, N, K, levels): M = 1; ragged M and N; K tails (K / 2 not a multiple of SUB); 2 row tiles
    (1, 1, 32, 16), (1, 50, 256, 16), (3, 33, 128, 8), (17, 20, 64, 16), (5, 24, 100, 8), (20, 40, 34, 4),
    (70, 24, 64, 16),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mnkl", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_twinlog_gemm_matches_reference(mnkl, dtype):
    m, n, k, levels = mnkl
    x, wp, lut = operands(m, n, k, levels, dtype, seed=sum(mnkl))
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)  # every element must be written
    y = twinlog_gemm(x, wp, lut, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert_gemm_close(y, twinlog_gemm_reference(x, wp, lut), x, wp, lut, levels_rounded=False)
    if dtype != torch.float32:  # with the levels in x's dtype only summation order and output rounding remain
        rounded = lut.to(dtype).to(torch.float32)
        assert_gemm_close(y, twinlog_gemm_reference(x, wp, rounded), x, wp, rounded, levels_rounded=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("levels", [8, 16])
def test_one_and_two_hot_rows_give_the_levels_exactly(dtype, levels):
    """One-hot row i of x: y[i, n] = 1.0 * W[n, i], a single exact product, so each level must come
    back rounded to x's dtype to nearest (a wrong nibble, code or row is a different value; the
    interpreter's truncating bf16 conversion would be off by an ulp). Two-hot rows (columns i and
    i + 1, one even, one odd): y = r(W[n, i]) + r(W[n, i + 1]) in fp32 (exact for 16-bit r(.)), then
    rounded once: the levels are rounded to x's dtype *before* the sum, as a 16-bit GPU dot does,
    not the fp32 sum afterwards. K = 48: a masked K tail (48 / 2 < SUB = 32 for 16-bit x)."""
    n, k = 24, 48
    _, wp, lut = operands(1, n, k, levels, dtype, seed=levels)
    w = dequantize_twinlog_reference(wp, lut).to(dtype).float()  # the levels in x's dtype (fp32 held)
    one_hot = torch.eye(k, dtype=dtype, device=DEVICE)
    assert torch.equal(twinlog_gemm(one_hot, wp, lut), w.T.to(dtype))
    two_hot = one_hot + one_hot.roll(1, dims=1)
    assert torch.equal(twinlog_gemm(two_hot, wp, lut), (w + w.roll(-1, dims=1)).T.to(dtype))
    if dtype != torch.float32:  # the random levels are not 16-bit values: the rounding is exercised
        assert not torch.equal(w, dequantize_twinlog_reference(wp, lut))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_strided_views_and_block_configs(dtype):
    m, n, k = 5, 40, 128
    x_big, wp, lut = operands(m, n, 2 * k, 16, dtype, seed=11)
    x = x_big[:, ::2]  # strided activations
    wp = wp[:, : k // 2]
    lut_big = torch.randn(n, 32, generator=gen(12)).to(DEVICE)
    lut_view = lut_big[:, ::2]  # table with a column stride of 2
    ref = twinlog_gemm_reference(x, wp, lut_view)
    out_big = torch.full((m, 2 * n), float("nan"), dtype=dtype, device=DEVICE)
    y = twinlog_gemm(x, wp, lut_view, out=out_big[:, 1::2], config=dict(BLOCK_N=16, SUB=16))
    assert_gemm_close(y, ref, x, wp, lut_view, levels_rounded=False)
    assert torch.isnan(out_big[:, 0::2]).all()
    wp_t = wp.t().contiguous().t()  # column-major packed weight
    assert torch.equal(twinlog_gemm(x, wp_t, lut_view, config=dict(BLOCK_N=16, SUB=16)), y)
    # two chunks per K loop step vs one (SUB), 64-row tile for a small M: same sums up to order
    y64 = twinlog_gemm(x, wp, lut_view.contiguous(), config=dict(BLOCK_M=64, BLOCK_N=64, SUB=32))
    assert_gemm_close(y64, ref, x, wp, lut_view, levels_rounded=False)


def test_bad_inputs_are_clear_errors():
    x, wp, lut = operands(2, 8, 64, 16, torch.float16)
    with pytest.raises(TypeError, match="x must be"):
        twinlog_gemm(x.to(torch.int8), wp, lut)
    with pytest.raises(TypeError, match="x must be"):
        twinlog_gemm(x.double(), wp, lut)
    with pytest.raises(TypeError, match="w_packed must be"):
        twinlog_gemm(x, wp.to(torch.int8), lut)
    with pytest.raises(TypeError, match="lut must be"):
        twinlog_gemm(x, wp, lut.half())
    with pytest.raises(ValueError, match="K mismatch"):
        twinlog_gemm(x[:, :32], wp, lut)
    with pytest.raises(ValueError, match="odd"):
        twinlog_gemm(x[:, :63], wp[:, :31], lut)
    for bad_lut in (lut[:, :12], torch.zeros(8, 32, device=DEVICE), lut[:4]):  # widths 12, 32; 4 rows
        with pytest.raises(ValueError, match="lut must have shape"):
            twinlog_gemm(x, wp, bad_lut)
    with pytest.raises(ValueError, match="SUB=8"):
        twinlog_gemm(x, wp, lut, config=dict(SUB=8))  # a 16-bit dot needs K >= 16
    with pytest.raises(ValueError, match="unknown config key"):
        twinlog_gemm(x, wp, lut, config=dict(GROUP=32))
    with pytest.raises(ValueError, match="input_precision"):
        twinlog_gemm(x, wp, lut, input_precision="bf16")
    with pytest.raises(ValueError, match="out must be"):
        twinlog_gemm(x, wp, lut, out=torch.empty(2, 8, device=DEVICE))  # fp32 buffer for fp16 x
    assert twinlog_gemm(x[:0], wp, lut).shape == (0, 8)


# --------------------------------------------------------------------------- the real module


def tlq_model(bits: int, int8_inputs: bool) -> nn.Module:
    """The toy model (K = 32, 64, 128, 64; N = 64, 128, 64, 10) with twin-log weights, frozen.
    A small search grid keeps the fit fast; the codes and params are what the test needs."""
    model = init_toy_model(ToyConfig(hidden_size=64, intermediate_size=128, num_layers=2, seed=0))
    act = QuantSpec(bits=8, granularity="token") if int8_inputs else None
    step = Quantize(weight=tlq_spec(bits), weight_observer="twinlog_mse",
                    weight_observer_kwargs=dict(etas=[0.0, 0.01, 0.05], percentiles=[0.99, 0.999]),
                    activation=act, dynamic=int8_inputs)
    return aq.quantize_(model, Recipe("tlq", [step]), progress=False)


def linear_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each QuantLinear of ``model`` receives on ``x``."""
    seen, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            hooks.append(m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, inp[0])))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("int8_inputs", [False, True], ids=["weight_only", "int8_token"])
@pytest.mark.parametrize("bits", [4, 3])
def test_converted_model_matches_its_fake_twin(bits, int8_inputs):
    fake = tlq_model(bits, int8_inputs)
    real = convert_to_real(copy.deepcopy(fake), kernels="triton").to(DEVICE)
    row = LINEAR_KERNELS[("twinlog", "int8" if int8_inputs else "none", "cuda")]
    summary = real._archquant_real
    assert summary["converted"] == 4 and summary["kept"] == []
    assert set(summary["paths"].values()) == {row.description} and "twinlog_gemm" in row.description
    if int8_inputs:  # the label says what is real and what is not
        assert "fake-quantized" in row.label and "real weights only" in row.label
    x, _ = toy_task(ToyConfig(), 8, split_seed=5)
    inputs = linear_inputs(fake, x)
    for name, inp in inputs.items():
        f, r = get_submodule(fake, name), get_submodule(real, name)
        assert isinstance(r, RealTwinLogLinear) and r.bits == bits
        # the stored codes, unchanged; their levels are the fake module's weight (to an ulp of exp2)
        assert torch.equal(r.weight_packed.cpu(), f.weight_codes) and r.weight_lut.shape == (f.out_features, 2**bits)
        w, eta = dequantize_twinlog_reference(r.weight_packed, r.weight_lut).cpu(), f.weight_params.eta
        assert_same_levels(w, f.effective_weight(), eta)
        # per Linear, on the very input the fake one got: fp32 summation order, plus those level ulps
        with torch.no_grad():
            want, got = f(inp), r(inp.to(DEVICE)).cpu()
            xq = inp if f.input_quantizer is None else f.input_quantizer(inp)
        mag = xq.double().abs() @ w.double().abs().T + f.bias.double().abs()
        ulps = xq.double().abs() @ (w.double().abs() + eta.double()).T
        bound = (2 * f.in_features + 8) * 2.0**-24 * mag + 2.0**-22 * ulps
        assert bool(((got.double() - want.double()).abs() <= bound).all()), name
    # the whole model: the per-Linear differences (~1e-7 relative) pass through two blocks; with
    # int8 inputs a difference that close to a rounding boundary may move one code by one step,
    # so allow a few such steps there (still far below the quantization error, ~1e-1 here)
    with torch.no_grad():
        want, got = fake(x), real(x.to(DEVICE)).cpu()
    rel = ((got - want).norm() / want.norm()).item()
    assert rel <= (2e-3 if int8_inputs else 1e-5), rel


def test_auto_on_a_cpu_keeps_the_fake_modules_and_says_why():
    model = tlq_model(4, int8_inputs=False)
    convert_to_real(model)  # kernels="auto": CPU tensors, and the LUT GEMM is Triton only
    summary = model._archquant_real
    assert summary["converted"] == 0 and len(summary["kept"]) == 4
    reasons = {reason for _, reason in summary["kept"]}
    assert reasons == {"twinlog W4A16/W3A16 LUT GEMM: no CPU kernel; kept in fake quant"}
    assert all(not isinstance(m, RealTwinLogLinear) for m in model.modules())


def test_the_module_refuses_what_the_kernel_cannot_take():
    lin = nn.Linear(64, 16)
    unpacked = QuantLinear.from_float(lin, weight_spec=tlq_spec(6), weight_observer="twinlog_mse")
    unpacked.freeze()
    with pytest.raises(ValueError, match="6-bit codes are stored one per byte"):
        RealTwinLogLinear(unpacked, kernels="triton")
    int4 = QuantLinear.from_float(lin, weight_spec=QuantSpec(bits=4, granularity="group", group_size=32))
    int4.freeze()
    with pytest.raises(ValueError, match="needs twin-log weights"):
        RealTwinLogLinear(int4, kernels="triton")


# =========================================================================== sm_90 AOT compile (CPU)


TWINLOG_AOT_BODY = r"""
from archquant.kernels import twinlog_gemm as T

ONES = ("s_xk", "s_wk", "s_lc", "s_yn")
for dt, code in (("fp16", 1), ("bf16", 2), ("fp32", 0)):
    sub = 16 if code == 0 else 32  # the wrapper's defaults
    for levels in (8, 16):
        for block_m in (16, 64):  # decode / prefill tiles
            aot(T._twinlog_kernel, dict(LEVELS=levels, SUB=sub, EVEN_K=True, DOT_CODE=code, OUT_CODE=code,
                                        PRECISION="ieee", BLOCK_M=block_m, BLOCK_N=32),
                dict(x_ptr=dt, w_ptr="u8", y_ptr=dt), ones=ONES)
    aot(T._twinlog_kernel, dict(LEVELS=16, SUB=sub, EVEN_K=False, DOT_CODE=code, OUT_CODE=code, PRECISION="ieee",
                                BLOCK_M=16, BLOCK_N=32), dict(x_ptr=dt, w_ptr="u8", y_ptr=dt))  # K tail, any strides
aot(T._twinlog_kernel, dict(LEVELS=16, SUB=16, EVEN_K=True, DOT_CODE=0, OUT_CODE=0, PRECISION="tf32x3",
                            BLOCK_M=16, BLOCK_N=32), dict(x_ptr="fp32", w_ptr="u8", y_ptr="fp32"), ones=ONES)
# negative control: a dot K of 8 fails the static_assert
try:
    aot(T._twinlog_kernel, dict(LEVELS=16, SUB=8, EVEN_K=True, DOT_CODE=1, OUT_CODE=1, PRECISION="ieee",
                                BLOCK_M=16, BLOCK_N=32), dict(x_ptr="fp16", w_ptr="u8", y_ptr="fp16"), ones=ONES)
except Exception as e:  # CompilationError
    print("expected failure:", type(e).__name__)
else:
    raise SystemExit("negative control SUB=8 compiled")
"""


def test_kernel_compiles_for_sm90(tmp_path):
    run_aot(tmp_path, TWINLOG_AOT_BODY)
