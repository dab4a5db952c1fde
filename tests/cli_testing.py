"""Helpers shared by the runner's tests: run the CLI in-process, read its one error line."""
from pathlib import Path

from archquant.run import main

ROOT = Path(__file__).resolve().parent.parent
TOY_CONFIG = ROOT / "configs" / "toy_w8a8.yaml"
#: overrides that make the toy job take about a second
FAST_TOY = ["model.options.train_steps=20", "calibration.num_samples=64", "evaluation.num_samples=256",
            "progress=false"]


def run_cli(capsys, *args):
    """``python -m archquant.run ARGS`` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """stderr must be exactly one line (no traceback): return it."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]
