#!/usr/bin/env bash
# GPU checks of the segquant kernels in one command, for an H100 (sm_90) machine.
#
# Run from the repository root with kernels_cuda/build carried (built elsewhere with
# `python -m segquant_fx.cli build-kernels --arch 90a,80,89 --example`):
#
#     bash tests/gpu/run_gpu_checks.sh            # logs under $OUT (default /tmp/segquant_gpu)
#
# 1. environment (GPU, driver, torch, the carried library);
# 2. python -m pytest tests/gpu (bit-exact quantize grid, qlinear vs reference, opcheck,
#    CUDA graphs, torch.compile, fallbacks, the C example)        -> $OUT/pytest_gpu.log
# 3. kernels_cuda/build/gemm_example (the C++ example on its own) -> $OUT/gemm_example.log
# 4. python benchmarks/kernels.py --quick                          -> $OUT/bench_quick.log, .json
# and prints a summary last. Time limits (seconds): PYTEST_TIMEOUT (330), BENCH_TIMEOUT (200; 0 skips step 4).
set -u
OUT=${OUT:-/tmp/segquant_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}
cd "$(dirname "$0")/../.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv 2>&1
  "$PY" -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, \
torch.cuda.get_device_name(), torch.cuda.get_device_capability())" 2>&1
  ls -la kernels_cuda/build 2>&1
  cat kernels_cuda/build/libsegquant_kernels.json 2>&1
  # the GEMM must run on Hopper's warpgroup matrix instructions (IGMMA int8, QGMMA fp8), not a stub
  echo "sm_90a matrix instructions in the library:"
  cuobjdump -sass kernels_cuda/build/libsegquant_kernels.so 2>&1 | grep -oE "\b(IGMMA|QGMMA|HGMMA|IMMA|HMMA)\.[A-Z0-9]+" \
    | sort | uniq -c | head -12
  # registers / stack / local memory of every GEMM kernel (spills show as STACK or LOCAL > 0)
  echo "GEMM kernel resources (REG, STACK, SHARED, LOCAL):"
  cuobjdump --dump-resource-usage kernels_cuda/build/libsegquant_kernels.so 2>&1 \
    | grep -A1 -E "Function .*(Gemm|gemm|Seg)" | grep -oE "REG:[0-9]+ STACK:[0-9]+ SHARED:[0-9]+ LOCAL:[0-9]+" \
    | sort | uniq -c | head -12
  "$PY" -c "from segquant_fx.ops import cuda_kernels as c; print('library', c.library_path(), \
'gemm', c.has_gemm(), 'segmented gemm', c.has_segmented_gemm(), 'registered', c.registered_ops(), \
'reason', c.unavailable_reason())" 2>&1
} > "$OUT/env.txt"

summary=()
if "$PY" -c "import pytest" 2>/dev/null; then
  timeout "${PYTEST_TIMEOUT:-330}" "$PY" -m pytest tests/gpu -q -rfEs --durations=15 -p no:cacheprovider \
    > "$OUT/pytest_gpu.log" 2>&1
  summary+=("pytest tests/gpu: exit $? ($(tail -n 1 "$OUT/pytest_gpu.log"))")
else
  summary+=("pytest tests/gpu: NOT RUN (pytest is not installed for $PY; carry its wheel)")
fi

if [ -x kernels_cuda/build/gemm_example ]; then
  timeout 120 kernels_cuda/build/gemm_example > "$OUT/gemm_example.log" 2>&1
  summary+=("gemm_example: exit $? ($(tail -n 1 "$OUT/gemm_example.log"))")
else
  summary+=("gemm_example: NOT RUN (kernels_cuda/build/gemm_example missing: build with --example)")
fi

if [ "${BENCH_TIMEOUT:-200}" != "0" ]; then
  timeout "${BENCH_TIMEOUT:-200}" "$PY" benchmarks/kernels.py --quick --out "$OUT/kernels_quick.json" \
    > "$OUT/bench_quick.log" 2>&1
  summary+=("benchmarks/kernels.py --quick: exit $?")
else
  summary+=("benchmarks/kernels.py: skipped (BENCH_TIMEOUT=0)")
fi

echo "== env"; tail -n 25 "$OUT/env.txt"
echo "== pytest failures (if any)"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_gpu.log" 2>/dev/null | head -40
echo "== pytest slowest"; grep -A 16 "slowest" "$OUT/pytest_gpu.log" 2>/dev/null | head -18
echo "== gemm_example"; cat "$OUT/gemm_example.log" 2>/dev/null
echo "== benchmark (quick)"; sed -n '/^| M | K | N | bf16/,$p' "$OUT/bench_quick.log"
grep -E "FAILED|measurements" "$OUT/bench_quick.log"
echo "== summary"; printf '%s\n' "${summary[@]}"
