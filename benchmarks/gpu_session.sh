#!/usr/bin/env bash
# One GPU lease, several jobs: train the built-in text-to-image models in the background while the
# kernel correctness tests run (neither is timed against the other), then the kernel benchmark alone.
#
#     bash benchmarks/gpu_session.sh          # on the GPU machine, repo root, carry .whl and kernels_cuda/build
#
# Env: OUT (results, default /tmp/segquant_gpu), TRAIN_BUDGET_S (training seconds per model, default 330;
# 0 skips training), TRAIN_MODEL (mmdit|flux|unet|all, default all), TRAIN_ARGS (extra train_t2i.py
# arguments, e.g. "--no-amp"), PYTEST_TIMEOUT (300), BENCH_TIMEOUT (150; 0 skips the benchmark),
# BENCH_ARGS (extra benchmarks/kernels.py arguments, e.g. "--variants sq_gemm_int8,sm80_sq_gemm_int8").
# The next FLUX retry: TRAIN_MODEL=flux TRAIN_ARGS=--no-amp TRAIN_BUDGET_S=170 (bf16 autocast crashed
# cuBLAS at the first backward on 2026-12-08).
# Leaves $OUT/t2i-*.tar (weights, cards, sample grids) and $OUT/logs.tar (summary.json, pytest_gpu.log,
# env.txt, kernels_quick.json, bench_quick.log, train.log, ...); prints a summary first.
set -u
OUT=${OUT:-/tmp/segquant_gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONPATH="${PYTHONPATH:-$PWD}"

train_pid=""
if [ "${TRAIN_BUDGET_S:-330}" != "0" ]; then
  # shellcheck disable=SC2086  # TRAIN_ARGS is a list of arguments
  python3 benchmarks/train_t2i.py --model "${TRAIN_MODEL:-all}" --device cuda --time-budget-s "${TRAIN_BUDGET_S:-330}" \
    --out "$OUT/t2i" --pack tar ${TRAIN_ARGS:-} > "$OUT/train.log" 2>&1 &
  train_pid=$!
fi

# kernel checks without the benchmark (it must not share the GPU with training)
BENCH_TIMEOUT=0 OUT="$OUT" bash tests/gpu/run_gpu_checks.sh > "$OUT/checks.txt" 2>&1

if [ -n "$train_pid" ]; then
  wait "$train_pid"
  echo "training exit $?" >> "$OUT/train.log"
  mv "$OUT"/t2i/*.tar "$OUT"/t2i/summary.json "$OUT"/ 2>/dev/null  # the tars hold weights, cards, grids
  rm -rf "$OUT/t2i"
fi

if [ "${BENCH_TIMEOUT:-150}" != "0" ]; then
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-150}" python3 benchmarks/kernels.py --quick --out "$OUT/kernels_quick.json" ${BENCH_ARGS:-} \
    > "$OUT/bench_quick.log" 2>&1
  echo "benchmark exit $?" >> "$OUT/bench_quick.log"
fi

echo "== checks"; tail -n 60 "$OUT/checks.txt"
echo "== training"; grep -E "adherence|final|exit|Error|error" "$OUT/train.log" | tail -n 20
cat "$OUT/summary.json" 2>/dev/null
echo "== benchmark"; sed -n '/^| M | K | N | bf16/,$p' "$OUT/bench_quick.log"; tail -n 3 "$OUT/bench_quick.log"
# at most 8 files come back: the model tars and one tar of every log
(cd "$OUT" && tar cf logs.tar --remove-files ./*.txt ./*.log ./*.json 2>/dev/null)
ls -la "$OUT"
