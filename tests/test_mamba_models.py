"""Mamba1/Mamba2 model code (models/mamba.py) and checkpoint loading (models/mamba_loading.py).

Everything runs on tiny random models written to ``tmp_path``; no network is used.
"""
from __future__ import annotations

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from archquant.models.mamba import (MambaConfig, MambaLM, ScaledSiLU, init_mamba_weights, selective_scan, ssd_scan,
                                    ssd_scan_reference)
from archquant.models.mamba_loading import (MambaLoadError, config_from_hf, config_from_mamba_ssm, hf_config_dict,
                                            load_mamba, save_mamba_hf)

VOCAB = 50


def _cfg(arch: str = "mamba1", **kw) -> MambaConfig:
    base = dict(arch=arch, vocab_size=VOCAB, hidden_size=32, num_layers=2, state_size=8)
    if arch == "mamba2":
        base.update(head_dim=16, n_groups=1, chunk_size=8, tie_embeddings=False)
    base.update(kw)
    return MambaConfig(**base)


def _perturb(model: MambaLM, seed: int = 0) -> MambaLM:
    """Standard init, then move every parameter away from its default (A_log, D, norms, dt biases…)
    so that a wrong formula cannot pass by accident."""
    init_mamba_weights(model, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("A_log"):
                p.add_(0.5 * noise)
            elif name.endswith(".D"):
                p.copy_(noise)
            elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith(("dt_proj.bias", "dt_bias")):
                p.add_(0.5 * noise)
            elif name.endswith("bias"):  # conv / linear biases
                p.copy_(0.1 * noise)
            else:
                p.add_(0.05 * noise)
    return model.eval()


def _model(arch: str = "mamba1", seed: int = 0, **kw) -> MambaLM:
    return _perturb(MambaLM(_cfg(arch, **kw)), seed)


def _ids(b: int = 2, l: int = 13, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, l), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return model(ids)


def _one_line_error(excinfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


# ----------------------------------------------------------------------------------------
# 1. equality with transformers
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,kw,length", [
    ("mamba1", dict(tie_embeddings=True), 13),
    ("mamba2", dict(tie_embeddings=False), 16),
    ("mamba2", dict(tie_embeddings=False, n_groups=2), 13),  # l not a multiple of chunk_size=8
    ("mamba2", dict(tie_embeddings=False, n_groups=2, chunk_size=4, time_step_limit=(0.05, 0.2)), 11),
], ids=["mamba1-tied", "mamba2-untied", "mamba2-groups2-ragged", "mamba2-dt-limit"])
def test_matches_transformers(tmp_path, arch, kw, length):
    transformers = pytest.importorskip("transformers")
    ours = _model(arch, seed=3, **kw)
    save_mamba_hf(ours, tmp_path)
    cls = transformers.MambaForCausalLM if arch == "mamba1" else transformers.Mamba2ForCausalLM
    hf = cls.from_pretrained(str(tmp_path)).eval()
    ids = _ids(2, length, seed=1)
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
    got = _logits(ours, ids)
    assert got.shape == ref.shape == (2, length, VOCAB)
    assert ref.abs().max() > 0.1  # a non-trivial comparison
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # the HF model holds the very same parameters under the very same names
    hf_state = hf.state_dict()
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(hf_state[k], v, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------
# 2. round trips
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_save_load_roundtrip_bit_identical(tmp_path, arch):
    model = _model(arch, seed=5)
    save_mamba_hf(model, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "config.json").is_file() and (tmp_path / "ckpt" / "model.safetensors").is_file()
    loaded = load_mamba(str(tmp_path / "ckpt"))
    assert not loaded.training
    assert loaded.config.to_dict() == model.config.to_dict()
    if model.config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.backbone.embeddings.weight
    ids = _ids()
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_load_dtype(tmp_path):
    model = _model("mamba1")
    save_mamba_hf(model, tmp_path)
    loaded = load_mamba(str(tmp_path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    out = _logits(loaded, _ids())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_pytorch_model_bin(tmp_path, arch):
    model = _model(arch, seed=6)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # a tied HF .bin may hold lm_head too
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(model.config)))
    loaded = load_mamba(str(tmp_path))
    ids = _ids()
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_sharded_safetensors(tmp_path):
    model = _model("mamba2", seed=7, n_groups=2)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(tmp_path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in ks})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(model.config)))
    loaded = load_mamba(str(tmp_path))
    ids = _ids()
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))

    # a shard named in the index but absent is an error naming that shard
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MambaLoadError) as ei:
        load_mamba(str(tmp_path))
    _one_line_error(ei, "model-00002-of-00002.safetensors")


def test_hf_config_roundtrip():
    for cfg in (_cfg("mamba1", dt_rank=5, tie_embeddings=False),
                _cfg("mamba2", n_groups=2, time_step_limit=(0.001, 0.1)),
                _cfg("mamba2")):
        d = json.loads(json.dumps(hf_config_dict(cfg)))  # through JSON, Infinity included
        assert config_from_hf(d).to_dict() == cfg.to_dict()


# ----------------------------------------------------------------------------------------
# 3. mamba_ssm format
# ----------------------------------------------------------------------------------------


def _write_mamba_ssm(directory, model: MambaLM, ssm_cfg: dict, vocab_size: int, multiple: int = 8, **extra):
    """What mamba_ssm's ``save_pretrained`` writes: config.json + pytorch_model.bin, vocab padded."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    padded = vocab_size + (-vocab_size) % multiple
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().clone()
        if k in ("backbone.embeddings.weight", "lm_head.weight"):
            v = torch.cat([v, 0.02 * torch.randn(padded - v.shape[0], v.shape[1])])
        state["backbone.embedding.weight" if k == "backbone.embeddings.weight" else k] = v
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["backbone.embedding.weight"]  # mamba_ssm saves both keys
    torch.save(state, directory / "pytorch_model.bin")
    config = {"d_model": cfg.hidden_size, "d_intermediate": 0, "n_layer": cfg.num_layers, "vocab_size": vocab_size,
              "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
              "residual_in_fp32": cfg.residual_in_fp32, "fused_add_norm": True,
              "pad_vocab_size_multiple": multiple, "tie_embeddings": cfg.tie_embeddings}
    config.update(extra)
    (directory / "config.json").write_text(json.dumps(config))
    return padded


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_mamba_ssm_format(tmp_path, arch):
    vocab = 100
    if arch == "mamba1":
        model = _model("mamba1", seed=8, vocab_size=vocab, hidden_size=64, state_size=16, tie_embeddings=True)
        ssm_cfg = {}
    else:
        model = _model("mamba2", seed=8, vocab_size=vocab, hidden_size=64, n_groups=1, chunk_size=8,
                       tie_embeddings=False, state_size=16)
        ssm_cfg = {"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 1, "chunk_size": 8}
    padded = _write_mamba_ssm(tmp_path, model, ssm_cfg, vocab)
    assert padded == 104
    loaded = load_mamba(str(tmp_path))
    assert loaded.config.arch == arch
    assert loaded.config.vocab_size == 104
    assert loaded.backbone.embeddings.weight.shape == (104, 64)
    assert loaded.config.tie_embeddings == model.config.tie_embeddings
    ids = _ids(2, 11, vocab=vocab, seed=2)
    got, ref = _logits(loaded, ids), _logits(model, ids)
    assert got.shape == (2, 11, 104)
    torch.testing.assert_close(got[..., :vocab], ref, atol=1e-6, rtol=0)
    # and it saves as a valid HF checkpoint
    save_mamba_hf(loaded, tmp_path / "hf")
    assert torch.equal(_logits(load_mamba(str(tmp_path / "hf")), ids), got)


def test_mamba_ssm_config_translation():
    emb = torch.zeros(104, 64)
    cfg = config_from_mamba_ssm({"d_model": 64, "n_layer": 2, "vocab_size": 100, "ssm_cfg": {}, "rms_norm": True,
                                 "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8},
                                {"backbone.embedding.weight": emb})
    assert (cfg.arch, cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.state_size, cfg.dt_rank) == \
        ("mamba1", 104, 64, 2, 16, 4)
    cfg2 = config_from_mamba_ssm({"d_model": 64, "n_layer": 2, "vocab_size": 100,
                                  "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 1}},
                                 {"backbone.embedding.weight": emb})
    assert (cfg2.arch, cfg2.num_heads, cfg2.state_size, cfg2.chunk_size) == ("mamba2", 8, 16, 256)


@pytest.mark.parametrize("bad,needle", [
    (dict(ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 1, "d_ssm": 64}), "d_ssm"),
    (dict(ssm_cfg={"layer": "Mamba3"}), "Mamba3"),
    (dict(rms_norm=False), "rms_norm"),
    (dict(d_intermediate=128), "d_intermediate"),
    (dict(attn_layer_idx=[1]), "attn_layer_idx"),
])
def test_mamba_ssm_unsupported(tmp_path, bad, needle):
    model = _model("mamba2", vocab_size=100, hidden_size=64, state_size=16)
    extra = dict(bad)
    ssm_cfg = extra.pop("ssm_cfg", {"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 1})
    _write_mamba_ssm(tmp_path, model, ssm_cfg, 100, **extra)
    with pytest.raises(MambaLoadError) as ei:
        load_mamba(str(tmp_path))
    _one_line_error(ei, needle)


# ----------------------------------------------------------------------------------------
# 4. errors
# ----------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model = _model("mamba1", seed=9)
    return model, save_mamba_hf(model, tmp_path / "ckpt")


def test_error_missing_directory(tmp_path):
    with pytest.raises(MambaLoadError) as ei:
        load_mamba(str(tmp_path / "nowhere" / "model"))
    _one_line_error(ei, "not found", "nowhere")


def test_error_file_not_dir(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(MambaLoadError) as ei:
        load_mamba(str(f))
    _one_line_error(ei, str(f), "is a file")


def test_error_no_config(tmp_path, saved):
    _, d = saved
    (d / "config.json").unlink()
    with pytest.raises(MambaLoadError) as ei:
        load_mamba(str(d))
    _one_line_error(ei, "config.json", str(d))


@pytest.mark.parametrize("text", ['{"model_type": "mamba", ', "\xff\xfe garbage", "[1, 2]"],
                         ids=["truncated", "binary", "not-an-object"])
def test_error_corrupt_config(saved, text):
    _, d = saved
    (d / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(MambaLoadError) as ei:
        load_mamba(str(d))
    _one_line_error(ei, "corrupt", "config.json")


def test_error_unknown_model_type(saved):
    _, d = saved
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").unlink()  # the config is reported first
    with pytest.raises(MambaLoadError) as ei:
        load_mamba(str(d))
    _one_line_error(ei, "'llama'", "model_type")


def test_error_not_a_mamba_config(saved):
    _, d = saved
    (d / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(MambaLoadError) as ei:
        load_mamba(str(d))
    _one_line_error(ei, "config.json", "neither")


def test_error_config_field_missing_or_inconsistent(saved):
    _, d = saved
    cfg = json.loads((d / "config.json").read_text())
    del cfg["vocab_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MambaLoadError) as ei:
        load_mamba(str(d))
    _one_line_error(ei, "vocab_size")

    m2 = hf_config_dict(_cfg("mamba2"))
    m2["num_heads"] = 3
    (d / "config.json").write_text(json.dumps(m2))
    with pytest.raises(MambaLoadError) as ei:
        load_mamba(str(d))
    _one_line_error(ei, "num_heads")

    m2 = hf_config_dict(_cfg("mamba2"))
    m2["head_dim"] = 24  # 64 is not a multiple of 24: MambaConfig's own ValueError, rewrapped
    del m2["num_heads"]
    (d / "config.json").write_text(json.dumps(m2))
    with pytest.raises(MambaLoadError) as ei:
        load_mamba(str(d))
    _one_line_error(ei, "head_dim")


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_error_corrupt_safetensors(saved, how):
    _, d = saved
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x07" * 100, "empty": b""}[how])
    with pytest.raises(MambaLoadError) as ei:
        load_mamba(str(d))
    _one_line_error(ei, "model.safetensors")


@pytest.mark.parametrize("payload", [b"not a zip or pickle", "tensor"], ids=["garbage", "not-a-dict"])
def test_error_corrupt_bin(saved, payload):
    _, d = saved
    (d / "model.safetensors").unlink()
    f = d / "pytorch_model.bin"
    if payload == "tensor":
        torch.save(torch.zeros(3), f)
    else:
        f.write_bytes(payload)
    with pytest.raises(MambaLoadError) as ei:
        load_mamba(str(d))
    _one_line_error(ei, str(d))


def test_error_missing_key(saved):
    model, d = saved
    state = {k: v for k, v in model.state_dict().items() if k not in ("lm_head.weight", "backbone.layers.1.mixer.D")}
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(MambaLoadError) as ei:
        load_mamba(str(d))
    _one_line_error(ei, "backbone.layers.1.mixer.D", "missing")


def test_error_unexpected_key(saved):
    model, d = saved
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state["backbone.layers.7.mixer.D"] = torch.ones(3)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(MambaLoadError) as ei:
        load_mamba(str(d))
    _one_line_error(ei, "backbone.layers.7.mixer.D", "unexpected")


def test_error_wrong_shape(saved):
    model, d = saved
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state["backbone.layers.0.mixer.A_log"] = torch.zeros(64, 9)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(MambaLoadError) as ei:
        load_mamba(str(d))
    _one_line_error(ei, "backbone.layers.0.mixer.A_log", "(64, 9)", "(64, 8)")


def test_error_no_weights(saved):
    _, d = saved
    (d / "model.safetensors").unlink()
    with pytest.raises(MambaLoadError) as ei:
        load_mamba(str(d))
    _one_line_error(ei, "no weights", str(d))


def test_error_mamba_ssm_without_embedding(tmp_path):
    model = _model("mamba1", vocab_size=100, hidden_size=64, state_size=16)
    _write_mamba_ssm(tmp_path, model, {}, 100)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    state["backbone.embeddings.weight"] = state.pop("backbone.embedding.weight")
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(MambaLoadError) as ei:
        load_mamba(str(tmp_path))
    _one_line_error(ei, "backbone.embedding.weight")


def test_error_offline_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(MambaLoadError) as ei:
        load_mamba("state-spaces/definitely-not-here")
    assert time.monotonic() - t0 < 10
    _one_line_error(ei, "state-spaces/definitely-not-here")


# ----------------------------------------------------------------------------------------
# 5. scans
# ----------------------------------------------------------------------------------------


def _ssd_inputs(b=2, l=13, h=4, p=3, g=2, n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen)
    dt = F.softplus(torch.randn(b, l, h, generator=gen))
    A = -torch.exp(torch.randn(h, generator=gen))
    B = torch.randn(b, l, g, n, generator=gen)
    C = torch.randn(b, l, g, n, generator=gen)
    D = torch.randn(h, generator=gen)
    return x, dt, A, B, C, D


@pytest.mark.parametrize("chunk", [1, 3, 4, 13, 16, 64])
def test_ssd_scan_matches_reference(chunk):
    x, dt, A, B, C, D = _ssd_inputs(l=13)
    ref = ssd_scan_reference(x, dt, A, B, C, D)
    torch.testing.assert_close(ssd_scan(x, dt, A, B, C, chunk, D=D), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ssd_scan(x, dt, A, B, C, chunk), ssd_scan_reference(x, dt, A, B, C),
                               atol=1e-5, rtol=1e-5)


def test_ssd_scan_single_token_and_dtype():
    x, dt, A, B, C, D = _ssd_inputs(l=1, g=1)
    torch.testing.assert_close(ssd_scan(x, dt, A, B, C, 8, D=D), ssd_scan_reference(x, dt, A, B, C, D))
    y = ssd_scan(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), 8, D=D)
    assert y.dtype == torch.bfloat16


def _naive_selective_scan(u, dt, A, B, C, D, h=None):
    b, l, d = u.shape
    n = A.shape[1]
    h = torch.zeros(b, d, n, dtype=torch.float64) if h is None else h.double()
    ys = []
    for t in range(l):
        for i in range(d):
            dA = torch.exp(dt[:, t, i, None].double() * A[i].double())  # (b, n)
            h[:, i] = dA * h[:, i] + dt[:, t, i, None].double() * B[:, t].double() * u[:, t, i, None].double()
        y = (h * C[:, t, None, :].double()).sum(-1) + D.double() * u[:, t].double()
        ys.append(y)
    return torch.stack(ys, 1), h


def _sel_inputs(b=2, l=9, d=6, n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(b, l, d, generator=gen)
    dt = F.softplus(torch.randn(b, l, d, generator=gen))
    A = -torch.exp(torch.randn(d, n, generator=gen))
    B = torch.randn(b, l, n, generator=gen)
    C = torch.randn(b, l, n, generator=gen)
    D = torch.randn(d, generator=gen)
    return u, dt, A, B, C, D


def test_selective_scan_matches_naive_loop():
    u, dt, A, B, C, D = _sel_inputs()
    ref, h_ref = _naive_selective_scan(u, dt, A, B, C, D)
    y, h = selective_scan(u, dt, A, B, C, D, return_state=True)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.double(), h_ref, atol=1e-5, rtol=1e-5)
    # without D, the skip term is absent
    torch.testing.assert_close(selective_scan(u, dt, A, B, C).double(),
                               ref - D.double() * u.double(), atol=1e-5, rtol=1e-5)
    # a starting state
    h0 = torch.randn(2, 6, 4)
    ref0, _ = _naive_selective_scan(u, dt, A, B, C, D, h=h0)
    torch.testing.assert_close(selective_scan(u, dt, A, B, C, D, h0=h0).double(), ref0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 4, 8])
def test_selective_scan_continuation(k):
    u, dt, A, B, C, D = _sel_inputs(l=9)
    full, h_full = selective_scan(u, dt, A, B, C, D, return_state=True)
    y1, h1 = selective_scan(u[:, :k], dt[:, :k], A, B[:, :k], C[:, :k], D, return_state=True)
    y2, h2 = selective_scan(u[:, k:], dt[:, k:], A, B[:, k:], C[:, k:], D, h0=h1, return_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h2, h_full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k,chunk", [(6, 4), (4, 4), (1, 5), (12, 32)])
def test_ssd_scan_continuation(k, chunk):
    x, dt, A, B, C, D = _ssd_inputs(l=13)
    full, h_full = ssd_scan(x, dt, A, B, C, chunk, D=D, return_state=True)
    y1, h1 = ssd_scan(x[:, :k], dt[:, :k], A, B[:, :k], C[:, :k], chunk, D=D, return_state=True)
    y2, h2 = ssd_scan(x[:, k:], dt[:, k:], A, B[:, k:], C[:, k:], chunk, D=D, h0=h1, return_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h2, h_full, atol=1e-5, rtol=1e-5)
    # the final state is the recurrence's state: h_t = exp(dt A) h + dt x ⊗ B
    Bh = B.repeat_interleave(2, dim=2)
    h = torch.zeros_like(h_full)
    for t in range(13):
        h = torch.exp(dt[:, t] * A)[..., None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None]
    torch.testing.assert_close(h_full, h, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------
# 6. config
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [
    MambaConfig(),
    MambaConfig(arch="mamba2", hidden_size=64, head_dim=32, n_groups=2, time_step_limit=(0.0, float("inf"))),
    MambaConfig(arch="mamba2", hidden_size=64, head_dim=32, time_step_limit=(0.001, 0.1), tokenizer="gpt2",
                extra={"note": 1}),
], ids=["default", "mamba2-inf", "mamba2-finite"])
def test_config_dict_roundtrip(cfg):
    d = json.loads(json.dumps(cfg.to_dict(), allow_nan=False))  # strict JSON: inf is written as null
    back = MambaConfig.from_dict(d)
    assert back == cfg
    assert back.time_step_limit == cfg.time_step_limit and isinstance(back.time_step_limit, tuple)
    assert math.isinf(MambaConfig.from_dict(MambaConfig(arch="mamba2", hidden_size=64, head_dim=32).to_dict())
                      .time_step_limit[1])


def test_config_errors():
    with pytest.raises(ValueError, match="arch"):
        MambaConfig(arch="mamba3")
    with pytest.raises(ValueError, match="arch"):
        MambaConfig.from_dict({"arch": "transformer"})
    with pytest.raises(ValueError, match="head_dim"):
        MambaConfig(arch="mamba2", hidden_size=48, head_dim=64)
    with pytest.raises(ValueError, match="bogus"):
        MambaConfig.from_dict({"bogus": 1})


def test_config_derived():
    cfg = MambaConfig(hidden_size=768)
    assert (cfg.d_inner, cfg.dt_rank) == (1536, 48)
    assert MambaConfig(hidden_size=40, dt_rank=7).dt_rank == 7
    assert MambaConfig(arch="mamba2", hidden_size=64, head_dim=16).num_heads == 8


# ----------------------------------------------------------------------------------------
# 7. real sizes, and misc
# ----------------------------------------------------------------------------------------


def test_real_mamba1_size_forward():
    cfg = MambaConfig(arch="mamba1", hidden_size=768, num_layers=1, vocab_size=16)
    model = init_mamba_weights(MambaLM(cfg), seed=0).eval()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # the shapes of state-spaces/mamba-130m-hf's layers
    assert shapes["backbone.layers.0.mixer.in_proj.weight"] == (3072, 768)
    assert shapes["backbone.layers.0.mixer.conv1d.weight"] == (1536, 1, 4)
    assert shapes["backbone.layers.0.mixer.x_proj.weight"] == (48 + 32, 1536)
    assert shapes["backbone.layers.0.mixer.dt_proj.weight"] == (1536, 48)
    assert shapes["backbone.layers.0.mixer.A_log"] == (1536, 16)
    assert shapes["backbone.layers.0.mixer.out_proj.weight"] == (768, 1536)
    out = _logits(model, torch.tensor([[1, 5, 9, 15]]))
    assert out.shape == (1, 4, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_causal(arch):
    """Changing a later token never changes earlier logits."""
    model = _model(arch, seed=11)
    ids = _ids(1, 10, seed=4)
    ids2 = ids.clone()
    ids2[0, 6:] = (ids2[0, 6:] + 1) % VOCAB
    a, b = _logits(model, ids), _logits(model, ids2)
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_init_mamba_weights_seeded():
    a = init_mamba_weights(MambaLM(_cfg("mamba2")), seed=1)
    b = init_mamba_weights(MambaLM(_cfg("mamba2")), seed=1)
    c = init_mamba_weights(MambaLM(_cfg("mamba2")), seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    dt = F.softplus(a.backbone.layers[0].mixer.dt_bias)
    assert ((dt >= 1e-3 - 1e-6) & (dt <= 0.1 + 1e-6)).all()


def test_scaled_silu():
    s = torch.tensor([0.5, 1.0, 2.0])
    mod = ScaledSiLU(s)
    z = torch.randn(4, 3)
    torch.testing.assert_close(mod(z / s), F.silu(z) / s)
    assert ScaledSiLU.from_config(mod.to_config()).scale.shape == (3,)
