"""Moving digits: short clips of scikit-learn's digits crossing a dark canvas, their captions, and
the task metrics that judge a text-to-video model on them.

The offline video reference (``models/reference/wan-digits``, trained by
``archquant.models.train_video``) is a tiny Wan asked for prompts such as "a three moving left".
Whether a generated clip is what was asked is measured two ways, both without a learned video
model:

* the digit: the part-1 ``DigitClassifier`` (16x16 digits in [0, 1]) applied to every frame, on a
  window cut around that frame's centre of mass (``frame_predictions``, ``frame_class_accuracy``);
* the motion: the least-squares slope of the intensity-weighted centre of mass over the frames,
  its dominant axis and sign (``motion_direction``, ``direction_accuracy``).

Layouts: clips for training are (N, F, 1, S, S) in [-1, 1] (the model's pixel space); the metrics
take what the sampler returns, (N, F, C, H, W) in [0, 1]. Image rows grow downwards, so "up" is a
decreasing row and "left" a decreasing column.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .digits import DIGIT_WORDS, digit_in_prompt

DIRECTIONS = ("left", "right", "up", "down")
#: what ``motion_direction`` says of a clip whose centre of mass (almost) does not move
STATIC = "static"
#: per direction, the (row, column) change of the digit's position per frame, in units of ``step``
DIRECTION_VECTORS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
#: caption templates; {word} is the digit's word ("three"), {n} its numeral ("3"), {direction} one of DIRECTIONS
CAPTION_TEMPLATES = ("a {word} moving {direction}", "the digit {n} moves {direction}",
                     "a handwritten {word} going {direction}", "digit {n} moving {direction}",
                     "the number {word} drifts {direction}", "a {word} sliding {direction}")

# The default clip: 8 frames of 24x24, a 16x16 digit moving a pixel per frame. The digit fills most
# of the canvas: a Wan (rotary positions only, no absolute ones) learns to draw the asked digit
# far sooner than on a 32x32 canvas with a 2-pixel step (class accuracy of its samples 0.85 against
# 0.38 after a comparable training), and 7 pixels of travel are still plain to see.
CANVAS = 24  # canvas side S: a 16x16 digit and 7 pixels of travel fit with 1 to spare
DIGIT_SIZE = 16  # side of the digits drawn (load_digit_images(DIGIT_SIZE)): the classifier's own scale
FRAMES = 8
STEP = 1  # pixels per frame


def caption(digit: int, direction: str, template: str | int = 0) -> str:
    """The caption of ``digit`` moving ``direction``; ``template`` is a format string or an index
    into ``CAPTION_TEMPLATES``."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r} is not one of {DIRECTIONS}")
    if isinstance(template, int):
        template = CAPTION_TEMPLATES[template]
    return template.format(word=DIGIT_WORDS[digit], n=digit, direction=direction)


def parse_video_prompt(prompt: str) -> tuple[int | None, str | None]:
    """(digit, direction) that ``prompt`` asks for; either is None when the prompt names none or
    several different ones ("a seven moving left" -> (7, "left"))."""
    import re

    named = {w for w in re.findall(r"[a-z]+", prompt.lower()) if w in DIRECTIONS}
    return digit_in_prompt(prompt), (named.pop() if len(named) == 1 else None)


def clip_paths(directions: Sequence[str], *, canvas: int = CANVAS, digit_size: int = DIGIT_SIZE, frames: int = FRAMES,
               step: int = STEP, generator: torch.Generator | None = None) -> torch.Tensor:
    """Top-left (row, column) of the digit in every frame, (N, F, 2) integers: a constant ``step``
    per frame in each clip's direction, from a random start that keeps the whole path inside the
    canvas (the free room along the motion is the small jitter of the start; across it, anywhere)."""
    travel = step * (frames - 1)
    room_along, room_across = canvas - digit_size - travel, canvas - digit_size
    if room_along < 0:
        raise ValueError(f"a {digit_size}-pixel digit moving {travel} pixels does not fit a {canvas}-pixel canvas")
    n = len(directions)
    along = torch.randint(0, room_along + 1, (n,), generator=generator)
    across = torch.randint(0, room_across + 1, (n,), generator=generator)
    vectors = torch.tensor([DIRECTION_VECTORS[d] for d in directions])  # (N, 2) row, column
    moving_rows = vectors[:, 0] != 0
    # a clip moving backwards along an axis starts at the far end of its room
    start_along = torch.where(vectors.sum(1) < 0, along + travel, along)
    start = torch.stack([torch.where(moving_rows, start_along, across),
                         torch.where(moving_rows, across, start_along)], dim=1)
    offsets = torch.arange(frames).view(1, frames, 1) * step * vectors.view(n, 1, 2)
    return start.view(n, 1, 2) + offsets


def render_clips(digits: torch.Tensor, paths: torch.Tensor, *, canvas: int = CANVAS) -> torch.Tensor:
    """Paste ``digits`` ((N, 1, D, D) in [-1, 1], dark background -1) on a dark canvas at
    ``paths`` ((N, F, 2) top-left corners): clips (N, F, 1, canvas, canvas) in [-1, 1]."""
    n, frames = paths.shape[:2]
    size = digits.shape[-1]
    clips = torch.full((n, frames, 1, canvas, canvas), -1.0, dtype=digits.dtype)
    window = torch.arange(size)
    rows = (paths[..., 0, None] + window).view(n, frames, size, 1)
    cols = (paths[..., 1, None] + window).view(n, frames, 1, size)
    clip_idx = torch.arange(n).view(n, 1, 1, 1)
    frame_idx = torch.arange(frames).view(1, frames, 1, 1)
    clips[clip_idx, frame_idx, 0, rows, cols] = digits[:, 0].unsqueeze(1).expand(n, frames, size, size)
    return clips


def moving_clips(digits: torch.Tensor, directions: Sequence[str], *, canvas: int = CANVAS, frames: int = FRAMES,
                 step: int = STEP, generator: torch.Generator | None = None) -> torch.Tensor:
    """Clips (N, F, 1, canvas, canvas) in [-1, 1] of ``digits`` ((N, 1, D, D) in [-1, 1], e.g. from
    ``load_digit_images(16)``) each moving in its direction, start positions from ``generator``."""
    if len(directions) != digits.shape[0]:
        raise ValueError(f"{len(directions)} directions for {digits.shape[0]} digits")
    paths = clip_paths(directions, canvas=canvas, digit_size=digits.shape[-1], frames=frames, step=step,
                       generator=generator)
    return render_clips(digits, paths, canvas=canvas)


def _ink(videos01: torch.Tensor) -> torch.Tensor:
    """(N, F, H, W) weights of the digit's pixels: intensity above each frame's median. Most of the
    canvas is background, so the median is its level; a generated clip's faint grey haze then
    weighs nothing instead of pulling the centre of mass to the middle of the canvas."""
    frames = videos01.float().mean(2)  # channels averaged
    background = frames.flatten(2).median(-1).values[..., None, None]
    return (frames - background).clamp_min(0.0)


def centres_of_mass(videos01: torch.Tensor) -> torch.Tensor:
    """(N, F, 2) intensity-weighted (row, column) centre of each frame of ``videos01`` (N, F, C, H, W);
    an empty frame gets the canvas centre."""
    ink = _ink(videos01)
    h, w = ink.shape[-2:]
    mass = ink.sum((-2, -1))
    rows = torch.arange(h, dtype=ink.dtype).view(h, 1)
    cols = torch.arange(w, dtype=ink.dtype).view(1, w)
    centre = torch.tensor([(h - 1) / 2, (w - 1) / 2], dtype=ink.dtype)
    com = torch.stack([(ink * rows).sum((-2, -1)), (ink * cols).sum((-2, -1))], dim=-1) / mass.clamp_min(1e-8)[..., None]
    return torch.where(mass[..., None] > 1e-8, com, centre)


def displacements(videos01: torch.Tensor) -> torch.Tensor:
    """(N, 2) (row, column) distance the centre of mass travels over each clip: the least-squares
    slope over all frames times (F - 1), steadier than last-minus-first when a frame is noisy."""
    com = centres_of_mass(videos01)
    frames = com.shape[1]
    t = torch.arange(frames, dtype=com.dtype) - (frames - 1) / 2
    slope = (t.view(1, frames, 1) * com).sum(1) / t.square().sum().clamp_min(1e-8)
    return slope * (frames - 1)


def motion_direction(videos01: torch.Tensor, min_shift: float = 2.0) -> list[str]:
    """Each clip's direction in ``DIRECTIONS``: the dominant axis of the centre of mass's
    displacement and its sign; ``STATIC`` when it moves less than ``min_shift`` pixels."""
    shift = displacements(videos01)
    out = []
    for d_row, d_col in shift.tolist():
        if max(abs(d_row), abs(d_col)) < min_shift:
            out.append(STATIC)
        elif abs(d_col) >= abs(d_row):
            out.append("right" if d_col > 0 else "left")
        else:
            out.append("down" if d_row > 0 else "up")
    return out


def direction_accuracy(videos01: torch.Tensor, directions: Sequence[str], min_shift: float = 2.0) -> float:
    """Fraction of clips whose ``motion_direction`` is the asked direction."""
    got = motion_direction(videos01, min_shift)
    if len(got) != len(directions):
        raise ValueError(f"{len(got)} clips for {len(directions)} directions")
    return sum(g == d for g, d in zip(got, directions)) / max(len(got), 1)


def digit_crops(videos01: torch.Tensor, window: int, out_size: int) -> torch.Tensor:
    """(N * F, 1, out_size, out_size) views of each frame's digit: the frame scaled by
    ``out_size / window`` (bilinear), then an ``out_size`` square cut around its centre of mass
    (outside the canvas reads as background 0).

    Scaling first, then cutting, places the cut to a pixel of the classifier's scale rather than
    of the clip's: for 8-pixel digits read by a 16-pixel classifier that is half a clip pixel, and
    on real clips it is worth 3 points of accuracy over cutting first."""
    n, frames = videos01.shape[:2]
    images = videos01.float().mean(2, keepdim=True).flatten(0, 1)  # (N*F, 1, H, W)
    if window != out_size:
        images = F.interpolate(images, scale_factor=out_size / window, mode="bilinear", align_corners=False,
                               antialias=out_size < window)
    images = images[:, 0]
    com = centres_of_mass(images.view(n, frames, 1, *images.shape[-2:])).flatten(0, 1)
    # the cut's top-left such that its own centre ((out_size - 1) / 2) lands on the centre of mass;
    # real digits have theirs within a pixel of their frame's centre, where the classifier saw them
    top_left = (com - (out_size - 1) / 2).round().long() + out_size  # + out_size: the padding below
    padded = F.pad(images, (out_size,) * 4)
    offsets = torch.arange(out_size)
    rows = (top_left[:, 0, None] + offsets).view(-1, out_size, 1)
    cols = (top_left[:, 1, None] + offsets).view(-1, 1, out_size)
    crops = padded[torch.arange(n * frames).view(-1, 1, 1), rows, cols].unsqueeze(1)
    return crops.clamp(0.0, 1.0)


@torch.no_grad()
def frame_predictions(classifier, videos01: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(N, F) digit class the classifier reads in every frame of ``videos01`` (N, F, C, H, W) in [0, 1].

    The classifier knows 16x16 digits filling their frame, centred, as ``load_digit_images(16)``
    makes them (trained with a random shift of a pixel). A whole frame shrunk to 16x16 would show it
    a small, off-centre digit; a crop around the frame's centre of mass shows the digit at the
    scale and place it was trained on, wherever the digit is in its path. ``window`` is the digit's
    side in the clip (default ``DIGIT_SIZE``, the scale of the clips ``moving_clips`` draws by default);
    the frame is scaled by ``classifier size / window`` before the cut."""
    from .digits import predict

    size = int(getattr(classifier, "config", {}).get("size", 16))
    crops = digit_crops(videos01, window or DIGIT_SIZE, size)
    return predict(classifier, crops).view(videos01.shape[0], videos01.shape[1])


def frame_class_accuracy(classifier, videos01: torch.Tensor, digits: Sequence[int] | torch.Tensor,
                         window: int | None = None) -> float:
    """Fraction of all frames (every frame of every clip) that the classifier reads as the clip's digit."""
    pred = frame_predictions(classifier, videos01, window)
    want = torch.as_tensor(list(digits) if not torch.is_tensor(digits) else digits).long().view(-1, 1)
    if want.shape[0] != pred.shape[0]:
        raise ValueError(f"{pred.shape[0]} clips for {want.shape[0]} digits")
    return float(pred.eq(want).float().mean())
