"""The end-to-end benchmark script runs (tiny shapes on a CPU): correctness gate, table, file."""
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
    assert text.count("| W8A8 real |") == 2 and "block GEMMs (ms)" in text


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

