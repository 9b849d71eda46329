"""DeepSpeed's op builds: one folder per environment, and a lock left by a killed build does not hang a
run."""

import os
import sys
import time

from trainer import ds_extensions


def test_each_environment_builds_into_its_own_folder():
    env = {}
    assert ds_extensions.use_environment_folder(env) == os.path.join(sys.prefix, "torch_extensions")
    # the user's wins
    assert ds_extensions.use_environment_folder({"TORCH_EXTENSIONS_DIR": "/mine"}) == "/mine"


def _lock(root, age):
    lock = root / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    past = time.time() - age
    os.utime(lock, (past, past))
    return lock


def test_a_stale_lock_is_removed_and_said(tmp_path, caplog):
    lock = _lock(tmp_path, ds_extensions.STALE_LOCK_S + 60)
    assert ds_extensions.clear_stale_build_locks(tmp_path, compiler_running=lambda: False) == [lock]
    assert not lock.exists() and "no longer running" in caplog.text


def test_a_fresh_lock_or_a_running_build_is_left_alone(tmp_path):
    fresh = _lock(tmp_path, 5)
    assert ds_extensions.clear_stale_build_locks(tmp_path, compiler_running=lambda: False) == []
    assert fresh.exists()
    os.utime(fresh, (0, 0))
    assert ds_extensions.clear_stale_build_locks(tmp_path, compiler_running=lambda: True) == []
    assert fresh.exists()
