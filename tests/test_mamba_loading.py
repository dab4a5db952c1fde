"""Mamba checkpoints as users bring them (models/mamba_loading.py): written by the installed
transformers' ``save_pretrained`` or in mamba_ssm's layout, with or without a tokenizer beside
the weights. Tiny random models in ``tmp_path``; the network is never used (HF_HUB_OFFLINE=1).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from archquant.eval.lm import HFTokenizer, get_tokenizer
from archquant.models.mamba import MambaConfig, MambaLM, init_mamba_weights
from archquant.models.mamba_loading import (HF_FIELDS, MAMBA_SSM_TOKENIZER, READ, MambaLoadError, config_from_hf,
                                            decode_special_floats, load_mamba, save_mamba_hf)

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")

HF_CLASSES = {"mamba": (transformers.MambaConfig, transformers.MambaForCausalLM),
              "mamba2": (transformers.Mamba2Config, transformers.Mamba2ForCausalLM)}

#: fields that do not change the forward, set away from their defaults: they must not matter
NO_FORWARD_CHANGES = dict(initializer_range=0.3, rescale_prenorm_residual=True, time_step_min=0.01,
                          time_step_max=0.2, time_step_floor=1e-3, use_cache=False, pad_token_id=5, bos_token_id=6,
                          eos_token_id=7)
CONFIGS = {
    "mamba1-defaults": ("mamba", dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8)),
    "mamba1-every-field": ("mamba", dict(
        vocab_size=300, hidden_size=48, num_hidden_layers=2, state_size=4, expand=3, conv_kernel=3, use_bias=True,
        use_conv_bias=False, time_step_rank=5, layer_norm_epsilon=1e-3, residual_in_fp32=False,
        tie_word_embeddings=False, hidden_act="swish", time_step_scale=2.0, time_step_init_scheme="constant",
        use_mambapy=True, use_associative_scan=False, **NO_FORWARD_CHANGES)),
    "mamba2-defaults": ("mamba2", dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=16,
                                       head_dim=16, num_heads=4, n_groups=2, chunk_size=8)),
    "mamba2-every-field": ("mamba2", dict(
        vocab_size=300, hidden_size=48, num_hidden_layers=2, state_size=8, expand=2, head_dim=8, num_heads=12,
        n_groups=3, chunk_size=4, conv_kernel=3, use_bias=True, use_conv_bias=False, layer_norm_epsilon=1e-3,
        residual_in_fp32=False, tie_word_embeddings=True, time_step_limit=(0.05, 0.5), time_step_rank=7,
        **NO_FORWARD_CHANGES)),
}
DEFAULTS = {"mamba": "mamba1-defaults", "mamba2": "mamba2-defaults"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _hf_model(model_type: str, seed: int = 0, **config):
    """A transformers Mamba/Mamba2 LM with every parameter moved off its initial value, so a wrong
    formula on our side (A, D, norms, dt bias, conv bias…) cannot pass by accident."""
    config_cls, model_cls = HF_CLASSES[model_type]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**config)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _save_hf(directory, model_type: str, seed: int = 0, **config):
    model = _hf_model(model_type, seed, **config)
    model.save_pretrained(str(directory))
    return model


def _ids(vocab: int, length: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


def _one_line(excinfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def _tiny_tokenizer(size: int):
    """A WordLevel tokenizer of exactly ``size`` tokens ("[UNK]", "w1", "w2", …), built in memory."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, size)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def _write_mamba_ssm(directory, model: MambaLM) -> None:
    """mamba_ssm's layout: its config.json keys, ``backbone.embedding`` in pytorch_model.bin."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {("backbone.embedding.weight" if k == "backbone.embeddings.weight" else k): v.detach().clone()
             for k, v in model.state_dict().items()}
    torch.save(state, directory / "pytorch_model.bin")
    ssm_cfg = {} if cfg.arch == "mamba1" else {"layer": "Mamba2", "d_state": cfg.state_size,
                                               "headdim": cfg.head_dim, "ngroups": cfg.n_groups}
    (directory / "config.json").write_text(json.dumps({
        "d_model": cfg.hidden_size, "d_intermediate": 0, "n_layer": cfg.num_layers, "vocab_size": cfg.vocab_size,
        "ssm_cfg": ssm_cfg, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": 8, "tie_embeddings": cfg.tie_embeddings}))


# ----------------------------------------------------------------------------------------
# checkpoints written by the installed transformers
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_transformers_checkpoint_loads_with_the_same_logits(tmp_path, name):
    model_type, config = CONFIGS[name]
    hf = _save_hf(tmp_path, model_type, **config)
    ours = load_mamba(str(tmp_path))
    assert ours.config.arch == {"mamba": "mamba1", "mamba2": "mamba2"}[model_type]
    ids = _ids(config["vocab_size"])
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
        got = ours(ids)
    assert got.shape == ref.shape == (2, 11, config["vocab_size"])
    assert ref.abs().max() > 0.5  # a non-trivial comparison
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_transformers_5_infinity_encoding_is_read(tmp_path):
    """transformers 5 writes an infinite time_step_limit as {"__float__": "Infinity"}; reading it
    with float() was the reported "float() argument ... not 'dict'"."""
    _save_hf(tmp_path, "mamba2", **CONFIGS["mamba2-defaults"][1])
    written = json.loads((tmp_path / "config.json").read_text())
    if not isinstance(written["time_step_limit"][1], dict):
        pytest.skip(f"transformers {transformers.__version__} writes time_step_limit as {written['time_step_limit']}")
    assert written["time_step_limit"] == [0.0, {"__float__": "Infinity"}]
    assert load_mamba(str(tmp_path)).config.time_step_limit == (0.0, math.inf)
    # transformers 4.x wrote the bare (non-standard JSON) Infinity, which json.loads reads
    written["time_step_limit"] = [0.0, math.inf]
    (tmp_path / "config.json").write_text(json.dumps(written))
    assert "Infinity]" in (tmp_path / "config.json").read_text().replace("\n", "").replace(" ", "")
    assert load_mamba(str(tmp_path)).config.time_step_limit == (0.0, math.inf)


def test_decode_special_floats_as_transformers_does():
    encoded = {"a": [{"__float__": "Infinity"}, {"__float__": "-Infinity"}], "b": {"c": {"__float__": "NaN"}},
               "kept": {"__float__": "Infinity", "other": 1}, "unknown_tag": {"__float__": "Huge"}, "n": 3}
    got = decode_special_floats(encoded)
    assert got["a"] == [math.inf, -math.inf] and math.isnan(got["b"]["c"]) and got["n"] == 3
    assert got["kept"] == {"__float__": "Infinity", "other": 1} and got["unknown_tag"] == {"__float__": "Huge"}
    # transformers' own decoder agrees on every value
    theirs = transformers.PreTrainedConfig._decode_special_floats(encoded) if hasattr(
        transformers, "PreTrainedConfig") else None
    if theirs is not None:
        assert json.dumps(theirs, sort_keys=True) == json.dumps(got, sort_keys=True)


@pytest.mark.parametrize("model_type", sorted(HF_CLASSES))
def test_every_field_of_the_installed_transformers_config_is_classified(tmp_path, model_type):
    """Each field transformers writes is read, refused when unsupported, or listed as not
    changing the forward. A field a newer transformers adds fails here until it is classified."""
    config_cls, _ = HF_CLASSES[model_type]
    fields = set(config_cls().to_dict())
    _save_hf(tmp_path, model_type, **CONFIGS[DEFAULTS[model_type]][1])
    fields |= set(json.loads((tmp_path / "config.json").read_text()))
    unclassified = sorted(fields - set(HF_FIELDS[model_type]))
    assert not unclassified, (f"transformers {transformers.__version__} {config_cls.__name__} fields that "
                              f"models/mamba_loading.py HF_FIELDS does not classify: {unclassified}")


@pytest.mark.parametrize("model_type", sorted(HF_CLASSES))
def test_fields_said_not_to_change_the_forward_are_not_read(tmp_path, model_type):
    """Replacing every such field with a value nothing could use leaves our config unchanged."""
    name = "mamba1-every-field" if model_type == "mamba" else "mamba2-every-field"
    _save_hf(tmp_path, model_type, **CONFIGS[name][1])
    written = json.loads((tmp_path / "config.json").read_text())
    reference = config_from_hf(written).to_dict()
    ignored = [f for f in written if HF_FIELDS[model_type][f] != READ]
    assert len(ignored) >= 10
    scrambled = {**written, **{f: {"not": "a value anything reads"} for f in ignored}}
    assert config_from_hf(scrambled).to_dict() == reference


@pytest.mark.parametrize("model_type,field,value", [
    ("mamba", "hidden_act", "gelu"), ("mamba2", "hidden_act", "relu"),
    ("mamba2", "time_step_limit", [0.0]), ("mamba2", "num_heads", 3),
    ("mamba", "intermediate_size", 65),
])
def test_unsupported_values_are_refused_naming_the_field(tmp_path, model_type, field, value):
    config = dict(CONFIGS[DEFAULTS[model_type]][1])
    if field == "hidden_act":  # transformers builds these; our mixers only run SiLU
        _save_hf(tmp_path, model_type, **config, hidden_act=value)
    else:
        _save_hf(tmp_path, model_type, **config)
        written = json.loads((tmp_path / "config.json").read_text())
        written[field] = value
        (tmp_path / "config.json").write_text(json.dumps(written))
    with pytest.raises(MambaLoadError) as ei:
        load_mamba(str(tmp_path))
    _one_line(ei, field, str(tmp_path / "config.json"))


def test_absent_fields_take_transformers_defaults(tmp_path):
    """A minimal config.json reads as transformers reads it (its defaults, not ours)."""
    minimal = {"model_type": "mamba2", "vocab_size": 64, "hidden_size": 256, "num_hidden_layers": 1,
               "num_heads": 8}
    cfg = config_from_hf(minimal)
    theirs = transformers.Mamba2Config(**{k: v for k, v in minimal.items() if k != "model_type"})
    assert (cfg.state_size, cfg.head_dim, cfg.n_groups, cfg.chunk_size, cfg.conv_kernel, cfg.expand) == \
        (theirs.state_size, theirs.head_dim, theirs.n_groups, theirs.chunk_size, theirs.conv_kernel, theirs.expand)
    assert (cfg.tie_embeddings, cfg.residual_in_fp32, cfg.norm_eps, cfg.time_step_limit) == \
        (theirs.tie_word_embeddings, theirs.residual_in_fp32, theirs.layer_norm_epsilon, tuple(theirs.time_step_limit))
    cfg1 = config_from_hf({"model_type": "mamba", "vocab_size": 64, "hidden_size": 64, "num_hidden_layers": 1})
    theirs1 = transformers.MambaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1)
    assert (cfg1.state_size, cfg1.dt_rank, cfg1.tie_embeddings, cfg1.use_conv_bias, cfg1.use_bias) == \
        (theirs1.state_size, theirs1.time_step_rank, theirs1.tie_word_embeddings, theirs1.use_conv_bias,
         theirs1.use_bias)


# ----------------------------------------------------------------------------------------
# which tokenizer
# ----------------------------------------------------------------------------------------


def test_hf_checkpoint_uses_the_tokenizer_saved_beside_it_offline(tmp_path):
    _save_hf(tmp_path, "mamba", **CONFIGS["mamba1-every-field"][1])  # vocab 300
    made = _tiny_tokenizer(300)
    made.save_pretrained(str(tmp_path))
    model = load_mamba(str(tmp_path))
    assert model.config.tokenizer == str(tmp_path)
    tok = get_tokenizer(model.config.tokenizer)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 300
    assert tok.encode(b"w3 w299 zz w1") == [3, 299, 0, 1] == made.encode("w3 w299 zz w1", add_special_tokens=False)


def test_mamba_ssm_checkpoint_uses_the_tokenizer_saved_beside_it_offline(tmp_path):
    """It used to ask the hub for gpt-neox-20b even with a tokenizer in the directory."""
    model = init_mamba_weights(MambaLM(MambaConfig(vocab_size=64, hidden_size=32, num_layers=1, tokenizer="x")))
    _write_mamba_ssm(tmp_path / "with", model)
    _tiny_tokenizer(60).save_pretrained(str(tmp_path / "with"))
    loaded = load_mamba(str(tmp_path / "with"))
    assert loaded.config.tokenizer == str(tmp_path / "with")
    assert get_tokenizer(loaded.config.tokenizer).encode(b"w59 w2") == [59, 2]
    # without one, the tokenizer every mamba_ssm checkpoint was trained with
    _write_mamba_ssm(tmp_path / "without", model)
    assert load_mamba(str(tmp_path / "without")).config.tokenizer == MAMBA_SSM_TOKENIZER


def test_explicit_tokenizer_overrides_directory_and_config(tmp_path):
    _save_hf(tmp_path, "mamba", **CONFIGS["mamba1-defaults"][1])
    _tiny_tokenizer(64).save_pretrained(str(tmp_path))
    assert load_mamba(str(tmp_path), tokenizer="bytes").config.tokenizer == "bytes"
    assert load_mamba(str(tmp_path), tokenizer="org/some-tokenizer").config.tokenizer == "org/some-tokenizer"
    with pytest.raises(MambaLoadError) as ei:
        load_mamba(str(tmp_path), tokenizer=" ")
    _one_line(ei, "tokenizer", "'bytes'")


def test_archquant_checkpoint_keeps_its_tokenizer_unless_one_is_saved_beside_it(tmp_path):
    model = init_mamba_weights(MambaLM(MambaConfig(vocab_size=256, hidden_size=32, num_layers=1, tokenizer="bytes")))
    save_mamba_hf(model, tmp_path)
    assert load_mamba(str(tmp_path)).config.tokenizer == "bytes"
    _tiny_tokenizer(200).save_pretrained(str(tmp_path))
    assert load_mamba(str(tmp_path)).config.tokenizer == str(tmp_path)


def test_hf_checkpoint_without_any_tokenizer_says_so_when_one_is_needed(tmp_path):
    _save_hf(tmp_path, "mamba", **CONFIGS["mamba1-defaults"][1])
    model = load_mamba(str(tmp_path))
    assert model.config.tokenizer == str(tmp_path)
    with pytest.raises(ValueError) as ei:
        get_tokenizer(model.config.tokenizer)
    _one_line(ei, str(tmp_path), "no tokenizer", "tokenizer.json")
