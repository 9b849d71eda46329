"""The fault gate holds a rank before the chosen step until the test opens it (threads stand in for ranks)."""

import threading

import pytest

from trainer import fault_gate


def test_unset_or_another_step_passes_at_once(tmp_path):
    fault_gate.wait_at(5, 0, environ={})
    fault_gate.wait_at(5, 0, environ={fault_gate.ENV: f"6:{tmp_path}"})
    assert not list(tmp_path.iterdir())


def test_the_gate_holds_until_opened_and_says_it_was_reached(tmp_path):
    env = {fault_gate.ENV: f"11:{tmp_path}"}
    passed = threading.Event()

    def rank():
        fault_gate.wait_at(11, 1, environ=env, poll_s=0.01)
        passed.set()

    t = threading.Thread(target=rank)
    t.start()
    reached = tmp_path / "reached-rank1"
    for _ in range(2000):  # an event: the file the rank writes when it arrives
        if reached.exists():
            break
        threading.Event().wait(0.01)
    assert reached.exists() and not passed.is_set()
    fault_gate.release(tmp_path)
    t.join(30)
    assert passed.is_set()
    fault_gate.wait_at(11, 0, environ=env)  # a restarted group finds it open


def test_a_forgotten_gate_is_a_named_error(tmp_path):
    env = {fault_gate.ENV: f"3:{tmp_path}", fault_gate.TIMEOUT_ENV: "0.05"}
    with pytest.raises(TimeoutError, match="fault gate before step 3"):
        fault_gate.wait_at(3, 0, environ=env)


def test_several_gates_each_hold_their_own_step(tmp_path):
    env = {fault_gate.ENV: f"3:{tmp_path / 'a'},9:{tmp_path / 'b'}"}
    assert fault_gate.parse(env[fault_gate.ENV]) == {("step", 3): tmp_path / "a", ("step", 9): tmp_path / "b"}
    fault_gate.release(tmp_path / "a")
    fault_gate.wait_at(3, 0, environ=env)  # open: passes
    with pytest.raises(TimeoutError, match="before step 9"):  # the other one is still closed
        fault_gate.wait_at(9, 0, environ={**env, fault_gate.TIMEOUT_ENV: "0.05"})
    assert fault_gate.reached(tmp_path / "b", ranks=(0,))


def test_a_phase_gate_holds_only_that_phase_of_its_step(tmp_path):
    env = {fault_gate.ENV: f"save@8:{tmp_path}", fault_gate.TIMEOUT_ENV: "0.05"}
    assert fault_gate.parse(env[fault_gate.ENV]) == {("save", 8): tmp_path}
    fault_gate.wait_at(8, 0, environ=env)  # the start of step 8 is not gated
    fault_gate.wait_at(8, 0, environ=env, phase="upload")
    with pytest.raises(TimeoutError, match="at the save of step 8"):
        fault_gate.wait_at(8, 1, environ=env, phase="save")
    assert fault_gate.reached(tmp_path, ranks=(1,))


def test_a_malformed_setting_is_named():
    for bad in ("eleven", "upload:3:/tmp/g", "during@3:/tmp/g"):
        with pytest.raises(ValueError, match="PHASE"):
            fault_gate.parse(bad)
