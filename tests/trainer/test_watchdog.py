"""The watchdog fires when beats stop, not while they come; the phases that are not steps (start-up,
evaluation, a checkpoint save) run under their own, longer limit, not unwatched."""

import subprocess
import sys
import threading
import time

import pytest

from trainer.config import load_config
from trainer.loop import Trainer
from trainer.watchdog import Watchdog


class Expiry:
    """on_expire for tests: records why instead of ending the process."""

    def __init__(self):
        self.fired = threading.Event()
        self.why = ""

    def __call__(self, idle: float, why: str) -> None:
        self.why = why
        self.fired.set()


def run_for(dog: Watchdog, seconds: float, beat_every: float | None) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if beat_every is not None:
            dog.beat()
            time.sleep(beat_every)
        else:
            time.sleep(0.02)


def test_fires_after_timeout_without_progress():
    expiry = Expiry()
    dog = Watchdog(0.3, on_expire=expiry)
    dog.start()
    assert expiry.fired.wait(3.0)
    dog.stop()
    assert "a training step" in expiry.why and "train.watchdog_seconds=0" in expiry.why


def test_quiet_while_beating_and_inside_a_phase_under_its_limit():
    expiry = Expiry()
    # A 1 s limit against beats every 0.05 s: the suite runs two pytest workers beside Ray clusters, and a
    # thread of this process may wait a few hundred ms for a core.
    dog = Watchdog(1.0, on_expire=expiry, phase_timeout_s=10.0)
    dog.start()
    run_for(dog, 1.0, beat_every=0.05)
    with dog.phase("a checkpoint save"):
        run_for(dog, 2.5, beat_every=None)  # longer than a step may take, shorter than the phase limit
    run_for(dog, 0.5, beat_every=0.05)
    dog.stop()
    assert not expiry.fired.is_set(), expiry.why


def test_a_hung_phase_fires_with_its_name_and_setting():
    """Before phases, a save or an evaluation paused the watchdog: a collective hung there was never ended."""
    expiry = Expiry()
    dog = Watchdog(30.0, on_expire=expiry, phase_timeout_s=0.3)
    dog.start()
    with dog.phase("the checkpoint save of step 7"):
        assert expiry.fired.wait(5.0)
    dog.stop()
    assert "the checkpoint save of step 7" in expiry.why and "train.watchdog_phase_seconds" in expiry.why


def test_the_step_limit_is_back_after_a_phase_that_raised():
    expiry = Expiry()
    dog = Watchdog(0.4, on_expire=expiry, phase_timeout_s=60.0)
    dog.start()
    with pytest.raises(OSError):
        with dog.phase("a checkpoint save"):
            raise OSError("disk full")
    assert expiry.fired.wait(5.0)
    dog.stop()
    assert "a training step" in expiry.why


def watched_trainer(*overrides: str) -> tuple[Trainer, Expiry, threading.Event]:
    """A Trainer whose watchdog records instead of exiting (phase limit 0.3 s), and the event that un-hangs
    it."""
    trainer = Trainer(load_config(None, ["train.watchdog_phase_seconds=0.3", *overrides]), rank=0,
                      world_size=1, reporter=None)
    expiry = Expiry()
    trainer.watchdog = Watchdog(30.0, on_expire=expiry,
                                phase_timeout_s=trainer.cfg.train.watchdog_phase_seconds)
    return trainer, expiry, threading.Event()


def fires_while(target, expiry: Expiry, hung: threading.Event) -> bool:
    """Runs ``target`` in a thread; whether the watchdog fired while it hung (then releases it)."""
    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    try:
        return expiry.fired.wait(5.0)
    finally:
        hung.set()
        worker.join(10)


def test_trainer_checkpoint_runs_under_the_phase_limit(monkeypatch):
    """Trainer.checkpoint: a save that never returns ends the worker, naming the save and its step."""
    trainer, expiry, hung = watched_trainer()
    monkeypatch.setattr(trainer.checkpoints, "save", lambda step, *a: hung.wait(5.0) and None)
    trainer.watchdog.start()
    try:
        assert fires_while(lambda: trainer.checkpoint(12, {}), expiry, hung)
    finally:
        trainer.watchdog.stop()
    assert "the checkpoint save of step 12" in expiry.why


def test_trainer_start_up_runs_under_the_phase_limit(monkeypatch, tmp_path):
    """Trainer.run: a restore that never returns (a hung collective while loading) ends the worker too."""
    from data_pipeline.tokenizer import save_tokenizer, train_tokenizer

    # start-up loads the tokenizer before the restore (the restore compares it with the checkpoint's)
    tokenizer = save_tokenizer(train_tokenizer(["a red circle"], vocab_size=30, kind="wordlevel"),
                               str(tmp_path / "tokenizer.json"))
    trainer, expiry, hung = watched_trainer(f"data.tokenizer={tokenizer}")

    def hung_load(build):
        hung.wait(5.0)
        raise RuntimeError("released by the test")  # the run ends here, before any engine is built

    monkeypatch.setattr(trainer.checkpoints, "load", hung_load)
    assert fires_while(lambda: pytest.raises(RuntimeError, trainer.run), expiry, hung)
    assert "start-up" in expiry.why and "train.watchdog_phase_seconds" in expiry.why


@pytest.mark.integration
def test_default_action_names_the_setting():
    code = ("from trainer.watchdog import Watchdog; import time; d = Watchdog(0.2, name='rank 1'); "
            "d.start(); time.sleep(10)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 70
    assert "rank 1: no progress in a training step" in done.stderr and "train.watchdog_seconds" in done.stderr
