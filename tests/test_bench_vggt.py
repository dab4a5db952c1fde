"""The VGGT aggregator benchmark (eval/bench_vggt.py) runs end to end at the tiny shape: its
correctness gate passes, the table and its ratios parse, the W8A8 path takes the int8 kernels;
its CUDA code path runs on the Triton kernels in the interpreter. Nothing here checks a speed."""
import re

import pytest
import torch

from archquant.eval import bench_vggt as B

# tiny models: one thread (conftest); also restores the thread count that main() sets
pytestmark = pytest.mark.usefixtures("single_thread")

ROW = re.compile(r"^\| (?P<label>[^|]+?) \| (?P<int8>[^|]+?) \| (?P<ms>[0-9.]+|n/a) \| (?P<patch>[^|]+?) \| "
                 r"(?P<vs_a>[^|]+?) \| (?P<vs_b>[^|]+?) \| (?P<lin>[^|]+?) \| (?P<fake>[^|]+?) \| (?P<fp>[^|]+?) \|$")


def table_rows(text: str) -> dict:
    return {m["label"]: m for m in (ROW.match(line) for line in text.splitlines()) if m and m["label"] != "variant"}


def ratio(cell: str) -> float:
    assert re.fullmatch(r"[0-9]+\.[0-9]{2}x", cell), cell
    return float(cell[:-1])


def test_tiny_cpu_run_writes_a_table_whose_ratios_parse_and_whose_check_passed(tmp_path):
    from archquant.kernels.cpu_int8 import onednn_available

    out = tmp_path / "vggt_cpu.md"
    argv = ["--shapes", "tiny", "--repeats", "1", "--warmup", "0", "--threads", "1", "--write", str(out)]
    assert B.main(argv) == 0
    text = out.read_text()
    assert text.startswith("# VGGT aggregator on CPU: FP32 vs bf16 vs W8A8 real")
    assert "`python -m archquant.eval.bench_vggt --shapes tiny --repeats 1 --warmup 0 --threads 1 --write" in text
    assert "1 threads; torch " in text
    assert ("- tokens: 2 frames x 112 px: 8x8 patches + 5 = 69 tokens per frame, 138 in all (frame attention over "
            "69, global over 138); timed: 2 of 2 frame+global block pairs, 2 of 2 DINOv2 blocks") in text
    rows = table_rows(text)
    assert list(rows) == ["FP32", "bf16", "W8A8 real (rtn_dynamic)"]
    fp32, bf16, w8a8 = rows.values()
    for r in rows.values():
        assert float(r["ms"]) > 0
        assert re.fullmatch(r"[0-9.]+ \([0-9]+%\)", r["patch"])  # the patch embedder's time and share
    assert fp32["vs_a"] == "-" and bf16["vs_b"] == "-"
    ratio(fp32["vs_b"]), ratio(bf16["vs_a"]), ratio(w8a8["vs_a"]), ratio(w8a8["vs_b"])
    # every frame/global Linear on int8 (2 pairs x 2 blocks x 4), none kept; correctness gate passed
    assert w8a8["int8"] == "16 (0 kept)"
    assert float(w8a8["lin"]) <= B.LINEAR_TOL[torch.float32] and float(w8a8["fake"]) <= B.OUTPUT_TOL
    assert 0 < float(w8a8["fp"]) < 0.1  # quantization error, not garbage
    assert "- correctness check passed: W8A8 real (rtn_dynamic): per-Linear" in text and "WRONG" not in text
    route = re.search(r"- W8A8 real \(rtn_dynamic\): int8 GEMM route torch CPU int8 ops, per call: (.*)", text)[1]
    # 138 rows >= 64: oneDNN's prepacked int8 GEMM where it works here, one call per Linear
    # onednn where it is available and measured faster for the shape, int_mm elsewhere; 16 calls in all
    counts = dict(re.findall(r"(onednn|int_mm) x(\d+)", route))
    assert route.endswith("(rows M = 138)") and sum(int(v) for v in counts.values()) == 16
    assert onednn_available() or "onednn" not in counts
    assert re.search(r"- patch embed alone \(DINOv2, 2 blocks\): fp32 [0-9.]+ ms, bf16 [0-9.]+ ms", text)
    assert re.search(r"- alternating blocks alone .*: W8A8 real is [0-9.]+x FP32, [0-9.]+x bf16", text)
    assert "- target (W8A8 real >= 1.5x FP32): stated for the 1b shape, not tiny" in text


def test_rest_in_bf16_variant_is_checked_at_the_bf16_limit():
    geo = B.geometry("tiny", 2, 70, None, None)  # 30 tokens a frame: 60 rows, below oneDNN's M >= 64
    res = B.bench_cpu(geo, ("fp32", "w8a8_bf16"), repeats=1, warmup=0)
    fp32, w8a8 = res.rows
    assert w8a8.ok and w8a8.per_linear <= B.LINEAR_TOL[torch.bfloat16] and w8a8.ms is not None
    assert "onednn" not in w8a8.route and "(rows M = 60)" in w8a8.route
    assert "W8A8 real, rest in bf16 |" in B.render(res, "cmd")


def test_patch_embedder_variant_puts_its_linears_on_int8_and_times_its_own_embedder():
    geo = B.geometry("tiny", 2, 112, 1, 2)
    res = B.bench_cpu(geo, ("fp32", "w8a8", "w8a8_pe"), repeats=1, warmup=0)
    fp32, w8a8, pe = res.rows
    assert pe.ok and pe.int8_linears == "16 (0 kept)" and w8a8.int8_linears == "8 (0 kept)"  # + 2 DINOv2 blocks x 4
    assert pe.per_linear <= B.LINEAR_TOL[torch.float32] and pe.ms is not None
    assert w8a8.patch_ms == fp32.patch_ms and pe.patch_ms is not None  # its own embedder, timed on its own
    text = B.render(res, "cmd")
    assert "W8A8 real, patch embedder's Linears too |" in text
    assert re.search(r"- patch embed alone \(DINOv2, 2 blocks\): fp32 [0-9.]+ ms, W8A8 \(int8 Linears\) [0-9.]+ ms",
                     text)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_gpu_is_refused_in_one_line(capsys):
    assert B.main(["--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == "archquant: error: --device cuda but no CUDA device is available"


def test_geometry_of_vggt_1b_and_the_blocks_option(capsys):
    geo = B.geometry("1b", None, None, None, None)
    assert (geo.frames, geo.image_size, geo.tokens_per_frame, geo.tokens) == (4, 518, 1374, 4 * 1374)
    assert (geo.blocks, geo.dino_blocks) == (24, 24)
    assert B.geometry("1b", None, None, None, None, device="cuda").frames == 10
    part = B.geometry("1b", 2, 224, 6, None)  # the DINOv2 blocks follow in proportion
    assert (part.blocks, part.dino_blocks, part.tokens_per_frame) == (6, 6, 261)
    assert "timed: 6 of 24 frame+global block pairs, 6 of 24 DINOv2 blocks" in part.describe()
    assert B.geometry("1b", 2, 224, 6, 0).dino_blocks == 0
    assert B.main(["--image-size", "500"]) == 2
    assert "multiple of the patch size 14" in capsys.readouterr().err
    assert B.main(["--blocks", "25"]) == 2


def test_wrong_int8_linears_fail_the_check_and_are_not_timed(monkeypatch, tmp_path):
    from archquant.backends.linear import RealQuantLinear

    forward = RealQuantLinear.forward
    monkeypatch.setattr(RealQuantLinear, "forward", lambda self, x: 1.2 * forward(self, x))
    out = tmp_path / "wrong.md"
    assert B.main(["--shapes", "tiny", "--repeats", "1", "--warmup", "0", "--threads", "1", "--write", str(out)]) == 1
    text = out.read_text()
    w8a8 = table_rows(text)["W8A8 real (rtn_dynamic)"]
    assert w8a8["ms"] == "n/a" and w8a8["vs_a"] == "n/a"
    assert "WRONG: per-Linear" in text and "not timed" in text and "correctness check passed" not in text
    assert "- target (W8A8 real >= 1.5x FP32): stated for the 1b shape" in text


def test_cuda_code_path_runs_on_the_triton_kernels_in_the_interpreter(monkeypatch):
    """``bench_device`` as ``--device cuda`` runs it, on the CPU at the tiny shape: bf16 activations,
    the int8 Linears on the Triton quantize / GEMM kernels (interpreter), the gate passed, both
    variants timed, the table rendered."""
    from archquant.kernels._triton_utils import INTERPRET_MODE
    if not INTERPRET_MODE:
        pytest.skip("needs TRITON_INTERPRET=1 (on a GPU, `--device cuda` itself runs this code)")
    from archquant.kernels import w8a8_gemm

    calls = [0]
    gemm = w8a8_gemm.w8a8_gemm

    def counting(*a, **k):
        calls[0] += 1
        return gemm(*a, **k)

    monkeypatch.setattr(w8a8_gemm, "w8a8_gemm", counting)
    geo = B.geometry("tiny", 2, 56, 1, 1)  # 21 tokens a frame
    res = B.bench_device(geo, torch.device("cpu"), repeats=1, warmup=0, graphs=True, kernels="triton")
    base, w8a8 = res.rows
    assert (base.variant, w8a8.variant) == ("bf16", "w8a8")
    assert all(r.ok and r.ms is not None and r.graph_ms is None for r in res.rows)  # no graphs on a CPU
    assert w8a8.per_linear <= B.LINEAR_TOL[torch.bfloat16] and w8a8.vs_fake <= B.OUTPUT_TOL
    assert w8a8.route == "Triton per-token quantize + w8a8_gemm" and calls[0] >= 2 * 8
    text = B.render(res, "python -m archquant.eval.bench_vggt --device cuda")
    assert text.startswith("# VGGT aggregator on CPU (CUDA code path): bf16 vs W8A8 real")
    row = table_rows(text)["W8A8 real (rtn_dynamic)"]
    assert row["int8"] == "8 (0 kept)" and ratio(row["vs_a"]) > 0 and row["vs_b"] == "n/a"
    assert "smoke run on cpu, no target" in text and "WRONG" not in text
