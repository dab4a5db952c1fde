"""FVD against FP (eval/fvd.py): the I3D's layout, loading a user's state dict safely, the Fréchet arithmetic
against scipy, and the runner computing fvd_vs_fp on a tiny Wan when a network file is given."""
import json

import numpy as np
import pytest
import torch

from archquant.eval.fvd import FEATURES, FVDvsFP, InceptionI3d, load_i3d
from archquant.models.dit_loading import save_pipeline_folder

from cli_testing import one_error_line, run_cli
from diffusion_testing import tiny_wan, write_prompt_job

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = InceptionI3d()
    for m in net.modules():  # spread the batch-norm statistics so that features differ between clips
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("i3d") / "i3d.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def test_the_network_has_the_published_i3d_layout():
    state = InceptionI3d().state_dict()
    shapes = {"Conv3d_1a_7x7.conv3d.weight": (64, 3, 7, 7, 7), "Conv3d_2c_3x3.conv3d.weight": (192, 64, 3, 3, 3),
              "Mixed_3b.b1b.conv3d.weight": (128, 96, 3, 3, 3), "Mixed_4f.b3b.conv3d.weight": (128, 528, 1, 1, 1),
              "Mixed_5c.b0.bn.running_var": (384,), "logits.conv3d.weight": (400, 1024, 1, 1, 1),
              "logits.conv3d.bias": (400,)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert not any(k.startswith("logits.bn") for k in state) and "Conv3d_1a_7x7.conv3d.bias" not in state


def test_short_and_long_clips_give_400_features():
    net = InceptionI3d().eval()
    with torch.no_grad():
        for frames in (1, 5, 9):
            assert net(torch.rand(2, 3, frames, 64, 64) * 2 - 1).shape == (2, FEATURES)


def test_loading_a_users_file(tmp_path, i3d_file):
    net = load_i3d(i3d_file)
    pt = tmp_path / "i3d.pt"
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, pt)  # a DataParallel-style prefix
    again = load_i3d(pt)
    x = torch.rand(1, 3, 4, 64, 64)
    assert torch.equal(net(x), again(x))

    with pytest.raises(ValueError, match="does not exist"):
        load_i3d(tmp_path / "nope.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read it as a state dict"):
        load_i3d(broken)
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in net.state_dict().items() if not k.startswith("logits")}, partial)
    with pytest.raises(ValueError, match="is not an InceptionI3d state dict: 2 missing"):
        load_i3d(partial)
    pickled = tmp_path / "pickled.pt"
    torch.save({"net": net}, pickled)  # a whole pickled module: weights_only refuses to unpickle it
    with pytest.raises(ValueError, match="cannot read it as a state dict"):
        load_i3d(pickled)


class _FrameMeans(torch.nn.Module):
    """A stand-in feature network whose features vary with the clip: per-frame channel means, mixed."""

    def __init__(self, frames: int) -> None:
        super().__init__()
        self.mix = torch.nn.Linear(3 * frames, 8)
        torch.nn.init.normal_(self.mix.weight)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:  # (N, 3, F, H, W) in [-1, 1]
        return self.mix(clips.mean(dim=(3, 4)).flatten(1))


def test_fvd_equals_the_frechet_formula_computed_with_scipy():
    from scipy import linalg

    torch.manual_seed(1)
    fvd = FVDvsFP(_FrameMeans(4), device="cpu")
    fp = torch.rand(12, 4, 1, 16, 16) * torch.rand(12, 4, 1, 1, 1)  # clips of different brightness over time
    quantized = (0.8 * fp + 0.05 + 0.1 * torch.randn_like(fp)).clamp(0, 1)
    assert fvd.evaluate(fp) == ({}, [])  # the FP model: features kept
    value = fvd.evaluate(quantized, fp)[0]["fvd_vs_fp"]

    a, b = fvd.features(fp).numpy(), fvd.features(quantized).numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(sa @ sb).real
    expected = float(((mu_a - mu_b) ** 2).sum() + np.trace(sa + sb - 2 * covmean))
    assert expected > 1e-3 and value == pytest.approx(expected, rel=1e-4)
    assert abs(fvd.evaluate(fp, fp)[0]["fvd_vs_fp"]) < 1e-6 * expected
    assert fvd.evaluate(quantized[:1], fp[:1]) == ({}, ["fvd_vs_fp skipped: it needs at least 2 clips per model"])


def _config(tmp_path, folder, **options):
    return write_prompt_job(tmp_path, folder, ["a red cat", "a blue dog", "a green bird"],
                            ["a small dog", "the digit three"], {"num_steps": 2, "resolution": 16, "num_frames": 5},
                            evaluation_options=options, evaluation_batch_size=3, compare=())


def test_the_runner_reports_fvd_vs_fp_when_a_network_is_given(tmp_path, capsys, i3d_file):
    folder = tmp_path / "wan"
    save_pipeline_folder(tiny_wan(), folder)
    code, _, err = run_cli(capsys, _config(tmp_path, folder, fvd_network=str(i3d_file)))
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["metrics"]["quantized"]["fvd_vs_fp"] >= 0 and "fvd_vs_fp" not in report["metrics"]["fp"]
    assert not any(n.startswith("fvd_vs_fp skipped") for n in report["evaluation_notes"])
    assert "fvd_vs_fp" in (tmp_path / "out" / "report.md").read_text()

    code, _, err = run_cli(capsys, _config(tmp_path, folder, fvd_network=str(tmp_path / "missing.pt")),
                           f"output_dir={tmp_path / 'out2'}")
    assert code == 2 and "fvd_network" in one_error_line(err) and "missing.pt does not exist" in one_error_line(err)
    assert not (tmp_path / "out2").exists()
