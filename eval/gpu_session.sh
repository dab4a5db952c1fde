#!/usr/bin/env bash
# Everything a GPU session should run, in one command (H100/H200, nothing downloaded):
# install, the end-to-end benchmark, the kernel benchmark (each checks its results against
# references before timing), then the test files that exercise kernels on the GPU.
# Logs and result tables land in $OUT (the device tool brings them back):
#     device run:  bash eval/gpu_session.sh          (timeout_s 600; stages are time-boxed below)
# Then copy $OUT/gpu_kernels.md and $OUT/e2e.md to eval/results/ (with the device named).
# The device image has torch, triton, safetensors, scikit-learn and tqdm; the benchmarks and
# these tests need nothing else (omegaconf is only needed by the runner).
set -u -o pipefail
OUT=${OUT:-/tmp/archquant_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
SECONDS=0
stage() { echo "== $1 (t=${SECONDS}s)" | tee -a "$OUT/summary.txt"; }

stage install
if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1; then
  # fallback without pip: the archquant namespace as links (models/ and eval/ map into it)
  echo "pip install failed (see install.log); using a linked package on PYTHONPATH" | tee -a "$OUT/summary.txt"
  mkdir -p /tmp/aq_pkg/archquant
  for f in "$PWD"/archquant/*; do ln -sfn "$f" /tmp/aq_pkg/archquant/; done
  for d in models eval; do ln -sfn "$PWD/$d" "/tmp/aq_pkg/archquant/$d"; done
  export PYTHONPATH=/tmp/aq_pkg${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import archquant.eval.bench_e2e" || { echo "archquant does not import" | tee -a "$OUT/summary.txt"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  | tee -a "$OUT/summary.txt"

stage "end-to-end benchmark"
timeout 200 python3 -m archquant.eval.bench_e2e --write "$OUT/e2e.md" >"$OUT/bench_e2e.log" 2>&1
echo "e2e exit $?" | tee -a "$OUT/summary.txt"; tail -25 "$OUT/bench_e2e.log" | tee -a "$OUT/summary.txt"

stage "kernel benchmark"
timeout 200 python3 -m archquant.eval.bench_gpu --rep 40 --write "$OUT/gpu_kernels.md" >"$OUT/bench_gpu.log" 2>&1
echo "kernels exit $?" | tee -a "$OUT/summary.txt"; tail -5 "$OUT/bench_gpu.log" | tee -a "$OUT/summary.txt"
stage "GPU tests"  # last: both benchmarks check results before timing; sm_90 AOT compile checks skipped (they run on the CPU)
timeout 180 python3 -m pytest -q -p no:cacheprovider -k "not sm90" \
  tests/test_kernels_quantize.py tests/test_kernels_gemm.py tests/test_kernels_hadamard.py \
  tests/test_kernels_mamba.py tests/test_kernels_w4.py tests/test_kernels_rmsnorm.py tests/test_real_mamba.py \
  tests/test_mamba_decode.py tests/test_kernels_dispatch.py \
  >"$OUT/gpu_tests.log" 2>&1
echo "tests exit $?" | tee -a "$OUT/summary.txt"; tail -15 "$OUT/gpu_tests.log" | tee -a "$OUT/summary.txt"

stage done
