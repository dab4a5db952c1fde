"""Calibration / evaluation disjointness is checked on content, not on labels (CPU, fast).

The same evaluation file given to calibration by another route (``text_files`` on the stdlib
file itself, a copy, a hardlink, a symlink, a re-saved copy) must be refused; binary files
given as text are refused in one line; the mechanism works for any family's items.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from archquant.adapters.mamba import MambaAdapter
from archquant.adapters.toy import ToyAdapter
from archquant.eval.corpus import (STDLIB_SPLITS, binary_content, document_digests, stdlib_documents, stdlib_root,
                              text_file_documents)
from archquant.data import (DataOverlapError, DataSplit, MissingContentDigestsError, check_disjoint, digest_record,
                            digest_tensor, digest_text, digest_tokens, label_digests, normalize_text)
from archquant.models.toy import ToyConfig
from archquant.run import main

ROOT = Path(__file__).resolve().parent.parent
MAMBA = MambaAdapter()


def _calibration_cfg(source: str = "stdlib", path=None, seq_len: int = 32, num_samples: int = 4) -> dict:
    return {"source": source, "split": None if path else "calibration", "path": None if path is None else str(path),
            "num_samples": num_samples, "seq_len": seq_len, "batch_size": 2, "shuffle": True, "seed": 0}


def _evaluation_cfg(seq_len: int = 32, num_samples: int = 4) -> dict:
    return {"source": "stdlib", "split": "evaluation", "num_samples": num_samples, "seq_len": seq_len,
            "batch_size": 2, "task_examples": 0}


@pytest.fixture(scope="module")
def evaluation():
    return MAMBA.load_data(_evaluation_cfg(), "evaluation", {})


@pytest.fixture(scope="module")
def evaluation_file() -> Path:
    """A real standard-library file of the evaluation split, long enough to calibrate on."""
    doc = next(d for d in stdlib_documents("evaluation") if len(d.text) > 4000)
    return stdlib_root() / doc.id.removeprefix("stdlib:")


def _calibrate_on(path) -> DataSplit:
    return MAMBA.load_data(_calibration_cfg("text_files", path), "calibration", {})


# ------------------------------------------------------------------------------ text: the same file by other routes
def test_text_files_calibration_on_a_stdlib_evaluation_file_is_refused(evaluation, evaluation_file):
    rel = evaluation_file.relative_to(stdlib_root()).as_posix()
    with pytest.raises(DataOverlapError, match="overlap in 1 item") as err:
        check_disjoint(_calibrate_on(evaluation_file), evaluation)
    message = str(err.value)
    assert "\n" not in message
    assert f"file:{evaluation_file.resolve()}" in message and f"stdlib:{rel}" in message  # both sides named


def _copy(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)


def _hardlink(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem than the stdlib's: a link inside tmp shows the same thing
        shutil.copyfile(src, dst.with_name("original.py"))
        os.link(dst.with_name("original.py"), dst)


def _symlink(src: Path, dst: Path) -> None:
    dst.symlink_to(src)


def _resaved_crlf_with_trailing_spaces(src: Path, dst: Path) -> None:
    lines = src.read_bytes().split(b"\n")
    dst.write_bytes(b"\r\n".join(line + b"  \t" for line in lines) + b"\r\n\r\n")


@pytest.mark.parametrize("make", [_copy, _hardlink, _symlink, _resaved_crlf_with_trailing_spaces],
                         ids=["copy", "hardlink", "symlink", "crlf-copy"])
def test_other_routes_to_the_same_content_are_refused(evaluation, evaluation_file, tmp_path, make):
    variant = tmp_path / "some_other_name.txt"
    make(evaluation_file, variant)
    with pytest.raises(DataOverlapError, match="overlap"):
        check_disjoint(_calibrate_on(variant), evaluation)


def test_a_directory_holding_one_evaluation_file_is_refused(evaluation, evaluation_file, tmp_path):
    (tmp_path / "mine.txt").write_text("my own notes\n" * 50)
    _copy(evaluation_file, tmp_path / "borrowed.py")
    split = MAMBA.load_data(_calibration_cfg("text_files", tmp_path, num_samples=200), "calibration", {})
    with pytest.raises(DataOverlapError, match="borrowed.py"):
        check_disjoint(split, evaluation)


def test_a_concatenation_of_evaluation_files_is_caught_by_its_token_windows(tmp_path):
    # No single document matches, but the model would be fed the evaluation windows themselves.
    evaluation = MAMBA.load_data(_evaluation_cfg(seq_len=64), "evaluation", {})
    docs = stdlib_documents("evaluation")
    (tmp_path / "all.txt").write_bytes(b"\n".join(d.text for d in docs[:20]))
    calibration = MAMBA.load_data(_calibration_cfg("text_files", tmp_path / "all.txt", seq_len=64), "calibration", {})
    shared_window = "window 0 has the same content as evaluation stdlib/evaluation window 0"
    with pytest.raises(DataOverlapError, match=shared_window):
        check_disjoint(calibration, evaluation)


def _distinct_text(seed: int, lines: int = 40) -> str:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "lambda", "zeta"]
    return "\n".join(" ".join(rng.choice(words) + str(rng.randrange(1000)) for _ in range(8)) for _ in range(lines))


def test_genuinely_different_files_are_accepted_and_the_items_counted(tmp_path):
    for i in range(2):
        (tmp_path / f"notes{i}.txt").write_text(_distinct_text(i, lines=5))  # ~300 bytes: both are used
    (tmp_path / "empty.txt").write_text("\n  \n")  # no content: neither an item nor an overlap
    calibration = MAMBA.load_data(_calibration_cfg("text_files", tmp_path, seq_len=64, num_samples=6),
                                  "calibration", {})
    evaluation = MAMBA.load_data(_evaluation_cfg(seq_len=64), "evaluation", {})
    summary = check_disjoint(calibration, evaluation)
    eval_docs = document_digests(stdlib_documents("evaluation"))
    assert summary == {"calibration_items": 2 + 6, "evaluation_items": len(eval_docs) + 4,
                       "compared_by": "sha256 of normalized document text and of token-id windows"}


def test_the_default_stdlib_splits_are_disjoint_by_content():
    # Identical files at several stdlib paths (copies of one __main__.py) all fall into one split.
    digests = {split: document_digests(stdlib_documents(split)) for split in STDLIB_SPLITS}
    for a in STDLIB_SPLITS:
        for b in STDLIB_SPLITS:
            if a < b:
                assert not digests[a].keys() & digests[b].keys(), (a, b)


def test_the_default_config_passes_the_check(evaluation):
    calibration = MAMBA.load_data(_calibration_cfg(), "calibration", {})
    summary = check_disjoint(calibration, evaluation)
    assert summary["calibration_items"] >= 1 and summary["evaluation_items"] > 100
    assert summary["compared_by"] == "sha256 of normalized document text"  # 32-token windows are too short to count


# ------------------------------------------------------------------------------ through the runner
def _run(capsys, *overrides):
    code = main([str(ROOT / "configs" / "mamba_w8a8.yaml"), "backend=fake", "compare=[]", "progress=false",
                 "calibration.num_samples=4", "calibration.seq_len=32", "calibration.batch_size=2",
                 "evaluation.num_samples=4", "evaluation.seq_len=32", "evaluation.batch_size=2",
                 "evaluation.task_examples=4", *overrides])
    return code, capsys.readouterr().err


def test_runner_refuses_the_overlap_with_one_line_and_exit_2(evaluation_file, tmp_path, capsys):
    copy = tmp_path / "renamed.txt"
    _copy(evaluation_file, copy)
    code, err = _run(capsys, "calibration.source=text_files", f"calibration.path={copy}",
                     f"output_dir={tmp_path / 'out'}")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("archquant: error: calibration data (text_files:"), err
    assert "overlap in 1 item(s)" in lines[0] and str(copy.resolve()) in lines[0]
    assert not (tmp_path / "out").exists()


def test_runner_refuses_a_binary_data_file_with_one_line(tmp_path, capsys):
    binary = tmp_path / "ls"
    binary.write_bytes(Path("/bin/ls").read_bytes() if Path("/bin/ls").is_file() else b"\x7fELF" + bytes(64))
    code, err = _run(capsys, "calibration.source=text_files", f"calibration.path={binary}",
                     f"output_dir={tmp_path / 'out'}")
    assert code == 2
    assert err.strip() == f"archquant: error: data file {binary} is not text (binary content: ELF executable)"


# ------------------------------------------------------------------------------ binary files given as text
def test_an_elf_file_is_refused_naming_the_file(tmp_path):
    elf = tmp_path / "tool"
    elf.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(57) + b"code")
    with pytest.raises(ValueError) as err:
        text_file_documents(elf)
    assert str(err.value) == f"data file {elf} is not text (binary content: ELF executable)"


def test_random_bytes_are_refused_even_inside_a_directory(tmp_path):
    (tmp_path / "a.txt").write_text("plain text\n")
    noise = tmp_path / "b.txt"
    noise.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(ValueError, match=f"^data file {noise} is not text \\(binary content: [^\n]+\\)$"):
        text_file_documents(tmp_path)


@pytest.mark.parametrize("data,reason", [
    (b"abc\x00def", "NUL bytes"),
    (bytes(range(1, 32)) * 10, "invalid UTF-8 or control characters"),
    (bytes([0xC3, 0x28, 0xA0, 0xA1]) * 50, "invalid UTF-8 or control characters"),
])
def test_binary_content_reasons(data, reason):
    assert reason in binary_content(data)


def test_text_with_a_few_stray_bytes_is_still_text():
    assert binary_content("naïve café — ok\n\tindented\r\n".encode()) is None
    assert binary_content(b"latin-1 caf\xe9 in a long line of otherwise plain ASCII text\n" * 3) is None
    assert binary_content(b"") is None


# ------------------------------------------------------------------------------ the family-neutral mechanism
def _split(name: str, digests: dict[str, str]) -> DataSplit:
    return DataSplit(name, batches=[], digests=digests)


def test_prompt_seed_records_overlapping_are_refused():
    calibration = _split("prompts/calibration", label_digests(
        (digest_record({"prompt": p, "seed": s}), f"prompt {i}")
        for i, (p, s) in enumerate([("a red cube", 0), ("a cat on a mat", 1)])))
    evaluation = _split("prompts/evaluation", label_digests(
        (digest_record({"seed": s, "prompt": p}), f"coco #{i}")  # key order does not matter
        for i, (p, s) in enumerate([("a dog", 5), ("a cat on a mat", 1)])))
    with pytest.raises(DataOverlapError, match="e.g. calibration prompt 1 has the same content as evaluation coco #1"):
        check_disjoint(calibration, evaluation)


def test_class_seed_pairs_and_scenes_are_compared_by_record():
    def class_seed_pairs(seed: int) -> dict[str, str]:
        return {digest_record({"class": c, "seed": seed}): f"class {c} seed {seed}" for c in range(4)}

    calibration = _split("imagenet/calibration", class_seed_pairs(7))
    evaluation = _split("imagenet/evaluation", class_seed_pairs(8))
    assert check_disjoint(calibration, evaluation) == {
        "calibration_items": 4, "evaluation_items": 4, "compared_by": "sha256 of canonical JSON records"}
    scene = {"files": {"frame0.png": digest_tensor(torch.zeros(2, 2)), "frame1.png": digest_tensor(torch.ones(2, 2))}}
    with pytest.raises(DataOverlapError):
        check_disjoint(_split("scenes/a", {digest_record(scene): "scene kitchen"}),
                       _split("scenes/b", {digest_record(dict(reversed(scene.items()))): "scene 0042"}))
    with pytest.raises(TypeError, match="digest it first"):
        digest_record({"image": b"raw bytes"})


def test_a_split_without_digests_is_an_adapter_bug_not_a_pass():
    hashed = _split("hashed", {digest_text("x"): "x"})
    with pytest.raises(MissingContentDigestsError, match=r"evaluation data \(forgot\) has no content digests"):
        check_disjoint(hashed, DataSplit("forgot", [], item_ids=frozenset({"a", "b"})))
    with pytest.raises(MissingContentDigestsError, match="no kind in common"):
        check_disjoint(hashed, _split("records", {digest_record([1]): "r"}))
    assert not issubclass(MissingContentDigestsError, ValueError)  # a traceback, not a one-line user error


def test_labels_are_still_compared():
    a = DataSplit("a", [], item_ids=frozenset({"same-id"}), digests={digest_text("one"): "same-id"})
    b = DataSplit("b", [], item_ids=frozenset({"same-id"}), digests={digest_text("two"): "same-id"})
    with pytest.raises(DataOverlapError, match="e.g. same-id"):
        check_disjoint(a, b)


# ------------------------------------------------------------------------------ toy family
def test_toy_splits_are_compared_by_their_sample_tensors():
    toy, model_config = ToyAdapter(), ToyConfig().to_dict()
    cfg = {"source": "synthetic", "num_samples": 32, "batch_size": 8}
    calibration = toy.load_data({**cfg, "split": "calibration"}, "calibration", model_config)
    evaluation = toy.load_data({**cfg, "split": "evaluation"}, "evaluation", model_config)
    assert check_disjoint(calibration, evaluation) == {
        "calibration_items": 32, "evaluation_items": 32, "compared_by": "sha256 of tensors (dtype, shape, values)"}
    same = toy.load_data({**cfg, "split": "evaluation"}, "calibration", model_config)
    same.item_ids = frozenset()  # labels out of the way: the content alone must catch it
    with pytest.raises(DataOverlapError, match=r"overlap in 32 item\(s\), e.g. calibration synthetic/evaluation\[0\]"):
        check_disjoint(same, evaluation)


# ------------------------------------------------------------------------------ digests
def test_normalize_text_takes_out_what_a_resave_changes():
    original = "def f():\n    return 'café'\n"
    resaved = "\ufeff\r\n  \r\ndef f():   \r\n    return 'cafe\u0301'\t\r\n\r\n\r\n"  # BOM, CRLF, blanks, NFD
    assert normalize_text(resaved) == normalize_text(original.encode()) == "def f():\n    return 'café'"
    assert digest_text(resaved) == digest_text(original)
    assert digest_text("def f():\n  return 1") != digest_text("def f():\n    return 1")  # indentation is content


def test_tensor_and_token_digests():
    x = torch.arange(6, dtype=torch.float32)
    assert digest_tensor(x) == digest_tensor(x.clone())
    assert digest_tensor(x) != digest_tensor(x.double())  # dtype is part of the identity
    assert digest_tensor(x) != digest_tensor(x.view(2, 3))  # and so is the shape
    assert digest_tensor(x.view(2, 3)[:, 1]) == digest_tensor(torch.tensor([1.0, 4.0]))  # views hash their values
    assert digest_tensor(x.bfloat16()).startswith("tensor:")
    assert digest_tokens(torch.tensor([1, 2, 3], dtype=torch.int32)) == digest_tokens([1, 2, 3])
