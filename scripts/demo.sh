#!/usr/bin/env bash
# Runs the end-to-end demo after making sure the environment exists (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
exec .venv/bin/unimo demo "$@"
