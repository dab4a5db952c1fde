"""scikit-learn's bundled 8x8 digits as 16x16 images, and the small CNN that judges generated digits.

The offline diffusion reference (``models/reference/dit-digits``, trained by
``archquant.models.train_dit``) generates these digits; ``DigitClassifier`` (trained on real
digits, saved beside it as ``classifier.safetensors`` + ``classifier.json``) measures whether a
sample is the digit that was asked for. The classifier takes images in [0, 1], the range
``sample_class_conditional`` returns.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_CONFIG = "classifier.json"


def load_digit_images(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 1, size, size) floats in [-1, 1] (bilinear upsampling of the 8x8
    originals, whose pixels are 0..16) and their (N,) labels 0..9, in scikit-learn's order."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [0, 1]
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()
    return x, torch.as_tensor(data.target, dtype=torch.long)


def split_indices(n: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded (train, test) split of range(n): the held-out digits behind the classifier's test
    accuracy in training.json."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * test_fraction))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


class DigitClassifier(nn.Module):
    """Two 3x3 conv + 2x2 max-pool stages and a two-layer head: (B, 1, size, size) in [0, 1] → 10
    logits. About 38k parameters at the defaults."""

    def __init__(self, channels: tuple[int, int] | list[int] = (16, 32), hidden: int = 64, num_classes: int = 10,
                 size: int = 16):
        super().__init__()
        c1, c2 = (int(c) for c in channels)
        if size % 4:
            raise ValueError(f"DigitClassifier needs a size divisible by 4, not {size}")
        self.config = {"channels": [c1, c2], "hidden": int(hidden), "num_classes": int(num_classes), "size": int(size)}
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * (size // 4) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def save_classifier(classifier: DigitClassifier, folder) -> Path:
    """``classifier.safetensors`` (weights) and ``classifier.json`` (constructor arguments) in
    ``folder``; returns the weights' path."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / CLASSIFIER_WEIGHTS
    save_file({k: v.detach().contiguous() for k, v in classifier.state_dict().items()}, str(weights))
    (folder / CLASSIFIER_CONFIG).write_text(json.dumps(classifier.config, indent=2) + "\n")
    return weights


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] or type(e).__name__


def load_classifier(path) -> DigitClassifier:
    """The classifier saved by ``save_classifier``: ``path`` is its folder or its
    ``classifier.safetensors`` (``classifier.json`` lies beside it). Safetensors only. A missing or
    unreadable file, or weights that do not fit the configuration, raise a one-line ValueError
    naming the file."""
    from safetensors.torch import load_file

    path = Path(path)
    weights = path if path.suffix == ".safetensors" else path / CLASSIFIER_WEIGHTS
    config_path = weights.with_name(CLASSIFIER_CONFIG)
    try:
        config = json.loads(config_path.read_text())
        if not isinstance(config, dict):
            raise TypeError("not a JSON object")
        model = DigitClassifier(**config)
    except FileNotFoundError:
        raise ValueError(f"{config_path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: not a valid classifier configuration ({_one_line(e)})") from None
    if not weights.is_file():
        raise ValueError(f"{weights}: file not found")
    try:
        state = load_file(str(weights))
    except Exception as e:  # SafetensorError and friends: truncated, garbage, bad header
        raise ValueError(f"{weights}: not a readable safetensors file ({_one_line(e)})") from None
    expected = model.state_dict()
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"{weights}: tensors do not match {CLASSIFIER_CONFIG} (missing {missing}, unexpected {extra})")
    for k, v in state.items():
        if v.shape != expected[k].shape or not v.is_floating_point():
            raise ValueError(f"{weights}: tensor {k!r} is {v.dtype} {tuple(v.shape)}, "
                             f"expected {expected[k].dtype} {tuple(expected[k].shape)}")
        if not torch.isfinite(v).all():
            raise ValueError(f"{weights}: tensor {k!r} has non-finite values")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return model.eval()


@torch.no_grad()
def class_accuracy(classifier: nn.Module, images01: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Fraction of ``images01`` ((N, 1, H, W) in [0, 1]) that ``classifier`` assigns to ``labels``."""
    return float(predict(classifier, images01, batch_size).eq(torch.as_tensor(labels).long()).float().mean())


@torch.no_grad()
def predict(classifier: nn.Module, images01: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted class (N,) of each image in [0, 1]."""
    was_training = classifier.training
    classifier.eval()
    try:
        return torch.cat([classifier(x.float()).argmax(-1) for x in images01.split(batch_size)])
    finally:
        classifier.train(was_training)


def train_classifier(images01: torch.Tensor, labels: torch.Tensor, *, epochs: int = 15, batch_size: int = 64,
                     lr: float = 3e-3, seed: int = 0, shift: int = 1) -> DigitClassifier:
    """A ``DigitClassifier`` trained with Adam on ``images01`` in [0, 1]; each batch is shifted by a
    random ±``shift`` pixels (so a digit drawn slightly off-centre is still recognised)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitClassifier(size=images01.shape[-1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    n = images01.shape[0]
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            x = images01[idx]
            if shift:
                dx, dy = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=gen))
                x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


#: the words a prompt may use for each digit
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_in_prompt(prompt: str) -> int | None:
    """The one digit ``prompt`` names ("a handwritten seven", "the digit 7"), or None when it names
    none or several different ones."""
    import re

    found = {DIGIT_WORDS.index(w) if w in DIGIT_WORDS else int(w)
             for w in re.findall(r"[a-z]+|\d", prompt.lower()) if w in DIGIT_WORDS or w.isdigit()}
    return found.pop() if len(found) == 1 else None
