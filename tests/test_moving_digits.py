"""Moving-digit clips, their captions, and the task metrics (class per frame, direction of motion)
on ground-truth clips; the committed wan-digits reference generates what it is asked."""
import json
from pathlib import Path

import pytest
import torch

from archquant.models.digits import load_classifier, load_digit_images, split_indices
from archquant.models.moving_digits import (CANVAS, CAPTION_TEMPLATES, DIRECTIONS, FRAMES, STATIC, STEP, caption,
                                            centres_of_mass, clip_paths, direction_accuracy, displacements,
                                            frame_class_accuracy, frame_predictions, motion_direction, moving_clips,
                                            parse_video_prompt)

pytestmark = pytest.mark.usefixtures("single_thread")

REFERENCES = Path(__file__).resolve().parents[1] / "models" / "reference"
JUDGE = REFERENCES / "dit-digits"
WAN = REFERENCES / "wan-digits"


@pytest.fixture(scope="module")
def held_out():
    """Real clips of the digits the judge never saw, the four directions in turn, in [0, 1]."""
    x, y = load_digit_images(16)
    _, test = split_indices(len(y), 0.2, seed=0)
    directions = [DIRECTIONS[i % 4] for i in range(len(test))]
    clips = moving_clips(x[test], directions, generator=torch.Generator().manual_seed(0))
    return clips * 0.5 + 0.5, y[test], directions


def test_clips_shape_range_and_constant_step_inside_the_canvas():
    x, _ = load_digit_images(16)
    directions = list(DIRECTIONS) * 25
    gen = torch.Generator().manual_seed(1)
    paths = clip_paths(directions, generator=gen)
    assert paths.shape == (100, FRAMES, 2)
    assert paths.min() >= 0 and paths.max() <= CANVAS - 16  # the whole digit stays on the canvas
    steps = paths.diff(dim=1)
    for path_steps, d in zip(steps, directions):
        expected = {"left": (0, -STEP), "right": (0, STEP), "up": (-STEP, 0), "down": (STEP, 0)}[d]
        assert (path_steps == torch.tensor(expected)).all()
    assert len({tuple(p[0].tolist()) for p in paths}) > 20  # start positions vary

    clips = moving_clips(x[:100], directions, generator=torch.Generator().manual_seed(1))
    assert clips.shape == (100, FRAMES, 1, CANVAS, CANVAS) and clips.dtype == torch.float32
    assert clips.min() == -1.0 and clips.max() <= 1.0
    assert torch.equal(clips, moving_clips(x[:100], directions, generator=torch.Generator().manual_seed(1)))
    # each frame holds the digit itself at the path's position, the rest is background
    top, left = paths[7, 3].tolist()
    assert torch.equal(clips[7, 3, 0, top:top + 16, left:left + 16], x[7, 0])
    assert clips[7, 3].sum() == x[7].sum() - (CANVAS * CANVAS - 256)


def test_direction_of_real_clips_reversed_and_static(held_out):
    clips, _, directions = held_out
    assert direction_accuracy(clips, directions) == 1.0
    travel = float(STEP * (FRAMES - 1))  # left, right, up, down: along the axis, none across
    expected = torch.tensor([[0.0, -travel], [0.0, travel], [-travel, 0.0], [travel, 0.0]])
    assert torch.allclose(displacements(clips[:4]), expected, atol=1e-3)
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    assert motion_direction(clips.flip(1)) == [opposite[d] for d in directions]
    assert direction_accuracy(clips.flip(1), directions) == 0.0
    static = clips[:, :1].expand_as(clips)
    assert set(motion_direction(static)) == {STATIC} and direction_accuracy(static, directions) == 0.0
    assert motion_direction(torch.zeros(2, FRAMES, 1, CANVAS, CANVAS)) == [STATIC, STATIC]  # blank clips


def test_centre_of_mass_ignores_a_uniform_haze(held_out):
    clips, _, directions = held_out
    hazy = (clips[:8] * 0.8 + 0.15)  # a grey background, as an under-trained model draws
    assert torch.allclose(centres_of_mass(hazy), centres_of_mass(clips[:8]), atol=1e-3)
    assert motion_direction(hazy) == directions[:8]


def test_frame_class_accuracy_of_real_clips_is_near_the_classifiers():
    classifier = load_classifier(JUDGE)
    held_out_accuracy = json.loads((JUDGE / "training.json").read_text())["classifier_test_accuracy"]
    x, y = load_digit_images(16)
    _, test = split_indices(len(y), 0.2, seed=0)
    directions = [DIRECTIONS[i % 4] for i in range(len(test))]
    clips = moving_clips(x[test], directions, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.5
    accuracy = frame_class_accuracy(classifier, clips, y[test])
    assert accuracy >= held_out_accuracy - 0.05 and accuracy >= 0.9
    assert frame_predictions(classifier, clips[:3]).shape == (3, FRAMES)
    assert frame_class_accuracy(classifier, clips, (y[test] + 1) % 10) < 0.1  # the wrong digit is wrong
    # a digit drawn at 12 pixels is read through a 12-pixel window, resized to the classifier's 16
    x12, _ = load_digit_images(12)
    small = moving_clips(x12[test[:100]], directions[:100], canvas=24, step=1, generator=torch.Generator().manual_seed(0))
    assert frame_class_accuracy(classifier, small * 0.5 + 0.5, y[test[:100]], window=12) >= 0.8


@pytest.mark.parametrize("prompt, expected", [
    ("a three moving left", (3, "left")),
    ("The digit 7 moves UP", (7, "up")),
    ("digit 0 moving down", (0, "down")),
    ("a seven", (7, None)),
    ("something moving right", (None, "right")),
    ("a one and a two moving left", (None, "left")),
    ("a four moving left then right", (4, None)),
    ("a five going leftwards", (5, None)),  # whole words only
    ("", (None, None)),
])
def test_parse_video_prompt(prompt, expected):
    assert parse_video_prompt(prompt) == expected


def test_every_caption_parses_back():
    for template in CAPTION_TEMPLATES:
        for digit in range(10):
            for direction in DIRECTIONS:
                assert parse_video_prompt(caption(digit, direction, template)) == (digit, direction)
    assert caption(3, "left") == "a three moving left" == caption(3, "left", CAPTION_TEMPLATES[0])
    with pytest.raises(ValueError):
        caption(3, "sideways")


def test_wan_reference_generates_the_asked_digit_and_direction():
    from archquant.models.dit_loading import load_pipeline_folder

    training = json.loads((WAN / "training.json").read_text())
    assert training["sample_class_accuracy"] >= 0.8 and training["sample_direction_accuracy"] >= 0.8
    assert sum(p.stat().st_size for p in WAN.rglob("*") if p.is_file()) < 8 * 2**20
    assert not list(WAN.rglob("*.bin")) and not list(WAN.rglob("*.pt*"))  # safetensors only
    model = load_pipeline_folder(WAN)
    assert model.kind == "wan" and model.vae is None and model.prompt_encoder.max_sequence_length == 8
    s = training["sampling"]
    digits, directions = [1, 3, 4, 7], ["left", "right", "up", "down"]
    prompts = [caption(c, d, 1) for c, d in zip(digits, directions)]
    clips = model.generate([0, 1, 2, 3], num_steps=s["num_steps"], guidance_scale=s["guidance_scale"],
                           prompts=prompts, resolution=s["resolution"], num_frames=s["num_frames"])
    assert clips.shape == (4, FRAMES, 1, CANVAS, CANVAS) and 0 <= clips.min() and clips.max() <= 1
    assert direction_accuracy(clips, directions) >= 0.75
    assert frame_class_accuracy(load_classifier(WAN), clips, digits) >= 0.6
