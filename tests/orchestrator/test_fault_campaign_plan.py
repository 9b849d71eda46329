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

    assert set(fc.PHASE) == set(fc.IN_JOB) and set(fc.PHASE.values()) <= set(fault_gate.PHASES)
    assert {fc.EXPECTED_RC[k] for k in fc.IN_JOB if k.startswith(("worker_", "kill_"))} == {0}
