"""Where DeepSpeed's just-in-time built ops live, a lock left behind by a killed build, and an import that
every engine build paid for nothing.

On a CPU machine DeepSpeed compiles its shared-memory collective op the first time a process group starts
(torch's cpp_extension, ~30 s). Two things made that a hang rather than a cost, both seen on one machine:
- torch keeps every build in one folder per op under ~/.cache/torch_extensions, keyed by the op's source
  paths, so two environments (a checkout's .venv and a clean clone's) rebuild over each other's build on every
  switch;
- a build holds a lock file while it compiles; a process killed during the build (a test's timeout, a
  preempted worker) leaves the file, and every later build waits for it forever (torch's FileBaton has no
  timeout).
So each environment builds into a folder of its own (``<sys.prefix>/torch_extensions``, unless the user set
TORCH_EXTENSIONS_DIR), which scripts/setup_env.sh pre-builds, and a build lock older than any build takes
(STALE_LOCK_S) while no compiler runs is removed with a warning.

The import: ``deepspeed.initialize`` and the ZeRO optimizers import DeepSpeed's Muon module to ask whether the
client optimizer is a Muon, and ZeRO 1-2 import its update function on every gradient reduction; importing
them decorates three functions with ``torch.compile``, which loads inductor (164 more modules, ~1 CPU-second
per worker start on the 2-core VM; docs/BENCHMARKS.md). The trainer's optimizer is always torch's AdamW
(trainer/optim.py), so ``without_muon_import`` puts stand-in modules in their place: a class nothing is an
instance of, and an update that would load the real one if it were ever called.

And one more import: ``import deepspeed`` loads its autotuner, which imports MLflow if it can (~0.7 CPU-second
and ~120 MB per process on the 2-core VM) only to log autotuning experiments, which unimo never runs. The
ranks that log (rank 0, and each node's first rank for its system metrics: trainer/tracking.py) import MLflow
anyway; every other rank, and every tool that only reads a checkpoint, did it for nothing.
``import_deepspeed`` imports DeepSpeed with MLflow made unimportable for that moment, unless MLflow is loaded
already, and then makes it importable again: the autotuner sees no MLflow, and anything that imports MLflow
later gets the real one. For that moment an ``import mlflow`` in another thread would fail too: it is called
before a process starts any thread that logs (the engine build, a checkpoint export).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
import types
from pathlib import Path

log = logging.getLogger("unimo.ds_extensions")
STALE_LOCK_S = 600.0
COMPILERS = ("ninja", "cc1plus", "c++", "g++", "gcc", "clang")
MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"
MUON_UPDATE_MODULE = "deepspeed.runtime.zero.muon.original_muon"


def use_environment_folder(environ: dict[str, str] | None = None) -> str:
    """Sets TORCH_EXTENSIONS_DIR to this environment's own folder unless it is set; returns it."""
    environ = os.environ if environ is None else environ
    return environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def _compiler_running() -> bool:
    try:
        import psutil
    except ImportError:  # cannot tell: leave the lock alone
        return True
    for proc in psutil.process_iter(["name"]):
        if (proc.info.get("name") or "") in COMPILERS:
            return True
    return False


def clear_stale_build_locks(root: str | Path, now: float | None = None,
                            compiler_running=_compiler_running) -> list[Path]:
    """Removes ``<root>/*/*/lock`` files older than STALE_LOCK_S when no compiler runs; returns what it
    removed."""
    now = time.time() if now is None else now
    old = [p for p in Path(root).glob("*/*/lock") if now - p.stat().st_mtime > STALE_LOCK_S]
    if not old or compiler_running():
        return []
    for lock in old:
        log.warning("removing %s: a DeepSpeed op build lock left %.0f s ago by a build that is no longer "
                    "running (the build was killed); the op is rebuilt", lock, now - lock.stat().st_mtime)
        lock.unlink(missing_ok=True)
    return old


def import_deepspeed():
    """``import deepspeed`` without the MLflow import of its autotuner (the file's docstring); returns it."""
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    hide = "mlflow" not in sys.modules  # loaded (or loading, in another thread): nothing to save
    if hide:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError; the autotuner catches it
    try:
        import deepspeed
    finally:
        if hide and "mlflow" in sys.modules and sys.modules["mlflow"] is None:
            del sys.modules["mlflow"]
    return deepspeed


def prepare() -> None:
    """Called before DeepSpeed starts a process group: this environment's folder, no stale lock in it, no
    inductor import for a Muon check."""
    without_muon_import()
    root = use_environment_folder()
    if Path(root).is_dir():
        clear_stale_build_locks(root)


class _NotMuon:
    """Stands for DeepSpeed's MuonWithAuxAdam: the trainer never builds one, so nothing is an instance."""

    def __init__(self, *args, **kwargs):  # DeepSpeed builds one only for its own `optimizer.type: muon`
        raise RuntimeError("unimo trains with torch's AdamW (trainer/optim.py): DeepSpeed's Muon optimizer "
                           "is not supported")


def _real(module: str, name: str):
    """``name`` of the real ``module``, loaded now in place of its stand-in."""
    if getattr(sys.modules.get(module), "__unimo_stand_in__", False):
        del sys.modules[module]
    return getattr(importlib.import_module(module), name)


def _muon_update(*args, **kwargs):
    """Stands for original_muon.muon_update, which ZeRO 1-2 import on every gradient reduction and call only
    for a Muon optimizer's parameters: never here, but if ever, the real one runs."""
    return _real(MUON_UPDATE_MODULE, "muon_update")(*args, **kwargs)


def without_muon_import() -> None:
    """Makes DeepSpeed's Muon checks cheap (the file's docstring): stand-ins for its two Muon modules, unless
    they are loaded already. Any name they do not define is taken from the real module."""
    for module, names in ((MUON_MODULE, {"MuonWithAuxAdam": _NotMuon}),
                          (MUON_UPDATE_MODULE, {"muon_update": _muon_update})):
        if module in sys.modules:
            continue
        stand_in = types.ModuleType(module, "unimo's stand-in: the trainer's optimizer is never a Muon")
        stand_in.__dict__.update(names, __unimo_stand_in__=True)

        def load_real(name: str, module: str = module):  # a name DeepSpeed did not use when this was written
            if name.startswith("__"):  # __file__, __path__, ...: what tools that walk sys.modules probe
                raise AttributeError(name)
            return _real(module, name)

        stand_in.__getattr__ = load_real
        sys.modules[module] = stand_in
