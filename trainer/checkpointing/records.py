"""Keeps Ray Train's run snapshot in agreement with the checkpoint folders on disk (the driver runs it).

Ray Train 2.60 writes ``checkpoints/checkpoint_manager_snapshot.json`` after every reported checkpoint and,
when a job starts, refuses the whole run folder if the snapshot names a folder that is gone ("a reference to a
checkpoint that does not exist anymore ... delete the existing folder"). Since the CheckpointManager owns the
folders (it prunes them, and moves a torn one aside to resume from an older one), the snapshot lags behind
them; the driver reconciles it before Ray reads it and after the job, and logs what it changed. The snapshot
is edited as JSON, field by field, so fields this code does not know are kept; nothing here imports Ray.
"""

from __future__ import annotations

import json
import logging

from trainer import checkpoint as ckpt
from trainer import storage

log = logging.getLogger(__name__)

SNAPSHOT = "checkpoint_manager_snapshot.json"


def reconcile_ray_snapshot(checkpoints_root: str) -> list[str]:
    """Makes Ray's snapshot under ``checkpoints_root`` name exactly the step folders there (each once, oldest
    first, the newest as Ray's latest, complete folders it missed added); returns what it changed, in words.

    A snapshot that cannot be parsed is moved aside (Ray then starts without one, and the workers find the
    checkpoints by listing the folder). No snapshot, nothing to do."""
    path = storage.join(checkpoints_root, SNAPSHOT)
    text = storage.read_text(path)
    if text is None:
        return []
    try:
        snap = json.loads(text)
        results = list(snap["checkpoint_results"])
        indices = list(snap["checkpoint_report_indices"])
        names = [r["checkpoint_dir_name"] for r in results]
    except (ValueError, KeyError, TypeError) as err:
        from trainer.checkpointing.manager import aside_name

        dest = storage.join(checkpoints_root, aside_name(path, "unreadable"))
        storage.move(path, dest)
        return [f"moved the unreadable run snapshot aside to {dest} ({err})"]
    on_disk = {storage.name_of(c.path): c.step for c in ckpt.list_step_dirs(checkpoints_root)}
    changes = []

    # Each folder once (its last report: the metrics of the folder as it is now), only folders that exist.
    kept: dict[str, tuple[dict, int]] = {}
    for name, result, index in zip(names, results, indices):
        kept[name] = (result, index)
    gone = sorted(name for name in kept if name not in on_disk)
    if gone:
        changes.append(f"dropped {len(gone)} reference(s) to folders no longer there ({', '.join(gone)}: "
                       "pruned by retention or moved aside)")
    if len(kept) < len(results):
        changes.append(f"merged {len(results) - len(kept)} duplicate reference(s) to one folder")
    kept = {name: entry for name, entry in kept.items() if name in on_disk}
    missed = sorted(name for name in on_disk if name not in kept
                    and ckpt.has_manifest(storage.join(checkpoints_root, name)))
    for name in missed:
        kept[name] = ({"version": 0, "checkpoint_dir_name": name, "metrics": {"step": on_disk[name]}},
                      int(snap.get("current_report_index", 0)))
    if missed:
        changes.append(f"added {len(missed)} complete folder(s) Ray had not registered ({', '.join(missed)})")
    order = sorted(kept, key=lambda name: on_disk[name])
    snap["checkpoint_results"] = [kept[name][0] for name in order]
    snap["checkpoint_report_indices"] = [kept[name][1] for name in order]

    latest = snap.get("latest_checkpoint_result")
    newest = kept[order[-1]][0] if order else None
    if (latest or {}).get("checkpoint_dir_name") != (newest or {}).get("checkpoint_dir_name"):
        changes.append(f"latest checkpoint {(latest or {}).get('checkpoint_dir_name')} -> "
                       f"{(newest or {}).get('checkpoint_dir_name')}")
    snap["latest_checkpoint_result"] = newest
    _drop_pending_and_statuses(snap, set(order))
    if changes:
        storage.write_text(path, json.dumps(snap))
    return changes


def _drop_pending_and_statuses(snap: dict, names: set[str]) -> None:
    """Validation bookkeeping (unused by unimo) may only name folders the snapshot keeps."""
    pending = list(zip(snap.get("pending_training_results", []), snap.get("pending_validation_specs", [])))
    pending = [(r, v) for r, v in pending if r["checkpoint_dir_name"] in names]
    snap["pending_training_results"] = [r for r, _ in pending]
    snap["pending_validation_specs"] = [v for _, v in pending]
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names"):
        if key in snap:
            snap[key] = [n for n in snap[key] if n in names]


def reconcile_run(run_dir: str, when: str) -> None:
    """Reconciles the run's records with its folders and logs each repair (``when``: "start" or "end")."""
    try:
        changes = reconcile_ray_snapshot(storage.join(run_dir, "checkpoints"))
    except OSError as err:
        if when == "start":
            raise
        # the job's outcome stands; the next start reconciles again
        log.warning("run folder %s: could not reconcile Ray's run snapshot after the job: %s", run_dir, err)
        return
    # After a job its own pruning is expected; before one, a disagreement is news (a crash, a hand edit).
    level = logging.WARNING if when == "start" else logging.INFO
    for change in changes:
        log.log(level, "run folder %s, %s of the job: repaired Ray's run snapshot: %s", run_dir, when, change)
