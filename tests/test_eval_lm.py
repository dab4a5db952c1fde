"""Tests for archquant.eval.lm (CPU, fast)."""

from __future__ import annotations

import math

import pytest
import torch

from archquant.eval.corpus import Document, stdlib_documents
from archquant.eval.lm import (
    ByteTokenizer,
    LastTokenExample,
    build_last_token_task,
    calibration_windows,
    check_tokenizer_fits,
    eval_windows,
    get_tokenizer,
    last_token_accuracy,
    perplexity,
    token_stream,
)

BYTES = ByteTokenizer()


def make_docs(n: int, size: int = 10) -> list[Document]:
    """n documents of `size` bytes each, every document made of one distinct letter."""
    return [Document(f"doc{i}", bytes([ord("a") + i]) * size) for i in range(n)]


# ---------------------------------------------------------------- tokenizers and streams
def test_byte_tokenizer_round_trip():
    data = bytes(range(256)) + "héllo\n".encode()
    ids = BYTES.encode(data)
    assert ids[:3] == [0, 1, 2] and max(ids) < BYTES.vocab_size == 256
    assert BYTES.decode(ids) == data
    assert BYTES.decode(torch.tensor(ids)) == data


def test_get_tokenizer_bytes_and_missing_dir():
    assert isinstance(get_tokenizer("bytes"), ByteTokenizer)
    with pytest.raises(ValueError, match="/no/such/dir"):
        get_tokenizer("/no/such/dir")


def test_get_tokenizer_on_a_directory_without_a_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a model directory, say, with no tokenizer saved
    with pytest.raises(ValueError) as ei:
        get_tokenizer(str(tmp_path))
    msg = str(ei.value)
    assert "\n" not in msg and str(tmp_path) in msg and "no tokenizer" in msg and "tokenizer.json" in msg


def test_check_tokenizer_fits():
    check_tokenizer_fits(BYTES, 256, "model m")
    check_tokenizer_fits(BYTES, 50280, "model m")  # a padded vocabulary is fine
    with pytest.raises(ValueError) as ei:
        check_tokenizer_fits(BYTES, 200, "model /ckpt/m")
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith("tokenizer 'bytes' has 256 tokens but the model's vocabulary is 200: ")
    assert "ids 200..255" in msg and "/ckpt/m" in msg


def test_check_tokenizer_fits_guards_the_embedding_lookup(tmp_path):
    """The IndexError it replaces: a word-level tokenizer of 300 tokens, a model of 64."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    from archquant.models.mamba import MambaConfig, MambaLM

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 300)}}
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]").save_pretrained(tmp_path)
    tok = get_tokenizer(str(tmp_path))
    model = MambaLM(MambaConfig(vocab_size=64, hidden_size=16, num_layers=1))
    ids = torch.tensor([tok.encode(b"w1 w299")])
    with pytest.raises(IndexError):
        model(ids)
    with pytest.raises(ValueError, match=r"^tokenizer '.+' has 300 tokens but the model's vocabulary is 64: "):
        check_tokenizer_fits(tok, model.config.vocab_size, "the model")


def test_get_tokenizer_wraps_a_local_hf_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    # A byte-level BPE with a single merge, built here so the test needs no download.
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["de"] = len(vocab)
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[("d", "e")]))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.add_special_tokens(["<s>"])
    # Prepends <s> by default, which get_tokenizer's encode must not do.
    bpe.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 257)])
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>").save_pretrained(tmp_path)

    tok = get_tokenizer(str(tmp_path))
    assert tok.vocab_size == 258  # 256 bytes, the merge and the added "<s>"
    text = "def f(x):\n    return 'héllo'  # ok\n".encode()
    ids = tok.encode(text)
    assert tok.tokenizer.encode("x")[0] == 257 and 257 not in ids
    assert vocab["de"] in ids and len(ids) < len(text)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(b"ab\xffc")) == "ab\ufffdc".encode()  # invalid UTF-8 is replaced
    assert tok.decode(token_stream([Document("a", b"ab"), Document("b", b"de")], tok)) == b"ab\nde"


def test_old_corpus_module_re_exports_the_moved_one():
    import archquant.corpus as old
    import archquant.eval.corpus as moved

    assert len(moved.__all__) >= 10
    for name in moved.__all__:
        assert getattr(old, name) is getattr(moved, name), name


def test_token_stream_joins_documents_with_separator():
    docs = [Document("a", b"ab"), Document("b", b""), Document("c", b"cd")]
    assert BYTES.decode(token_stream(docs, BYTES)) == b"ab\n\ncd"
    assert BYTES.decode(token_stream(docs, BYTES, separator=b"|")) == b"ab||cd"
    assert token_stream(docs, BYTES).dtype == torch.long


# ---------------------------------------------------------------- evaluation windows
def test_eval_windows_shapes_and_contents():
    docs = make_docs(3)  # stream: 10 a, \n, 10 b, \n, 10 c = 32 tokens
    stream = token_stream(docs, BYTES)
    w = eval_windows(docs, BYTES, seq_len=7, max_windows=10)
    assert w.shape == (4, 8) and w.dtype == torch.long  # 32 // 8 windows
    assert torch.equal(w.reshape(-1), stream[:32])
    assert eval_windows(docs, BYTES, seq_len=7, max_windows=2).shape == (2, 8)
    assert torch.equal(eval_windows(docs, BYTES, seq_len=7, max_windows=2), w[:2])


def test_eval_windows_too_short():
    with pytest.raises(ValueError, match=r"10 tokens.*seq_len=10.*11"):
        eval_windows(make_docs(1), BYTES, seq_len=10, max_windows=1)


# ---------------------------------------------------------------- calibration windows
def test_calibration_windows_deterministic_per_seed():
    docs = make_docs(12)
    a, used_a = calibration_windows(docs, BYTES, seq_len=5, num_samples=6, seed=1)
    b, used_b = calibration_windows(docs, BYTES, seq_len=5, num_samples=6, seed=1)
    c, _ = calibration_windows(docs, BYTES, seq_len=5, num_samples=6, seed=2)
    assert a.shape == (6, 5) and a.dtype == torch.long
    assert torch.equal(a, b) and used_a == used_b
    assert not torch.equal(a, c)
    # The documents were put in the order of torch.randperm under the seed's generator.
    order = torch.randperm(12, generator=torch.Generator().manual_seed(1)).tolist()
    assert BYTES.decode(a.reshape(-1)[:21]) == docs[order[0]].text + b"\n" + docs[order[1]].text


def test_calibration_windows_without_shuffle_keeps_order():
    docs = make_docs(5)
    w, used = calibration_windows(docs, BYTES, seq_len=11, num_samples=2, shuffle=False)
    assert torch.equal(w.reshape(-1), token_stream(docs, BYTES)[:22])
    assert used == frozenset({"doc0", "doc1"})


def test_calibration_windows_used_ids_are_the_contributing_docs():
    docs = make_docs(8)
    w, used = calibration_windows(docs, BYTES, seq_len=6, num_samples=4, seed=3)
    letters_seen = {chr(t) for t in w.reshape(-1).tolist() if t != ord("\n")}
    assert used == frozenset(f"doc{ord(ch) - ord('a')}" for ch in letters_seen)
    # 24 tokens of 11-token (doc + separator) blocks: exactly 3 documents
    assert len(used) == 3
    # A window ending right after a document's separator does not count the next document.
    _, used = calibration_windows(docs, BYTES, seq_len=11, num_samples=1, shuffle=False)
    assert used == frozenset({"doc0"})
    # Empty documents contribute no tokens.
    docs = [Document("empty", b""), Document("full", b"xyz" * 5)]
    _, used = calibration_windows(docs, BYTES, seq_len=4, num_samples=2, shuffle=False)
    assert used == frozenset({"full"})


def test_calibration_windows_errors():
    with pytest.raises(ValueError, match=r"21 tokens.*2 documents.*3 x 8 = 24"):
        calibration_windows(make_docs(2), BYTES, seq_len=8, num_samples=3)
    with pytest.raises(ValueError, match="num_samples"):
        calibration_windows(make_docs(2), BYTES, seq_len=8, num_samples=0)


# ---------------------------------------------------------------- perplexity
def test_perplexity_of_uniform_model_is_vocab_size():
    vocab = 37
    windows = torch.randint(0, vocab, (5, 9), generator=torch.Generator().manual_seed(0))

    def uniform(ids):
        return torch.zeros(*ids.shape, vocab)

    ppl = perplexity(uniform, windows, batch_size=2)
    assert math.isclose(ppl, vocab, rel_tol=1e-9)


def test_perplexity_of_perfect_model_is_one():
    windows = torch.randint(0, 50, (3, 17), generator=torch.Generator().manual_seed(0))
    lookup = {tuple(w[:-1].tolist()): w[1:] for w in windows}

    def perfect(ids):
        targets = torch.stack([lookup[tuple(row.tolist())] for row in ids])
        return torch.nn.functional.one_hot(targets, 50).float() * 50.0

    assert perplexity(perfect, windows, batch_size=2) == pytest.approx(1.0, abs=1e-6)


def test_perplexity_of_a_collapsed_model_is_inf_not_an_error():
    """A mean NLL of ~1e4 nats: math.exp overflows, the metric is inf and the run goes on."""
    windows = torch.zeros(2, 6, dtype=torch.long)

    def sure_and_wrong(ids):  # every target is 0; this model puts all its mass on token 1
        logits = torch.zeros(*ids.shape, 4)
        logits[..., 1] = 1e4
        return logits

    assert perplexity(sure_and_wrong, windows) == math.inf

    def nan_logits(ids):
        return torch.full((*ids.shape, 4), math.nan)

    assert math.isnan(perplexity(nan_logits, windows))

    # just below the overflow the value is still exact: NLL = 700 nats per token
    def seven_hundred(ids):
        logits = torch.zeros(*ids.shape, 2)
        logits[..., 1] = 700.0  # log(1 + e^700) ≈ 700 nats for target 0
        return logits

    assert perplexity(seven_hundred, windows) == pytest.approx(math.exp(700.0), rel=1e-9)


def test_perplexity_checks_logit_shape():
    with pytest.raises(ValueError, match="logits of shape"):
        perplexity(lambda ids: torch.zeros(ids.shape[0], 4), torch.zeros(2, 5, dtype=torch.long))


# ---------------------------------------------------------------- last-token task
DOC = Document("code", b"alpha = 1\nbeta = alpha\nprint(gamma)\nreturn beta,\n")


def decoded(example: LastTokenExample) -> tuple[bytes, bytes]:
    return BYTES.decode(example.context), BYTES.decode(example.target)


def test_last_token_task_hand_checked():
    examples = build_last_token_task([DOC], BYTES, num_examples=10)
    assert [decoded(e) for e in examples] == [
        (b"alpha = 1\nbeta = ", b"alpha"),
        (b"alpha = 1\nbeta = alpha\nprint(gamma)\nreturn ", b"beta"),
    ]  # "gamma" ends a line but never occurred before it: no example
    assert all(e.doc_id == "code" for e in examples)
    assert all(e.context.dtype == e.target.dtype == torch.long for e in examples)


def test_last_token_task_context_len_limits_context_and_lookback():
    # "alpha" ends line 2 at byte 17 and first occurs at byte 0; "beta" ends line 4 at byte 43
    # and first occurs at byte 10.
    examples = build_last_token_task([DOC], BYTES, num_examples=10, context_len=17)
    assert [decoded(e) for e in examples] == [(b"alpha = 1\nbeta = ", b"alpha")]
    examples = build_last_token_task([DOC], BYTES, num_examples=10, context_len=40)
    assert [decoded(e) for e in examples][1] == (DOC.text[3:43], b"beta")
    # 16 bytes cut the earlier "alpha" to "lpha": that is not an occurrence, so nothing is left.
    with pytest.raises(ValueError, match="no last-token example"):
        build_last_token_task([DOC], BYTES, num_examples=10, context_len=16)


def test_last_token_task_rejects_word_only_seen_in_a_longer_identifier():
    doc = Document("d", b"values = value_list\nreturn value\nreturn value_list\n")
    targets = [decoded(e)[1] for e in build_last_token_task([doc], BYTES, num_examples=10)]
    assert targets == [b"value_list"]  # "value" only occurred inside other identifiers


def test_last_token_task_per_doc_spread_and_num_examples():
    lines = [b"name%d = 1" % i for i in range(10)] + [b"use(name%d)" % i for i in range(10)]
    doc = Document("many", b"\n".join(lines) + b"\n")
    examples = build_last_token_task([doc, DOC], BYTES, num_examples=10, per_doc=2)
    # 10 candidates in "many": the evenly spaced picks are candidates 2 and 7
    assert [decoded(e)[1] for e in examples] == [b"name2", b"name7", b"alpha", b"beta"]
    assert [e.doc_id for e in examples] == ["many", "many", "code", "code"]
    assert len(build_last_token_task([doc, DOC], BYTES, num_examples=3, per_doc=2)) == 3
    assert len(build_last_token_task([doc], BYTES, num_examples=100, per_doc=100)) == 10


def test_last_token_task_is_deterministic_and_errors_without_candidates():
    docs = stdlib_documents("evaluation")[:3]
    a = build_last_token_task(docs, BYTES, num_examples=6, context_len=128)
    b = build_last_token_task(docs, BYTES, num_examples=6, context_len=128)
    assert [(decoded(e), e.doc_id) for e in a] == [(decoded(e), e.doc_id) for e in b]
    for e in a:  # the target always occurred earlier in its own context
        assert decoded(e)[1] in decoded(e)[0]
    with pytest.raises(ValueError, match="no last-token example"):
        build_last_token_task([Document("x", b"a = 1\nb = 2\n")], BYTES, num_examples=3)


class SpaceMergingTokenizer:
    """A BPE-like toy: a space followed by a letter is one token, so words merge with the space."""

    vocab_size = 512

    def encode(self, data: bytes) -> list[int]:
        ids, i = [], 0
        while i < len(data):
            if data[i] == ord(" ") and i + 1 < len(data) and chr(data[i + 1]).isalpha():
                ids.append(256 + data[i + 1])
                i += 2
            else:
                ids.append(data[i])
                i += 1
        return ids

    def decode(self, ids) -> bytes:
        return b"".join(b" " + bytes([i - 256]) if i >= 256 else bytes([i]) for i in map(int, ids))


def test_last_token_task_skips_words_merged_with_the_context():
    doc = Document("d", b"alpha = 1\nbeta = alpha\nprint(beta)\n")
    tok = SpaceMergingTokenizer()
    examples = build_last_token_task([doc], tok, num_examples=10, per_doc=5)
    # " alpha" would merge its space into the word: only the "(beta" boundary is clean.
    assert [(tok.decode(e.context)[-6:], tok.decode(e.target)) for e in examples] == [(b"print(", b"beta")]


# ---------------------------------------------------------------- last-token accuracy
def oracle_model(examples: list[LastTokenExample], right: set[int], vocab: int = 256):
    """Predicts the targets of examples whose index is in `right`, and token 0 everywhere else.

    It recognises an example by its exact input row, so left padding would make it miss.
    """
    known = {}
    for i, ex in enumerate(examples):
        row = tuple(torch.cat([ex.context, ex.target[:-1]]).tolist())
        known[row] = (len(ex.context), ex.target) if i in right else None

    def model_fn(ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, vocab)
        logits[..., 0] = 1.0
        for b, row in enumerate(ids.tolist()):
            hit = known.get(tuple(row))
            if hit is not None:
                ctx_len, target = hit
                positions = torch.arange(ctx_len - 1, ctx_len - 1 + len(target))
                logits[b, positions, target] = 10.0
        return logits

    return model_fn


@pytest.fixture(scope="module")
def stdlib_examples() -> list[LastTokenExample]:
    return build_last_token_task(stdlib_documents("evaluation")[:3], BYTES, num_examples=12, context_len=96)


def test_last_token_accuracy_oracle_and_constant(stdlib_examples):
    examples = stdlib_examples
    assert last_token_accuracy(oracle_model(examples, set(range(len(examples)))), examples) == 1.0
    assert last_token_accuracy(oracle_model(examples, set()), examples) == 0.0


def test_last_token_accuracy_partial_credit():
    # Two-token target: getting the first token right is not enough.
    ex = LastTokenExample(context=torch.tensor([5, 6, 7]), target=torch.tensor([8, 9]), doc_id="x")

    def first_token_only(ids):
        logits = torch.zeros(*ids.shape, 16)
        logits[:, 2, 8] = 1.0  # position 2 predicts target[0]; position 3 predicts 0
        return logits

    assert last_token_accuracy(first_token_only, [ex]) == 0.0


def test_last_token_accuracy_batched_equals_one_at_a_time(stdlib_examples):
    examples = stdlib_examples
    assert len({len(e.context) + len(e.target) for e in examples}) > 1  # mixed lengths
    model_fn = oracle_model(examples, right=set(range(0, len(examples), 2)))
    alone = [last_token_accuracy(model_fn, [e], batch_size=1) for e in examples]
    batched = last_token_accuracy(model_fn, examples, batch_size=16)
    assert batched == sum(alone) / len(examples)
    assert batched == pytest.approx(len(range(0, len(examples), 2)) / len(examples))


# ---------------------------------------------------------------- smoke test on a real model
def test_smoke_tiny_mamba_on_stdlib():
    from archquant.models.mamba import MambaConfig, MambaLM, init_mamba_weights

    torch.manual_seed(0)
    model = init_mamba_weights(MambaLM(MambaConfig(arch="mamba1", vocab_size=256, hidden_size=32, num_layers=1)))
    model.eval()
    docs = stdlib_documents("evaluation")[:3]
    ppl = perplexity(model, eval_windows(docs, BYTES, seq_len=64, max_windows=4), batch_size=2)
    assert math.isfinite(ppl) and ppl > 1
    examples = build_last_token_task(docs, BYTES, num_examples=6, context_len=64)
    acc = last_token_accuracy(model, examples, batch_size=4)
    assert 0.0 <= acc <= 1.0
