#!/usr/bin/env bash
# The one command for a lent GPU machine (torch, triton, pytest and ninja preinstalled; nothing is
# downloaded; the package runs from this checkout):
#
#   bash bench/gpu_check.sh OUT          # the run (OUT defaults to $OUT, else bench/results/gpu-run)
#   bash bench/gpu_check.sh --plan       # print the stages and their time limits, run nothing
#   bash bench/gpu_check.sh --dry OUT    # no GPU needed: collect each test stage, run each bench stage
#                                        # at a tiny CPU size, skip build and memcheck (checks the script)
#
# Correctness first (CUDA build, CUDA and Triton op tests, compute-sanitizer memcheck), then the
# benchmark at the headline size (B=1024, C=1M, D=512, bf16, fwd+bwd), then larger sizes while time
# remains.  Every stage has its own limit and the limits add up to BUDGET_S (450 s): a stage is cut to
# what is left of the budget and skipped when less than its minimum remains.
#
# What comes back is two files in OUT, rewritten after every stage so that a run cut short still
# returns everything finished so far: summary.txt (device, one line per stage with its exit code and
# time, the tail of a failing stage) and gpu_check.tar.gz (every stage's full log and the benchmark
# CSVs).  Unpack with: mkdir -p bench/results/<card> && tar -xzf OUT/gpu_check.tar.gz -C bench/results/<card>
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET_S=450
# name:limit_seconds:minimum_seconds — the order is the run order; limits sum to BUDGET_S
STAGES=(
  "env:15:5"
  "build:80:60"
  "tests_cuda:45:20"
  "tests_triton:45:20"
  "memcheck:25:15"
  "bench_1m:120:40"
  "bench_chunks:30:20"
  "profile:45:15"
  "bench_4m:45:20"
)

plan() {
  local total=0 entry name limit minimum
  for entry in "${STAGES[@]}"; do
    IFS=: read -r name limit minimum <<< "$entry"
    printf '%s %s %s\n' "$name" "$limit" "$minimum"
    total=$((total + limit))
  done
  printf 'total %s budget %s\n' "$total" "$BUDGET_S"
}

DRY=0
case "${1:-}" in
  --plan) plan; exit 0 ;;
  --dry) DRY=1; shift ;;
esac
OUT="${1:-${OUT:-bench/results/gpu-run}}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
SUMMARY="$OUT/summary.txt"
ARCHIVE="$OUT/gpu_check.tar.gz"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export MARGINOPS_CACHE_DIR="${MARGINOPS_CACHE_DIR:-$WORK/cache}"
# correctness does not need the Triton autotuner: the first configuration of each kernel is tested
export MARGINOPS_TRITON_AUTOTUNE=0
PY="${PYTHON:-python}"
START=$SECONDS

: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

pack() {  # the archive holds $WORK/results (logs, CSVs) and a copy of the summary; written atomically
  cp "$SUMMARY" "$WORK/results/summary.txt"
  tar -czf "$ARCHIVE.part" -C "$WORK/results" . && mv -f "$ARCHIVE.part" "$ARCHIVE"
}

mkdir -p "$WORK/results"
note "gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC') budget ${BUDGET_S}s$([ $DRY = 1 ] && echo ' (dry run)')"

# -------------------------------------------------------------------------------------------------
# Is there a GPU?  Without one (and without --dry) say so and stop: nothing here can be measured.
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2> "$WORK/results/probe.log"; then
  if [ $DRY = 0 ]; then
    note "no CUDA device visible to torch ($("$PY" -c 'import torch; print("torch", torch.__version__)' 2>&1 | tail -n 1)): nothing to run; --dry checks the script without a GPU"
    pack
    exit 0
  fi
  note "no CUDA device: dry run (tests collected, not run; benchmarks at a tiny CPU size)"
  DEVICE=cpu
else
  DEVICE=cuda
fi

# The benchmark's providers: the chunked and fused paths side by side, the anchors, whichever exist.
BACKENDS="$("$PY" - <<'EOF' 2>/dev/null || echo reference,cuda,triton,matmul
import sys
sys.path.insert(0, ".")
from bench.providers import PROVIDERS
wanted = ["reference", "insightface", "cuda", "cuda_mixed", "cuda_fused", "triton", "triton_onepass", "hybrid",
          "hybrid_mixed", "matmul"]
print(",".join(p for p in wanted if p in PROVIDERS))
EOF
)"

# -------------------------------------------------------------------------------------------------
stage_limit() {  # name -> "limit minimum"
  local entry name limit minimum
  for entry in "${STAGES[@]}"; do
    IFS=: read -r name limit minimum <<< "$entry"
    [ "$name" = "$1" ] && { echo "$limit $minimum"; return; }
  done
  echo "0 0"
}

stage() {  # stage NAME COMMAND...: run under min(limit, what is left of the budget)
  local name=$1; shift
  local limit minimum left start rc
  read -r limit minimum <<< "$(stage_limit "$name")"
  if [ $DRY = 1 ]; then
    # the limits are the GPU run's; a dry run's CPU stages on a busy machine (CI's heavy tests) take longer
    limit=$((4 * limit)); left=$((4 * BUDGET_S - (SECONDS - START)))
  else
    left=$((BUDGET_S - (SECONDS - START)))
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt "$minimum" ]; then
    note "$name: skipped (${left}s of the budget left, needs ${minimum}s)"
    pack
    return
  fi
  start=$SECONDS
  timeout --kill-after=5 "$limit" "$@" > "$WORK/results/$name.log" 2>&1
  rc=$?
  local what="rc=$rc"
  [ $rc = 124 ] || [ $rc = 137 ] && what="rc=$rc (cut at its ${limit}s limit)"
  note "$name: $what ($((SECONDS - start)) s)"
  # pytest's last line (counts) and the profile's split always; the tail of anything that failed
  if [ $rc != 0 ]; then
    tail -n 25 "$WORK/results/$name.log" | sed 's/^/    /' >> "$SUMMARY"
  else
    { grep -E '^\[profile\] ' "$WORK/results/$name.log"; tail -n 1 "$WORK/results/$name.log"; } | sed 's/^/    /' >> "$SUMMARY"
  fi
  pack
}

# one pytest process (the repository's addopts ask for pytest-xdist, which a GPU machine may not have, and the
# sanitizer follows one process best); the other defaults kept
PYTEST_OPTS=(-p no:cacheprovider -o "addopts=-rs -m 'not heavy'")

pytest_stage() {  # pytest_stage NAME PYTEST-ARGS...: on the GPU run them, in a dry run collect them
  local name=$1; shift
  if [ $DRY = 1 ]; then
    stage "$name" "$PY" -m pytest -q --collect-only "${PYTEST_OPTS[@]}" "$@"
  else
    # --maxfail rather than -x: on a first GPU run every failure is worth seeing
    stage "$name" "$PY" -m pytest -q -rfE --maxfail=25 "${PYTEST_OPTS[@]}" "$@"
  fi
}

bench_stage() {  # bench_stage NAME BxCxD REPEATS [PROVIDERS]
  local name=$1 size=$2 repeats=$3 backends=${4:-$BACKENDS}
  mkdir -p "$WORK/results/$name"
  if [ $DRY = 1 ]; then
    size=8x300x16 repeats=1
  fi
  stage "$name" "$PY" -m bench --device "$DEVICE" --sizes "$size" \
    --dtype "$([ $DRY = 1 ] && echo float32 || echo bfloat16)" --margins arcface \
    --backends "$backends" --repeats "$repeats" --warmup 1 --min-seconds 0 --max-seconds 8 \
    --timeout 40 --out "$WORK/results/$name" --no-plot
}

# -------------------------------------------------------------------------------------------------
stage env bash -c "nvidia-smi 2>&1 | head -n 20; $PY -c \"import sys, torch, triton, marginops; \
print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, \
'| marginops', marginops.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')\""

if [ $DRY = 1 ]; then
  note "build: skipped in a dry run"
else
  stage build "$PY" -m marginops.build --cuda --verbose
fi
pytest_stage tests_cuda tests -m cuda -k "not triton and not compute_sanitizer"
pytest_stage tests_triton tests -k "triton or hybrid" -m "not slow"
if [ $DRY = 1 ]; then
  note "memcheck: skipped in a dry run"
elif command -v compute-sanitizer > /dev/null; then
  MARGINOPS_TEST_COMPUTE_SANITIZER=1 stage memcheck compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$PY" -m pytest -q "${PYTEST_OPTS[@]}" tests -k compute_sanitizer
else
  note "memcheck: compute-sanitizer not found"
fi
# the performance point of the GPU issues, then C = 4M (where the materialized reference needs ~16 GB per B×C
# buffer) while time remains
bench_stage bench_1m 1024x1000000x512 5
# the chunked path's classes per chunk around the planner's choice (16384 here): whether a chunk whose blocks
# stay in L2 pays for its extra launches
bench_stage bench_chunks 1024x1000000x512 2 "cuda,cuda_chunk4k,cuda_chunk8k,cuda_chunk32k"
# the default paths' step split into vendor GEMMs, marginops kernels, element-wise work and device idle time
# (launch overhead: what a CUDA graph or a second stream would recover), and each modelled kernel's measured time
# beside the time model's (profile/profile_kernels.csv, bench/gpu_model.py): what calibrates the model
if [ $DRY = 1 ]; then
  stage profile "$PY" -m bench.profile --device cpu --size 8x300x16 --dtype float32 --backends reference,matmul \
    --steps 1 --out "$WORK/results/profile"
else
  stage profile "$PY" -m bench.profile --device cuda --size 1024x1000000x512 --dtype bfloat16 \
    --backends cuda,cuda_mixed,hybrid,triton --steps 2 --out "$WORK/results/profile"
fi
# C = 4M without the reference (~16 GB per B×C buffer) and the fused variants: each case is its own
# process (a few seconds of start-up), so the stage times the default paths and the anchors only
bench_stage bench_4m 1024x4000000x512 3 "$(echo "$BACKENDS" | tr , '\n' | grep -Ex 'insightface|cuda|cuda_mixed|triton|matmul' | paste -sd,)"

note "done in $((SECONDS - START)) s; unpack: mkdir -p bench/results/<card> && tar -xzf $ARCHIVE -C bench/results/<card>"
pack
