#!/usr/bin/env bash
# Runs the whole test suite (unit + integration) after making sure the environment exists.
# Integration tests start their own servers on 127.0.0.1: Ray, an S3 endpoint (moto) and an MLflow server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
# Two pytest workers; --dist worksteal: an idle worker takes tests queued on the other, so the long integration
# tests at the end do not run one after the other on one worker (with the default scheduling one worker ran the
# last ~40 tests alone). UNIMO_TEST_WORKERS=0 runs everything in one process.
if [ "${UNIMO_TEST_WORKERS:-2}" = 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
exec .venv/bin/python -m pytest -n "${UNIMO_TEST_WORKERS:-2}" --dist worksteal "$@"
