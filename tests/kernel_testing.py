"""Shared scaffolding of the Triton kernel tests: device choice, skip markers, sm_90 AOT check."""
import os
import subprocess
import sys

import pytest
import torch

from archquant.kernels._triton_utils import INTERPRET_MODE

DEVICE = "cpu" if INTERPRET_MODE else "cuda"
#: module-level mark: the kernels need the interpreter (CPU) or a GPU
requires_backend = pytest.mark.skipif(
    not INTERPRET_MODE and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 (set before importing triton) or a CUDA device",
)
needs_gpu = pytest.mark.skipif(
    INTERPRET_MODE or not torch.cuda.is_available(),
    reason="needs a CUDA device and TRITON_INTERPRET=0",
)


# The interpreter never compiles a kernel.  Triton can compile for a GPU target without a GPU
# (its wheel bundles ptxas), which catches what only the NVIDIA backend checks: dot sizes,
# type/layout errors, register spills.  Run in a subprocess because this process decorated
# the kernels in interpreter mode.
AOT_HELPER = r'''
import os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = triton.compiler.make_backend(TARGET)


def aot(kernel, consts, ptr_types=None, ones=(), num_warps=4, num_stages=3):
    """Compile for sm_90 with the launch-time specialisations (args == 1 -> constexpr)."""
    sig, cx = {}, {}
    for nm in kernel.arg_names:
        if nm in consts:
            sig[nm], cx[nm] = "constexpr", consts[nm]
        elif nm in ones:
            sig[nm], cx[nm] = "constexpr", 1
        elif nm.endswith("_ptr"):
            sig[nm] = "*" + (ptr_types or {}).get(nm, "fp32")
        else:
            sig[nm] = "i32"
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=cx)
    opts = BACKEND.parse_options(dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=False))
    k = triton.compile(src, target=TARGET, options=opts.__dict__)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    stack = 0
    if os.path.exists(cuobjdump):
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        m = re.search(r"STACK:(\d+)", out)
        stack = int(m.group(1)) if m else 0
    assert stack == 0, f"{kernel.__name__} {consts}: {stack} bytes of register spills"
    return k
'''


def run_aot(tmp_path, body):
    script = tmp_path / "aot_check.py"
    script.write_text(AOT_HELPER + body + "\nprint('AOT_OK')\n")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"),
               TRITON_DEFAULT_FP_FUSION="0")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=240)
    if res.returncode != 0 and ("ptxas" in res.stderr and "not found" in res.stderr.lower()):
        pytest.skip("no ptxas for the sm_90 AOT compile")
    assert res.returncode == 0 and "AOT_OK" in res.stdout, res.stderr[-3000:]
