"""trainer/preemption.py in-process: a SIGTERM while training becomes a stop request; otherwise Ray's handler
runs.

The whole path (SIGTERM to a Ray Train worker, checkpoint, clean exit, resume) is
tests/integration/test_preemption.py::test_sigterm_to_the_driver_then_to_a_worker_of_the_resubmission.
"""

from __future__ import annotations

import os
import signal

import pytest

from trainer import preemption


@pytest.fixture
def installed(monkeypatch):
    """preemption.install() as a Ray worker runs it, then Ray's task loop setting its handler (a recorder)."""
    import ray._private.utils as ray_utils

    previous = signal.getsignal(signal.SIGTERM)
    # restored afterwards
    monkeypatch.setattr(ray_utils, "set_sigterm_handler", ray_utils.set_sigterm_handler)
    preemption._requested.clear()
    calls: list[int] = []
    preemption.install()
    ray_utils.set_sigterm_handler(lambda signum, frame: calls.append(signum))  # what Ray's main_loop does
    try:
        yield calls
    finally:
        signal.signal(signal.SIGTERM, previous)
        preemption._requested.clear()
        preemption._fallback = signal.SIG_DFL


def test_sigterm_while_training_requests_a_stop_and_a_second_one_goes_to_ray(installed, capfd):
    assert signal.getsignal(signal.SIGTERM) is preemption.on_sigterm  # Ray's later install did not replace it
    with preemption.training():
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.requested() and installed == []
        os.kill(os.getpid(), signal.SIGTERM)  # again: exit now, as Ray would
        assert installed == [signal.SIGTERM]
    assert "saving a checkpoint at the next step" in capfd.readouterr().err


def test_sigterm_outside_the_step_loop_goes_to_ray(installed):
    os.kill(os.getpid(), signal.SIGTERM)
    assert installed == [signal.SIGTERM] and not preemption.requested()


def test_any_rank_s_sigterm_is_a_stop_in_the_control_flags(monkeypatch):
    """Rank 1 (which does not read the driver's STOP file) still raises the stop flag the ranks all-reduce."""
    from trainer.config import load_config
    from trainer.loop import Trainer

    rank1 = Trainer(load_config(None, []), rank=1, world_size=1, reporter=None)
    assert rank1.control_flags() == (False, False)
    monkeypatch.setattr(preemption, "requested", lambda: True)
    assert rank1.control_flags() == (True, False)


def test_rank0_reads_the_stop_file(tmp_path):
    from trainer.checkpointing.stop import STOP_FILE
    from trainer.config import load_config
    from trainer.loop import Trainer

    rank0 = Trainer(load_config(None, []), rank=0, world_size=1, reporter=None, control_dir=str(tmp_path))
    assert rank0.control_flags() == (False, False)
    (tmp_path / STOP_FILE).write_text("SIGTERM\n")
    assert rank0.control_flags() == (True, False)
