"""Checkpoint directories: DeepSpeed shards + trainer_state.json + a manifest written last.

Only a checkpoint whose manifest lists every file with the right size and checksum counts; anything else is
torn (a crash during save, a lost upload, a flipped byte) and is skipped with a warning naming it.

``verify`` checks a whole checkpoint (export, evaluation, the universal conversion), downloaded whole from S3
(``checked_local_copy``). A resuming rank checks the presence and size of every file but hashes only the files
it will load (``files_for_rank``): its own ZeRO shards and the files every rank reads; from S3 its node
downloads only those (``partial_copy``, ``fetch_into``) and takes the sizes from one listing
(``listed_sizes``); trainer/checkpointing/verification.py makes the ranks agree.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from data_pipeline.errors import UserError
from trainer import storage

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE = "trainer_state.json"
TOKENIZER = "tokenizer.json"  # the tokenizer trained with (schema 2 on; trainer/checkpointing/identity.py)
# Schema 3 on: each rank's data cursor and RNG state in its own file, and the cursor's elastic view (what
# another world size resumes from, O(shards)) beside them; trainer_state.json holds neither
# (trainer/checkpointing/cursors.py). Top-level names, not a sub-folder: on S3, Arrow's upload writes
# directory markers for every folder of each rank's save (4 PUTs and a HEAD per rank and folder).
RANK_STATE = "rank_state_{rank:05d}.json"
RANK_STATE_FILE = re.compile(r"(?:^|/)rank_state_(\d+)\.json$")
ELASTIC_VIEW = "data_elastic_view.json"
# The layout version written into manifest.json and trainer_state.json. Older checkpoints load through
# ``migrate_state``; a newer one (written by a later unimo) is refused with a message, never misread.
SCHEMA_VERSION = 3
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
    write_json_atomic(root / MANIFEST, {"schema": SCHEMA_VERSION, "step": step, "files": files})


class TornCheckpoint(RuntimeError):
    """A checkpoint that is incomplete or corrupt."""


class CheckpointUnreadable(OSError):
    """A checkpoint some rank could not read for a storage error (unreachable, reset, EIO): not torn, so it is
    neither skipped nor moved aside; the worker group fails and Ray Train starts it again."""


class NewerCheckpoint(UserError, ValueError):
    """A checkpoint written by a later unimo, in a layout this one does not know (a restart cannot help)."""


class IncompatibleCheckpoint(UserError, ValueError):
    """A checkpoint this run cannot continue from as configured (another model, say): never retried."""


def check_schema(payload: dict[str, Any], where: Path | str) -> int:
    """The payload's schema version (0 before versions were written); a newer one than ours is an error."""
    version = int(payload.get("schema", 0))
    if version > SCHEMA_VERSION:
        raise NewerCheckpoint(f"{where} has checkpoint schema {version}, but this unimo reads schema "
                              f"{SCHEMA_VERSION} and older; resume or export it with a newer unimo")
    return version


def _v0_to_v1(state: dict[str, Any]) -> dict[str, Any]:
    """Schema 0 (no version field) had no ``extra`` in some early checkpoints; everything else is the same."""
    state.setdefault("extra", {})
    return state


def _v1_to_v2(state: dict[str, Any]) -> dict[str, Any]:
    """Schema 2 records the tokenizer's hash and the corpora's URL digests (``data_identity``) and keeps the
    tokenizer.json beside the state; before, neither was known: None resumes unchecked."""
    state.setdefault("data_identity", None)
    return state


def _v2_to_v3(state: dict[str, Any]) -> dict[str, Any]:
    """Schema 3 keeps each rank's cursor and RNG in its own file (``RANK_STATE``) and the elastic view in
    ``ELASTIC_VIEW``; before, trainer_state.json held every rank's (``data_states``, ``rng``). Those lists
    move to ``inline_ranks`` ([{"data", "rng"}] per rank), which trainer/checkpointing/cursors.py reads in
    place of the files."""
    data, rng = state.pop("data_states", None), state.pop("rng", None)
    if data is not None:
        state["inline_ranks"] = [{"data": d, "rng": r} for d, r in zip(data, rng or [None] * len(data))]
    return state


# MIGRATIONS[v] turns a schema-v trainer state into schema v+1.
MIGRATIONS = {0: _v0_to_v1, 1: _v1_to_v2, 2: _v2_to_v3}


def migrate_state(state: dict[str, Any], where: Path | str) -> dict[str, Any]:
    """A trainer state of any schema up to ours, brought to ours one step at a time."""
    version = check_schema(state, where)
    while version < SCHEMA_VERSION:
        state = MIGRATIONS[version](state)
        version += 1
    state["schema"] = SCHEMA_VERSION
    return state


def read_manifest(root: Path) -> dict[str, Any]:
    """The parsed manifest of the checkpoint at ``root``; raises TornCheckpoint when it is missing or
    unreadable, NewerCheckpoint when a later unimo wrote it."""
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise TornCheckpoint(f"checkpoint {root} has no {MANIFEST} (save did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
        if not isinstance(manifest["files"], dict):
            raise ValueError("'files' is not a mapping")
    except (ValueError, KeyError, TypeError) as err:
        raise TornCheckpoint(f"checkpoint {root}: unreadable {MANIFEST}: {err}") from None
    check_schema(manifest, manifest_path)
    return manifest


def check_sizes(root: Path, manifest: dict[str, Any], sizes: dict[str, int] | None = None) -> None:
    """Every file the manifest lists is there with its size: a stat per file under ``root``, or, for a
    partial copy of an S3 checkpoint, the ``sizes`` ({relative path: bytes}) its listing gave. No reading."""
    for rel, meta in manifest["files"].items():
        path = root / rel
        size = sizes.get(rel) if sizes is not None else (path.stat().st_size if path.is_file() else None)
        if size is None:
            raise TornCheckpoint(f"checkpoint {root}: file {rel} listed in the manifest is missing")
        if size != meta["size"]:
            raise TornCheckpoint(f"checkpoint {root}: file {rel} has size {size}, "
                                 f"manifest says {meta['size']}")


def check_hashes(root: Path, manifest: dict[str, Any], names: Iterable[str]) -> int:
    """Hashes the files ``names`` (manifest paths) against the manifest; returns the bytes read."""
    files = manifest["files"]
    read = 0
    for rel in names:
        if sha256_file(root / rel) != files[rel]["sha256"]:
            raise TornCheckpoint(f"checkpoint {root}: file {rel} fails its checksum")
        read += files[rel]["size"]
    return read


def verify(root: Path, check_sums: bool = True) -> dict[str, Any]:
    """Returns the manifest of a complete checkpoint at ``root``, every file hashed (``check_sums``: else
    sizes only); raises TornCheckpoint naming the problem."""
    manifest = read_manifest(root)
    check_sizes(root, manifest)
    if check_sums:
        check_hashes(root, manifest, manifest["files"])
    return manifest


# A ZeRO file that one data-parallel rank writes and, at the same world size and stage, only that rank reads
# back (deepspeed/runtime/engine.py: _get_ckpt_name, _get_rank_zero_ckpt_name; bf16_ under stages 1-2 with a
# bf16 optimizer). unimo has no model or pipeline parallelism, so the data-parallel rank is the global rank.
RANK_SHARD = re.compile(r"(?:^|/)(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_(?:model_states|optim_states)\.pt$")


def shard_rank(rel: str) -> int | None:
    """The rank whose file ``rel`` is (a ZeRO shard, or its data cursor and RNG), or None for a file any rank
    may read."""
    m = RANK_SHARD.search(rel) or RANK_STATE_FILE.search(rel)
    return int(m.group(1)) if m else None


def files_for_rank(names: Iterable[str], rank: int, elastic: bool = False) -> list[str]:
    """The files of a checkpoint that ``rank`` reads when it resumes at the same ZeRO stage: its own shards
    and cursor file and every file that is no rank's (trainer_state.json, tokenizer.json, stages 1-2's
    mp_rank_00_model_states.pt, ...); the cursor's elastic view only when ``elastic`` (another world size).
    A file of an unknown name counts as read by every rank: a rank may hash more than it reads, never less."""
    return [rel for rel in names if shard_rank(rel) in (None, rank) and (elastic or rel != ELASTIC_VIEW)]


def step_of(path: Path | str) -> int:
    """The step a checkpoint folder (or s3:// URL) is named after (-1 for a name that is not
    step_XXXXXXXX)."""
    m = STEP_DIR.match(storage.name_of(path))
    return int(m.group(1)) if m else -1


@dataclass
class FoundCheckpoint:
    path: Path | str  # a local folder, or an s3:// URL (see trainer/storage.py)
    step: int


def list_step_dirs(checkpoints_root: Path | str) -> list[FoundCheckpoint]:
    """Step directories under ``checkpoints_root`` (a local folder or an s3:// prefix), newest first."""
    if storage.is_remote(checkpoints_root):
        found = [FoundCheckpoint(storage.join(checkpoints_root, name), int(m.group(1)))
                 for name in storage.list_names(checkpoints_root) if (m := STEP_DIR.match(name))]
    else:
        root = Path(checkpoints_root)
        found = [FoundCheckpoint(child, int(m.group(1)))
                 for child in (root.iterdir() if root.is_dir() else [])
                 if (m := STEP_DIR.match(child.name)) and child.is_dir()]
    return sorted(found, key=lambda c: c.step, reverse=True)


def _copy_dir(location: Path | str, cache_dir: Path, version: str, suffix: str = "") -> Path:
    """Where a node keeps its copy of the checkpoint at ``location`` whose manifest reads ``version``."""
    key = hashlib.sha256(f"{location}\n{version}".encode()).hexdigest()[:12]
    return cache_dir / f"{storage.name_of(location)}-{key}{suffix}"


def _locks_dir(local: Path) -> Path:
    """Beside a partial copy, not in it: the file locks of its downloads and the node's listing."""
    return local.with_name(local.name + ".locks")


def fetch(location: Path | str, cache_dir: Path, version: str = "") -> Path:
    """A local folder holding the checkpoint: ``location`` itself when local, else a copy downloaded once per
    node into ``cache_dir`` (the ranks of a node share it; a file lock lets the first one download).

    ``version`` (the manifest's text) is part of the copy's name: a step folder rewritten on S3 after a torn
    save is downloaded again rather than served from an old copy.
    """
    from filelock import FileLock  # a Ray dependency

    if not storage.is_remote(location):
        return Path(location)
    dest = _copy_dir(location, cache_dir, version)
    done = dest.with_name(dest.name + ".complete")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if not done.exists():
            import shutil

            shutil.rmtree(dest, ignore_errors=True)  # a copy interrupted by a crash starts over
            storage.download(str(location), dest)
            done.touch()
    return dest


def drop_copy(local: Path) -> None:
    """Deletes a copy made by ``fetch`` (with its markers) once it has been loaded or found torn."""
    import shutil

    shutil.rmtree(local, ignore_errors=True)
    shutil.rmtree(_locks_dir(local), ignore_errors=True)
    for suffix in (".complete", ".lock"):
        local.with_name(local.name + suffix).unlink(missing_ok=True)


def local_copy(location: Path | str, cache_dir: Path) -> Path:
    """The local folder of a checkpoint, not yet verified: ``location`` itself when local, else the node's
    download in ``cache_dir``; raises TornCheckpoint, before any download, for an S3 checkpoint without a
    manifest."""
    if not storage.is_remote(location):
        return Path(location)
    manifest = storage.read_text(storage.join(location, MANIFEST))  # one GET decides before any download
    if manifest is None:
        raise TornCheckpoint(f"checkpoint {location} has no {MANIFEST} (save or upload did not finish)")
    return fetch(location, cache_dir, version=manifest)


# ----- a resuming node's partial copy: only the files its ranks read (``files_for_rank``) -------------------
# Downloading the whole checkpoint on every node made a resume's S3 GETs grow as nodes x files, i.e. with the
# square of the world size (about 395,000 at 1,024 ranks, docs/SCALE.md); each node now downloads its own
# ranks' files and the shared ones: every file about once per resume, plus one listing per node.
PARTIAL = ".files"  # a partial copy's suffix: never confused with a whole copy of ``fetch`` (its own markers)


def partial_copy(location: Path | str, cache_dir: Path) -> Path:
    """The node's folder for the files of the checkpoint at ``location`` its ranks read, holding at first
    only the manifest (``location`` itself when local); ``fetch_into`` adds files. Raises TornCheckpoint,
    before any download, for an S3 checkpoint without a manifest (one GET decides)."""
    if not storage.is_remote(location):
        return Path(location)
    manifest = storage.read_text(storage.join(location, MANIFEST))
    if manifest is None:
        raise TornCheckpoint(f"checkpoint {location} has no {MANIFEST} (save or upload did not finish)")
    local = _copy_dir(location, cache_dir, manifest, PARTIAL)
    _once(local / MANIFEST, _locks_dir(local), lambda tmp: tmp.write_text(manifest))
    return local


def fetch_into(local: Path, location: Path | str, names: Iterable[str]) -> None:
    """Downloads the files ``names`` of the checkpoint at ``location`` that the partial copy ``local`` lacks
    (nothing for a local checkpoint). The node's ranks share the copy: a file lock per file lets one rank
    download a shared file while the others wait for it, and each file appears whole (a rename) or not."""
    if not storage.is_remote(location):
        return
    for rel in names:
        _once(local / rel, _locks_dir(local), lambda tmp, rel=rel: storage.download_file(
            storage.join(location, rel), tmp))


def listed_sizes(local: Path, location: Path | str) -> dict[str, int] | None:
    """{relative path: bytes} of every file of the S3 checkpoint at ``location``, from one listing per node
    (kept beside the partial copy ``local`` for its other ranks); None for a local checkpoint (stat it)."""
    if not storage.is_remote(location):
        return None
    sizes = _locks_dir(local) / "sizes.json"
    _once(sizes, _locks_dir(local), lambda tmp: tmp.write_text(json.dumps(storage.file_sizes(str(location)))))
    return json.loads(sizes.read_text())


def _once(path: Path, locks: Path, make) -> None:
    """Creates ``path`` with ``make(temporary path)`` unless it exists; one process of the node does it, under
    a lock of its own, and renames it into place whole."""
    from filelock import FileLock  # a Ray dependency

    if path.is_file():
        return
    locks.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    with FileLock(str(locks / f"{key}.lock")):
        if path.is_file():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        make(tmp)
        os.replace(tmp, path)


def named_by_location(err: TornCheckpoint, local: Path, location: Path | str) -> TornCheckpoint:
    """The error about a downloaded copy, naming the checkpoint's URL instead of the copy."""
    return TornCheckpoint(str(err).replace(str(local), str(location)))


def checked_local_copy(location: Path | str, cache_dir: Path) -> Path:
    """The verified local folder of a checkpoint; raises TornCheckpoint naming ``location`` (the URL, not the
    copy) when it has no manifest or fails it. Local checkpoints are verified in place. Every file is hashed:
    for tools that read the whole checkpoint (export, evaluation); a resuming rank hashes its part only."""
    local = local_copy(location, cache_dir)
    try:
        verify(local)
    except TornCheckpoint as err:
        if storage.is_remote(location):
            drop_copy(local)
        raise named_by_location(err, local, location) from None
    return local


def has_manifest(location: Path | str) -> bool:
    """Without a manifest a checkpoint is torn or still uploading (one HEAD on S3)."""
    if storage.is_remote(location):
        return storage.exists(storage.join(location, MANIFEST))
    return (Path(location) / MANIFEST).is_file()


def files_present(location: Path | str) -> bool:
    """Every file the manifest lists is there with its size (a stat per file, one listing on S3; nothing is
    read but the manifest). Rank 0 writes the manifest with its own files, so a manifest alone does not show
    that the other ranks' uploads have landed."""
    try:
        if storage.is_remote(location):
            text = storage.read_text(storage.join(location, MANIFEST))
            if text is None:
                return False
            check_sizes(Path(str(location)), json.loads(text), storage.file_sizes(str(location)))
        else:
            check_sizes(Path(location), read_manifest(Path(location)))
        return True
    except (TornCheckpoint, ValueError, KeyError, TypeError, OSError):  # unreadable or unreachable: not shown
        return False


def newest_complete(checkpoints_root: Path | str) -> FoundCheckpoint | None:
    """The newest step folder with a manifest (complete as saved; not verified: no file is read)."""
    return next((c for c in list_step_dirs(checkpoints_root) if has_manifest(c.path)), None)


def newest_valid(checkpoints_root: Path | str, cache_dir: Path | None = None) -> FoundCheckpoint | None:
    """The newest checkpoint with a valid manifest; torn ones are skipped with a warning naming them.

    On S3 the result's ``path`` is the verified local copy in ``cache_dir`` (a temporary folder by default).
    """
    import tempfile

    cache = cache_dir or Path(tempfile.gettempdir()) / "unimo-checkpoint-cache"
    for cand in list_step_dirs(checkpoints_root):
        try:
            return FoundCheckpoint(checked_local_copy(cand.path, cache), cand.step)
        except TornCheckpoint as err:
            log.warning("skipping torn checkpoint: %s", err)
    return None


def read_state(root: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint, migrated to the current schema."""
    return migrate_state(json.loads((root / STATE).read_text()), root / STATE)


def config_mismatch(saved: dict[str, Any], current: dict[str, Any], prefix: str = "",
                    defaults: dict[str, Any] | None = None) -> list[str]:
    """Dotted names of fields whose values differ between two config trees (the resume error).

    With ``defaults`` (the tree of default values), a field the saved tree lacks and the current one holds at
    its default is no difference: it was added to the config after the checkpoint was written."""
    diffs = []
    defaults = defaults or {}
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = f"{prefix}{key}"
        if key not in saved and key in defaults and b == defaults[key]:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            sub = defaults.get(key)
            diffs += config_mismatch(a, b, name + ".", sub if isinstance(sub, dict) else None)
        elif a != b:
            diffs.append(f"{name}: checkpoint has {a!r}, config has {b!r}")
    return diffs


def retained_steps(steps: list[int], keep_last: int, keep_every: int) -> set[int]:
    """The steps retention keeps: the newest ``keep_last`` and every ``keep_every``-th."""
    newest = set(sorted(steps)[-keep_last:]) if keep_last > 0 else set()
    periodic = {s for s in steps if keep_every > 0 and s % keep_every == 0}
    return newest | periodic


def prune(checkpoints_root: Path | str, keep_last: int, keep_every: int,
          pending: int | None = None) -> list[Path | str]:
    """Deletes complete checkpoints that retention does not keep (locally or on S3); returns what it removed.

    Only folders with a manifest are candidates: one still being uploaded is never touched. ``pending`` is the
    step just handed to the (background) upload: it counts as the newest for retention. The newest checkpoint
    whose every file is there (``files_present``) is always kept as well: a manifest is rank 0's, and another
    rank's upload of the same step may still be running and fail, so a failed upload never leaves the run
    without a checkpoint to resume from.
    """
    complete = [c for c in list_step_dirs(checkpoints_root) if has_manifest(c.path) and c.step != pending]
    steps = [c.step for c in complete]
    keep = retained_steps(steps + ([pending] if pending is not None else []), keep_last, keep_every)
    whole = next((c for c in complete if files_present(c.path)), None)  # list_step_dirs: newest first
    if whole is not None:
        keep.add(whole.step)
    removed = []
    for cand in complete:
        if cand.step not in keep:
            storage.delete(cand.path)
            removed.append(cand.path)
    return removed
