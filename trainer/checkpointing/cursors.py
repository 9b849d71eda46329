"""Each rank's data cursor and RNG state in its own checkpoint file; the cursor's elastic view beside them.

Before (checkpoint schema 2), rank 0 all-gathered every rank's cursor and wrote them all into
trainer_state.json, and at resume every rank read that file and merged every rank's cursor: per rank O(ranks)
bytes, time and memory (about 0.6 GB of JSON, 22 s and 4 GiB per rank at 1,024 ranks with configs/xl.yaml's
data settings, docs/SCALE.md). Now (schema 3):

- each rank writes ``rank_state_RRRRR.json`` (its cursor and RNG state) into its own save folder; the
  manifest lists it like any file, and at resume only that rank hashes it (checkpoint.files_for_rank);
- rank 0 gathers from every rank only what the rank-independent view needs (each stream's plan and the shards
  it owns, no shuffle buffers: data_pipeline.cursor.rank_view_part) and writes the elastic view
  ``data_elastic_view.json``, O(shards) whatever the world size;
- a resume at the same world size and worker count reads its own file only; one at another reads the view.

A schema-2 checkpoint still resumes: its cursors come from trainer_state.json (``inline_ranks``, see
checkpoint.migrate_state), merged on every rank for an elastic resume as before.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

from data_pipeline.cursor import elastic_view, rank_view_part
from trainer import checkpoint as ckpt

log = logging.getLogger(__name__)


def rank_state_name(rank: int) -> str:
    return ckpt.RANK_STATE.format(rank=rank)


def write_rank_state(root: Path, rank: int, cursor: dict | None, rng: str) -> None:
    """This rank's cursor and RNG state, into its save folder (before it describes its files)."""
    path = root / rank_state_name(rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_json_atomic(path, {"schema": ckpt.SCHEMA_VERSION, "rank": rank, "data": cursor, "rng": rng})


def view_part(cursor: dict | None) -> dict | None:
    """What rank 0 needs of this rank's cursor for the elastic view (None without a cursor)."""
    return rank_view_part(cursor) if cursor is not None else None


def gather_to_first(obj: Any, rank: int, world_size: int) -> list | None:
    """Every rank's ``obj`` on rank 0 (None elsewhere): a gather, not an all-gather, so that no other rank
    holds O(ranks) of them."""
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    out: list | None = [None] * world_size if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def write_elastic_view(root: Path, parts: list[dict | None]) -> bool:
    """Rank 0: the elastic view from every rank's ``view_part``; False (nothing written) when the loader
    has no cursor to save."""
    if any(p is None for p in parts):
        return False
    path = root / ckpt.ELASTIC_VIEW
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_json_atomic(path, elastic_view(parts))
    return True


def _read(local: Path, rel: str, manifest: dict, fetch: Callable[[list[str]], None]) -> dict:
    """A JSON file of the checkpoint, checked against the manifest first (a file this rank's verification
    did not hash, like the elastic view after a worker-count change, is downloaded by ``fetch`` and hashed
    here)."""
    if rel not in manifest["files"]:
        raise ckpt.TornCheckpoint(f"checkpoint {local}: the manifest lists no {rel}")
    fetch([rel])
    ckpt.check_hashes(local, manifest, [rel])
    return json.loads((local / rel).read_text())


def restored(local: Path, state: dict, manifest: dict, rank: int, world_size: int, workers: int,
             fetch: Callable[[list[str]], None] = lambda names: None,
             ) -> tuple[dict | list | None, str | None]:
    """(the data cursor this rank resumes from, its RNG state or None) of the checkpoint at ``local``.

    Same world size and worker count: this rank's own cursor (an exact resume). Otherwise the elastic view,
    and no RNG state (another world size restarts it). ``fetch(names)`` brings files into ``local`` (a node's
    partial copy of an S3 checkpoint lacks the view when only the worker count changed)."""
    same_world = state["world_size"] == world_size
    if "inline_ranks" in state:  # schema 2 and older: every rank's cursor is in trainer_state.json
        ranks = state["inline_ranks"]
        if same_world:
            return ranks[rank]["data"], ranks[rank]["rng"]
        return [r["data"] for r in ranks], None  # build_loader merges them (O(ranks), as before)
    mine = _read(local, rank_state_name(rank), manifest, fetch) if same_world else None
    if mine is not None and _workers_of(mine["data"]) in (None, workers):
        return mine["data"], mine["rng"]
    if ckpt.ELASTIC_VIEW not in manifest["files"]:
        return None, mine["rng"] if mine else None  # saved without a data cursor
    rng = mine["rng"] if mine else None
    return _read(local, ckpt.ELASTIC_VIEW, manifest, fetch), rng


def _workers_of(cursor: dict | None) -> int | None:
    return cursor.get("num_workers") if isinstance(cursor, dict) else None


def first_cursor(state: dict, read_text) -> dict:
    """Any one rank's view of the data settings a checkpoint was saved with (seed, per-corpus shard counts,
    digests, seq_len), for checks before a job starts; ``read_text(rel)`` reads a file of the checkpoint
    (None when it is missing). {} without a cursor."""
    if "data_states" in state:  # schema 2 and older, unmigrated
        return (state.get("data_states") or [{}])[0] or {}
    text = read_text(ckpt.ELASTIC_VIEW)
    return json.loads(text) if text else {}

