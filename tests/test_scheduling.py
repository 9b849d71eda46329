"""The order tests are handed to the pytest workers (tests/scheduling.py) and the durations file behind it."""

import importlib.util
import json
import random
from pathlib import Path

from tests.scheduling import DEFAULT_S, balanced_order, block_sizes, load_durations

ROOT = Path(__file__).resolve().parents[1]


def _suite(spec: dict[str, list[float]]) -> tuple[list[str], dict[str, float]]:
    """Test ids in alphabetical file order and their seconds, from {file: [seconds of each test]}."""
    ids, secs = [], {}
    for f in sorted(spec):
        for i, s in enumerate(spec[f]):
            ids.append(f"{f}::t{i}")
            secs[ids[-1]] = s
    return ids, secs


def _blocks(order: list[str], workers: int) -> list[list[str]]:
    out, at = [], 0
    for size in block_sizes(len(order), workers):
        out.append(order[at:at + size])
        at += size
    return out


def test_block_sizes_are_xdist_worksteal_s_first_hand_out():
    assert block_sizes(7, 2) == [3, 4] and block_sizes(8, 2) == [4, 4] and block_sizes(10, 3) == [3, 3, 4]
    assert sum(block_sizes(731, 4)) == 731


def test_the_shares_balance_and_each_starts_with_its_longest_file():
    # the alphabetical order put all the long files in the second block: 1.2 s against 380 s
    spec = {"a_unit.py": [0.1] * 6, "b_unit.py": [0.1] * 6, "x_long.py": [200.0], "y_long.py": [100.0, 20.0],
            "z_long.py": [60.0]}
    ids, secs = _suite(spec)
    alpha = [sum(secs[t] for t in b) for b in _blocks(ids, 2)]
    order = balanced_order(ids, 2, lambda t: t.split("::")[0], secs.__getitem__)
    assert sorted(order) == sorted(ids)  # only the order changes
    blocks = _blocks(order, 2)
    sums = [sum(secs[t] for t in b) for b in blocks]
    assert max(alpha) - min(alpha) > 300 and max(sums) - min(sums) <= 40, (alpha, sums)
    for b in blocks:  # longest file first, the unit tests at the end where a dry worker steals them
        files = [t.split("::")[0] for t in b]
        assert "long" in files[0] and "unit" in files[-1], b
    assert order.index("y_long.py::t0") + 1 == order.index("y_long.py::t1")  # a file's tests stay in order


def test_a_random_suite_keeps_every_test_once_and_files_whole_where_they_fit():
    rng = random.Random(0)
    spec = {f"f{i:02d}.py": [rng.choice([0.01, 0.2, 5.0, 60.0]) for _ in range(rng.randint(1, 12))]
            for i in range(40)}
    ids, secs = _suite(spec)
    for workers in (2, 3):
        order = balanced_order(ids, workers, lambda t: t.split("::")[0], secs.__getitem__)
        assert sorted(order) == sorted(ids)
        split = [f for f in spec if len({i for i, b in enumerate(_blocks(order, workers))
                                         for t in b if t.startswith(f + "::")}) > 1]
        assert len(split) <= workers, split  # only where a block's room ends inside a file


def test_one_worker_or_none_keeps_the_collection_order():
    ids = ["b.py::t", "a.py::t"]
    assert balanced_order(ids, 1, lambda t: t, lambda t: 1.0) == ids


def test_durations_file_is_readable_and_lists_the_long_tests():
    durations = load_durations()
    assert durations and all(v >= 0.5 for v in durations.values())
    assert durations["tests/integration/test_fault_campaign.py::test_three_fixed_fault_schedules"] > 60
    assert load_durations(Path("/nonexistent/durations.json")) == {}
    assert DEFAULT_S < 0.5


def test_durations_script_writes_means_of_the_timelines(tmp_path, monkeypatch, capsys):
    path = ROOT / "scripts" / "test_durations.py"
    spec = importlib.util.spec_from_file_location("test_durations_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    one, two = tmp_path / "one.txt", tmp_path / "two.txt"
    one.write_text("10.0 gw0 start a.py::slow\n14.0 gw0 end a.py::slow\n10.0 gw1 start a.py::quick\n"
                   "10.1 gw1 end a.py::quick\n")
    two.write_text("0.0 gw1 start a.py::slow\n6.0 gw1 end a.py::slow\n")
    assert script.mean_seconds([one, two]) == {"a.py::slow": 5.0}
    monkeypatch.setattr(script, "OUT", tmp_path / "durations.json")
    assert script.main([str(one), str(two)]) == 0
    assert json.loads((tmp_path / "durations.json").read_text()) == {"a.py::slow": 5.0}
    assert script.main([str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "no such timeline" in err and "UNIMO_TEST_TIMELINE" in err
