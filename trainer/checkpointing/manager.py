"""One rank's checkpoint lifecycle: find, verify, restore (converting for another world size), save, report,
prune.

The Trainer calls ``load(build)`` once at start and ``save(step, ...)`` when a checkpoint is due. This class
is the one owner of the run's ``checkpoints/`` folders: Ray Train only uploads what it is given (its own
retention is off, see orchestrator/driver.py), rank 0 here decides what is kept, deletes the rest, and moves a
torn checkpoint newer than the one resumed from aside, so the same step can be saved again into a fresh
folder.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from data_pipeline.errors import UserError
from trainer import checkpoint as ckpt
from trainer import fault_gate
from trainer import storage
from trainer.checkpointing import cursors
from trainer.checkpointing.identity import data_changed, data_identity
from trainer.checkpointing.stage0 import load_universal_into_plain, param_names_by_group
from trainer.checkpointing.universal import drop_universal, to_universal
from trainer.checkpointing.verification import (UNREADABLE, finding, findings, log_verified,
                                                merged_candidates, verify_part)
from trainer.config_loader import digest, to_dict
from trainer.zero_stage import (needs_universal, resolve_zero_stage, run_optimizer_settings,
                                universal_load_fixed)

log = logging.getLogger(__name__)

# Each rank saves into <temp folder>/unimo-ckpt-<run>-<key>-<step>-r<rank>-XXXX before the upload (key: the
# run's storage); a folder of a job that died is removed when the next job of the run starts on that node.
SAVE_PREFIX = "unimo-ckpt-"


class NoSpaceForCheckpoint(UserError, OSError):
    """The local disk cannot hold the next checkpoint (a restart on the same disk cannot help)."""


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


class Reporter(Protocol):
    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None, step: int) -> None: ...

    def latest_checkpoint(self) -> Path | str | None: ...


@dataclass
class Progress:
    """What is restored from a checkpoint and saved into the next one."""

    step: int = 0
    # the loader cursor to resume from: this rank's own (same world size), the elastic view, or (a schema-2
    # checkpoint at another world size) every rank's
    data_state: dict | list | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Found:
    """A verified checkpoint: its local folder (a download for S3), where it lives, its trainer state and its
    manifest."""

    local: Path
    location: str
    state: dict
    manifest: dict


def rng_state() -> str:
    """This rank's random generators (CPU, and its current GPU's once CUDA is in use: ITM's negatives and any
    dropout draw there), for a same-world-size resume to continue the same streams."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    buf = io.BytesIO()
    torch.save(state, buf)
    return base64.b64encode(buf.getvalue()).decode()


def set_rng_state(blob: str) -> None:
    """Restores ``rng_state``'s generators (a checkpoint saved before the GPU's was recorded, or on another
    kind of machine, restores what it has)."""
    state = torch.load(io.BytesIO(base64.b64decode(blob)), weights_only=True)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def aside_name(location: str | Path, why: str) -> str:
    """Where a step folder that cannot be loaded is kept for forensics:
    ``step_00000020.torn-20261206T065242Z``.

    Not a step folder name, so no listing, retention or resume ever takes it for a checkpoint."""
    return f"{storage.name_of(location)}.{why}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"


class CheckpointManager:
    """Checkpoints of one rank; rank 0 writes the trainer state and the manifest and owns retention."""

    def __init__(self, cfg: Any, rank: int, world_size: int, reporter: Reporter | None,
                 run_location: str | None = None, local_rank: int | None = None,
                 mlflow_run_id: str | None = None, on_gpu: bool = False):
        self.cfg = cfg
        # the ZeRO stage `auto` resolves to depends on the device (trainer/zero_stage.py)
        self.on_gpu = on_gpu
        self.rank = rank
        self.world_size = world_size
        self.local_rank = rank if local_rank is None else local_rank
        self.reporter = reporter
        # the run's folder or s3:// prefix; checkpoints live under checkpoints/
        self.run_location = run_location
        self.mlflow_run_id = mlflow_run_id
        # where the restored checkpoint lives (a folder or an s3:// URL)
        self.restored_from: str | None = None
        self.tracker: Any = None  # the RunTracker, once tracking has started (``attach``)
        self.last_save = time.monotonic()
        self._torn: list[tuple[int, str]] = []  # (step, location) of torn candidates ``find`` skipped
        # Bytes this rank's last local save took (or its share of the restored checkpoint): the next save
        # needs about as much free space. None until one is known.
        self.last_size: int | None = None
        self._notes: list[tuple[int, str]] = []  # what rank 0 moved aside, for the tracker
        self._stage: int | None = None  # the ZeRO stage this run resolves to, once known (``_run_stage``)
        # the text of the run's tokenizer.json (``use_tokenizer``): saved into each checkpoint, and its hash
        # compared with the checkpoint's at resume. None: no tokenizer loaded (nothing saved or compared).
        self.tokenizer_text: str | None = None

    @property
    def root(self) -> str | None:
        """The run's checkpoints folder (or s3:// prefix); None for a Trainer without run storage."""
        return storage.join(self.run_location, "checkpoints") if self.run_location else None

    # ----- start: find, agree, restore, tidy ----------------------------------------------------------------
    def load(self, build: Callable[[bool], Any]) -> Progress:
        """Restores the newest valid checkpoint into the engine ``build(universal)`` returns; the progress to
        go on from (step 0 without one). ``universal`` is true when the checkpoint was saved by another world
        size or under a ZeRO stage whose layout this run's stage cannot load directly."""
        if self.local_rank == 0:
            self._remove_leftover_saves()
        found = self.find()  # the same on every rank: they agree on each candidate
        fresh_data = found is not None and self._data_changed(found)
        engine = build(found is not None and self._needs_universal(found.local, found.state))
        progress = self._restore(engine, found) if found is not None else Progress()
        if fresh_data:
            progress.data_state = None  # data.on_change=continue: the loader starts from scratch
        if self.rank == 0 and self.root:
            self._set_aside_torn(after=progress.step)
            self.prune()
        return progress

    def use_tokenizer(self, text: str | None) -> None:
        """The run's tokenizer.json text: each checkpoint keeps a copy and its hash."""
        self.tokenizer_text = text

    def _data_changed(self, found: Found) -> bool:
        """Whether the tokenizer or a corpus's URLs changed since the checkpoint (an error unless
        data.on_change=continue, which starts the data afresh)."""
        now = data_identity(self.cfg.data, self.tokenizer_text)
        return data_changed(found.state.get("data_identity"), now, found.location, self.cfg.data, self.rank)

    def _run_stage(self) -> int:
        """The ZeRO stage of this run, resolved once: under ``auto`` that is an all-reduce, which must not
        depend on what one rank found of a candidate."""
        if self._stage is None:
            self._stage = resolve_zero_stage(self.cfg, self.world_size, self.on_gpu).stage
        return self._stage

    def _needs_universal(self, local: Path, state: dict) -> bool:
        return needs_universal((local, state), self.cfg, self.world_size, self.on_gpu,
                               run_stage=self._run_stage())

    def _reads_everything(self, local: Path, state: dict) -> bool:
        """The node's first rank converts a checkpoint for another world size or stage, reading every
        file."""
        return self.local_rank == 0 and self._needs_universal(local, state)

    def _candidates(self) -> dict[str, int]:
        """{location: step} of this rank's candidates: Ray's latest and every step folder beside it or in the
        run's checkpoints folder."""
        candidates: dict[str, int] = {}
        reported = self.reporter.latest_checkpoint() if self.reporter is not None else None
        if reported is not None:
            candidates[str(reported)] = ckpt.step_of(reported)
        roots = {storage.parent_of(reported) if reported is not None else None, self.root}
        for root in roots - {None}:
            for found in ckpt.list_step_dirs(root):
                candidates.setdefault(str(found.path), found.step)
        return candidates

    def find(self) -> Found | None:
        """The newest valid checkpoint: Ray's latest, or a newer complete one in storage that Ray did not
        register (a driver killed between the upload and Ray's bookkeeping), or an older valid one if the
        newest is torn.

        Every rank verifies its part of each candidate, newest first, and the ranks agree on it with one
        all-reduce (verification.py): a file torn in one rank's part makes every rank skip the candidate, so
        all choose the same one. A checkpoint on S3 is verified and loaded from the node's copy of the files
        its ranks read (each downloaded once per node).
        """
        candidates = merged_candidates(self._candidates(), self.world_size)
        self._torn = []
        if candidates:
            self._run_stage()  # before any rank can part ways over a candidate
        for location, step in candidates:
            started = time.monotonic()
            part = verify_part(location, self._restore_cache(), self.rank, self._reads_everything,
                               world_size=self.world_size)
            bad = findings(finding(part), self.rank, self.world_size)
            unreadable = sorted(r for r, code in bad.items() if code == UNREADABLE)
            if unreadable:
                # Not torn as far as anyone knows: skipping it (and moving it aside) would lose its steps
                # to a blip. Every rank fails alike; Ray Train starts the group again (scaling.max_failures
                # bounds the tries in a row).
                raise ckpt.CheckpointUnreadable(
                    f"checkpoint {location}: rank(s) {unreadable} could not read it for a storage error "
                    f"({part.unreadable or 'this rank read it'}); it is not taken for torn: the worker group "
                    "restarts and reads it again")
            if bad:
                self._skip_torn(location, step, part, sorted(bad))
                continue
            self._check_compatible(part.state, location)
            log_verified(location, part, self.rank, started)
            if storage.is_remote(location):
                log.info("checkpoint %s verified in the local copy %s", location, part.local)
            self.restored_from = location
            return Found(part.local, location, part.state, part.manifest)
        if candidates:
            log.warning("no valid checkpoint left; starting from scratch")
        return None

    def _skip_torn(self, location: str, step: int, part: Any, bad: list[int]) -> None:
        """A candidate some rank found torn: this rank's reason, or which ranks found it, in the log; the
        node's download of it deleted (every rank is past it: the agreement was the last read)."""
        if part.problem is not None:
            log.warning("skipping torn checkpoint: %s", part.problem)
        else:
            log.warning("skipping torn checkpoint %s: rank(s) %s found it torn (their logs name the file)",
                        location, bad)
        self._torn.append((step, location))
        if storage.is_remote(location) and part.local is not None and self.local_rank == 0:
            ckpt.drop_copy(part.local)

    def _save_prefix(self) -> str:
        import hashlib

        key = hashlib.sha256(str(self.run_location).encode()).hexdigest()[:8]
        return f"{SAVE_PREFIX}{self.cfg.run.name}-{key}-"

    def _remove_leftover_saves(self) -> None:
        """Local save folders of this run left by a job that died (a save cut short, an upload never done)."""
        for leftover in Path(tempfile.gettempdir()).glob(self._save_prefix() + "*"):
            log.info("removing %s, a local checkpoint save left by an earlier job", leftover)
            shutil.rmtree(leftover, ignore_errors=True)

    def _restore_cache(self) -> Path:
        return Path(tempfile.gettempdir()) / "unimo-checkpoint-cache" / self.cfg.run.name

    def _check_compatible(self, state: dict, path: str) -> None:
        saved_model = state["config"]["model"]
        current = to_dict(self.cfg)["model"]
        # fields added to the model config after the checkpoint was written count only if set off their
        # default
        diffs = ckpt.config_mismatch(saved_model, current, "model.", defaults=to_dict(type(self.cfg.model)()))
        diffs = [d for d in diffs if not d.startswith("model.activation_checkpointing")]
        if diffs:
            raise ckpt.IncompatibleCheckpoint(f"checkpoint {path} was saved with another model config: "
                                              + "; ".join(diffs)
                                              + ". Use the original config or start a new run name.")

    def _restore(self, engine: Any, found: Found) -> Progress:
        """Loads weights, optimizer, data cursor and RNG; converts the checkpoint if the world size
        changed."""
        state = found.state
        fault_gate.wait_at(state["step"], self.rank, phase="restore")  # fault tests: a kill in a resume
        same_world = state["world_size"] == self.world_size
        universal = self._needs_universal(found.local, state)  # another world size or ZeRO stage
        # this rank's share of the checkpoint: about what its next save needs on the local disk
        files = found.manifest["files"]
        self.last_size = sum(f["size"] for f in files.values()) // max(1, state["world_size"])
        path, tag = found.local, "ds"
        if universal:
            path, tag = to_universal(found.local, state["step"], self.cfg.run.name, self.local_rank)
        with run_optimizer_settings(engine):  # the config's weight decay, betas, eps and clip, not the saved
            if universal and self._run_stage() == 0:  # DeepSpeed's universal load fills only ZeRO optimizers
                load_universal_into_plain(engine, path / tag)
            else:
                # slips of DeepSpeed's universal load, avoided or undone (trainer/zero_stage.py)
                with universal_load_fixed(engine.optimizer) if universal else contextlib.nullcontext():
                    engine.load_checkpoint(str(path), tag=tag, load_module_strict=True,
                                           load_optimizer_states=True, load_lr_scheduler_states=False)
        self._say_changed_optimizer_settings(state)
        if universal:
            drop_universal(path, self.local_rank)
        # this rank's cursor file (same world size) or the elastic view, read before the S3 copy goes
        data_state, rng = cursors.restored(found.local, state, found.manifest, self.rank, self.world_size,
                                           max(1, self.cfg.data.num_workers),
                                           lambda names: ckpt.fetch_into(found.local, found.location, names))
        if same_world and rng is not None:
            set_rng_state(rng)
        self._drop_restored_copy(found)
        if self.rank == 0:
            how = ("" if same_world
                   else f" (elastic: saved by {state['world_size']} ranks, now {self.world_size})")
            log.info("resumed from %s at step %d%s", found.location, state["step"], how)
        # The loader resumes exactly from this rank's own cursor, elastically from the view.
        return Progress(step=state["step"], data_state=data_state, extra=state.get("extra", {}))

    def _say_changed_optimizer_settings(self, state: dict) -> None:
        """Rank 0 logs the ``optimizer.*`` settings this run changed since the checkpoint was saved: they
        apply from the resumed step on (run_optimizer_settings)."""
        if self.rank != 0:
            return
        saved = state.get("config", {}).get("optimizer", {})
        current = to_dict(self.cfg)["optimizer"]
        changed = [f"optimizer.{k} {saved[k]} -> {value}" for k, value in current.items()
                   if k in saved and saved[k] != value]
        if changed:
            log.info("resumed with optimizer settings other than the checkpoint's, which apply from here: %s",
                     ", ".join(changed))

    def _drop_restored_copy(self, found: Found) -> None:
        """Deletes the node's download of an S3 checkpoint once every rank has loaded it (not for local
        ones)."""
        if not storage.is_remote(found.location):
            return
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
        if self.local_rank == 0:
            ckpt.drop_copy(found.local)

    def _set_aside_torn(self, after: int) -> None:
        """Moves torn step folders newer than the resumed step aside (rank 0): the steps are trained and saved
        again into fresh folders, and the torn files stay for forensics under a name that says why."""
        for step, location in self._torn:
            if step <= after or storage.parent_of(location) != self.root.rstrip("/"):
                continue  # older than the resumed one (never read again), or not in this run's folder
            if not storage.exists(location):
                continue  # Ray's record of a folder already gone (or the same folder spelled twice)
            dest = storage.join(self.root, aside_name(location, "torn"))
            storage.move(location, dest)
            log.warning("moved the torn checkpoint %s aside to %s (resuming from step %d)",
                        location, dest, after)
            self._notes.append((step, f"checkpoint {location} was torn and moved aside to {dest}; the run "
                                      f"resumed from step {after} and saves this step again\n"))
        self._torn = []

    def attach(self, tracker: Any) -> None:
        """Tracking has started: its record of a checkpoint moved aside says so (next to that step's
        manifest)."""
        self.tracker = tracker
        for step, note in self._notes:
            tracker.log_text(note, f"checkpoints/{ckpt.step_dir_name(step)}/moved_aside.txt")
        self._notes = []

    # ----- saving -------------------------------------------------------------------------------------------
    def due_by_time(self) -> bool:
        minutes = self.cfg.checkpoint.every_minutes
        return minutes > 0 and time.monotonic() - self.last_save >= minutes * 60

    def save(self, step: int, engine: Any, loader: Any, extra: dict, metrics: dict[str, float]) -> Path:
        """Saves, records and reports the checkpoint of ``step`` (``metrics`` go with the report), then
        prunes."""
        root = self.save_local(step, engine, loader, extra)
        if self.tracker is not None:
            self.tracker.checkpoint_saved(root, step)  # rank 0: its metrics to disk, its manifest queued
        # (the manifest is read before the report: with async upload Ray deletes the local folder once
        # uploaded)
        fault_gate.wait_at(step, self.rank, phase="upload")  # fault tests: a kill before the upload
        self.reporter.report(metrics, root, step)
        if not self.cfg.checkpoint.async_upload:
            shutil.rmtree(root, ignore_errors=True)
        if self.rank == 0 and self.root:
            fault_gate.wait_at(step, 0, phase="prune")  # fault tests: a kill before retention
            try:
                self.prune(pending=step if self.cfg.checkpoint.async_upload else None)
            except OSError as err:
                # Storage unreachable for longer than its client retries (an S3 outage, while the upload
                # rides it out with its larger budget): retention is housekeeping, not worth the run. The
                # next save, or the next job's start, deletes what this one could not.
                log.warning("retention after the save of step %d could not reach %s (%s); the next save "
                            "prunes again", step, self.root, err)
        self.last_save = time.monotonic()
        return root

    def save_local(self, step: int, engine: Any, loader: Any, extra: dict) -> Path:
        """Saves this rank's shards into a fresh local folder; rank 0 adds the state and the manifest."""
        self._check_free_space(step)
        root = Path(tempfile.mkdtemp(prefix=f"{self._save_prefix()}{step}-r{self.rank}-"))
        try:
            self._write(root, step, engine, loader, extra)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)  # a partial save is never left behind (nor uploaded)
            raise
        self.last_size = folder_bytes(root)
        return root

    def _check_free_space(self, step: int) -> None:
        """A save that cannot fit fails before it starts, naming the folder and the bytes, not half-way in
        DeepSpeed with a bare ENOSPC."""
        folder = Path(tempfile.gettempdir())
        if self.last_size is None:
            return
        free = free_bytes(folder)
        if free < self.last_size:
            raise NoSpaceForCheckpoint(
                f"not enough free space in {folder} for rank {self.rank}'s checkpoint save of step {step}: "
                f"it needs about {self.last_size} bytes (the size of the last checkpoint), {free} are free; "
                "free space there or point TMPDIR at a larger disk")

    def _write(self, root: Path, step: int, engine: Any, loader: Any, extra: dict) -> None:
        from trainer.loop import stage_at
        from trainer.redaction import safe_config, secret_values

        # without ZeRO, the names of the optimizer's parameters: what a conversion for another stage needs
        names = param_names_by_group(engine) if engine.zero_optimization_stage() == 0 else {}
        engine.save_checkpoint(str(root), tag="ds", client_state=names, save_latest=True)
        fault_gate.wait_at(step, self.rank, phase="save")  # fault tests: a kill half-way into a save
        if self.rank == 0 and self.tokenizer_text is not None:
            # the tokenizer trained with travels with the weights (export copies it from here)
            (root / ckpt.TOKENIZER).write_bytes(self.tokenizer_text.encode("utf-8"))
        cursor = loader.state_dict()
        cursors.write_rank_state(root, self.rank, cursor, rng_state())
        # Rank 0 gathers each rank's files and the part of its cursor the elastic view needs (no shuffle
        # buffers); every rank's whole cursor stays in that rank's own file.
        mine = {"files": ckpt.describe_files(root), "view": cursors.view_part(cursor)}
        per_rank = cursors.gather_to_first(mine, self.rank, self.world_size)
        if self.rank == 0:
            has_view = cursors.write_elastic_view(root, [r["view"] for r in per_rank])
            state = {
                "schema": ckpt.SCHEMA_VERSION,
                "step": step,
                "stage": stage_at(self.cfg.stages, max(step - 1, 0))[1].name,
                "world_size": self.world_size,
                "mlflow_run_id": self.mlflow_run_id,
                # The config without credentials (a URL's user:password, secret keys, the environment's secret
                # values): a checkpoint is copied, shared and exported, and must not carry them.
                "config": safe_config(self.cfg, secret_values(dict(os.environ))),
                "config_digest": digest(to_dict(self.cfg)),
                # the tokenizer's sha256 and each corpus's URL digest, checked at resume (identity.py)
                "data_identity": data_identity(self.cfg.data, self.tokenizer_text),
                "extra": extra,
            }
            ckpt.write_json_atomic(root / ckpt.STATE, state)
            files = {}
            for r in per_rank:
                files.update(r["files"])
            for rel in [ckpt.STATE] + ([ckpt.ELASTIC_VIEW] if has_view else []):
                files[rel] = {"size": (root / rel).stat().st_size, "sha256": ckpt.sha256_file(root / rel)}
            ckpt.write_manifest(root, files, step)  # written last: it is what makes the checkpoint count

    def prune(self, pending: int | None = None) -> list:
        """Retention (rank 0): the newest ``checkpoint.keep_last`` and every ``keep_every``-th step are
        kept."""
        keep = self.cfg.checkpoint
        removed = ckpt.prune(self.root, keep.keep_last, keep.keep_every, pending=pending)
        if removed:
            log.info("retention removed %s", ", ".join(storage.name_of(p) for p in removed))
        return removed
