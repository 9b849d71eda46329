#!/usr/bin/env bash
# Creates (once) the project's virtual environment in .venv and installs unimo with its dev extra.
# A second call finds the stamp file and returns at once. CPU machines get the CPU torch wheel;
# GPU users may pre-install their own CUDA torch build into .venv (or set UNIMO_TORCH_SPEC).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${UNIMO_VENV:-.venv}
STAMP="$VENV/.unimo-installed"
# The stamp records a hash of pyproject.toml, so a changed dependency list re-installs.
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
echo "[setup] installing unimo into $VENV with $($PY --version) (first time: a few minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# pip's notes about this machine's local package mirrors are noise; real errors still show.
pip_quiet() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "^WARNING: Location" >&2); }
PIP=pip_quiet
$PIP install -q --upgrade pip setuptools wheel
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  $PIP install -q "${UNIMO_TORCH_SPEC:-torch==2.13.0}"
fi
# deepspeed's setup.py imports torch, so it must build against the torch we just installed.
if ! "$VENV/bin/python" -c "import deepspeed" 2>/dev/null; then
  DS_BUILD_OPS=0 $PIP install -q --no-build-isolation "deepspeed>=0.16"
fi
$PIP install -q -e ".[dev]"
# On a CPU machine DeepSpeed JIT-compiles its shared-memory collective op the first time a process group starts
# (about 30 s here, cached in ~/.cache/torch_extensions): build it now rather than inside the first training run
# or test. Not fatal: DeepSpeed would report the same compiler error there.
"$VENV/bin/python" - <<'PYEOF' >&2 || echo "[setup] warning: could not pre-build DeepSpeed's CPU comm op" >&2
import torch
if not torch.cuda.is_available():
    from deepspeed.comm.torch import build_shm_op
    build_shm_op()
PYEOF
echo "$want" > "$STAMP"
echo "[setup] done: $VENV" >&2
