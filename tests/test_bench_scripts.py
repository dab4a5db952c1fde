"""The end-to-end benchmark script runs (tiny shapes on a CPU): correctness gate, table, file."""
import re

import pytest
import torch

from archquant.eval import bench_e2e, fake_vs_real


def test_tiny_run_writes_a_table(tmp_path, capsys):
    out = tmp_path / "e2e.md"
    assert bench_e2e.main(["--tiny", "--reps", "1", "--prompt", "12", "--write", str(out)]) == 0
    text = out.read_text()
    assert "python -m archquant.eval.bench_e2e --tiny" in text
    for row in ("TTFT, prefill 12 tokens", "decode step, eager", "weights, mixers", "weights, whole model"):
        assert row in text
    assert "real int8 vs fake-quant twin" in text and "smoke run: no target" in text
    assert "MISSED" not in text and "met (" not in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_full_size_run_without_gpu_is_refused(capsys):
    assert bench_e2e.main([]) == 2
    assert "needs a GPU" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the real run happens on the GPU")
def test_gpu_kernel_benchmark_sections_run_under_the_interpreter(monkeypatch):
    """Every section of eval/bench_gpu.py at tiny shapes, its kernels in the interpreter and each
    timed function run once: catches a broken benchmark before a (scarce) GPU session does."""
    from kernel_testing import requires_backend  # noqa: F401 - conftest turned the interpreter on
    from archquant.eval import bench_gpu as B

    ran = []

    def once(fn):
        fn()
        ran.append(fn)
        return 1.0

    monkeypatch.setattr(B, "median_ms", once)
    monkeypatch.setattr(B, "graph_median_ms", once)
    monkeypatch.setattr(B, "free_memory", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    monkeypatch.setattr(B, "GEMM_MS", (1, 17))
    monkeypatch.setattr(B, "GEMM_KN", ((64, 48),))
    monkeypatch.setattr(B, "SWEEP_SHAPES", ((20, 64, 48),))
    monkeypatch.setattr(B, "HAD_MS", (4,))
    monkeypatch.setattr(B, "HAD_NS", (96,))
    monkeypatch.setattr(B, "W4_MS", (1,))
    monkeypatch.setattr(B, "W4_KN", ((256, 64),))
    monkeypatch.setattr(B, "TLQ_MS", (1, 17))
    monkeypatch.setattr(B, "TLQ_KN", ((64, 48),))
    monkeypatch.setattr(B, "MAMBA", dict(d_model=64, d_inner=128, d_state=16, dt_rank=4, d_conv=4, layers=2,
                                         batch=1, seq=12))
    for name, bench in B.BENCHES.items():
        text = bench(torch.device("cpu"))
        assert text.startswith("## ") and "WRONG" not in text, (name, text)
    assert len(ran) >= 15


def test_cpu_benchmark_quick_run_writes_both_sections(tmp_path):
    from archquant.eval import bench_cpu
    out = tmp_path / "cpu.md"
    threads = torch.get_num_threads()
    try:
        assert bench_cpu.main(["--quick", "--threads", "1", "--write", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    text = out.read_text()
    assert "## W8A8 Linear" in text and "mamba1-byte" in text
    assert "block GEMMs (ms)" in text
    phases = ["prefill, no cache", "prefill, fresh cache", "prefill batch 4, no cache", "prefill batch 4, fresh cache",
              "decode step", "decode step, batch 4", "greedy_generate 64 after 64"]
    for phase in phases:  # every call path, FP32 and W8A8 real side by side
        assert f"| {phase} | " in text and re.search(rf"\| {re.escape(phase)} \| [^|]+ \| W8A8 real \| .* \| "
                                                        r"[0-9.]+x \|", text), phase
    assert text.count("| W8A8 real |") == len(phases)


def test_cpu_benchmark_rejects_unknown_model(capsys):
    from archquant.eval import bench_cpu
    with pytest.raises(SystemExit) as exc:
        bench_cpu.main(["--models", "mamba-7b"])
    assert exc.value.code == 2 and "unknown 'mamba-7b'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the real benchmark runs instead")
def test_e2e_fp16_on_triton_kernels_in_the_interpreter(monkeypatch, tmp_path):
    """The GPU configuration of the end-to-end benchmark as far as a CPU can run it: fp16 models,
    every FP and int8 op that has a Triton kernel on that kernel (interpreter; the FP parts through
    ``apply_fused_kernels``), correctness gate."""
    from archquant.kernels import mamba_scan
    from kernel_testing import INTERPRET_MODE
    if not INTERPRET_MODE:
        pytest.skip("needs TRITON_INTERPRET=1")
    calls = []
    orig = mamba_scan.selective_scan_triton  # the FP model's scan (the int8 one calls quant_selective_scan)
    monkeypatch.setattr(mamba_scan, "selective_scan_triton", lambda *a, **k: calls.append(1) or orig(*a, **k))
    out = tmp_path / "e2e.md"
    assert bench_e2e.main(["--tiny", "--kernels", "triton", "--dtype", "float16", "--reps", "1", "--prompt", "8",
                           "--write", str(out)]) == 0
    assert "| measure | FP (float16) | W8A8 real |" in out.read_text()
    assert calls  # the FP model's scan ran on the kernel


def test_fake_vs_real_measures_both_presets(tmp_path):
    """The README's fake-vs-real numbers come from this script: at tiny size it must convert every
    Linear (MambaQuant's asymmetric weights included) and agree with the fake model far below the
    quantization error."""
    out = tmp_path / "fvr.md"
    args = ["--hidden", "64", "--seq-len", "32", "--calib", "2", "--windows", "2", "--batch-size", "2"]
    parsed = fake_vs_real.parse_args(args)
    data = fake_vs_real.load_data(parsed)
    rows = [fake_vs_real.measure(p, parsed, *data) for p in fake_vs_real.PRESETS]
    for r in rows:
        assert r["converted"] == 8 and r["real_vs_fake"] < 0.01 * r["fake_vs_fp"], r
        assert abs(r["real_ppl"] - r["fake_ppl"]) <= 1e-4 * r["fake_ppl"]
    assert [r["blocks"] for r in rows] == [2, 0]  # quamba: whole blocks; mambaquant: Linears only
    assert fake_vs_real.main(args + ["--presets", "quamba", "--write", str(out)]) == 0
    assert "python -m archquant.eval.fake_vs_real --hidden 64" in out.read_text()



# ------------------------------------------------------------------------------------------------
# DiT denoising-step benchmark (eval/bench_dit.py): CPU mode, and its CUDA code path in reduced form


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_dit_benchmark_on_cuda_without_gpu_is_refused_in_one_line(capsys):
    from archquant.eval import bench_dit
    assert bench_dit.main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "archquant: error: --device cuda but no CUDA device is available"


def test_dit_benchmark_cpu_mode_small_shape_writes_its_table(tmp_path):
    from archquant.eval import bench_dit
    out = tmp_path / "dit_cpu.md"
    assert bench_dit.main(["--shapes", "small", "--repeats", "1", "--write", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Diffusion transformer denoising step on CPU: FP32 vs bf16 vs W8A8 real")
    assert "`python -m archquant.eval.bench_dit --shapes small --repeats 1 --write" in text
    assert "| small DiT (hidden 128, 4 blocks, 64 tokens) | 2 | 24 (0 kept) |" in text


def test_dit_benchmark_times_a_wan_step_too(tmp_path):
    """The Wan 2.1 shapes take the same code path: latents (B, C, F, H, W) and text features in, the
    attention / cross-attention / ffn Linears on int8 (tiny Wan: 2 blocks x 10)."""
    from archquant.eval import bench_dit as B

    row = B.bench("wan_tiny", batch=1, repeats=1)
    assert row["converted"] == 20 and row["kept"] == 0
    assert row["real_vs_fake"] < 1e-4 and row["fake_vs_fp"] < 5e-2


def test_dit_variant_builder_gives_int8_linears_and_full_width_hadamards():
    """The builder the CUDA benchmark uses: every attention / feed-forward Linear real in both
    variants; in the quarot one each carries a full-width Hadamard (the preset's one-part chain),
    which the Triton path fuses into its quantize kernel, as convert_to_real leaves it."""
    from archquant.core.ars import ChainTransform
    from archquant.core.transforms import HadamardTransform
    from archquant.eval import bench_dit as B

    fp, variants = B.build_variants("tiny")
    assert set(variants) == {"w8a8", "w8a8_hadamard"}
    for v in variants.values():
        linears = B.real_int8_linears(v.real)
        assert v.converted == len(linears) == 12 and v.kept == 0
        assert v.fake is not None and not B.real_int8_linears(v.fake)
    plain = B.real_int8_linears(variants["w8a8"].real).values()
    assert all(m.input_transform is None for m in plain)
    rotated = variants["w8a8_hadamard"]
    for m in B.real_int8_linears(rotated.real).values():
        t = m.input_transform
        assert isinstance(t, ChainTransform) and len(t.parts) == 1
        had = t.parts[0]
        assert isinstance(had, HadamardTransform) and had.block is None and had.size == m.in_features
        assert m._fused_hadamard() is had
    assert rotated.fused == rotated.hadamard == 12


def test_dit_cast_keeps_the_int8_scales_in_fp32():
    from archquant.eval import bench_dit as B

    fp, variants = B.build_variants("tiny")
    real = B.cast_fp_parts(variants["w8a8"].real, torch.bfloat16)
    for m in B.real_int8_linears(real).values():
        assert m.weight_q.dtype == torch.int8 and m.weight_scale.dtype == torch.float32
    assert real.transformer.transformer_blocks[0].norm1.linear.weight.dtype == torch.bfloat16  # adaLN, kept FP
    assert real.transformer.proj_out_1.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in B.cast_fp_parts(fp, torch.bfloat16).parameters())


def test_dit_cuda_code_path_runs_on_the_triton_kernels_in_the_interpreter(monkeypatch):
    """``bench_device`` as ``--device cuda`` runs it, on the CPU at the tiny shape: bf16
    activations, the int8 Linears on the Triton quantize / fused Hadamard-quantize / GEMM kernels
    (interpreter), correctness gates passed, every variant timed, the table rendered."""
    from archquant.kernels._triton_utils import INTERPRET_MODE
    if not INTERPRET_MODE:
        pytest.skip("needs TRITON_INTERPRET=1 (on a GPU, `--device cuda` itself runs this code)")
    from archquant.eval import bench_dit as B
    from archquant.kernels import hadamard_quant, w8a8_gemm

    calls = {"hadamard_quant": 0, "w8a8_gemm": 0}

    def counting(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(hadamard_quant, "hadamard_quant_int8",
                        counting("hadamard_quant", hadamard_quant.hadamard_quant_int8))
    monkeypatch.setattr(w8a8_gemm, "w8a8_gemm", counting("w8a8_gemm", w8a8_gemm.w8a8_gemm))
    device = torch.device("cpu")
    rows, notes = B.bench_device("tiny", [2], device, repeats=1, graphs=True, kernels="triton")
    assert [r.variant for r in rows] == ["bf16", "w8a8", "w8a8_hadamard"]
    assert all(r.ok and r.eager_ms is not None and r.graph_ms is None for r in rows)  # no graphs on a CPU
    for r in rows[1:]:
        assert r.per_linear <= B.LINEAR_TOL and r.vs_fake <= B.STEP_TOL
    # one step = 12 GEMMs per variant; the Hadamard variant's 12 inputs rotated in the quantize kernel
    assert calls["w8a8_gemm"] >= 2 * 12 and calls["hadamard_quant"] >= 12
    text = B.render_device(rows, notes, "python -m archquant.eval.bench_dit --device cuda", device, 1, True)
    assert "| tiny DiT (hidden 64, 2 blocks, 16 tokens) | 2 | W8A8 real + online Hadamard (quarot) | " \
           "12 (0 kept); Hadamard fused in 12 of 12 |" in text
    assert "smoke run: no target" in text and "WRONG" not in text and "MISSED" not in text
    assert "fused into the quantize kernel in 12 of 12 int8 Linears" in text


def test_dit_device_benchmark_does_not_time_a_wrong_int8_model(monkeypatch):
    """Correctness first: int8 Linears off by 20% fail the per-Linear check; that variant is
    marked WRONG and not timed, the others are."""
    from archquant.backends.linear import RealQuantLinear
    from archquant.eval import bench_dit as B

    forward = RealQuantLinear.forward
    monkeypatch.setattr(RealQuantLinear, "forward", lambda self, x: 1.2 * forward(self, x))
    device = torch.device("cpu")
    rows, notes = B.bench_device("tiny", [2], device, repeats=1, graphs=False, names=("w8a8",))
    base, w8a8 = rows
    assert base.ok and base.eager_ms is not None
    assert not w8a8.ok and w8a8.eager_ms is None and w8a8.per_linear > B.LINEAR_TOL
    text = B.render_device(rows, notes, "cmd", device, 1, False)
    assert "WRONG: per-Linear" in text and "not timed" in text


def test_dit_target_verdict_uses_graph_replays_where_timed():
    from archquant.eval import bench_dit as B

    def row(variant, eager, graph, shape="xl"):
        return B.DeviceRow("label", shape, 2, variant, variant, eager_ms=eager, graph_ms=graph)

    base = row("bf16", 10.0, 4.0)
    assert B.verdict(row("w8a8", 20.0, 2.8), base, smoke=False) == "met (graph 1.43x, target >= 1.4x)"
    assert B.verdict(row("w8a8", 5.0, 3.0), base, smoke=False) == "MISSED (graph 1.33x, target >= 1.4x)"
    no_graphs = row("bf16", 10.0, None)
    assert B.verdict(row("w8a8", 7.0, None), no_graphs, smoke=False) == "met (eager 1.43x, target >= 1.4x)"
    assert B.verdict(row("w8a8", 5.0, 2.0, shape="small"), base, smoke=False) == "-"  # the target is XL's
    assert B.verdict(row("w8a8", 5.0, 2.0), base, smoke=True) == "smoke run: no target"
    assert B.verdict(base, base, smoke=False) == "-"
