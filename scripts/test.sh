#!/usr/bin/env bash
# Runs the whole test suite (unit + integration) after making sure the environment exists.
# Integration tests start their own servers on 127.0.0.1: Ray, an S3 endpoint (moto) and an MLflow server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
# Two pytest workers: an integration test leaves a third of the 2 cores idle (process start-ups, polling), and the
# suite's wall time is 16.5-19 minutes here (408 tests). UNIMO_TEST_WORKERS=0 runs everything in one process.
exec .venv/bin/python -m pytest -n "${UNIMO_TEST_WORKERS:-2}" "$@"
