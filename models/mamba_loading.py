"""Load Mamba1/Mamba2 checkpoints into ``models.mamba.MambaLM``; save ours in HF format.

Formats read (``load_mamba(path)``), told apart by their ``config.json``:
* HF transformers (``MambaForCausalLM`` / ``Mamba2ForCausalLM``): ``model_type`` "mamba" or
  "mamba2", weights in ``model.safetensors`` (or sharded with an index) or ``pytorch_model.bin``;
* mamba_ssm (``state-spaces/mamba-130m``): ``d_model``, ``n_layer``, ``ssm_cfg``…, weights in
  ``pytorch_model.bin``, embedding named ``backbone.embedding`` (HF: ``backbone.embeddings``),
  vocab padded to a multiple of ``pad_vocab_size_multiple``.
``.bin`` files are read with ``torch.load(weights_only=True)``: never unpickled as code.

``path`` may be a hub id ("org/name"): it is downloaded with huggingface_hub when online.

HF configs are read as the transformers that wrote them reads them: 5.x's encoding of
non-finite floats (``{"__float__": "Infinity"}``) is decoded, absent fields take transformers'
defaults, and each field transformers writes is classified in ``HF_FIELDS`` (read, refused when
its value is one we do not run, or a field that does not change the forward).

The tokenizer the token ids mean is recorded in ``model.config.tokenizer``: the caller's
``tokenizer=``, else one saved in the checkpoint directory, else the config's (``resolve_tokenizer``).
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .mamba import MambaConfig, MambaLM


class MambaLoadError(ValueError):
    """A checkpoint that cannot be read; the message names the file and the problem."""


# ----------------------------------------------------------------------------------------
# config translation
# ----------------------------------------------------------------------------------------

#: what a field of transformers' ``MambaConfig`` / ``Mamba2Config`` means to us. ``READ`` fields
#: are translated into our ``MambaConfig`` (or checked, and refused with a one-line
#: ``MambaLoadError`` naming the field when their value is one we do not run); every other
#: entry says why the field does not change the logits. tests/test_mamba_loading.py fails when
#: the installed transformers writes a field that is in neither table, so this stays complete.
#: Fields in no table (mamba_ssm leftovers such as ``d_model`` or ``fused_add_norm`` in old HF
#: configs, or anything newer) are ignored, as transformers ignores them.
READ = "read"
_INIT = "initialisation only (the weights are loaded, not initialised)"
_OUTPUTS = "which outputs forward returns, not the logits"
_PROVENANCE = "provenance, not architecture"
_TOKEN_IDS = "special token ids for generation and padding; the logits do not depend on them"
_CLASSIFICATION = "sequence-classification heads only"
HF_FIELDS_COMMON = {
    "model_type": READ, "vocab_size": READ, "hidden_size": READ, "num_hidden_layers": READ, "state_size": READ,
    "expand": READ, "conv_kernel": READ, "use_bias": READ, "use_conv_bias": READ, "layer_norm_epsilon": READ,
    "residual_in_fp32": READ, "tie_word_embeddings": READ,
    "hidden_act": READ,  # checked: only SiLU
    "initializer_range": _INIT, "rescale_prenorm_residual": _INIT,
    "time_step_min": _INIT, "time_step_max": _INIT, "time_step_floor": _INIT,
    "pad_token_id": _TOKEN_IDS, "bos_token_id": _TOKEN_IDS, "eos_token_id": _TOKEN_IDS,
    "use_cache": "whether forward returns a recurrent cache; the logits are the same",
    "output_hidden_states": _OUTPUTS, "output_attentions": _OUTPUTS, "return_dict": _OUTPUTS,
    "dtype": "the storage dtype: the weights carry their own, load_mamba(dtype=...) sets the compute dtype",
    "torch_dtype": "transformers 4.x name of dtype",
    "architectures": _PROVENANCE, "transformers_version": _PROVENANCE, "_name_or_path": _PROVENANCE,
    "id2label": _CLASSIFICATION, "label2id": _CLASSIFICATION, "problem_type": _CLASSIFICATION,
    "chunk_size_feed_forward": "feed-forward chunking, which no Mamba block uses",
    "is_encoder_decoder": "transformers' Mamba models are decoder-only whatever it says",
}
HF_FIELDS = {
    "mamba": {
        **HF_FIELDS_COMMON,
        "time_step_rank": READ, "intermediate_size": READ,  # checked: expand * hidden_size, as transformers sets it
        "time_step_scale": _INIT, "time_step_init_scheme": _INIT,
        "use_mambapy": "which slow-path scan implementation transformers runs, not what it computes",
        "use_associative_scan": "which slow-path scan implementation transformers runs, not what it computes",
    },
    "mamba2": {
        **HF_FIELDS_COMMON,
        "num_heads": READ, "head_dim": READ, "n_groups": READ, "chunk_size": READ, "time_step_limit": READ,
        "time_step_rank": "Mamba2 has no dt projection: transformers stores the rank and never uses it",
        "rms_norm": "transformers 4.x Mamba2Config field; its Mamba2 uses the gated RMSNorm whatever it says",
    },
}
#: transformers' defaults for absent fields (the same in 4.x and 5.x). vocab_size, hidden_size
#: and num_hidden_layers have defaults there too, but a config without them cannot describe the
#: weights beside it: they are required here, so the error names the missing field.
HF_DEFAULTS = {
    "mamba": dict(state_size=16, expand=2, conv_kernel=4, use_bias=False, use_conv_bias=True,
                  layer_norm_epsilon=1e-5, residual_in_fp32=True, tie_word_embeddings=True, hidden_act="silu",
                  time_step_rank="auto"),
    "mamba2": dict(state_size=128, expand=2, conv_kernel=4, use_bias=False, use_conv_bias=True,
                   layer_norm_epsilon=1e-5, residual_in_fp32=True, tie_word_embeddings=False, hidden_act="silu",
                   num_heads=128, head_dim=64, n_groups=8, chunk_size=256, time_step_limit=(0.0, float("inf"))),
}
#: the names transformers' ACT2FN gives SiLU (the only activation our mixers run)
SILU_NAMES = ("silu", "swish")
_SPECIAL_FLOATS = {"Infinity": float("inf"), "-Infinity": float("-inf"), "NaN": float("nan")}


def decode_special_floats(obj):
    """``obj`` with transformers 5.x's encoding of non-finite floats undone.

    JSON has no Infinity or NaN: transformers 5 writes them as ``{"__float__": "Infinity"}``
    (4.x wrote the non-standard bare ``Infinity``, which ``json.loads`` reads directly). This
    is how transformers reads them back: a dict whose only key is ``__float__`` with a known tag.
    """
    if isinstance(obj, dict):
        if set(obj) == {"__float__"} and obj["__float__"] in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[obj["__float__"]]
        return {k: decode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_special_floats(v) for v in obj]
    return obj


def _time_step_limit(value, field: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise MambaLoadError(f"config.json {field}={value!r} is not a pair (min, max)")
    return tuple(float("inf") if x is None else float(x) for x in value)


def config_from_hf(d: dict) -> MambaConfig:
    """Our ``MambaConfig`` for a transformers ``config.json`` (already parsed), read as
    transformers reads it: non-finite floats decoded, its defaults for absent fields."""
    mt = d.get("model_type")
    if mt not in HF_FIELDS:
        raise MambaLoadError(f"config.json model_type {mt!r} is not a Mamba model ('mamba' or 'mamba2')")
    d = {**HF_DEFAULTS[mt], **decode_special_floats(d)}
    if d["hidden_act"] not in SILU_NAMES:
        raise MambaLoadError(f"config.json hidden_act={d['hidden_act']!r} is not supported: only 'silu'")
    common = dict(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
                  state_size=d["state_size"], expand=d["expand"], conv_kernel=d["conv_kernel"],
                  use_bias=d["use_bias"], use_conv_bias=d["use_conv_bias"], norm_eps=d["layer_norm_epsilon"],
                  residual_in_fp32=d["residual_in_fp32"], tie_embeddings=d["tie_word_embeddings"],
                  tokenizer=d.get("archquant_tokenizer", "auto"))
    if mt == "mamba":
        rank = d["time_step_rank"]
        cfg = MambaConfig(arch="mamba1", dt_rank=0 if rank == "auto" else int(rank), **common)
        inter = d.get("intermediate_size")
        if inter is not None and int(inter) != cfg.d_inner:
            raise MambaLoadError(f"config.json intermediate_size={inter} != expand*hidden_size={cfg.d_inner}")
        return cfg
    cfg = MambaConfig(arch="mamba2", head_dim=d["head_dim"], n_groups=d["n_groups"], chunk_size=d["chunk_size"],
                      time_step_limit=_time_step_limit(d["time_step_limit"], "time_step_limit"), **common)
    nh = d["num_heads"]
    if int(nh) * cfg.head_dim != cfg.d_inner:
        raise MambaLoadError(f"config.json num_heads*head_dim={int(nh) * cfg.head_dim} != "
                             f"expand*hidden_size={cfg.d_inner}")
    if cfg.num_heads % cfg.n_groups:
        raise MambaLoadError(f"config.json num_heads={cfg.num_heads} is not a multiple of n_groups={cfg.n_groups}")
    return cfg


def hf_config_dict(cfg: MambaConfig) -> dict:
    """The HF ``config.json`` for ``cfg`` (``MambaForCausalLM`` / ``Mamba2ForCausalLM`` load it)."""
    d = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
         "state_size": cfg.state_size, "expand": cfg.expand, "conv_kernel": cfg.conv_kernel,
         "use_bias": cfg.use_bias, "use_conv_bias": cfg.use_conv_bias, "layer_norm_epsilon": cfg.norm_eps,
         "residual_in_fp32": cfg.residual_in_fp32, "tie_word_embeddings": cfg.tie_embeddings,
         "hidden_act": "silu", "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0,
         "archquant_tokenizer": cfg.tokenizer}
    if cfg.arch == "mamba1":
        d.update(model_type="mamba", architectures=["MambaForCausalLM"], time_step_rank=cfg.dt_rank,
                 intermediate_size=cfg.d_inner)
    else:
        d.update(model_type="mamba2", architectures=["Mamba2ForCausalLM"], head_dim=cfg.head_dim,
                 num_heads=cfg.num_heads, n_groups=cfg.n_groups, chunk_size=cfg.chunk_size,
                 time_step_limit=[float(x) for x in cfg.time_step_limit])  # json writes inf as Infinity, as HF does
    return d


#: the tokenizer every state-spaces mamba_ssm checkpoint was trained with (their configs do not say)
MAMBA_SSM_TOKENIZER = "EleutherAI/gpt-neox-20b"


def config_from_mamba_ssm(d: dict, state: dict) -> MambaConfig:
    ssm_cfg = dict(d.get("ssm_cfg") or {})
    layer = ssm_cfg.pop("layer", "Mamba1")
    emb = state.get("backbone.embedding.weight")
    if emb is None:
        raise MambaLoadError("mamba_ssm checkpoint has no 'backbone.embedding.weight'")
    vocab = emb.shape[0]  # already padded to pad_vocab_size_multiple
    common = dict(vocab_size=vocab, hidden_size=d["d_model"], num_layers=d["n_layer"],
                  norm_eps=d.get("norm_epsilon", 1e-5), residual_in_fp32=d.get("residual_in_fp32", True),
                  tie_embeddings=d.get("tie_embeddings", True), tokenizer=MAMBA_SSM_TOKENIZER,
                  state_size=ssm_cfg.get("d_state", 16 if layer == "Mamba1" else 128),
                  expand=ssm_cfg.get("expand", 2), conv_kernel=ssm_cfg.get("d_conv", 4),
                  use_bias=ssm_cfg.get("bias", False), use_conv_bias=ssm_cfg.get("conv_bias", True))
    if d.get("attn_layer_idx"):
        raise MambaLoadError("hybrid attention layers (attn_layer_idx) are not supported")
    if d.get("d_intermediate", 0):
        raise MambaLoadError(f"mamba_ssm d_intermediate={d['d_intermediate']} (MLP blocks) is not supported")
    if not d.get("rms_norm", True):
        raise MambaLoadError("mamba_ssm rms_norm=false (LayerNorm blocks) is not supported")
    if layer == "Mamba1":
        rank = ssm_cfg.get("dt_rank", "auto")
        return MambaConfig(arch="mamba1", dt_rank=0 if rank == "auto" else int(rank), **common)
    if layer == "Mamba2":
        d_inner = common["expand"] * common["hidden_size"]
        d_ssm = ssm_cfg.get("d_ssm")
        if d_ssm is not None and int(d_ssm) != d_inner:
            raise MambaLoadError(f"mamba_ssm Mamba2 d_ssm={d_ssm} != d_inner={d_inner} (an MLP part in in_proj) "
                                 "is not supported")
        for key, default in (("rmsnorm", True), ("norm_before_gate", False), ("D_has_hdim", False)):
            if bool(ssm_cfg.get(key, default)) != default:
                raise MambaLoadError(f"mamba_ssm Mamba2 {key}={ssm_cfg[key]!r} is not supported")
        limit = _time_step_limit(ssm_cfg.get("dt_limit", (0.0, float("inf"))), "ssm_cfg.dt_limit")
        return MambaConfig(arch="mamba2", head_dim=ssm_cfg.get("headdim", 64), n_groups=ssm_cfg.get("ngroups", 1),
                           chunk_size=ssm_cfg.get("chunk_size", 256), time_step_limit=limit, **common)
    raise MambaLoadError(f"mamba_ssm ssm_cfg.layer {layer!r} not supported: 'Mamba1' or 'Mamba2'")


# ----------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    state = _read_weight_files(directory)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise MambaLoadError(f"weights in {directory} are not a state dict of named tensors")
    return state


def _read_weight_files(directory: Path):
    st, idx, binf = directory / "model.safetensors", directory / "model.safetensors.index.json", directory / "pytorch_model.bin"
    current = directory  # the file being read, named in the error
    try:
        if st.is_file():
            current = st
            return load_file(str(st))
        if idx.is_file():
            current = idx
            weight_map = json.loads(idx.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
            state = {}
            for shard in shards:
                current = directory / shard
                if Path(shard).name != shard:
                    raise ValueError(f"shard name {shard!r} is not a file name in the checkpoint directory")
                state.update(load_file(str(current)))
            return state
        if binf.is_file():
            current = binf
            return torch.load(str(binf), map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, KeyError, ValueError, TypeError, AttributeError, EOFError,
            pickle.UnpicklingError) as e:
        msg = str(e).strip()
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in msg:
            raise MambaLoadError(f"cannot read weights {current}: it cannot be read safely as a weights-only "
                                 f"checkpoint ({_unpickler_detail(msg)}); archquant never unpickles code") from None
        if isinstance(e, KeyError):
            msg = f"no field {msg}"
        first = msg.splitlines()[0] if msg else type(e).__name__
        raise MambaLoadError(f"cannot read weights {current}: {type(e).__name__}: {first}") from None
    raise MambaLoadError(f"no weights in {directory}: expected model.safetensors, an index, or pytorch_model.bin")


def _unpickler_detail(msg: str) -> str:
    """What torch's weights-only unpickler refused (e.g. "Unsupported global: GLOBAL x.Y"), without
    torch's advice around it: that advice is to load the file as code (``weights_only=False``)."""
    _, found, rest = msg.partition("WeightsUnpickler error:")
    paragraphs = [" ".join(p.split()) for p in rest.split("\n\n") if p.strip()] if found else []
    detail = paragraphs[0] if paragraphs else ""
    detail = detail.split(" was not an allowed global")[0].split(". Please")[0].rstrip(".")
    if not detail or "weights_only" in detail:
        return "not a plain tensor file"
    return detail


def _resolve(path: str) -> Path:
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise MambaLoadError(f"model.path {path} is a file: expected a checkpoint directory")
        return p
    if path.count("/") == 1 and not path.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            # huggingface_hub reads HF_HUB_OFFLINE once, at import: look at it again here
            offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
            return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"],
                                          local_files_only=offline))
        except Exception as e:  # offline, unknown repo, …
            raise MambaLoadError(f"model {path!r} is not a local directory and cannot be downloaded from the hub "
                                 f"({type(e).__name__}); pass a local checkpoint directory instead") from None
    raise MambaLoadError(f"model directory not found: {path}")


#: files that make a directory a tokenizer directory (``AutoTokenizer.from_pretrained`` reads them)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def resolve_tokenizer(explicit: str | None, directory: Path, config_default: str) -> str:
    """The tokenizer a checkpoint's token ids mean, first found of: ``explicit`` (the user's
    ``model.options.tokenizer``: "bytes", a directory or a hub id); a tokenizer saved in the model
    directory; the config's own (``archquant_tokenizer``, or gpt-neox for mamba_ssm checkpoints).
    With none of these ("auto"), the model directory: loading a tokenizer from it then fails
    saying that it has none, which is where the user would look."""
    if explicit is not None:
        if not isinstance(explicit, str) or not explicit.strip():
            raise MambaLoadError(f"tokenizer {explicit!r} is not a name: 'bytes', a tokenizer directory or a hub id")
        return explicit
    if any((directory / name).is_file() for name in TOKENIZER_FILES):
        return str(directory)
    return str(directory) if config_default == "auto" else config_default


def load_mamba(path: str, dtype: torch.dtype = torch.float32, tokenizer: str | None = None) -> MambaLM:
    """Load an HF or mamba_ssm Mamba1/Mamba2 checkpoint directory (or hub id) as a ``MambaLM``.

    ``tokenizer`` overrides the tokenizer the checkpoint implies; the one used is recorded in
    ``model.config.tokenizer`` (see ``resolve_tokenizer``)."""
    directory = _resolve(path)
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise MambaLoadError(f"no config.json in {directory}")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MambaLoadError(f"corrupt {cfg_file}: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise MambaLoadError(f"cannot read {cfg_file}: {type(e).__name__}") from None
    if not isinstance(raw, dict):
        raise MambaLoadError(f"corrupt {cfg_file}: expected a JSON object, got {type(raw).__name__}")
    try:
        if "model_type" in raw:
            cfg = config_from_hf(raw)  # before the weights: a wrong model_type is the first thing to report
            state = _read_weights(directory)
        elif "d_model" in raw and "n_layer" in raw:
            state = _read_weights(directory)
            cfg = config_from_mamba_ssm(raw, state)
            state = {("backbone.embeddings.weight" if k == "backbone.embedding.weight" else k): v
                     for k, v in state.items()}
        else:
            raise MambaLoadError(f"{cfg_file} is neither an HF Mamba config (model_type) "
                                 "nor a mamba_ssm one (d_model, n_layer)")
    except MambaLoadError as e:
        if str(cfg_file) in str(e) or str(directory) in str(e):
            raise
        msg = str(e)
        raise MambaLoadError(f"{cfg_file}{msg[len('config.json'):]}" if msg.startswith("config.json ")
                             else f"{cfg_file}: {msg}") from None
    except KeyError as e:
        raise MambaLoadError(f"{cfg_file} lacks the field {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as e:  # MambaConfig's own checks, wrong value types
        raise MambaLoadError(f"{cfg_file} is not a valid Mamba config: {str(e).splitlines()[0]}") from None
    cfg.tokenizer = resolve_tokenizer(tokenizer, directory, cfg.tokenizer)
    model = MambaLM(cfg)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise MambaLoadError(f"weights in {directory} do not match its config.json: {what} "
                             f"({len(missing)} missing, {len(unexpected)} unexpected)")
    own = model.state_dict()
    for k, v in state.items():
        want = own[k].shape
        if tuple(v.shape) != tuple(want):
            raise MambaLoadError(f"weights in {directory}: {k} has shape {tuple(v.shape)}, config says {tuple(want)}")
        if own[k].is_floating_point() and not v.is_floating_point():  # float16 → float32 is a cast; int32 is not
            raise MambaLoadError(f"weights in {directory}: {k} is stored as {str(v.dtype).removeprefix('torch.')}, "
                                 "expected a floating-point tensor")
        if v.is_floating_point() and not bool(torch.isfinite(v.float() if v.element_size() == 1 else v).all()):
            raise MambaLoadError(f"weights in {directory}: {k} holds NaN or Inf values")
    model.load_state_dict(state, strict=False)
    return model.to(dtype).eval()


def save_mamba_hf(model: MambaLM, directory: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in HF transformers format."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not (model.config.tie_embeddings and k == "lm_head.weight")}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config_dict(model.config), indent=2) + "\n")
    return directory
