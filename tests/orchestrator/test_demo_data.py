"""`unimo demo` reuses its data folder only when the same version of the synthetic world wrote it."""

from __future__ import annotations

import pytest

from data_pipeline import synthetic
from orchestrator.demo import ensure_demo_data


@pytest.fixture
def writes(monkeypatch):
    """Stands in for write_synthetic_dataset (seconds of CPU): records each call and writes a file."""
    calls = []

    def fake(out):
        calls.append(out)
        from pathlib import Path

        (Path(out) / "pairs").mkdir(parents=True, exist_ok=True)
        (Path(out) / "pairs" / "shard-000000.tar").write_bytes(b"x")
        return {k: f"{out}/{k}" for k in ("pair", "text", "image", "eval", "tokenizer")}

    monkeypatch.setattr(synthetic, "write_synthetic_dataset", fake)
    return calls


def test_the_same_world_is_written_once(tmp_path, writes):
    ensure_demo_data(tmp_path / "data")
    ensure_demo_data(tmp_path / "data")
    assert len(writes) == 1
    assert (tmp_path / "data" / "DONE").read_text() == f"world {synthetic.world_version()}\n"


@pytest.mark.parametrize("marker", ["ok\n", "world 000000000000\n"])  # before versions; another version
def test_data_of_another_world_is_written_again(tmp_path, writes, marker, capsys):
    data = tmp_path / "data"
    (data / "pairs").mkdir(parents=True)
    (data / "pairs" / "stale.tar").write_bytes(b"old world")
    (data / "DONE").write_text(marker)
    ensure_demo_data(data)
    assert writes == [str(data)]
    assert not (data / "pairs" / "stale.tar").exists()  # nothing of the old world is left to be read
    assert "another version of the synthetic world" in capsys.readouterr().out
    assert (data / "DONE").read_text() == f"world {synthetic.world_version()}\n"
