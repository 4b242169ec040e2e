#!/usr/bin/env bash
# The GPU check: hrnet's CUDA tests, then the GPU benchmark against timm, on this machine's first GPU.
#
#   bash benchmarks/gpu_check.sh                 # from the repository root; OUT=dir keeps the log and figures
#
# Needs only torch, timm, onnxruntime, scikit-image and scikit-learn (plus pytest): hrnet runs from src/.
# Sized for one H100: at most 8 minutes (tests about 4, then the benchmark within the time left).
# Writes $OUT/gpu_check.log (everything printed) and $OUT/gpu_figures.json (the benchmark's figures);
# without $OUT, in a new temporary directory, printed at the end.
# Exit status: 0 all passed and measured; 1 a test failed; 2 the benchmark failed; 3 no CUDA GPU is
# visible (the tests ran and skipped, nothing was measured).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d -t hrnet-gpu-check.XXXXXX)}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
TOTAL_S="${GPU_CHECK_BUDGET_S:-480}"
start=$(date +%s)
: > "$LOG"
say() { echo "gpu_check: $*" | tee -a "$LOG" >&2; }

say "hrnet from $PWD/src; log $LOG"
"$PY" - >>"$LOG" 2>&1 <<'PYEOF'
import torch
print("torch", torch.__version__, "CUDA build", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("GPU", torch.cuda.get_device_name(0), "of", torch.cuda.device_count())
PYEOF

# the tests: pytest -ra prints each skip with its reason
if "$PY" -c "import pytest" 2>/dev/null; then
    timeout $((TOTAL_S * 6 / 10)) "$PY" -m pytest tests/test_cuda.py -m cuda -q -ra -p no:cacheprovider \
        -o addopts="" 2>&1 | tee -a "$LOG"
    tests=${PIPESTATUS[0]}
    [ "$tests" = 5 ] && tests=0  # no test collected is not a failure
else
    say "pytest is not installed (pip install pytest): the CUDA tests cannot run"
    tests=1
fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "no CUDA GPU is visible (torch.cuda.is_available() is False): the CUDA tests skipped, nothing was measured"
    exit 3
fi
if [ "$tests" != 0 ]; then
    say "the CUDA tests failed (exit $tests); the benchmark runs anyway"
fi

left=$(( TOTAL_S - ($(date +%s) - start) - 60 ))  # the benchmark stops starting work with a minute to spare
[ "$left" -lt 60 ] && left=60
say "benchmark: bench_gpu.py --budget-s $left"
timeout $((left + 120)) "$PY" benchmarks/bench_gpu.py --json "$OUT/gpu_figures.json" --budget-s "$left" 2>&1 | tee -a "$LOG"
bench=${PIPESTATUS[0]}
say "done in $(( $(date +%s) - start )) s: tests exit $tests, benchmark exit $bench; log $LOG, figures $OUT/gpu_figures.json"
[ "$tests" != 0 ] && exit 1
[ "$bench" != 0 ] && exit 2
exit 0
