#!/usr/bin/env bash
# One call on a lent GPU machine (torch, triton, pytest, ninja preinstalled; no downloads):
# build the CUDA kernels, run the GPU tests (CUDA + Triton natively), a compute-sanitizer memcheck
# on a small case, and the GPU benchmark.  Everything lands in $OUT (or the folder given as $1):
# copy it into bench/results/<card>/ afterwards — the machine keeps nothing.
# Each stage has its own time limit so the whole run stays under ~8 minutes on an H100; a stage
# that fails is recorded in summary.txt and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-bench/results/gpu-run}}"
mkdir -p "$OUT"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export MARGINOPS_CACHE_DIR="${MARGINOPS_CACHE_DIR:-/tmp/marginops-cache}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc ($((SECONDS - start)) s)" | tee -a "$SUMMARY"
  tail -n 3 "$OUT/$name.log" | sed 's/^/    /' >> "$SUMMARY"
}

{ nvidia-smi; python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"; } > "$OUT/device.txt" 2>&1
head -n 20 "$OUT/device.txt" >> "$SUMMARY"

stage build 240 python -m marginops.build --cuda --verbose
# --maxfail rather than -x: on a first GPU run every failure is worth seeing
stage tests_cuda 150 python -m pytest -q --maxfail=25 tests/test_cuda_op.py tests/test_loss.py tests/test_op_registration.py tests/test_margin_zoo.py -k "cuda" --junitxml="$OUT/tests_cuda.xml"
# correctness does not need the autotuner: pin the first config so the tests do not compile them all
MARGINOPS_TRITON_AUTOTUNE=0 stage tests_triton 150 python -m pytest -q --maxfail=25 tests/test_triton_op.py tests/test_loss.py tests/test_op_registration.py -k "triton" --junitxml="$OUT/tests_triton.xml"
if command -v compute-sanitizer >/dev/null; then
  export MARGINOPS_TEST_COMPUTE_SANITIZER=1
  stage memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 1 \
    python -m pytest -q tests/test_cuda_op.py -k compute_sanitizer
  unset MARGINOPS_TEST_COMPUTE_SANITIZER
else
  echo "memcheck: compute-sanitizer not found" >> "$SUMMARY"
fi
# the issue's performance point: B=1024, D=512, C=1M, bf16, fwd+bwd, against the 3 plain matmuls and the reference
stage bench_1m 150 python -m bench --device cuda --sizes 1024x1000000x512 --dtype bfloat16 --margins arcface \
  --backends reference,cuda,triton,matmul --repeats 5 --out "$OUT" --no-plot
# C = 4M, where the reference runs out of memory
stage bench_4m 120 python -m bench --device cuda --sizes 1024x4000000x512 --dtype bfloat16 --margins arcface \
  --backends reference,cuda,triton,matmul --repeats 3 --out "$OUT" --no-plot
echo "done; results in $OUT" | tee -a "$SUMMARY"
