#!/usr/bin/env bash
# Looks at a run the way a user does: serves an MLflow store on 127.0.0.1, opens the newest run's page (and its
# metric charts) in headless Chromium and saves screenshots, for docs/ and for review after a change of what is
# logged. Needs Debian's `chromium` package (apt-get install chromium).
#
#   bash scripts/mlflow_screenshot.sh sqlite:///$PWD/demo_out/runs/mlflow.db docs/images/mlflow
#
# writes <prefix>-run.png (the run's overview: params, tags, artifacts) and <prefix>-metrics.png (its charts).
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${1:?usage: mlflow_screenshot.sh BACKEND_STORE_URI OUT_PREFIX}
PREFIX=${2:?usage: mlflow_screenshot.sh BACKEND_STORE_URI OUT_PREFIX}
BROWSER=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$BROWSER" ] || { echo "no chromium found: apt-get install chromium" >&2; exit 2; }
PORT=$(.venv/bin/python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
URL="http://127.0.0.1:$PORT"
LOG=$(mktemp)
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
.venv/bin/mlflow server --backend-store-uri "$STORE" --host 127.0.0.1 --port "$PORT" --workers 1 \
  > "$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 1 120); do
  curl -fs "$URL/health" >/dev/null 2>&1 && break
  sleep 0.5
done
curl -fs "$URL/health" >/dev/null || { echo "MLflow did not answer at $URL" >&2; cat "$LOG" >&2; exit 1; }
read -r EXP RUN < <(.venv/bin/python - "$URL" <<'EOF'
import sys
from mlflow.tracking import MlflowClient

client = MlflowClient(sys.argv[1])
runs = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["attributes.start_time DESC"],
                          max_results=1)
if not runs:
    sys.exit("no run in this store")
print(runs[0].info.experiment_id, runs[0].info.run_id)
EOF
)
mkdir -p "$(dirname "$PREFIX")"
shot() {  # the page is a React app: give it virtual time to fetch and draw
  "$BROWSER" --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1100 \
    --virtual-time-budget=20000 --screenshot="$2" "$1" >/dev/null 2>&1
  echo "wrote $2 ($1)"
}
# ?workflowType=machine_learning: MLflow 3 opens in its GenAI view otherwise (a fresh browser keeps that choice
# in local storage; the experiment's kind tag does not decide it)
VIEW="?workflowType=machine_learning"
shot "$URL/#/experiments/$EXP/runs/$RUN$VIEW" "$PREFIX-run.png"
shot "$URL/#/experiments/$EXP/runs/$RUN/model-metrics$VIEW" "$PREFIX-metrics.png"
