"""Where the fault campaign (bench/fault_campaign.py) holds a run for each in-job fault: only at moments the
attempt still reaches, so that no schedule waits for a gate the run never meets."""

from __future__ import annotations

import pytest

from bench import fault_campaign as fc


@pytest.fixture
def resumed_at(monkeypatch):
    """Sets the step the next attempt resumes from (what the run folder's newest valid checkpoint says)."""
    def set_step(step: int) -> None:
        monkeypatch.setattr(fc, "_resume_step", lambda run_dir: step)
    return set_step


def setup(steps: int = 16) -> fc.Setup:
    return fc.Setup(data=None, work=None, steps=steps)


def holds(kind: str, u: float, tmp_path) -> list[tuple[str, int]]:
    return fc._holds(setup(), tmp_path, fc.Fault(kind, (u, 0.5, 0.5)))


def test_a_kill_in_a_save_upload_or_prune_holds_a_saving_step_this_attempt_reaches(resumed_at, tmp_path):
    resumed_at(4)
    saves = {holds("kill_in_save", u / 20, tmp_path)[0] for u in range(20)}
    assert saves == {("save", 8), ("save", 12), ("save", 16)}  # the run saves every 4 steps, up to 16
    assert {holds("kill_before_upload", u / 20, tmp_path)[0][1] for u in range(20)} == {8, 12, 16}
    assert {holds("kill_before_prune", u / 20, tmp_path)[0] for u in range(20)} == {
        ("prune", 8), ("prune", 12), ("prune", 16)}  # retention runs after every save
    resumed_at(16)
    assert holds("kill_in_save", 0.5, tmp_path) == []  # nothing left to save: the fault is skipped


def test_a_kill_in_a_resume_holds_this_attempt_s_resume_or_the_one_after_a_kill(resumed_at, tmp_path):
    resumed_at(8)
    assert holds("kill_in_restore", 0.3, tmp_path) == [("restore", 8)]
    resumed_at(0)  # nothing to resume from: a worker is killed first, and its group's resume is held
    for u in range(20):
        (phase, step), (phase2, restored) = holds("kill_in_restore", u / 20, tmp_path)
        assert phase == "step" and phase2 == "restore" and 5 <= step <= 15
        assert restored == (step - 1) // 4 * 4 and restored >= 4  # the newest checkpoint before the kill
    resumed_at(16)
    assert holds("kill_in_restore", 0.5, tmp_path) == []


def test_every_kind_of_the_menu_is_drawn_and_a_killed_worker_is_retried_inside_the_job():
    drawn = {f.kind for seed in range(200) for f in fc.draw_faults(seed)}
    assert drawn == set(fc.MENU)
    from trainer import fault_gate

    assert set(fc.PHASE) == set(fc.IN_JOB + fc.FOLLOW_UP) and set(fc.PHASE.values()) <= set(fault_gate.PHASES)
    assert set(fc.STRIKES) | {k for k in fc.IN_JOB if k.startswith("kill_")} == set(fc.PHASE)
    assert {fc.EXPECTED_RC[k] for k in fc.IN_JOB if k.startswith(("worker_", "kill_"))} == {0}
    # outages are survived inside the job; a full disk ends it (a user error, never retried); a resize stops
    # the driver at its steps like a SIGTERM
    assert [fc.EXPECTED_RC[k] for k in ("s3_outage", "mlflow_outage", "disk_full", "resize", "resize_back")] \
        == [0, 0, 1, 75, 75]
    assert not set(fc.FOLLOW_UP) & set(fc.MENU)  # the way back of a resize is never drawn on its own


def test_an_mlflow_outage_holds_a_step_to_stop_the_server_and_a_later_one_to_start_it(resumed_at, tmp_path):
    resumed_at(4)
    for u in range(20):
        for u1 in (0.0, 0.5, 0.99):
            (p1, down), (p2, up) = fc._holds(setup(), tmp_path, fc.Fault("mlflow_outage", (u / 20, u1, 0.5)))
            assert p1 == p2 == "step" and 5 <= down < up <= 15  # both before K: the job cannot end first
    resumed_at(15)
    assert holds("mlflow_outage", 0.5, tmp_path) == []  # one step left: no room for an outage


def test_a_full_disk_is_filled_before_a_step_whose_save_has_a_known_size(resumed_at, tmp_path):
    resumed_at(0)  # from scratch: the first save (step 4) tells the ranks its size, so a later one is refused
    assert {holds("disk_full", u / 20, tmp_path)[0][1] for u in range(20)} == set(range(5, 17))
    resumed_at(8)  # a resume knows the size from the checkpoint it loaded
    assert {holds("disk_full", u / 20, tmp_path)[0][1] for u in range(20)} == set(range(9, 17))
    resumed_at(16)
    assert holds("disk_full", 0.5, tmp_path) == []


def test_a_resize_leaves_a_step_for_the_way_back_and_queues_it(resumed_at, tmp_path):
    resumed_at(4)
    assert {holds("resize", u / 20, tmp_path)[0][1] for u in range(20)} == set(range(5, 15))
    resumed_at(15)
    assert holds("resize", 0.5, tmp_path) == []
    sched = fc.Schedule(setup(), tmp_path, str(tmp_path / "campaign"))
    queue = [fc.Fault("truncate")]
    assert fc._after(sched, fc.Fault("resize", (0.1, 0.7, 0.2)), queue, 1) == ""
    assert sched.workers == 1 and [f.kind for f in queue] == ["resize_back", "truncate"]
    assert queue[0].u[0] == 0.7  # its step drawn from the schedule's own draw: a replay picks the same
    fc._after(sched, queue.pop(0), queue, 2)
    assert sched.workers == 2


def test_the_world_size_pattern_of_the_kept_steps_picks_the_reference():
    assert fc.world_size_pattern({}, 16) == ((2, 1, 16),)  # the uninterrupted reference
    trained = {**{s: 2 for s in range(1, 7)}, **{s: 1 for s in range(7, 12)}, **{s: 2 for s in range(12, 17)}}
    assert fc.world_size_pattern(trained, 16) == ((2, 1, 6), (1, 7, 11), (2, 12, 16))
    # a later resume from an older checkpoint trained steps 9-16 again with 2 workers: only 7 and 8 were 1's
    trained.update({s: 2 for s in range(9, 17)})
    assert fc.world_size_pattern(trained, 16) == ((2, 1, 6), (1, 7, 8), (2, 9, 16))


def test_a_fault_skipped_once_the_run_is_at_k_costs_no_attempt(monkeypatch, tmp_path):
    """Faults drawn after one that let the run reach K are skipped without a job that would only start and
    stop; a disk fault after them still gets the job it is owed."""
    at = {"step": 0}
    monkeypatch.setattr(fc, "_resume_step", lambda run_dir: at["step"])
    ran, damaged = [], []

    def one_attempt(sched, fault, holds, n):
        ran.append(fault.kind if fault else "clean")
        at["step"] = 16
        return 0

    monkeypatch.setattr(fc, "_one_attempt", one_attempt)
    monkeypatch.setattr(fc, "_damage", lambda sched, fault: damaged.append(fault.kind))
    faults = [fc.Fault(kind) for kind in ("worker_kill", "kill_in_save", "driver_kill", "truncate")]
    result = fc.Result(1, faults)
    fc._attempts(fc.Schedule(setup(), tmp_path, str(tmp_path / "run")), result)
    assert not result.failures, result.failures
    assert ran == ["worker_kill", "clean"] and result.attempts == [0, 0]  # the truncate's job, no other
    assert damaged == ["truncate"]
    assert [f.done for f in faults[1:3]] == ["kill_in_save (skipped: no checkpoint left to save)",
                                             "driver_kill (skipped: no step left to hold)"]


@pytest.mark.parametrize("rerun_log, problem", [
    ("took over the stale lock of run campaign (gone; was host h, pid 4242, since x)\n"
     "resumed from /r/step_00000004 at step 4\n", None),
    ("resumed from /r/step_00000004 at step 4\n", "did not say it took over the stale lock"),
    ("took over the stale lock of run campaign (gone; was host h, pid 42424, since x)\n"
     "resumed from /r/step_00000004 at step 4\n", "did not say it took over the stale lock"),
    ("took over the stale lock of run campaign (gone; was host h, pid 4242, since x)\n"
     "step 1/16\n", "did not resume from step 4"),
])
def test_the_attempt_after_a_driver_kill_must_take_over_its_lock_and_resume_where_it_left(
        monkeypatch, tmp_path, rerun_log, problem):
    at = {"step": 0}
    monkeypatch.setattr(fc, "_resume_step", lambda run_dir: at["step"])

    def one_attempt(sched, fault, holds, n):
        if fault is not None:  # the driver killed before step 5: step 4's checkpoint is the newest
            sched.stale_lock_pid, at["step"] = 4242, 4
            (tmp_path / f"attempt{n}.log").write_text("step 4/16\n")
            return -9
        (tmp_path / f"attempt{n}.log").write_text(rerun_log)
        at["step"] = 16
        return 0

    monkeypatch.setattr(fc, "_one_attempt", one_attempt)
    result = fc.Result(1, [fc.Fault("driver_kill", (0.3, 0.5, 0.5))])
    fc._attempts(fc.Schedule(setup(), tmp_path, str(tmp_path / "run")), result)
    assert result.attempts == [-9, 0]
    if problem is None:
        assert not result.failures, result.failures
    else:
        assert len(result.failures) == 1 and problem in result.failures[0], result.failures
