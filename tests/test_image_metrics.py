"""Optional image metrics (archquant.eval.image_metrics): FID against a folder and against the FP
images (tiny deterministic feature network vs an independent numpy/scipy Fréchet distance), CLIP
score with a tiny CLIP built offline (vs the embeddings computed directly), and the notes for what
cannot run here (torch-fidelity or its weights missing, LPIPS without torchvision, CLIP not cached)."""
import ast
import importlib.util
import math
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from archquant.eval import image_metrics as im
from archquant.eval.image_metrics import METRICS, OptionalImageMetrics, ReferenceFolderError

pytestmark = pytest.mark.usefixtures("single_thread")


class TinyFeatures(nn.Module):
    """Deterministic features of float RGB images: 4x4 average pooling, a fixed projection, tanh.
    Counts the images it sees and records the shapes it is given."""

    def __init__(self, dim: int = 6, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(3 * 16, dim, generator=g))
        self.seen, self.shapes = 0, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        self.shapes.append(tuple(x.shape))
        return torch.tanh(F.adaptive_avg_pool2d(x.float(), 4).flatten(1) @ self.w)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Independent Fréchet distance of two feature sets (rows: samples), scipy's matrix square root."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def features(images: torch.Tensor) -> np.ndarray:
    """The tiny network's features of (N, 1 or 3, H, W) images, computed here without the module."""
    rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    with torch.no_grad():
        return TinyFeatures()(rgb).double().numpy()


def levels(n: int, channels: int, size: int = 16, seed: int = 0, low: int = 0, high: int = 256) -> torch.Tensor:
    """Images whose values are multiples of 1/255 (a PNG holds them exactly)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, channels, size, size), generator=g).float() / 255


def write_pngs(folder: Path, images: torch.Tensor, prefix: str = "img") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        arr = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        path = folder / f"{prefix}{i:03d}.png"
        Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).save(path)
        paths.append(path)
    return paths


def read_folder(paths) -> torch.Tensor:
    """The reference images as float RGB in [0, 1], read here with PIL (same size as generated)."""
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255 for p in sorted(paths)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def metrics_only(**kw) -> OptionalImageMetrics:
    """FID only: no CLIP, no LPIPS (their notes are tested on their own)."""
    return OptionalImageMetrics(clip_model=None, lpips=None, **kw)


@pytest.fixture
def reference(tmp_path):
    """12 reference images: RGB PNGs, one grayscale PNG and one JPEG, all 16x16."""
    folder = tmp_path / "reference"
    write_pngs(folder / "rgb", levels(10, 3, seed=1))
    write_pngs(folder, levels(1, 1, seed=2), prefix="gray")
    Image.fromarray((levels(1, 3, seed=3)[0] * 255).to(torch.uint8).permute(1, 2, 0).numpy()).save(folder / "x.JPG")
    (folder / "notes.txt").write_text("not an image")
    return folder


# ---------------------------------------------------------------------- FID


def test_fid_against_the_folder_matches_scipy(reference):
    images = levels(9, 1, seed=4)  # grayscale generated images: repeated to 3 channels
    metrics, notes = metrics_only(fid_reference=reference, feature_extractor=TinyFeatures()).evaluate(images)
    ref = read_folder(p for p in reference.rglob("*") if p.suffix.lower() in (".png", ".jpg"))
    assert len(ref) == 12
    expected = frechet(features(ref), features(images))
    assert expected > 0.05
    assert metrics == {"fid": pytest.approx(expected, rel=1e-6)}
    assert notes == []


def test_fid_vs_fp_matches_scipy_and_everything_expensive_is_done_once(reference):
    extractor = TinyFeatures()
    metrics = metrics_only(fid_reference=reference, feature_extractor=extractor)
    fp, q1, q2 = levels(8, 3, seed=5), levels(8, 3, seed=6, high=200), levels(8, 3, seed=7, low=30)

    fp_metrics, notes = metrics.evaluate(fp)  # the FP model: FID against the folder only
    assert set(fp_metrics) == {"fid"} and notes == []
    assert extractor.seen == 12 + 8  # the folder, then the FP images
    for q in (q1, q2):
        qm, notes = metrics.evaluate(q, fp_images=fp.clone())  # an equal copy: recognized by content
        assert notes == []
        assert qm["fid_vs_fp"] == pytest.approx(frechet(features(fp), features(q)), rel=1e-6)
        ref = read_folder(p for p in reference.rglob("*") if p.suffix.lower() in (".png", ".jpg"))
        assert qm["fid"] == pytest.approx(frechet(features(ref), features(q)), rel=1e-6)
    assert extractor.seen == 12 + 8 + 8 + 8  # neither the folder nor the FP images a second time

    again, _ = metrics.evaluate(q1, fp_images=fp)  # the same model evaluated again: the same numbers
    assert again == metrics.evaluate(q1, fp_images=fp)[0]


def test_fid_vs_fp_without_a_folder_and_without_an_fp_call():
    """fid_vs_fp needs no folder; when the FP images were never evaluated they are featurized once."""
    extractor = TinyFeatures()
    metrics = metrics_only(feature_extractor=extractor)
    fp, q = levels(6, 1, seed=8), levels(6, 1, seed=9)
    for _ in range(2):
        out, notes = metrics.evaluate(q, fp_images=fp)
        assert out == {"fid_vs_fp": pytest.approx(frechet(features(fp), features(q)), rel=1e-6)}
        assert notes == ["fid skipped: no fid_reference folder given"]
    assert extractor.seen == 6 + 6 + 6  # q twice, fp once


def test_identical_image_sets_give_fid_zero(tmp_path):
    images = levels(10, 3, seed=10)
    write_pngs(tmp_path / "same", images)
    metrics = metrics_only(fid_reference=tmp_path / "same", feature_extractor=TinyFeatures())
    out, _ = metrics.evaluate(images)
    assert abs(out["fid"]) < 1e-9
    out, _ = metrics.evaluate(images.clone(), fp_images=images)
    assert abs(out["fid_vs_fp"]) < 1e-9 and abs(out["fid"]) < 1e-9
    out, _ = metrics.evaluate(levels(10, 3, seed=11), fp_images=images)
    assert out["fid_vs_fp"] > 0.01


def test_folder_images_are_cropped_and_resized_to_the_generated_size(tmp_path):
    """Reference images of other sizes and aspect ratios reach the features at the generated size."""
    folder = tmp_path / "big"
    folder.mkdir()
    for i, (w, h) in enumerate([(40, 24), (24, 40), (32, 32), (17, 9)]):
        Image.fromarray(np.full((h, w, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    extractor = TinyFeatures()
    out, _ = metrics_only(fid_reference=folder, feature_extractor=extractor).evaluate(levels(5, 1, size=12))
    assert {s[1:] for s in extractor.shapes} == {(3, 12, 12)}
    assert math.isfinite(out["fid"])
    # a uniform image stays uniform: the folder's images are what was written, resized
    cropped = im._read_image(folder / "2.png", (12, 12), folder)
    assert cropped.shape == (3, 12, 12) and torch.allclose(cropped, torch.full_like(cropped, 80 / 255))


@pytest.mark.parametrize("case", ["missing", "file", "empty", "one", "corrupt"])
def test_bad_reference_folder_is_a_one_line_value_error(tmp_path, case):
    folder = tmp_path / "ref"
    if case == "file":
        folder.write_text("x")
    elif case != "missing":
        folder.mkdir()
        (folder / "readme.txt").write_text("x")
        if case in ("one", "corrupt"):
            write_pngs(folder, levels(1, 3))
        if case == "corrupt":
            write_pngs(folder / "sub", levels(2, 3))
            (folder / "sub" / "img001.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ValueError) as err:
        metrics_only(fid_reference=folder, feature_extractor=TinyFeatures())
    assert isinstance(err.value, ReferenceFolderError)
    message = str(err.value)
    assert str(folder) in message and "\n" not in message
    if case == "corrupt":
        assert "img001.png" in message


def test_too_few_images_is_a_note_not_a_number(reference):
    metrics = metrics_only(fid_reference=reference, feature_extractor=TinyFeatures(), min_fid_images=4)
    out, notes = metrics.evaluate(levels(3, 3), fp_images=levels(3, 3, seed=1))
    assert out == {}
    assert notes == ["fid and fid_vs_fp skipped: 3 generated image(s), FID needs at least 4"]


def test_without_a_folder_fid_is_skipped_and_nothing_is_loaded(monkeypatch):
    def no_loading(*_):
        raise AssertionError("nothing should be loaded for the FP model without a folder")

    monkeypatch.setattr(im, "_load_inception", no_loading)
    out, notes = metrics_only().evaluate(levels(4, 3))
    assert out == {} and notes == ["fid skipped: no fid_reference folder given"]


def test_a_failing_feature_network_is_a_note(reference):
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("no kernel for this\ndevice")

    out, notes = metrics_only(fid_reference=reference, feature_extractor=Broken()).evaluate(levels(4, 3))
    assert out == {}
    assert notes == ["FID (fid, fid_vs_fp) failed: RuntimeError: no kernel for this device"]


# ---------------------------------------------------------------------- FID's default network (torch-fidelity)


def test_fid_without_torch_fidelity_is_skipped_with_what_to_install(reference, monkeypatch):
    if importlib.util.find_spec("torch_fidelity") is None:  # as here: the real check, unpatched
        out, notes = metrics_only(fid_reference=reference).evaluate(levels(4, 3), fp_images=levels(4, 3, seed=1))
        assert out == {} and len(notes) == 1
        assert notes[0].startswith("FID (fid, fid_vs_fp) skipped:") and "pip install torch-fidelity" in notes[0]
    monkeypatch.setattr(im, "_torch_fidelity_installed", lambda: False)
    out, notes = metrics_only(fid_reference=reference).evaluate(levels(4, 3))
    assert out == {}
    assert notes == ["FID (fid, fid_vs_fp) skipped: torchmetrics' FID needs the torch-fidelity package for its "
                     "Inception network: pip install torch-fidelity (it needs a torchvision built for this torch)"]


def test_fid_without_inception_weights_offline_is_skipped_with_where_to_put_them(reference, monkeypatch):
    import torchmetrics.image.fid as tm_fid

    class Offline(nn.Module):
        def __init__(self, *args, **kwargs):
            raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(im, "_torch_fidelity_installed", lambda: True)
    monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", Offline)
    metrics = metrics_only(fid_reference=reference)
    for _ in range(2):  # the failed load is not retried; the note comes with every call
        out, notes = metrics.evaluate(levels(4, 3))
        assert out == {} and len(notes) == 1 and "\n" not in notes[0]
        assert notes[0].startswith("FID (fid, fid_vs_fp) skipped: torch-fidelity's Inception weights could not be "
                                   "loaded from ")
        assert im.INCEPTION_WEIGHTS in notes[0] and "URLError" in notes[0] and "fid_weights" in notes[0]


def test_fid_with_the_default_network_feeds_it_uint8_like_torchmetrics(reference, monkeypatch, tmp_path):
    """With torch-fidelity and its weights (mocked): torchmetrics' Inception gets (x * 255).byte() RGB
    images, as FrechetInceptionDistance(normalize=True) gives them, and its weights path."""
    import torchmetrics.image.fid as tm_fid

    made = {}

    class FakeInception(nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, antialias=True):
            super().__init__()
            made.update(name=name, features=features_list, weights=feature_extractor_weights_path)
            self.tiny = TinyFeatures()

        def forward(self, x):
            assert x.dtype == torch.uint8 and x.shape[1] == 3
            return self.tiny(x.float() / 255)

    monkeypatch.setattr(im, "_torch_fidelity_installed", lambda: True)
    monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", FakeInception)
    images = levels(7, 1, seed=12)
    out, notes = metrics_only(fid_reference=reference, fid_weights=tmp_path / "w.pth").evaluate(images)
    assert made == {"name": "inception-v3-compat", "features": ["2048"], "weights": str(tmp_path / "w.pth")}
    ref = read_folder(p for p in reference.rglob("*") if p.suffix.lower() in (".png", ".jpg"))
    expected = frechet(features((ref * 255).byte().float() / 255), features((images * 255).byte().float() / 255))
    assert notes == [] and out == {"fid": pytest.approx(expected, rel=1e-6)}


# ---------------------------------------------------------------------- LPIPS


def test_lpips_is_a_number_or_a_one_line_note():
    fp = levels(4, 3, size=64, seed=13)
    metrics = OptionalImageMetrics(clip_model=None, lpips="alex", feature_extractor=TinyFeatures())
    out, notes = metrics.evaluate(levels(4, 3, size=64, seed=14), fp_images=fp)
    lpips_notes = [n for n in notes if n.startswith("lpips_vs_fp")]
    if "lpips_vs_fp" not in out:  # here: torchmetrics' LPIPS needs torchvision (or its weights offline)
        assert len(lpips_notes) == 1 and "\n" not in lpips_notes[0]
        assert lpips_notes[0].startswith("lpips_vs_fp skipped: LPIPS (alex) could not be loaded: ")
        assert metrics.evaluate(levels(4, 3, size=64, seed=14), fp_images=fp)[1] == notes  # not retried, same note
    else:
        assert lpips_notes == [] and out["lpips_vs_fp"] > 0.0
        same, _ = metrics.evaluate(fp.clone(), fp_images=fp)
        assert abs(same["lpips_vs_fp"]) < 1e-6
    assert "fid_vs_fp" in out  # the other metrics do not depend on it


def test_lpips_net_is_checked():
    with pytest.raises(ValueError, match="lpips='resnet'"):
        OptionalImageMetrics(lpips="resnet")


# ---------------------------------------------------------------------- CLIP score


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny CLIP (model, processor) saved to a folder, built offline: a character-level CLIP BPE
    tokenizer written in memory, a 16x16 image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocab = {t: i for i, t in enumerate(specials + letters + [c + "</w>" for c in letters])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = 32
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=4),
        projection_dim=8)
    model = CLIPModel(config).eval()
    with torch.no_grad():  # spread the embeddings: cosines of both signs
        model.visual_projection.weight.normal_()
        model.text_projection.weight.normal_()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder, model, tokenizer


def direct_clip_scores(model, tokenizer, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """100 x cos(image embedding, text embedding) per image, computed here: uint8 pixels normalized by
    hand with CLIP's mean and std (16x16 images: the processor's resize and crop leave them as they are)."""
    rgb = images.expand(-1, 3, -1, -1)
    pixels = (rgb * 255).round() / 255
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=(pixels - mean) / std)
        txt = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    img, txt = (x if isinstance(x, torch.Tensor) else x.pooler_output for x in (img, txt))
    return 100 * F.cosine_similarity(img.double(), txt.double(), dim=-1)


@pytest.mark.parametrize("channels", [1, 3])
def test_clip_score_matches_the_embeddings_computed_directly(tiny_clip, channels):
    folder, model, tokenizer = tiny_clip
    prompts = ["a red cat", "blue dog", "seven", "a photo of a digit", "cat", "a small red house"]
    images = levels(len(prompts), channels, seed=20 + channels)
    metrics = OptionalImageMetrics(clip_model=str(folder), lpips=None)
    scores = direct_clip_scores(model, tokenizer, images, prompts)

    out, notes = metrics.evaluate(images, prompts=prompts)
    assert notes == ["fid skipped: no fid_reference folder given"]
    assert out["clip_score"] == pytest.approx(max(float(scores.mean()), 0.0), abs=1e-4)
    # torchmetrics clamps the mean (not each image); image by image: max(100 cos, 0), the model reused
    for i in range(len(prompts)):
        one, _ = metrics.evaluate(images[i:i + 1], prompts=prompts[i:i + 1])
        assert one["clip_score"] == pytest.approx(max(float(scores[i]), 0.0), abs=1e-4)
    assert (scores > 1).any() and (scores < -1).any()  # both sides of the clamp were exercised


def test_clip_is_not_loaded_without_prompts(monkeypatch):
    monkeypatch.setattr(im, "_load_clip_score", lambda name: pytest.fail("CLIP loaded for a class-conditional model"))
    out, notes = OptionalImageMetrics(lpips=None).evaluate(levels(3, 1))
    assert out == {} and notes == ["fid skipped: no fid_reference folder given"]


def test_clip_model_that_cannot_be_loaded_is_a_note(tmp_path, monkeypatch):
    import huggingface_hub.constants

    missing = tmp_path / "no-such-clip"
    out, notes = OptionalImageMetrics(clip_model=str(missing), lpips=None).evaluate(levels(2, 3), prompts=["a", "b"])
    assert "clip_score" not in out
    assert notes[-1] == f"clip_score skipped: clip_model folder {missing} does not exist"

    # a hub id that is not cached is a note at once, online or not: weights present are used, none downloaded
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    name = "archquant-tests/clip-that-is-not-cached"
    out, notes = OptionalImageMetrics(clip_model=name, lpips=None).evaluate(levels(2, 3), prompts=["a", "b"])
    assert "clip_score" not in out
    assert notes[-1] == (f"clip_score skipped: CLIP model {name!r} is not in the Hugging Face cache: download it "
                         f"once (huggingface-cli download {name}), or give clip_model a local folder")

    (tmp_path / "empty-clip").mkdir()  # a folder without a model: the loader's reason, on one line
    out, notes = OptionalImageMetrics(clip_model=str(tmp_path / "empty-clip"), lpips=None).evaluate(
        levels(2, 3), prompts=["a", "b"])
    assert "clip_score" not in out and "\n" not in notes[-1]
    assert notes[-1].startswith(f"clip_score skipped: CLIP model {str(tmp_path / 'empty-clip')!r} could not be loaded (")


# ---------------------------------------------------------------------- the module's surface


def test_declared_metrics_and_input_checks():
    assert [m.name for m in METRICS] == ["fid", "fid_vs_fp", "lpips_vs_fp", "clip_score"]
    assert [m.relative_to_fp for m in METRICS] == [False, True, True, False]
    metrics = metrics_only(feature_extractor=TinyFeatures())
    with pytest.raises(ValueError, match="expected float images"):
        metrics.evaluate(torch.rand(2, 2, 8, 8))
    with pytest.raises(ValueError, match="do not match"):
        metrics.evaluate(torch.rand(2, 3, 8, 8), fp_images=torch.rand(3, 3, 8, 8))
    with pytest.raises(ValueError, match="1 prompts for 2 images"):
        metrics.evaluate(torch.rand(2, 3, 8, 8), prompts=["x"])


def test_eval_layer_imports_no_adapter_or_model_code():
    source = Path(im.__file__).read_text()
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            names.append(node.module or "")
    assert not [n for n in names if n.startswith(("archquant.adapters", "archquant.models", "models", "adapters"))]
