"""Reading the files of a diffusers / transformers pipeline folder: one-line errors naming the file,
and safetensors only (a component that has only pickled weights is refused, never unpickled)."""
from __future__ import annotations

import json
from pathlib import Path


def read_json(path: Path, what: str) -> dict:
    """The JSON object in ``path``; FileNotFoundError / ValueError naming ``what`` and the file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def require_safetensors(folder: Path, what: str) -> None:
    """Refuse a component folder without ``*.safetensors`` weights, naming a pickled file if it has one."""
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.glob("*.bin"))
    if pickled:
        raise ValueError(f"the {what} in {folder} has only pickled weights ({pickled[0]}); archquant loads "
                         "safetensors only: re-save it with save_pretrained(..., safe_serialization=True)")
    raise FileNotFoundError(f"no weights (*.safetensors) for the {what} in {folder}")
