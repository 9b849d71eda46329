#!/usr/bin/env bash
# Tests the newest releases that pyproject.toml allows, not the lock: run it before each lock refresh
# (scripts/lock.sh) so that drift is seen before users meet it. Builds its own environment in .venv-latest
# (torch: the same CPU wheel as setup_env.sh) and runs the given pytest arguments (default: the whole suite).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-latest
command -v uv >/dev/null || python3 -m pip install -q uv
PY=${PYTHON:-python3.11}
rm -rf "$VENV"
uv venv -q --python "$PY" "$VENV"
src=()
[ -d "${UNIMO_WHEELS:-/opt/wheels}" ] && src=(--find-links "${UNIMO_WHEELS:-/opt/wheels}")
uv pip install -q --python "$VENV/bin/python" "${src[@]}" --index-strategy unsafe-best-match \
  "${UNIMO_TORCH_SPEC:-torch==2.13.0+cpu}" setuptools wheel
# --upgrade --resolution highest: the newest of every dependency within pyproject's ranges
DS_BUILD_OPS=0 uv pip install -q --python "$VENV/bin/python" --upgrade --resolution highest \
  --no-build-isolation-package deepspeed -e ".[dev]"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
echo "[test_latest] newest allowed releases (compare with requirements/lock-dev.txt):" >&2
exec "$VENV/bin/python" -m pytest -n "${UNIMO_TEST_WORKERS:-2}" "$@"
