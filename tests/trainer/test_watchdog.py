"""The watchdog fires when beats stop, not while they come or while paused."""

import threading
import time

from trainer.watchdog import Watchdog


def run_for(dog: Watchdog, seconds: float, beat_every: float | None) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if beat_every is not None:
            dog.beat()
            time.sleep(beat_every)
        else:
            time.sleep(0.02)


def test_fires_after_timeout_without_progress():
    fired = threading.Event()
    dog = Watchdog(0.3, on_expire=lambda idle: fired.set())
    dog.start()
    assert fired.wait(3.0)
    dog.stop()


def test_quiet_while_beating_and_while_paused():
    fired = threading.Event()
    # A 1 s limit against beats every 0.05 s: the suite runs two pytest workers beside Ray clusters, and a
    # thread of this process may wait a few hundred ms for a core.
    dog = Watchdog(1.0, on_expire=lambda idle: fired.set())
    dog.start()
    run_for(dog, 1.0, beat_every=0.05)
    dog.pause()
    run_for(dog, 2.5, beat_every=None)
    dog.resume()
    run_for(dog, 0.5, beat_every=0.05)
    dog.stop()
    assert not fired.is_set()


def test_default_action_names_the_setting(capfd):
    import subprocess
    import sys

    code = ("from trainer.watchdog import Watchdog; import time; d = Watchdog(0.2, name='rank 1'); d.start(); "
            "time.sleep(10)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 70
    assert "rank 1: no training progress" in done.stderr and "train.watchdog_seconds" in done.stderr
