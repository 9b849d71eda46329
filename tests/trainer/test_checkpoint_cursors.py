"""Each rank's data cursor in its own checkpoint file, the elastic view beside them (checkpoint schema 3), and
schema-2 checkpoints (every rank's cursor in trainer_state.json) still resuming exactly and elastically.

The cursors are real: the scale simulation's ranks (bench/scale_sim.py: the real plan, stream, mixer and
cursor code over a synthetic shard listing, no tars, no processes) draw some micro-batches and hand over
their ``state_dict()``. The checkpoint folder is laid out as the ranks' saves write it
(trainer/checkpointing/cursors.py); the manager's save and load run at one rank over a gloo group.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.scale_sim import Drawn, build_world, make_plan, run_steps, synthetic_config, synthetic_listing
from data_pipeline.cursor import merge_states
from data_pipeline.loader import _initial_states
from trainer import checkpoint as ckpt
from trainer.checkpointing import cursors
from trainer.checkpointing.verification import verify_part
from tests.trainer.checkpoint_fakes import NoReporter, StubEngine

WORKERS = 2


@pytest.fixture(scope="module")
def world():
    """(config, listing, every rank's cursor) of 2 ranks x 2 workers after some micro-batches."""
    cfg, listing = synthetic_config(buffer=8, batch=4, workers=WORKERS), synthetic_listing(200)
    ranks, _ = build_world(cfg, listing, 2, None, measure=False)
    run_steps(ranks, 5, Drawn())
    return cfg, listing, [r.loader.state_dict() for r in ranks]


def _schema3(root: Path, states: list[dict]) -> Path:
    """A step folder of 2 ranks as their saves lay it out: each rank's cursor file, the elastic view rank 0
    built from the gathered parts, the trainer state without cursors, the manifest."""
    d = root / ckpt.step_dir_name(4)
    for rank, st in enumerate(states):
        cursors.write_rank_state(d, rank, st, f"rng of rank {rank}")
    assert cursors.write_elastic_view(d, [cursors.view_part(st) for st in states])
    (d / ckpt.STATE).write_text(json.dumps({"schema": ckpt.SCHEMA_VERSION, "step": 4, "world_size": 2}))
    ckpt.write_manifest(d, ckpt.describe_files(d), 4)
    return d


def _schema2(root: Path, states: list[dict]) -> Path:
    """A step folder as unimo wrote it before schema 3: every rank's cursor and RNG in trainer_state.json."""
    d = root / ckpt.step_dir_name(4)
    d.mkdir(parents=True)
    (d / ckpt.STATE).write_text(json.dumps({"schema": 2, "step": 4, "world_size": 2, "data_states": states,
                                            "rng": ["rng of rank 0", "rng of rank 1"]}))
    ckpt.write_manifest(d, ckpt.describe_files(d), 4)
    return d


def _restored(d: Path, rank: int, world_size: int, workers: int = WORKERS):
    return cursors.restored(d, ckpt.read_state(d), ckpt.read_manifest(d), rank, world_size, workers)


def _redistributed(state, cfg, listing, world_size: int) -> list:
    """Every new rank's stream states and mix resumed from ``state`` (what build_loader hands its loader)."""
    if isinstance(state, list):
        state = merge_states(state)
    return [_initial_states(state, make_plan(cfg, listing, r), world_size) for r in range(world_size)]


def test_an_exact_resume_reads_only_its_own_cursor_file(tmp_path, world):
    _, _, states = world
    d = _schema3(tmp_path, states)
    # the other rank's file and the elastic view gone: rank 1 does not need them
    (d / cursors.rank_state_name(0)).unlink()
    (d / ckpt.ELASTIC_VIEW).unlink()
    cursor, rng = _restored(d, 1, 2)
    assert cursor == states[1] and rng == "rng of rank 1"
    assert "data_states" not in ckpt.read_state(d) and "rng" not in ckpt.read_state(d)


def test_an_elastic_resume_reads_the_view_which_resumes_like_every_ranks_cursor(tmp_path, world):
    cfg, listing, states = world
    d = _schema3(tmp_path, states)
    for rank in range(2):
        (d / cursors.rank_state_name(rank)).unlink()  # another world size reads no rank's file
    view, rng = _restored(d, 0, 3)
    assert rng is None  # another world size starts its RNG afresh
    assert all(src["streams"] == {} for src in view["sources"].values())  # O(shards): no stream's state
    assert _redistributed(view, cfg, listing, 3) == _redistributed(states, cfg, listing, 3)


def test_another_worker_count_at_the_same_world_size_resumes_from_the_view(tmp_path, world):
    cfg, listing, states = world
    d = _schema3(tmp_path, states)
    view, rng = _restored(d, 1, 2, workers=WORKERS + 1)
    assert rng == "rng of rank 1" and view == json.loads((d / ckpt.ELASTIC_VIEW).read_text())


def test_a_partial_copy_fetches_the_view_when_the_worker_count_changed(tmp_path, world):
    """A node's copy of an S3 checkpoint holds the files its ranks hash, not the view at the same world size;
    another worker count reads the view, so it is fetched (checkpoint.fetch_into), then hashed."""
    _, _, states = world
    d = _schema3(tmp_path / "saved", states)
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    (copy / ckpt.ELASTIC_VIEW).unlink()
    asked: list[list[str]] = []

    def fetch(names):
        asked.append(names)
        for rel in names:
            shutil.copyfile(d / rel, copy / rel)

    state, manifest = ckpt.read_state(copy), ckpt.read_manifest(copy)
    assert cursors.restored(copy, state, manifest, 1, 2, WORKERS, fetch)[0] == states[1]
    assert asked == [[cursors.rank_state_name(1)]]  # the exact resume asks only for its own file
    view, _ = cursors.restored(copy, state, manifest, 1, 2, WORKERS + 1, fetch)
    assert asked[-1] == [ckpt.ELASTIC_VIEW] and view == json.loads((d / ckpt.ELASTIC_VIEW).read_text())


def test_a_schema_2_checkpoint_resumes_exactly_and_elastically(tmp_path, world):
    cfg, listing, states = world
    d = _schema2(tmp_path, states)
    assert ckpt.read_state(d)["schema"] == ckpt.SCHEMA_VERSION == 3
    assert _restored(d, 1, 2) == (states[1], "rng of rank 1")  # exact: its own cursor only
    every, rng = _restored(d, 0, 3)
    assert rng is None and every == states
    # the same resume at 3 ranks as from a schema-3 checkpoint's elastic view of the same cursors
    view, _ = _restored(_schema3(tmp_path / "v3", states), 0, 3)
    assert _redistributed(every, cfg, listing, 3) == _redistributed(view, cfg, listing, 3)
    part = verify_part(str(d), tmp_path / "cache", 1, lambda local, state: False, world_size=2)
    assert part.problem is None


def test_a_rank_hashes_its_own_cursor_file_and_the_view_only_when_the_world_size_changed(tmp_path, world,
                                                                                         hashed):
    _, _, states = world
    d = _schema3(tmp_path, states)
    hashed.clear()  # (writing the manifest hashed everything)
    mine, view = cursors.rank_state_name(1), ckpt.ELASTIC_VIEW
    assert verify_part(str(d), tmp_path / "c", 1, lambda local, state: False, world_size=2).problem is None
    assert mine in hashed and cursors.rank_state_name(0) not in hashed and view not in hashed
    hashed.clear()
    assert verify_part(str(d), tmp_path / "c", 1, lambda local, state: False, world_size=3).problem is None
    assert view in hashed and cursors.rank_state_name(0) not in hashed
    # a torn cursor file of rank 1 is found by rank 1, not by rank 0 (the agreement then skips it for all)
    (d / mine).write_text((d / mine).read_text().replace("rng of rank 1", "rng of rank X"))  # same size
    assert "rank_state_00001.json fails its checksum" in verify_part(
        str(d), tmp_path / "c", 1, lambda local, state: False, world_size=2).problem
    assert verify_part(str(d), tmp_path / "c", 0, lambda local, state: False, world_size=2).problem is None


# ---- the manager's save and load, one rank over gloo -----------------------------------------------------

def test_the_manager_saves_the_cursor_beside_a_small_trainer_state_and_resumes_from_it(tmp_path,
                                                                                      one_rank_group):
    from trainer.checkpointing.manager import CheckpointManager
    from trainer.config import load_config

    data_cfg, listing = synthetic_config(buffer=8, batch=4, workers=WORKERS), synthetic_listing(200)
    (rank,), _ = build_world(data_cfg, listing, 1, None, measure=False)
    run_steps([rank], 3, Drawn())
    cfg = load_config(None, ["run.name=cursors", "deepspeed.zero_stage=3", f"data.num_workers={WORKERS}"])
    run = tmp_path / "run"
    manager = CheckpointManager(cfg, 0, 1, NoReporter(), run_location=str(run))
    local = manager.save_local(3, StubEngine(), rank.loader, {})
    shutil.move(str(local), run / "checkpoints" / ckpt.step_dir_name(3))
    d = run / "checkpoints" / ckpt.step_dir_name(3)
    files = ckpt.verify(d)["files"]
    assert cursors.rank_state_name(0) in files and ckpt.ELASTIC_VIEW in files
    state = json.loads((d / ckpt.STATE).read_text())
    assert state["schema"] == 3 and "data_states" not in state and "rng" not in state
    resumed = CheckpointManager(cfg, 0, 1, NoReporter(), run_location=str(run))
    progress = resumed.load(lambda universal: StubEngine())
    assert progress.step == 3 and progress.data_state == rank.loader.state_dict()
