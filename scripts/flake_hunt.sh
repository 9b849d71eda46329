#!/usr/bin/env bash
# Runs the integration tier N times (default 3), each in a clean clone of HEAD, while two busy processes hold the
# CPUs, and prints every failing test with how often it failed. A test that fails only under load depends on
# the machine's speed: make it wait on an event instead (see docs/TESTING.md). The clones share this checkout's
# environment (.venv), so run scripts/setup_env.sh first.
set -uo pipefail
cd "$(dirname "$0")/.."
N=${1:-3}
ROOT=$PWD
WORK=$(mktemp -d /tmp/unimo-flake-hunt.XXXXXX)
[ -x .venv/bin/python ] || bash scripts/setup_env.sh
# Two busy loops at normal priority, as the other jobs of a shared runner would be.
# (stdout closed: $(burn) would otherwise wait for the busy loop to end)
burn() { python3 -c 'while True: pass' > /dev/null 2>&1 & echo $!; }
B1=$(burn); B2=$(burn)
trap 'kill $B1 $B2 2>/dev/null' EXIT
echo "[flake_hunt] $N run(s) of the integration tier under load (busy pids $B1 $B2); clones in $WORK" >&2
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
for i in $(seq 1 "$N"); do
  git clone -q "$ROOT" "$WORK/run$i"
  start=$SECONDS
  (cd "$WORK/run$i" && PYTHONPATH="$WORK/run$i" "$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider \
     -n "${UNIMO_TEST_WORKERS:-2}" -m integration -rfE "${@:2}" > "$WORK/run$i.log" 2>&1)
  echo "[flake_hunt] run $i: $(tail -1 "$WORK/run$i.log") ($((SECONDS - start)) s)" >&2
done
echo "[flake_hunt] failures (count test):"
grep -hE "^(FAILED|ERROR) " "$WORK"/run*.log | awk '{print $2}' | sort | uniq -c | sort -rn || true
fails=$(cat "$WORK"/run*.log | grep -cE "^(FAILED|ERROR) ")
echo "[flake_hunt] $fails failure(s) in $N run(s)"
if [ "$fails" = 0 ]; then rm -rf "$WORK"; else echo "[flake_hunt] logs kept in $WORK/run*.log"; fi
[ "$fails" = 0 ]
