#!/usr/bin/env bash
# Everything a GPU session should run, in one command (H100/H200, nothing downloaded):
# install, the end-to-end benchmark, the kernel benchmark, the DiT denoising-step benchmark, the
# VGGT aggregator benchmark (each checks its results against references before timing), then the
# test files that exercise kernels on the GPU. Logs and result tables land in $OUT (the device tool
# brings them back):
#     device run:  bash eval/gpu_session.sh          (timeout_s 600; stages are time-boxed below)
# Then copy $OUT/gpu_kernels.md, $OUT/e2e.md and $OUT/dit_gpu.md to eval/results/ (with the device
# named). The device tool brings back 8 files at most: this script writes exactly 8. The Wan and
# VGGT stages add none: their logs stay in /tmp (their last lines go to summary.txt) and their
# tables are appended to dit_gpu.md, which so holds the DiT, Wan and VGGT tables.
# The device image has torch, triton, safetensors, scikit-learn and tqdm; the benchmarks and
# these tests need nothing else (omegaconf is only needed by the runner), except the DiT step
# benchmark, which builds a diffusers DiTTransformer2DModel: diffusers is not in the image. Carry
# its wheel (pure Python; its other requirements are in the image) in .whl/, named in the run's
# carry, and this script installs every wheel there first. Once, on the developer machine:
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1
# Without it the DiT stage stops at once with a one-line error in bench_dit.log.
set -u -o pipefail
OUT=${OUT:-/tmp/archquant_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
SECONDS=0
# One budget for the whole command (the device run is killed at 600 s, and everything after that
# is lost): each stage gets its own cap or what is left of the budget, whichever is less, so a
# slow stage shortens the later ones instead of the run overrunning.
BUDGET=${BUDGET:-570}
stage() { echo "== $1 (t=${SECONDS}s)" | tee -a "$OUT/summary.txt"; }
boxed() {  # boxed CAP LOG CMD...: run CMD under timeout min(CAP, budget left), output to LOG
  local cap=$1 log=$2; shift 2
  local left=$((BUDGET - SECONDS))
  local box=$((cap < left ? cap : left))
  if ((box < 20)); then
    echo "skipped: ${left}s of the ${BUDGET}s budget left" | tee "$log"
    return 124
  fi
  timeout "$box" "$@" >"$log" 2>&1
}

stage install
if compgen -G ".whl/*.whl" >/dev/null; then  # carried wheels (diffusers), see the header
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/aq_site \
    .whl/*.whl >>"$OUT/summary.txt" 2>&1 && export PYTHONPATH=/tmp/aq_site${PYTHONPATH:+:$PYTHONPATH}
  echo "carried wheels: $(cd .whl && ls *.whl | tr '\n' ' ')" | tee -a "$OUT/summary.txt"
fi
if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$OUT/summary.txt" 2>&1; then
  # fallback without pip: the archquant namespace as links (models/ and eval/ map into it)
  echo "pip install failed (pip's output above); using a linked package on PYTHONPATH" | tee -a "$OUT/summary.txt"
  mkdir -p /tmp/aq_pkg/archquant
  for f in "$PWD"/archquant/*; do ln -sfn "$f" /tmp/aq_pkg/archquant/; done
  for d in models eval; do ln -sfn "$PWD/$d" "/tmp/aq_pkg/archquant/$d"; done
  export PYTHONPATH=/tmp/aq_pkg${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import archquant.eval.bench_e2e" || { echo "archquant does not import" | tee -a "$OUT/summary.txt"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "import diffusers; print('diffusers', diffusers.__version__)" 2>/dev/null || echo "no diffusers"; } \
  | tee -a "$OUT/summary.txt"

stage "end-to-end benchmark"
boxed 200 "$OUT/bench_e2e.log" python3 -m archquant.eval.bench_e2e --write "$OUT/e2e.md"
echo "e2e exit $?" | tee -a "$OUT/summary.txt"; tail -25 "$OUT/bench_e2e.log" | tee -a "$OUT/summary.txt"

stage "kernel benchmark"
boxed 200 "$OUT/bench_gpu.log" python3 -m archquant.eval.bench_gpu --rep 40 --write "$OUT/gpu_kernels.md"
echo "kernels exit $?" | tee -a "$OUT/summary.txt"; tail -5 "$OUT/bench_gpu.log" | tee -a "$OUT/summary.txt"

stage "DiT step benchmark"  # DiT-XL/2, batches 2 and 8: bf16 vs W8A8 (+ fused Hadamard); models built on the CPU first
boxed 120 "$OUT/bench_dit.log" python3 -m archquant.eval.bench_dit --device cuda --write "$OUT/dit_gpu.md"
echo "dit exit $?" | tee -a "$OUT/summary.txt"; tail -16 "$OUT/bench_dit.log" | tee -a "$OUT/summary.txt"

stage "Wan step benchmark"  # Wan 2.1 1.3B shapes, batch 1 (WanPipeline's two calls per step): bf16 vs W8A8;
# quarot's fold of the 8960-wide ffn input would take minutes on the CPU side, so W8A8 only. Its table is
# appended to dit_gpu.md (the device tool brings back 8 files, and this script writes 8).
boxed 100 /tmp/bench_wan.log python3 -m archquant.eval.bench_dit --device cuda --shapes wan --batch 1 \
  --variants w8a8 --write /tmp/wan_gpu.md
echo "wan exit $?" | tee -a "$OUT/summary.txt"; tail -12 /tmp/bench_wan.log | tee -a "$OUT/summary.txt"
[ -f /tmp/wan_gpu.md ] && { echo; cat /tmp/wan_gpu.md; } >>"$OUT/dit_gpu.md"

stage "VGGT aggregator benchmark"  # VGGT-1B shapes (24 frame + 24 global blocks, DINOv2 ViT-L/14 embedder),
# 10 frames at 518 px = 13740 tokens, batch 1: bf16 vs W8A8 real (rtn_dynamic); needs no carried wheel; models
# built and quantized on the GPU. Its table is appended to dit_gpu.md (8 files come back, and this script writes 8).
boxed 120 /tmp/bench_vggt.log python3 -m archquant.eval.bench_vggt --device cuda --repeats 20 --write /tmp/vggt_gpu.md
echo "vggt exit $?" | tee -a "$OUT/summary.txt"; tail -14 /tmp/bench_vggt.log | tee -a "$OUT/summary.txt"
[ -f /tmp/vggt_gpu.md ] && { echo; cat /tmp/vggt_gpu.md; } >>"$OUT/dit_gpu.md"

# last: the benchmarks check results before timing; sm_90 AOT compile checks skipped (they run on the CPU)
stage "GPU tests"
boxed 180 "$OUT/gpu_tests.log" python3 -m pytest -q -p no:cacheprovider -k "not sm90" \
  tests/test_kernels_quantize.py tests/test_kernels_gemm.py tests/test_kernels_hadamard.py \
  tests/test_kernels_mamba.py tests/test_kernels_w4.py tests/test_kernels_rmsnorm.py tests/test_real_mamba.py \
  tests/test_mamba_decode.py tests/test_kernels_dispatch.py
echo "tests exit $?" | tee -a "$OUT/summary.txt"; tail -15 "$OUT/gpu_tests.log" | tee -a "$OUT/summary.txt"

stage done
