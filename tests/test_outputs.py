"""What a run leaves on disk: the user's files are never lost, results appear whole or not at
all (also when the run is killed, interrupted or runs out of disk), and leftovers are cleaned.

The kill tests run the real CLI in a subprocess (tests/_pausing_cli.py), pause it at a chosen
point, and send SIGKILL or SIGINT there.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import archquant as aq
from archquant.core import safe_io
from archquant.core.safe_io import MARKER, StagedDir, write_text_atomic
from archquant.run import main

from cli_testing import run_cli, one_error_line

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "toy_w8a8.yaml"
FAST = ["model.options.train_steps=20", "calibration.num_samples=64", "evaluation.num_samples=256", "progress=false"]


def visible_checkpoints(root: Path) -> list[Path]:
    """Directories under ``root`` that look like a complete checkpoint and are not hidden staging."""
    found = []
    for config in root.rglob("quantization_config.json"):
        rel = config.relative_to(root)
        if not any(part.startswith(".") for part in rel.parts) and (config.parent / "model.safetensors").is_file():
            found.append(config.parent)
    return found


@pytest.fixture(scope="module")
def previous_result(tmp_path_factory):
    """A finished run of the hadamard_static recipe, to be copied where a test needs an earlier result."""
    out = tmp_path_factory.mktemp("previous") / "out"
    assert main([str(CONFIG), *FAST, f"output_dir={out}"]) == 0
    return out


def copy_result(previous: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(previous, out, symlinks=True)
    return out


def recipe_of(out: Path) -> str:
    return json.loads((out / "report.json").read_text())["method"]["name"]


# ------------------------------------------------------------------ 1. never lose a user's files
def test_output_dir_with_someone_elses_files_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    (out / "checkpoint" / "step_1000").mkdir(parents=True)
    (out / "checkpoint" / "step_1000" / "optimizer.pt").write_bytes(b"hours of training")
    from archquant.adapters.toy import ToyAdapter

    monkeypatch.setattr(ToyAdapter, "load_model", lambda *a, **k: pytest.fail("work started"))
    code, _, err = run_cli(capsys, CONFIG, *FAST, f"output_dir={out}")
    assert code == 2
    assert "already holds files archquant did not write (e.g. checkpoint)" in one_error_line(err)
    assert (out / "checkpoint" / "step_1000" / "optimizer.pt").read_bytes() == b"hours of training"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left either


def test_rerun_replaces_archquants_own_result_and_keeps_what_someone_added(previous_result, tmp_path, capsys):
    out = copy_result(previous_result, tmp_path)
    (out / "notes.txt").write_text("my notes")
    (out / "checkpoint" / "eval.log").write_text("my log")
    code, stdout, err = run_cli(capsys, CONFIG, *FAST, f"output_dir={out}", "recipe.name=rtn_dynamic")
    assert code == 0, err
    assert recipe_of(out) == "rtn_dynamic"
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "artifacts", "checkpoint", "report.json", "report.md"]
    kept = [p for p in tmp_path.iterdir() if p.name != "out"]
    assert len(kept) == 1 and kept[0].name.startswith("out.kept-")
    assert (kept[0] / "notes.txt").read_text() == "my notes"
    # the user's file inside the old checkpoint is kept; the old checkpoint's own files are not
    assert sorted(p.name for p in (kept[0] / "checkpoint").iterdir()) == ["eval.log"]
    report = json.loads((out / "report.json").read_text())
    assert report["output"]["kept_aside"] == str(kept[0])
    assert str(kept[0]) in (out / "report.md").read_text() and str(kept[0]) in stdout


def test_an_older_archquants_output_dir_is_recognised_and_replaced(previous_result, tmp_path, capsys):
    out = copy_result(previous_result, tmp_path)
    for marker in (out / MARKER, out / "checkpoint" / MARKER):  # what archquant wrote before markers existed
        marker.unlink()
    shutil.rmtree(out / "artifacts", ignore_errors=True)  # nor did it write artifacts
    (out / ".report.md.tmp").write_text("leftover of that version")
    code, _, err = run_cli(capsys, CONFIG, *FAST, f"output_dir={out}", "recipe.name=rtn_dynamic")
    assert code == 0, err
    assert recipe_of(out) == "rtn_dynamic"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_planted_symlink_is_never_written_through(previous_result, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("do not touch")
    out = copy_result(previous_result, tmp_path)
    (out / ".report.md.tmp").symlink_to(victim)  # the old fixed temporary name
    (out / "report.md").unlink()
    (out / "report.md").symlink_to(victim)
    code, _, err = run_cli(capsys, CONFIG, *FAST, f"output_dir={out}")
    assert code == 0, err
    assert victim.read_text() == "do not touch"
    assert not (out / "report.md").is_symlink()
    # and the atomic writer on its own: a symlink at the target is replaced, not followed
    link = tmp_path / "link.txt"
    link.symlink_to(victim)
    write_text_atomic(link, "new")
    assert victim.read_text() == "do not touch" and link.read_text() == "new" and not link.is_symlink()


def test_leftovers_of_interrupted_runs_are_cleaned_up_and_reported(tmp_path, capsys):
    out = tmp_path / "out"
    dead_pid = 2**22 + 12345  # above pid_max's usual range: no such process
    staging = tmp_path / f".out.tmp-{dead_pid}-abc123"
    (staging / "checkpoint").mkdir(parents=True)
    (staging / MARKER).write_text(json.dumps({"written_by": "archquant", "kind": "staging", "entries": []}))
    (staging / "checkpoint" / "model.safetensors").write_bytes(b"partial")
    empty_old_style = tmp_path / ".out.tmp-q8zx1"  # older archquant's mkdtemp name, killed before writing
    empty_old_style.mkdir()
    not_ours = tmp_path / f".out.tmp-{dead_pid}-zzz"  # right name, but holds someone's file and no marker
    not_ours.mkdir()
    (not_ours / "data.bin").write_bytes(b"x")
    code, stdout, err = run_cli(capsys, CONFIG, *FAST, f"output_dir={out}")
    assert code == 0, err
    assert not staging.exists() and not empty_old_style.exists()
    assert (not_ours / "data.bin").read_bytes() == b"x"
    assert f"removed the leftover of an interrupted run: {staging}" in stdout
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["output"]["removed_leftovers"]) == sorted([str(staging), str(empty_old_style)])


def test_save_quantized_refuses_a_foreign_directory_and_replaces_its_own(toy_model, tmp_path):
    aq.quantize_(toy_model, "rtn_dynamic", progress=False)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(b"1")
    with pytest.raises(aq.OutputExistsError, match="will not replace them"):
        aq.save_quantized(toy_model, foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["weights.bin"]
    target = tmp_path / "ckpt"
    aq.save_quantized(toy_model, target)
    aq.save_quantized(toy_model, target)
    aq.load_quantized(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "mine"]


# ------------------------------------------------------------------ 2. complete together or not at all
@pytest.mark.parametrize("output_dir,message", [
    ("/proc/archquant-out", "cannot write output_dir /proc/archquant-out"),
    ("{file}", "exists and is not a directory"),
])
def test_an_unusable_output_dir_fails_before_any_work(tmp_path, capsys, monkeypatch, output_dir, message):
    existing = tmp_path / "a_file"
    existing.write_text("x")
    output_dir = output_dir.format(file=existing)
    from archquant.adapters.toy import ToyAdapter

    monkeypatch.setattr(ToyAdapter, "load_model", lambda *a, **k: pytest.fail("work started"))
    t0 = time.perf_counter()
    code, _, err = run_cli(capsys, CONFIG, *FAST, f"output_dir={output_dir}")
    assert code == 2 and message in one_error_line(err)
    assert time.perf_counter() - t0 < 1.0
    assert existing.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_output_dir_fails_before_any_work(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        code, _, err = run_cli(capsys, CONFIG, *FAST, f"output_dir={parent / 'out'}")
    finally:
        parent.chmod(0o700)
    assert code == 2 and "cannot write output_dir" in one_error_line(err)


def test_a_reload_mismatch_publishes_nothing(previous_result, tmp_path, capsys, monkeypatch):
    out = copy_result(previous_result, tmp_path)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    import archquant.run as run_module

    original = run_module.load_quantized

    def corrupt_reload(directory):
        model = original(directory)
        next(model.parameters()).data.add_(1.0)  # as if the file had not round-tripped
        return model

    monkeypatch.setattr(run_module, "load_quantized", corrupt_reload)
    code, _, err = run_cli(capsys, CONFIG, *FAST, f"output_dir={out}", "recipe.name=rtn_dynamic")
    line = one_error_line(err)
    assert code == 1 and "reloaded to a model with different outputs on the probe batch" in line and f"nothing was published to {out}" in line
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_full_disk_during_save_publishes_nothing(previous_result, tmp_path, capsys, monkeypatch):
    """Fault injection in-process: the weights writer fails as safetensors does when the disk is full."""
    out = copy_result(previous_result, tmp_path)
    from safetensors import SafetensorError

    import archquant.core.serialization as serialization

    def disk_full(model, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # a partial file, as a real full disk leaves
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(serialization, "save_model", disk_full)
    code, _, err = run_cli(capsys, CONFIG, *FAST, f"output_dir={out}", "recipe.name=rtn_dynamic")
    line = one_error_line(err)
    assert code == 1 and "No space left on device" in line and f"nothing was published to {out}" in line
    assert recipe_of(out) == "hadamard_static"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_file_size_limit_hit_during_save_publishes_nothing(previous_result, tmp_path):
    """Real OS-level write failures (RLIMIT_FSIZE, EFBIG) inside safetensors' own writer, in a subprocess."""
    out = copy_result(previous_result, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "archquant.run", str(CONFIG), *FAST, f"output_dir={out}",
                           "recipe.name=rtn_dynamic"], capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size(16 * 1024), cwd=ROOT)
    line = one_error_line(proc.stderr)
    assert proc.returncode == 1, proc.stderr
    assert "File too large" in line and f"nothing was published to {out}" in line
    assert recipe_of(out) == "hadamard_static" and aq.load_quantized(out / "checkpoint") is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# (signal, pause point): SIGKILL leaves hidden staging behind (the next run removes it); SIGINT/SIGTERM clean up.
KILLS = [
    (signal.SIGKILL, "stage:save"),
    (signal.SIGKILL, "weights-written"),
    (signal.SIGKILL, "reload"),
    (signal.SIGKILL, "publish"),
    (signal.SIGKILL, "swapped"),
    (signal.SIGINT, "stage:load data"),
    (signal.SIGINT, "weights-written"),
    (signal.SIGINT, "reload"),
    (signal.SIGINT, "publish"),
    (signal.SIGTERM, "reload"),
]


def run_paused(point: str, out: Path, sig: int, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "_pausing_cli.py"), point, str(CONFIG), *FAST,
                             f"output_dir={out}", *overrides], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    try:
        for line in proc.stdout:
            if line.startswith("PAUSED"):
                break
        else:
            pytest.fail(f"never reached {point}: {proc.wait() and proc.stderr.read()}")
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("sig,point", KILLS, ids=[f"{s.name}-{p}" for s, p in KILLS])
def test_a_killed_run_leaves_the_previous_result_whole(previous_result, tmp_path, sig, point):
    out = copy_result(previous_result, tmp_path)
    (out / "notes.txt").write_text("mine")
    result = run_paused(point, out, sig, "recipe.name=rtn_dynamic")
    if sig != signal.SIGKILL:
        assert result.returncode == (130 if sig == signal.SIGINT else 143)
        line = one_error_line(result.stderr)
        word = "interrupted" if sig == signal.SIGINT else "terminated"
        assert line == f"archquant: {word}; nothing was published to {out}, which was left as it was"
    else:
        assert result.returncode == -signal.SIGKILL
    visible = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    if point == "swapped":  # killed after the swap: the new result is in place, the old one not yet cleaned up
        assert recipe_of(out) == "rtn_dynamic"
    else:
        assert recipe_of(out) == "hadamard_static" and visible == ["out"]
        assert (out / "notes.txt").read_text() == "mine"
    assert visible_checkpoints(tmp_path) == [out / "checkpoint"]
    aq.load_quantized(out / "checkpoint")
    if sig != signal.SIGKILL:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left behind
        return
    if point not in ("weights-written", "publish", "swapped"):  # rerun where the leftovers differ most
        return
    # the next run removes what the killed one left, says so, and the user's file survives
    proc = subprocess.run([sys.executable, "-m", "archquant.run", str(CONFIG), *FAST, f"output_dir={out}"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "leftover of an interrupted run" in proc.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    kept = [p / "notes.txt" for p in tmp_path.iterdir() if p.name.startswith("out.kept-")]
    assert [p.read_text() for p in kept] == ["mine"]


def test_exchange_fallback_when_the_filesystem_cannot_swap(previous_result, tmp_path, capsys, monkeypatch):
    out = copy_result(previous_result, tmp_path)
    monkeypatch.setattr(safe_io, "_exchange", lambda a, b: False)
    code, _, err = run_cli(capsys, CONFIG, *FAST, f"output_dir={out}", "recipe.name=rtn_dynamic")
    assert code == 0, err
    assert recipe_of(out) == "rtn_dynamic"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_staged_dir_leaves_nothing_when_the_block_fails(tmp_path):
    target = tmp_path / "t"
    with pytest.raises(RuntimeError):
        with StagedDir(target) as stage:
            (stage.path / "x").write_text("1")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_the_report_names_the_committed_reference_model_a_config_loaded():
    from archquant.report import _model_source

    assert _model_source({"model": {"path": "/data/VGGT-1B"}, "config": {}}) == "/data/VGGT-1B"
    named = {"model": {"path": None}, "config": {"model": {"options": {"reference": "vggt-scenes"}}}}
    assert _model_source(named) == "committed reference model `vggt-scenes` (models/reference/vggt-scenes)"
    assert _model_source({"model": {"path": None}, "config": {"model": {"options": {}}}}) == "(built-in default)"
