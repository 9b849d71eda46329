"""Where DeepSpeed's just-in-time built ops live, and a lock left behind by a killed build.

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
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("unimo.ds_extensions")
STALE_LOCK_S = 600.0
COMPILERS = ("ninja", "cc1plus", "c++", "g++", "gcc", "clang")


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


def prepare() -> None:
    """Called before DeepSpeed starts a process group: this environment's folder, no stale lock in it."""
    root = use_environment_folder()
    if Path(root).is_dir():
        clear_stale_build_locks(root)
