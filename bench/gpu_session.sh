#!/usr/bin/env bash
# One GPU session for "fast on GPUs" (issue #16), at most 590 s on one GPU (the steps' limits add up to that,
# under the 600 s a lent device runs one command): the GPU tests, then every GPU figure the issue asks for,
# each written under $OUT (stdout logs and JSON):
#   1. pytest -m gpu                                          -> $OUT/pytest_gpu.txt
#   2. bench/bench_gpu.py: debug/small/base/large at the largest micro-batch that fits, plain loop vs the
#      trainer's engine at zero_stage auto and ZeRO-3 forced, same run: ms/step, samples/s, TFLOP/s, MFU, peak
#      memory, kernels launched and module calls per step; data_wait_fraction of base fed by the real loader
#      (JPEG shards at 256 px, fed at 224 px)                 -> $OUT/bench_gpu.{txt,json}
#   3. base and large with deepspeed.precision=autocast (fp32 weights, bf16 compute, as the plain loop): one
#      rank's `auto` then takes stage 0 (no ZeRO)               -> $OUT/bench_gpu_autocast.{txt,json}
#   4. the same for base with train.compile=true               -> $OUT/bench_gpu_compile.{txt,json}
#   5. base under ZeRO-3 with and without whole units (deepspeed.zero3_whole_units)
#                                                             -> $OUT/bench_gpu_zero3.{txt,json}
#   6. bench/bench_host_overhead.py for base (host work per step on this machine's CPU)
#                                                             -> $OUT/bench_host_overhead.txt
# Not in the session, for a second call if time is left: DeepSpeed's compiler (DeepCompile, CUDA only), whose
# CUDA extension build alone may take minutes:
#   python bench/bench_gpu.py --flavors base --stages 3 3-deepcompile --json $OUT/bench_gpu_deepcompile.json
# Each step has its own time limit, so one that hangs or runs out of memory does not take the others with it.
#
#   OUT=/tmp/out bash bench/gpu_session.sh            # on the GPU machine, from the repository root
#   bash bench/gpu_session.sh --dry-run               # anywhere: prints the commands, runs nothing
#   bash bench/gpu_session.sh --cpu-smoke             # anywhere: every step at the debug flavor on CPU
set -u
OUT=${OUT:-./gpu_session_out}
PY=${PYTHON:-python}
MODE=gpu
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --cpu-smoke) MODE=cpu ;;
  "") ;;
  *) echo "usage: $0 [--dry-run | --cpu-smoke]" >&2; exit 2 ;;
esac
[ "$MODE" = dry ] || mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-$PWD} MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true RAY_USAGE_STATS_ENABLED=0

step() {  # step SECONDS NAME COMMAND...: runs COMMAND with a limit, its output into $OUT/NAME.txt
  local limit=$1 name=$2; shift 2
  echo "+ [$name, <= ${limit}s] $*"
  [ "$MODE" = dry ] && return 0
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  echo "  rc=$rc in $((SECONDS - t0)) s; tail:"; tail -n 12 "$OUT/$name.txt" | sed 's/^/  | /'
  echo "$name rc=$rc seconds=$((SECONDS - t0))" >>"$OUT/summary.txt"
}

if [ "$MODE" = cpu ]; then
  COMMON=(--device cpu --batch 2 --steps 1 --warmup 1 --seq-len 16)
  step 300 bench_gpu "$PY" bench/bench_gpu.py "${COMMON[@]}" --flavors debug --data-wait debug \
    --stored-size 48 --data-workers 0 --json "$OUT/bench_gpu.json"
  step 300 bench_host_overhead "$PY" bench/bench_host_overhead.py --flavors debug --steps 1 --warmup 1
  exit 0
fi

[ "$MODE" = gpu ] && nvidia-smi >"$OUT/nvidia_smi.txt" 2>&1
step 90 pytest_gpu "$PY" -m pytest -q -m gpu -p no:cacheprovider -n 0 tests/model/test_model_gpu.py tests/trainer/test_gpu.py
step 260 bench_gpu "$PY" bench/bench_gpu.py --flavors debug small base large --stages auto 3 --steps 8 --warmup 3 \
  --data-wait base --stored-size 256 --json "$OUT/bench_gpu.json"
step 75 bench_gpu_autocast "$PY" bench/bench_gpu.py --flavors base large --stages auto --precision autocast \
  --steps 8 --warmup 3 --json "$OUT/bench_gpu_autocast.json"
step 75 bench_gpu_compile "$PY" bench/bench_gpu.py --flavors base --stages auto --compile --steps 8 --warmup 4 \
  --json "$OUT/bench_gpu_compile.json"
step 60 bench_gpu_zero3 "$PY" bench/bench_gpu.py --flavors base --stages 3 3-per-module \
  --steps 8 --warmup 3 --json "$OUT/bench_gpu_zero3.json"
step 30 bench_host_overhead "$PY" bench/bench_host_overhead.py --flavors base --steps 4 --warmup 1
echo "figures under $OUT"
