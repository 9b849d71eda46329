#!/usr/bin/env bash
# Creates (once) the project's virtual environment in .venv from the committed lock (requirements/lock-dev.txt)
# and installs unimo into it, editable. A second call finds the stamp file and returns at once.
#
# Installer: uv (installed with pip when absent; it resolves nothing here, the lock is exact, and installs in
# seconds); UNIMO_INSTALLER=pip uses pip instead. torch is installed first and apart from the lock: CPU machines
# get the CPU wheel (UNIMO_TORCH_SPEC, default torch==2.13.0+cpu); a GPU user installs a CUDA build into .venv
# before running this (or sets UNIMO_TORCH_SPEC and UNIMO_TORCH_INDEX), and it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${UNIMO_VENV:-.venv}
LOCK=${UNIMO_LOCK:-requirements/lock-dev.txt}
STAMP="$VENV/.unimo-installed"
# The stamp records a hash of the lock, pyproject.toml and this script, so a changed dependency set (or set-up
# step) re-installs.
want=$(cat "$LOCK" pyproject.toml "$0" | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
t0=$SECONDS
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
echo "[setup] installing unimo into $VENV with $("$VENV/bin/python" --version) from $LOCK" >&2

# Where torch's CPU wheel comes from: a local wheel folder when the machine has one (pip's find-links here), else
# PyTorch's CPU index. uv does not read pip's configuration, so both are passed explicitly.
WHEELS=${UNIMO_WHEELS:-/opt/wheels}
TORCH_SPEC=${UNIMO_TORCH_SPEC:-torch==2.13.0+cpu}
TORCH_SRC=()
if [ -n "${UNIMO_TORCH_INDEX:-}" ]; then
  TORCH_SRC=(--extra-index-url "$UNIMO_TORCH_INDEX")
elif [ -d "$WHEELS" ] && ls "$WHEELS"/torch-* >/dev/null 2>&1; then
  TORCH_SRC=(--find-links "$WHEELS")
else
  TORCH_SRC=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi

installer=${UNIMO_INSTALLER:-uv}
UV=""
if [ "$installer" = uv ]; then
  if command -v uv >/dev/null; then
    UV=$(command -v uv)
  else
    echo "[setup] uv not found: installing it into $VENV with pip" >&2
    if "$VENV/bin/python" -m pip install -q uv 2> >(grep -v "^WARNING: Location" >&2); then
      UV="$VENV/bin/uv"
    else
      echo "[setup] could not install uv; falling back to pip (slower)" >&2
      installer=pip
    fi
  fi
fi

if [ "$installer" = uv ]; then
  uvpip() { "$UV" pip "$@" --python "$VENV/bin/python"; }
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    uvpip install -q "${TORCH_SRC[@]}" --index-strategy unsafe-best-match "$TORCH_SPEC"
  fi
  # --no-deps: the lock is the whole closure but torch (installed above). deepspeed ships as a source package
  # whose setup imports torch: build it against the torch just installed.
  DS_BUILD_OPS=0 uvpip install -q --require-hashes --no-deps --no-build-isolation-package deepspeed -r "$LOCK"
  uvpip install -q --no-deps -e .
else
  # pip fallback: the same lock, hash-checked; the machine's pip configuration (indexes, find-links) applies.
  pip_quiet() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "^WARNING: Location" >&2); }
  pip_quiet install -q --upgrade pip setuptools wheel
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    pip_quiet install -q "${TORCH_SRC[@]}" "$TORCH_SPEC"
  fi
  DS_BUILD_OPS=0 pip_quiet install -q --require-hashes --no-deps --no-build-isolation -r "$LOCK"
  pip_quiet install -q --no-deps --no-build-isolation -e .
fi
# Bytecode for every installed module, now. uv installs without it, and where PYTHONDONTWRITEBYTECODE is set (as
# on CI images) Python never caches it either: each process then compiles torch, DeepSpeed, Ray and MLflow from
# source at import. Measured on 2 cores: `import deepspeed` 8.5 -> 3.4 s, `import ray.train` 3.9 -> 1.2 s; a job
# starts five such processes. compileall skips what is already compiled; a few non-Python .py templates fail to
# compile and are ignored.
echo "[setup] compiling bytecode" >&2
"$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
  >/dev/null 2>&1 || true
# On a CPU machine DeepSpeed JIT-compiles its shared-memory collective op the first time a process group starts
# (about 30 s here, cached in ~/.cache/torch_extensions): build it now rather than inside the first training run
# or test. Not fatal: DeepSpeed would report the same compiler error there.
"$VENV/bin/python" - <<'PYEOF' >&2 || echo "[setup] warning: could not pre-build DeepSpeed's CPU comm op" >&2
import torch
from trainer import ds_extensions
ds_extensions.prepare()  # into this environment's own folder, where the trainer looks (trainer/ds_extensions.py)
if not torch.cuda.is_available():
    from deepspeed.comm.torch import build_shm_op
    build_shm_op()
PYEOF
echo "$want" > "$STAMP"
echo "[setup] done: $VENV in $((SECONDS - t0)) s" >&2
