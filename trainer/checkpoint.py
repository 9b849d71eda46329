"""Checkpoint directories: DeepSpeed shards + trainer_state.json + a manifest written last.

Only a checkpoint whose manifest lists every file with the right size and checksum counts; anything else is
torn (a crash during save, a lost upload, a flipped byte) and is skipped with a warning naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE = "trainer_state.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_files(root: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} of every file under ``root`` (what one rank wrote)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel not in exclude:
            out[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    os.replace(tmp, path)


def write_manifest(root: Path, files: dict[str, dict[str, Any]], step: int) -> None:
    write_json_atomic(root / MANIFEST, {"step": step, "files": files})


class TornCheckpoint(RuntimeError):
    """A checkpoint that is incomplete or corrupt."""


def verify(root: Path, check_sums: bool = True) -> dict[str, Any]:
    """Returns the manifest of a complete checkpoint at ``root``; raises TornCheckpoint naming the problem."""
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise TornCheckpoint(f"checkpoint {root} has no {MANIFEST} (save did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as err:
        raise TornCheckpoint(f"checkpoint {root}: unreadable {MANIFEST}: {err}") from None
    for rel, meta in files.items():
        path = root / rel
        if not path.is_file():
            raise TornCheckpoint(f"checkpoint {root}: file {rel} listed in the manifest is missing")
        if path.stat().st_size != meta["size"]:
            raise TornCheckpoint(f"checkpoint {root}: file {rel} has size {path.stat().st_size}, "
                                 f"manifest says {meta['size']}")
        if check_sums and sha256_file(path) != meta["sha256"]:
            raise TornCheckpoint(f"checkpoint {root}: file {rel} fails its checksum")
    return manifest


def step_of(path: Path) -> int:
    """The step a checkpoint folder is named after (-1 for a name that is not step_XXXXXXXX)."""
    m = STEP_DIR.match(path.name)
    return int(m.group(1)) if m else -1


@dataclass
class FoundCheckpoint:
    path: Path
    step: int


def list_step_dirs(checkpoints_root: Path) -> list[FoundCheckpoint]:
    """Step directories under ``checkpoints_root``, newest first."""
    if not checkpoints_root.is_dir():
        return []
    found = []
    for child in checkpoints_root.iterdir():
        m = STEP_DIR.match(child.name)
        if m and child.is_dir():
            found.append(FoundCheckpoint(child, int(m.group(1))))
    return sorted(found, key=lambda c: c.step, reverse=True)


def newest_valid(checkpoints_root: Path) -> FoundCheckpoint | None:
    """The newest checkpoint with a valid manifest; torn ones are skipped with a warning naming them."""
    for cand in list_step_dirs(checkpoints_root):
        try:
            verify(cand.path)
            return cand
        except TornCheckpoint as err:
            log.warning("skipping torn checkpoint: %s", err)
    return None


def read_state(root: Path) -> dict[str, Any]:
    return json.loads((root / STATE).read_text())


def config_mismatch(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of fields whose values differ between two config trees (B8's message)."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_mismatch(a, b, name + ".")
        elif a != b:
            diffs.append(f"{name}: checkpoint has {a!r}, config has {b!r}")
    return diffs


def retained_steps(steps: list[int], keep_last: int, keep_every: int) -> set[int]:
    """The steps retention keeps: the newest ``keep_last`` and every ``keep_every``-th."""
    newest = set(sorted(steps)[-keep_last:]) if keep_last > 0 else set()
    periodic = {s for s in steps if keep_every > 0 and s % keep_every == 0}
    return newest | periodic


def prune(checkpoints_root: Path, keep_last: int, keep_every: int) -> list[Path]:
    """Deletes complete checkpoints that retention does not keep; returns what it removed.

    Only folders with a manifest are candidates: one still being uploaded is never touched.
    """
    complete = [c for c in list_step_dirs(checkpoints_root) if (c.path / MANIFEST).is_file()]
    keep = retained_steps([c.step for c in complete], keep_last, keep_every)
    removed = []
    for cand in complete:
        if cand.step not in keep:
            import shutil

            shutil.rmtree(cand.path, ignore_errors=True)
            removed.append(cand.path)
    return removed
