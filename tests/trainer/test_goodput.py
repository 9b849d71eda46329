"""Goodput accounting (trainer/goodput.py): the ledgers of a job's attempts, split into kept and lost steps,
restart, start-up, checkpoint, eval and data wait; the parts add up to the wall time."""

from __future__ import annotations

import pytest

from trainer.goodput import AttemptLedger, Ledger, read_ledgers, summarize


def attempt(start, loop_start, updated, first_step, step, steps_s, at_checkpoint, **seconds) -> Ledger:
    return Ledger(start=start, loop_start=loop_start, updated=updated, first_step=first_step, step=step,
                  seconds={"steps": steps_s, "data_wait": 0.0, "checkpoint": 0.0, "eval": 0.0, **seconds},
                  steps_at_checkpoint={str(k): v for k, v in at_checkpoint.items()})


def test_a_killed_attempt_s_steps_after_the_resumed_checkpoint_are_lost():
    """Job 0-100 s: attempt 1 trains steps 1-11 (checkpoint at 10 after 40 s of steps), is killed at 60 s;
    attempt 2 resumes from step 10 at 70 s and trains to 20, last accounted at 99 s."""
    first = attempt(5, 15, 60, 0, 11, 44.0, {10: 40.0}, data_wait=0.5, checkpoint=0.5)
    second = attempt(62, 70, 99, 10, 20, 27.0, {20: 27.0}, checkpoint=2.0)
    s = summarize([first, second], job_start=0.0, job_end=100.0)
    assert s["kept"] == pytest.approx(40 + 27) and s["lost"] == pytest.approx(4)
    assert s["restart"] == pytest.approx(70 - 60) and s["start_up"] == pytest.approx(15 + 1)
    assert s["checkpoint"] == pytest.approx(2.5) and s["data_wait"] == pytest.approx(0.5)
    assert s["wall"] == 100 and s["goodput"] == pytest.approx(0.67)
    parts = sum(s[k] for k in ("kept", "lost", "data_wait", "checkpoint", "eval", "start_up", "restart"))
    assert parts + s["unaccounted"] == pytest.approx(100)


def test_a_resume_from_an_older_attempt_s_checkpoint_keeps_none_of_the_failed_one():
    first = attempt(0, 5, 30, 0, 10, 20.0, {10: 20.0})
    second = attempt(31, 35, 40, 10, 13, 4.0, {})  # failed again before its first checkpoint
    third = attempt(41, 45, 60, 10, 20, 14.0, {20: 14.0})
    s = summarize([first, second, third], job_start=0.0, job_end=60.0)
    assert s["kept"] == pytest.approx(20 + 14) and s["lost"] == pytest.approx(4)


def test_ledgers_are_written_as_the_attempt_goes_and_only_this_job_s_are_read(tmp_path):
    old = AttemptLedger(str(tmp_path), now=100.0)
    old.started(0)
    ledger = AttemptLedger(str(tmp_path), now=200.0)
    ledger.started(4)
    ledger.step_done(5, 1.0, 0.25, 0.0, 0.0, saved=False)
    ledger.step_done(6, 1.0, 0.25, 0.0, 0.5, saved=True)  # killed here: the file holds steps 5-6
    (tmp_path / "goodput" / "stray.json").write_text("{not json")
    [read] = read_ledgers(str(tmp_path), since=150.0)
    assert read.first_step == 4 and read.step == 6 and read.seconds["steps"] == 2.0
    assert read.steps_at_checkpoint == {"6": 2.0} and read.seconds["checkpoint"] == 0.5 and not read.ended
