"""torchrun: the evaluation sharded over 2 CPU processes (gloo) gives the single-process report, the
ranks hold identical quantized weights, and failures stop every rank with one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion_testing import tiny_dit
from archquant.models.dit_loading import save_pipeline_folder

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist") / "pipeline"
    save_pipeline_folder(tiny_dit(), folder)
    return folder


def config(tmp_path, pipeline, name, **evaluation):
    cfg = {"family": "dit", "model": {"path": str(pipeline)},
           "recipe": {"name": "lrq_dit", "w_bits": 4, "a_bits": 8, "options": {"block_size": 16}},
           "calibration": {"source": "classes", "num_samples": 1, "batch_size": 4, "seed": 0,
                           "options": {"num_steps": 3}},
           "evaluation": {"source": "classes", "num_samples": 3, "batch_size": 2, "seed": 100,
                          "options": {"num_steps": 3}, **evaluation},
           "compare": ["rtn_dynamic"], "progress": False, "output_dir": str(tmp_path / name)}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def launch(args, nproc: int, timeout: int = 240):
    """``torchrun --nproc_per_node nproc ARGS`` on this machine (gloo), one thread per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ARCHQUANT_DIST_TIMEOUT": "120", "PYTHONPATH": str(HERE)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE.parent)


def test_two_ranks_give_the_one_process_report_bit_for_bit(tmp_path, pipeline):
    one = launch(["-m", "archquant.run", str(config(tmp_path, pipeline, "one"))], nproc=1)
    two = launch(["-m", "archquant.run", str(config(tmp_path, pipeline, "two"))], nproc=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a = json.loads((tmp_path / "one" / "report.json").read_text())
    b = json.loads((tmp_path / "two" / "report.json").read_text())
    assert b["ranks"]["world"] == 2 and b["ranks"]["backend"] == "gloo"
    assert a["items"]["lrq_dit"] and a["items"] == b["items"]  # every item's metrics, bit for bit
    assert a["metrics"] == b["metrics"] and a["compare"]["rtn_dynamic"]["metrics"] == b["compare"]["rtn_dynamic"]["metrics"]
    assert [r["item"] for r in b["items"]["lrq_dit"]] == list(range(12))
    digests = b["ranks"]["quantized_state_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]  # rank 1 holds exactly what rank 0 calibrated
    assert b["reload"]["identical"] and b["reload"]["outputs_identical"]
    files = {x["path"] for x in b["artifacts"]}
    assert {"artifacts/lrq_dit/samples.png", "artifacts/lrq_dit/samples_from006.png"} <= files  # both ranks' grids
    assert two.stdout.count("# archquant report") == 1  # rank 0 alone reports


def test_a_failing_rank_stops_every_rank_with_its_one_line(tmp_path, pipeline):
    res = launch([str(HERE / "_rank_failure.py"), str(config(tmp_path, pipeline, "fail"))], nproc=2)
    assert res.returncode != 0
    assert "archquant: error: rank 1: ValueError: planted failure on rank 1" in res.stderr
    assert not (tmp_path / "fail").exists()  # nothing published


def test_more_ranks_than_evaluation_batches_is_refused(tmp_path, pipeline):
    res = launch(["-m", "archquant.run", str(config(tmp_path, pipeline, "few", num_samples=1, batch_size=4))], nproc=2)
    lines = [line for line in res.stderr.splitlines() if line.startswith("archquant: error")]
    assert res.returncode != 0 and lines == [
        "archquant: error: torchrun started 2 ranks, but the evaluation has 1 batch(es) (4 items): use at most 1 "
        "processes, or a smaller evaluation.batch_size"]
    # the rank exits 2 like any bad input; torchrun itself then reports the failure and exits 1
    assert "exitcode  : 2" in res.stderr
