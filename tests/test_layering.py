"""Layering: kernels import no model code, and importing archquant (or a family's adapter) loads
no Triton kernel: the backends load only when a model is converted or fused.

The import checks run in fresh interpreters: this test process has long imported everything.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNEL_FILES = sorted((ROOT / "archquant" / "kernels").glob("*.py"))
#: what kernels/ must not import: model code and family adapters (absolute or relative spellings)
FORBIDDEN = ("archquant.models", "models", "archquant.adapters", "adapters")


def imported_modules(path: Path) -> list[str]:
    """Every module an ``import`` / ``from ... import`` in ``path`` names, relative ones resolved
    against the package the file installs as (kernels/ is ``archquant.kernels``), anywhere in the
    file (function-level imports included). ``from X import name`` yields X and X.name."""
    package = ["archquant", path.parent.name]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:max(0, len(package) - (node.level - 1))]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append(module)
            found += [f"{module}.{alias.name}" for alias in node.names]
    return found


def _forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def test_the_walk_sees_every_import_spelling(tmp_path):
    """The checker itself: absolute, relative (.., ...) and nested imports of model code are found."""
    pkg = tmp_path / "kernels"
    pkg.mkdir()
    cases = {"import archquant.models.mamba": True, "from archquant.models import mamba": True,
             "from ..models.layers import rms_norm": True, "from .. import models": True,
             "from ..adapters import mamba": True, "import models.layers": True,
             "def f():\n    from archquant.adapters.mamba import x": True,
             "from ._triton_utils import next_pow2": False, "from archquant.core.formats import quantize": False,
             "import torch": False}
    for i, (src, bad) in enumerate(cases.items()):
        f = pkg / f"case{i}.py"
        f.write_text(src + "\n")
        assert any(map(_forbidden, imported_modules(f))) is bad, src


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.name)
def test_kernels_import_no_model_or_adapter_code(path):
    bad = [m for m in imported_modules(path) if _forbidden(m)]
    assert not bad, f"kernels/{path.name} imports {bad}"


def _loaded_after(code: str) -> list[str]:
    """triton and archquant modules loaded by ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint(sorted(m for m in sys.modules if m.split('.')[0] in ('triton', 'archquant')))"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    return eval(res.stdout.strip().splitlines()[-1])  # a printed list of str


def test_import_archquant_loads_no_triton_and_no_family():
    loaded = _loaded_after("import archquant")
    assert "triton" not in loaded
    assert not [m for m in loaded if m.startswith(("archquant.adapters.mamba", "archquant.models.mamba"))], loaded


def test_mamba_adapter_loads_no_triton():
    loaded = _loaded_after("from archquant.adapters import get_adapter\nget_adapter('mamba')")
    assert "archquant.adapters.mamba" in loaded  # the probe sees what it looks for
    assert not [m for m in loaded if m == "triton" or m.startswith(("triton.", "archquant.kernels.",
                                                                     "archquant.backends."))], loaded


def test_the_backend_package_loads_no_family_and_no_triton():
    loaded = _loaded_after("import archquant.backends")
    assert not [m for m in loaded if m == "triton" or m.startswith(("triton.", "archquant.backends.mamba",
                                                                     "archquant.models.mamba"))], loaded


def test_conversion_loads_the_family_backend_on_demand():
    """The other side: converting a Mamba model imports its backend (and so the kernels)."""
    loaded = _loaded_after("import torch\nfrom archquant.models.mamba import MambaConfig, MambaLM\n"
                           "from archquant.backends import convert_to_real\n"
                           "convert_to_real(MambaLM(MambaConfig(hidden_size=16, num_layers=1)))")
    assert "archquant.backends.mamba" in loaded and "triton" in loaded


def test_run_from_the_repository_root_transformers_finds_its_own_kernels_package():
    """``python -m`` from the root puts the root first on sys.path; nothing there may shadow a
    package our dependencies import (transformers 5.x imports Hugging Face's ``kernels`` with its
    model code, and a top-level ``kernels/`` of ours broke every transformers model import)."""
    code = ("import importlib.util, transformers.activations; spec = importlib.util.find_spec('kernels'); "
            "print(spec.origin if spec else None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert not out.stdout.strip().startswith(str(ROOT) + "/kernels"), out.stdout
