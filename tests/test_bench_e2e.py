"""The end-to-end benchmark script runs (tiny shapes on a CPU): correctness gate, table, file."""
import pytest
import torch

from archquant.eval import bench_e2e


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
