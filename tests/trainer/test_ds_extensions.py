"""DeepSpeed's op builds: one folder per environment, and a lock left by a killed build does not hang a
run."""

import os
import sys
import time

import pytest

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


def test_muon_stand_ins_answer_deepspeed_s_checks_and_load_the_real_module_for_anything_else(monkeypatch):
    """DeepSpeed's engine asks "is the optimizer a Muon?" and ZeRO 1-2 import Muon's update on every
    reduction; the stand-ins answer both without loading inductor. A name they do not define (a DeepSpeed
    release that uses more of the module) is the real module's, not an error; tools probing dunders get no
    import."""
    import sys

    import torch

    from trainer import ds_extensions

    modules = (ds_extensions.MUON_MODULE, ds_extensions.MUON_UPDATE_MODULE)
    for module in modules:  # whatever this pytest worker had (nothing, stand-ins or real) comes back after
        monkeypatch.setitem(sys.modules, module, None)
        monkeypatch.delitem(sys.modules, module)
    ds_extensions.without_muon_import()
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
    from deepspeed.runtime.zero.muon.original_muon import muon_update

    assert not isinstance(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]), MuonWithAuxAdam)
    assert muon_update is ds_extensions._muon_update
    stand_in = sys.modules[ds_extensions.MUON_UPDATE_MODULE]
    assert getattr(stand_in, "__file__", None) is None
    assert sys.modules[ds_extensions.MUON_UPDATE_MODULE] is stand_in
    real = stand_in.zeropower_via_newtonschulz5  # not defined by the stand-in: loads the real module
    assert sys.modules[ds_extensions.MUON_UPDATE_MODULE] is not stand_in
    assert real is sys.modules[ds_extensions.MUON_UPDATE_MODULE].zeropower_via_newtonschulz5
    ds_extensions.without_muon_import()  # the real module is loaded now: left as it is
    assert sys.modules[ds_extensions.MUON_UPDATE_MODULE] is not stand_in
    with pytest.raises(RuntimeError, match="Muon"):  # DeepSpeed's own `optimizer.type: muon`: said plainly
        MuonWithAuxAdam([])
