"""Language-model data and metrics: tokenizers, token windows, perplexity, a LAMBADA-style task.

Everything works on ``archquant.eval.corpus.Document`` lists, so the documents (and token windows)
that went into calibration can be compared, by content, with those used for evaluation (see
``archquant.data``).

* ``eval_windows`` / ``perplexity``: non-overlapping windows from the start of the token
  stream, scored by exp(mean next-token NLL) accumulated in float64 (inf when that overflows:
  a collapsed model is a result to report, not an error).
* ``calibration_windows``: consecutive windows of a (seeded) shuffle of the documents, together
  with the ids of the documents that actually contributed tokens.
* ``build_last_token_task`` / ``last_token_accuracy``: predict the last word of a line of text
  when that word already occurred in the preceding context -- LAMBADA's defining property,
  built from any corpus instead of downloaded. Sensitive to long-range memory, which is what
  quantizing an SSM's state path tends to damage first.
"""
from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from archquant.eval.corpus import Document

__all__ = [
    "ByteTokenizer", "HFTokenizer", "get_tokenizer", "check_tokenizer_fits", "token_stream", "eval_windows", "calibration_windows",
    "perplexity", "LastTokenExample", "build_last_token_task", "last_token_accuracy",
]

ModelFn = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------
class ByteTokenizer:
    """Token id = byte value: lossless on any input, no files needed."""

    vocab_size: int = 256
    name: str = "bytes"

    def encode(self, data: bytes) -> list[int]:
        return list(data)

    def decode(self, ids) -> bytes:
        return bytes(int(i) for i in ids)


class HFTokenizer:
    """A ``transformers`` tokenizer behind the bytes-in / bytes-out interface of ``ByteTokenizer``."""

    def __init__(self, tokenizer, name: str) -> None:
        self.tokenizer = tokenizer
        self.name = name
        # len() counts added tokens too; tokenizer.vocab_size does not.
        self.vocab_size = len(tokenizer)

    def encode(self, data: bytes) -> list[int]:
        # Corpus files may hold stray non-UTF-8 bytes; replacing them beats failing a whole run.
        text = data.decode("utf-8", errors="replace")
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids) -> bytes:
        ids = [int(i) for i in ids]
        # No clean-up: it rewrites spaces around punctuation, and code text must come back as it was.
        return self.tokenizer.decode(ids, clean_up_tokenization_spaces=False).encode("utf-8")


#: the files ``AutoTokenizer.from_pretrained`` needs one of in a tokenizer directory
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _looks_like_local_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~"))


def get_tokenizer(name: str):
    """``"bytes"`` -> ``ByteTokenizer``; anything else is a local directory or an HF hub id."""
    if name == "bytes":
        return ByteTokenizer()
    # A path that is clearly local and missing gets a plain message instead of a hub-id error.
    path = os.path.expanduser(name)
    if _looks_like_local_path(name) and not os.path.isdir(path):
        raise ValueError(f"tokenizer {name!r}: no such directory")
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise ValueError(f"tokenizer {name!r}: the directory has no tokenizer ({' or '.join(TOKENIZER_FILES)}); "
                         "name one: 'bytes', a tokenizer directory or a hub id")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises OSError, ValueError, HFValidationError, ...
        raise ValueError(f"cannot load tokenizer {name!r} ({type(e).__name__}): not a tokenizer directory, "
                         f"or a hub id that is not available offline") from None
    return HFTokenizer(tokenizer, name)


def check_tokenizer_fits(tokenizer, vocab_size: int, where: str) -> None:
    """Refuse, in one line, a tokenizer whose ids reach beyond the model's embedding table.

    Fewer tokens than the vocabulary is fine (checkpoints pad it, e.g. 50277 -> 50280); more
    would end in an embedding lookup's ``IndexError`` deep in the first forward. ``where``
    names the model (or the setting that paired the two) for the message.
    """
    size = int(tokenizer.vocab_size)
    if size > vocab_size:
        name = getattr(tokenizer, "name", type(tokenizer).__name__)
        raise ValueError(f"tokenizer {name!r} has {size} tokens but the model's vocabulary is {vocab_size}: "
                         f"ids {vocab_size}..{size - 1} have no embedding in {where}; "
                         "use the tokenizer the model was trained with")


def _encode_tensor(tokenizer, data: bytes) -> torch.Tensor:
    """``tokenizer.encode`` as a 1-D LongTensor."""
    if isinstance(tokenizer, ByteTokenizer):
        # Fast path: megabytes of corpus through a Python list of ints take seconds.
        if not data:
            return torch.empty(0, dtype=torch.long)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    return torch.tensor(tokenizer.encode(data), dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Token streams and windows
# --------------------------------------------------------------------------------------------
def _stream_prefix(docs: Sequence[Document], tokenizer, separator: bytes,
                   needed: int | None = None) -> tuple[torch.Tensor, frozenset[str]]:
    """The token stream of ``docs`` joined by ``separator``, and the ids of the documents in it.

    Each document is tokenized on its own, so BPE merges never cross a document boundary and we
    know which tokens came from which document. With ``needed``, tokenizing stops as soon as the
    stream has that many tokens, and only documents with a token among the first ``needed`` count
    as used.
    """
    sep = _encode_tensor(tokenizer, separator)
    pieces: list[torch.Tensor] = []
    used: set[str] = set()
    total = 0
    for i, doc in enumerate(docs):
        if i > 0:
            pieces.append(sep)
            total += len(sep)
        if needed is not None and total >= needed:
            break  # every token from here on lies beyond what the caller asked for
        tokens = _encode_tensor(tokenizer, doc.text)
        if len(tokens):
            used.add(doc.id)
        pieces.append(tokens)
        total += len(tokens)
    stream = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)
    return stream, frozenset(used)


def token_stream(docs: Sequence[Document], tokenizer, separator: bytes = b"\n") -> torch.Tensor:
    """All documents' tokens, in order, with the separator's tokens between documents."""
    return _stream_prefix(docs, tokenizer, separator)[0]


def _require_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def eval_windows(docs: Sequence[Document], tokenizer, seq_len: int, max_windows: int) -> torch.Tensor:
    """(n, seq_len + 1) non-overlapping windows from the start of the stream, n <= max_windows.

    Each window is scored as input ``w[:, :-1]`` and target ``w[:, 1:]``.
    """
    _require_positive(seq_len=seq_len, max_windows=max_windows)
    width = seq_len + 1
    stream, _ = _stream_prefix(docs, tokenizer, b"\n", needed=width * max_windows)
    n = min(max_windows, len(stream) // width)
    if n == 0:
        raise ValueError(f"evaluation data too short: {len(stream)} tokens from {len(docs)} documents, "
                         f"one window of seq_len={seq_len} needs {width}")
    return stream[: n * width].view(n, width)


def calibration_windows(docs: Sequence[Document], tokenizer, seq_len: int, num_samples: int,
                        seed: int = 0, shuffle: bool = True) -> tuple[torch.Tensor, frozenset[str]]:
    """(num_samples, seq_len) consecutive windows, and the ids of the documents they contain.

    The documents are put in a random order drawn from ``torch.Generator().manual_seed(seed)``
    before they are concatenated, so calibration does not only see the alphabetically first
    files. ``shuffle=False`` keeps the given order (it reproduces a reference implementation
    that drew a permutation but never applied it).
    """
    _require_positive(seq_len=seq_len, num_samples=num_samples)
    if shuffle:
        order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
        docs = [docs[i] for i in order]
    needed = num_samples * seq_len
    stream, used = _stream_prefix(docs, tokenizer, b"\n", needed=needed)
    if len(stream) < needed:
        raise ValueError(f"calibration data too short: {len(stream)} tokens from {len(docs)} documents, "
                         f"need num_samples x seq_len = {num_samples} x {seq_len} = {needed}")
    return stream[:needed].view(num_samples, seq_len), used


# --------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------
def _check_logits(logits: torch.Tensor, inputs: torch.Tensor) -> None:
    if logits.dim() != 3 or logits.shape[:2] != inputs.shape:
        raise ValueError(f"model_fn returned logits of shape {tuple(logits.shape)} for input_ids of shape "
                         f"{tuple(inputs.shape)}: expected (batch, length, vocab)")


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor, max_elements: int = 1 << 22) -> float:
    """Summed next-token NLL, computed in float64 a slice of tokens at a time.

    float64 so that low-precision logits (bf16, fp16) do not bias the metric; slices so that
    upcasting a (tokens x 50k-vocab) tensor does not need gigabytes at once.
    """
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    flat_targets = targets.reshape(-1)
    rows = max(1, max_elements // vocab)
    total = 0.0
    for start in range(0, flat_targets.numel(), rows):
        chunk = flat_logits[start:start + rows].double()
        total += F.cross_entropy(chunk, flat_targets[start:start + rows], reduction="sum").item()
    return total


@torch.no_grad()
def perplexity(model_fn: ModelFn, windows: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean NLL) of every target token of ``windows`` (from ``eval_windows``).

    A mean NLL beyond ~709 nats (a collapsed model) gives ``inf`` rather than an OverflowError,
    so one broken model does not lose the rest of a report; NaN logits give NaN."""
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must have shape (n >= 1, seq_len + 1 >= 2), got {tuple(windows.shape)}")
    _require_positive(batch_size=batch_size)
    total_nll, total_tokens = 0.0, 0  # Python floats are float64
    for batch in windows.split(batch_size):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model_fn(inputs)
        _check_logits(logits, inputs)
        # model_fn may move the inputs to its own device; follow it there.
        total_nll += _nll_sum(logits, targets.to(logits.device))
        total_tokens += targets.numel()
    return _exp_or_inf(total_nll / total_tokens)


def _exp_or_inf(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:  # the true value is beyond float64: inf is the honest float for it
        return float("inf")


# --------------------------------------------------------------------------------------------
# LAMBADA-style last-word task
# --------------------------------------------------------------------------------------------
@dataclass
class LastTokenExample:
    context: torch.Tensor  # 1-D long: tokens of the bytes right before the word
    target: torch.Tensor  # 1-D long: the word's tokens (>= 1)
    doc_id: str


_IDENT_CHARS = rb"A-Za-z0-9_"
# An identifier of >= 4 characters that ends its line, give or take closing punctuation.
# The look-behind makes it a whole identifier (not the tail of a longer one, not after a digit).
_LINE_FINAL_WORD = re.compile(
    rb"(?<![" + _IDENT_CHARS + rb"])([A-Za-z_][" + _IDENT_CHARS + rb"]{3,})[ \t\r)\]}:;,.'\"]*$", re.MULTILINE)


def _occurs_between(text: bytes, word: bytes, lo: int, hi: int) -> bool:
    """Whether ``word`` occurs as a whole identifier inside ``text[lo:hi]``."""
    pattern = re.compile(rb"(?<![" + _IDENT_CHARS + rb"])" + re.escape(word) + rb"(?![" + _IDENT_CHARS + rb"])")
    # search(pos=lo) still lets the look-behind see text[lo - 1], so a word cut by the context
    # boundary does not count as an occurrence. (endpos = the target's start is safe: the byte
    # before a target is never an identifier character, so no occurrence can end there.)
    return pattern.search(text, lo, hi) is not None


def _candidates(text: bytes, context_len: int) -> list[tuple[int, bytes]]:
    """(start, word) of each line-final word that already occurs in the context_len bytes before it."""
    found = []
    for m in _LINE_FINAL_WORD.finditer(text):
        start, word = m.start(1), m.group(1)
        if _occurs_between(text, word, max(0, start - context_len), start):
            found.append((start, word))
    return found


def _spread(items: list, k: int) -> list:
    """At most ``k`` items at evenly spaced positions (the centres of k equal parts)."""
    n = len(items)
    if n <= k:
        return items
    return [items[(2 * i + 1) * n // (2 * k)] for i in range(k)]


def _make_example(doc: Document, start: int, word: bytes, tokenizer, context_len: int) -> LastTokenExample | None:
    context = doc.text[max(0, start - context_len):start]
    context_ids = tokenizer.encode(context)
    full_ids = tokenizer.encode(context + word)
    # With BPE the word may merge with the end of the context (" name" as one token); then
    # there is no clean split into context tokens and target tokens, and we skip the example.
    if full_ids[:len(context_ids)] != context_ids or len(full_ids) == len(context_ids) or not context_ids:
        return None
    return LastTokenExample(context=torch.tensor(context_ids, dtype=torch.long),
                            target=torch.tensor(full_ids[len(context_ids):], dtype=torch.long),
                            doc_id=doc.id)


def build_last_token_task(docs: Sequence[Document], tokenizer, num_examples: int, context_len: int = 256,
                          per_doc: int = 2) -> list[LastTokenExample]:
    """Up to ``num_examples`` "predict the line's last word" examples, deterministic.

    A line-final identifier of >= 4 characters is a candidate when it already occurs within
    the ``context_len`` bytes before it, so it is predictable from context (LAMBADA's
    property). Documents are used in the given order, at most ``per_doc`` examples each, taken
    at evenly spaced candidates so they cover the whole document.
    """
    _require_positive(num_examples=num_examples, context_len=context_len, per_doc=per_doc)
    examples: list[LastTokenExample] = []
    for doc in docs:
        for start, word in _spread(_candidates(doc.text, context_len), per_doc):
            example = _make_example(doc, start, word, tokenizer, context_len)
            if example is not None:
                examples.append(example)
            if len(examples) == num_examples:
                return examples
    if not examples:
        raise ValueError(f"no last-token example could be built from {len(docs)} documents "
                         f"(context_len={context_len}): no line ends in a word seen in its context")
    return examples


def _count_correct(model_fn: ModelFn, batch: list[LastTokenExample]) -> int:
    """How many examples of ``batch`` (all with equal context and target lengths) are fully right."""
    ctx_len, tgt_len = len(batch[0].context), len(batch[0].target)
    # Teacher forcing: feed context + all but the last target token.
    inputs = torch.stack([torch.cat([ex.context, ex.target[:-1]]) for ex in batch])
    targets = torch.stack([ex.target for ex in batch])
    logits = model_fn(inputs)
    _check_logits(logits, inputs)
    # The logits at position p predict token p + 1, so the target tokens are predicted at
    # positions ctx_len - 1 ... ctx_len + tgt_len - 2.
    predicted = logits[:, ctx_len - 1:ctx_len - 1 + tgt_len].argmax(dim=-1)
    return int((predicted == targets.to(predicted.device)).all(dim=1).sum())


@torch.no_grad()
def last_token_accuracy(model_fn: ModelFn, examples: Sequence[LastTokenExample], batch_size: int = 16) -> float:
    """Fraction of examples whose every target token is the greedy (argmax) prediction.

    Examples are batched only with others of the same context and target lengths: padding
    would be seen by a causal model (and by an SSM's state) and change its predictions, so
    each example is scored exactly as if it ran alone.
    """
    if not examples:
        raise ValueError("last_token_accuracy needs at least one example")
    _require_positive(batch_size=batch_size)
    groups: dict[tuple[int, int], list[LastTokenExample]] = defaultdict(list)
    for ex in examples:
        groups[(len(ex.context), len(ex.target))].append(ex)
    correct = 0
    for key in sorted(groups):
        group = groups[key]
        for start in range(0, len(group), batch_size):
            correct += _count_correct(model_fn, group[start:start + batch_size])
    return correct / len(examples)
