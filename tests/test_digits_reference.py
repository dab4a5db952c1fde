"""The digits data, the digit classifier's file format, and the committed dit-digits reference."""
import json
from pathlib import Path

import pytest
import torch

from archquant.models.digits import (DigitClassifier, class_accuracy, load_classifier, load_digit_images,
                                     save_classifier, split_indices)

pytestmark = pytest.mark.usefixtures("single_thread")

REFERENCE = Path(__file__).resolve().parents[1] / "models" / "reference" / "dit-digits"


def test_digit_images_shapes_and_range():
    x, y = load_digit_images(16)
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.long
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.min() == -1.0 and x.max() == 1.0  # blank background and full-ink pixels both occur
    assert sorted(y.unique().tolist()) == list(range(10))
    x8, y8 = load_digit_images(8)
    assert x8.shape == (1797, 1, 8, 8) and torch.equal(y8, y)


def test_split_is_seeded_and_disjoint():
    train, test = split_indices(1797, 0.2, seed=0)
    assert len(test) == 359 and len(train) + len(test) == 1797
    assert not set(train.tolist()) & set(test.tolist())
    assert torch.equal(split_indices(1797, 0.2, seed=0)[1], test)


def test_classifier_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DigitClassifier(channels=(8, 12), hidden=24).eval()
    assert sum(p.numel() for p in DigitClassifier().parameters()) < 100_000
    save_classifier(model, tmp_path)
    assert json.loads((tmp_path / "classifier.json").read_text())["channels"] == [8, 12]
    x = torch.rand(5, 1, 16, 16)
    for path in (tmp_path, tmp_path / "classifier.safetensors"):
        loaded = load_classifier(path)
        assert torch.equal(loaded(x), model(x))


def _one_line_error_naming(path: Path, folder: Path) -> None:
    with pytest.raises(ValueError) as info:
        load_classifier(folder)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated", "empty", "wrong_shapes"])
def test_bad_classifier_weights_are_a_one_line_error(tmp_path, damage):
    save_classifier(DigitClassifier(), tmp_path)
    weights = tmp_path / "classifier.safetensors"
    if damage == "missing":
        weights.unlink()
    elif damage == "garbage":
        weights.write_bytes(b"\x93NUMPY not safetensors at all" * 10)
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-1000])
    elif damage == "empty":
        weights.write_bytes(b"")
    else:  # a valid file for another configuration
        save_classifier(DigitClassifier(hidden=32), tmp_path / "other")
        weights.write_bytes((tmp_path / "other" / "classifier.safetensors").read_bytes())
    _one_line_error_naming(weights, tmp_path)


@pytest.mark.parametrize("damage", ["missing", "garbage", "wrong_keys"])
def test_bad_classifier_config_is_a_one_line_error(tmp_path, damage):
    save_classifier(DigitClassifier(), tmp_path)
    config = tmp_path / "classifier.json"
    if damage == "missing":
        config.unlink()
    elif damage == "garbage":
        config.write_text("{not json")
    else:
        config.write_text(json.dumps({"width": 3}))
    _one_line_error_naming(config, tmp_path)


@pytest.fixture(scope="module")
def reference():
    from diffusers import DDIMScheduler, DiTTransformer2DModel
    from diffusers.utils import logging

    logging.set_verbosity_error()
    transformer = DiTTransformer2DModel.from_pretrained(REFERENCE / "transformer", use_safetensors=True).eval()
    scheduler = DDIMScheduler.from_pretrained(REFERENCE / "scheduler")
    return transformer, scheduler


def test_reference_folder_is_a_pixel_space_dit_pipeline(reference):
    transformer, _ = reference
    index = json.loads((REFERENCE / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline"
    assert index["transformer"] == ["diffusers", "DiTTransformer2DModel"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["vae"] == [None, None]
    cfg = transformer.config
    assert (cfg.in_channels, cfg.out_channels, cfg.sample_size, cfg.patch_size) == (1, 1, 16, 2)
    assert cfg.num_embeds_ada_norm == 10
    table = transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    assert table.shape[0] == 11  # 10 digits + the null class 10
    assert not list(REFERENCE.rglob("*.bin")) and not list(REFERENCE.rglob("*.pt*"))  # safetensors only
    size = sum(p.stat().st_size for p in REFERENCE.rglob("*") if p.is_file())
    assert size < 8 * 2**20
    training = json.loads((REFERENCE / "training.json").read_text())
    assert training["sample_class_accuracy"] >= 0.85


def test_reference_generates_images_in_unit_range(reference):
    from archquant.models.diffusion import sample_class_conditional

    transformer, scheduler = reference
    out = sample_class_conditional(transformer, scheduler, torch.tensor([3, 7]), [0, 1], num_steps=4,
                                   guidance_scale=3.0, null_class=10)
    assert out.shape == (2, 1, 16, 16)
    assert torch.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0


def test_reference_classifier_accuracy_on_held_out_digits():
    training = json.loads((REFERENCE / "training.json").read_text())
    x, y = load_digit_images(16)
    _, test = split_indices(len(y), 0.2, seed=training["seed"])
    classifier = load_classifier(REFERENCE)
    accuracy = class_accuracy(classifier, (x[test] + 1) / 2, y[test])
    assert accuracy >= 0.9
    assert accuracy == pytest.approx(training["classifier_test_accuracy"], abs=1e-6)


PIXART = REFERENCE.parent / "pixart-digits"


def test_pixart_reference_folder_is_a_text_to_image_pipeline_with_a_frozen_t5():
    from archquant.models.dit_loading import load_pipeline_folder

    index = json.loads((PIXART / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "PixArtTransformer2DModel"]
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"] and index["vae"] == [None, None]
    assert not list(PIXART.rglob("*.bin")) and not list(PIXART.rglob("*.pt*"))  # safetensors only
    assert sum(p.stat().st_size for p in PIXART.rglob("*") if p.is_file()) < 8 * 2**20
    training = json.loads((PIXART / "training.json").read_text())
    assert training["sample_class_accuracy"] >= 0.85
    model = load_pipeline_folder(PIXART)
    assert model.prompt_encoder.max_sequence_length == 16  # the folder's tokenizer says so, not PixArt's 300
    from archquant.models.digits import digit_in_prompt

    prompts = ["a handwritten three", "the digit 7"]
    assert [digit_in_prompt(p) for p in prompts] == [3, 7]
    out = model.generate([0, 1], num_steps=4, guidance_scale=3.0, prompts=prompts)
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1


def test_digit_in_prompt_needs_exactly_one_digit():
    from archquant.models.digits import digit_in_prompt

    assert digit_in_prompt("A handwritten Seven") == 7 and digit_in_prompt("number 0") == 0
    assert digit_in_prompt("a cat") is None and digit_in_prompt("a one and a two") is None
    assert digit_in_prompt("one 1") == 1  # the same digit twice is still one digit
