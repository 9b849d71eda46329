"""Pre-flight: every mistake a user can make in a run's inputs, found in seconds before Ray or a worker
starts.

``unimo check CONFIG`` and ``unimo train --dry-run`` print the table of these checks; ``unimo train`` runs
them before it starts anything and ``unimo submit`` before it sends the job. Each check is named after the
config key it reads, so a failure says where to look; the first error stops the list (a later check often
depends on an earlier one: the data cursor is compared with the shards the listing found).

What is checked: the plan's sources have data; run storage takes a small probe object (written, then removed);
the tracking server answers and accepts the credentials; the tokenizer loads and its vocabulary and special
ids fit the model; every data source lists its shards (within data.io_retries) and yields a first sample (a
corpus may have fewer shards than the streams that read it); on resume, the newest checkpoint's model config,
data seed, sequence length and shard lists match the config; the requested GPUs exist (CPUs are checked
against a cluster when the driver joins it, see ``check_cluster``).
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any
from dataclasses import dataclass, field

from data_pipeline.errors import TransientError, UserError
from trainer import storage
from trainer.config import RunConfig
from trainer.config_loader import ConfigError, to_dict

# How long a driver waits for a cluster to provide the workers it lacks (an autoscaler adding nodes) before it
# stops with an error; Ray Train would otherwise retry its worker-group start every minute without end.
CLUSTER_WAIT_ENV = "UNIMO_CLUSTER_WAIT_S"
DEFAULT_CLUSTER_WAIT_S = 300.0
PROBE_PREFIX = ".unimo-preflight-"


class PreflightError(UserError):
    """A pre-flight check failed; the message names the key or URL and what to do."""


@dataclass
class Check:
    """One line of the pre-flight table."""

    name: str  # the config key (or area) checked, e.g. data.pair.urls
    status: str  # ok | warn | error | skip
    detail: str
    seconds: float = 0.0


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != "error" for c in self.checks)

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.status == "warn"]


class _Runner:
    """Runs checks in order, records each as a table row, and stops at the first error."""

    def __init__(self, on_check: Callable[[Check], None] | None):
        self.report = Report()
        self.on_check = on_check

    def run(self, name: str, fn: Callable[[], str | tuple[str, str] | None]) -> None:
        t0 = time.monotonic()
        try:
            out = fn()
            status, detail = out if isinstance(out, tuple) else ("ok", out or "")
        except Exception as err:  # noqa: BLE001 - every failure becomes the check's row and one paragraph
            text = str(err) if isinstance(err, (UserError, ConfigError, ValueError, OSError,
                                                TransientError)) \
                else f"{type(err).__name__}: {err}"
            self._add(Check(name, "error", text, time.monotonic() - t0))
            raise PreflightError(text if text.startswith(name) else f"{name}: {text}") from None
        self._add(Check(name, status, detail, time.monotonic() - t0))

    def _add(self, check: Check) -> None:
        self.report.checks.append(check)
        if self.on_check is not None:
            self.on_check(check)


# ----- the checks -------------------------------------------------------------------------------------------

def check_plan(cfg: RunConfig) -> str:
    cfg.check_ready_to_train()
    return (f"{len(cfg.stages)} stage(s), {cfg.total_steps} steps, sources "
            f"{', '.join(cfg.data.active_sources())}")


def check_storage(run_dir: str) -> str:
    """The run's folder or prefix takes a small object, which is then removed."""
    probe = storage.join(run_dir, f"{PROBE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
    created = _missing_folders(run_dir)
    try:
        storage.check_writable(run_dir)
        storage.write_text(probe, "unimo pre-flight probe; safe to delete\n")
        storage.delete(probe)
        for folder in created:  # a check leaves nothing behind, not even the folders it made
            os.rmdir(folder)
    except storage.StorageError as err:
        raise UserError(str(err)) from None
    except PermissionError as err:
        raise UserError(f"run.storage: cannot write in {run_dir} ({err.strerror or err}); choose a folder "
                        "you may write, or fix its permissions") from None
    except OSError as err:
        raise UserError(f"run.storage: cannot write a probe object under {run_dir} "
                        f"({type(err).__name__}: {err}); check the path, the bucket and its "
                        "permissions") from None
    return f"{run_dir} is writable (probe object written and removed)"


def _missing_folders(location: str) -> list[str]:
    """The local folders that writing into ``location`` creates, deepest first (none for s3://)."""
    from pathlib import Path

    if storage.is_remote(location):
        return []
    out, path = [], Path(location)
    while not path.exists() and path != path.parent:
        out.append(str(path))
        path = path.parent
    return out


def check_tracking(cfg: RunConfig, run_dir: str) -> str | tuple[str, str]:
    from pathlib import Path

    from orchestrator.tracking_setup import (_unreachable_message, check_reachable, default_tracking_uri,
                                             tracking_secrets)
    from trainer.redaction import redact

    uri = default_tracking_uri(cfg, run_dir if storage.is_remote(run_dir) else Path(run_dir))
    if not uri.startswith(("http://", "https://")):
        return f"local store {redact(uri, tracking_secrets(uri))}"
    try:
        check_reachable(uri, experiment=cfg.tracking.experiment)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - no answer at all
        message = _unreachable_message(uri, err)
        if cfg.tracking.buffer_if_unreachable:
            return "warn", message + " (tracking.buffer_if_unreachable=true: training goes on)"
        raise UserError(message) from None
    return f"{redact(uri, tracking_secrets(uri))} answers and accepts the credentials"


def check_tokenizer(cfg: RunConfig, policy) -> tuple[str, object]:
    """Loads the tokenizer and compares it with model.text (the same rules the trainer applies)."""
    from data_pipeline.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(cfg.data.tokenizer, policy)
    except TransientError as err:
        raise UserError(f"{err}; {_storage_hint()}") from None
    except UserError as err:
        raise UserError(f"{err}; give a tokenizer.json (or a folder holding one), e.g. written by "
                        "`unimo data tokenizer`") from None
    from trainer.config import tokenizer_mismatch

    problem = tokenizer_mismatch(cfg, tok)
    if problem:
        raise UserError(problem)
    text = cfg.model.text
    return f"{tok.vocab_size} tokens (model: {text.vocab_size}), special ids match", tok


def first_item(source: str, shard_url: str, cfg: RunConfig, tok, policy) -> dict | None:
    """The first usable item of a shard, prepared as the loader would (image decoded, text tokenized)."""
    from collections import Counter

    from data_pipeline.storage_io import RetryingReader
    from data_pipeline.samples import Prep, shard_items

    prep = Prep(cfg.model.vision.image_size, cfg.seq_len, tok)
    seen: Counter = Counter()
    with RetryingReader(shard_url, policy, cfg.data.read_block_bytes) as reader:
        for _, item in shard_items(source, shard_url, reader, prep, lambda n: seen.update([n]),
                                   lambda o: True):
            if item is not None:
                return item
    raise UserError(f"{shard_url}: no usable {source} sample in the whole shard (skipped: "
                    f"{dict(seen) or 'none'}); is it a WebDataset tar of {source} samples?")


def check_source(cfg: RunConfig, key: str, source_of, source: str, tok, policy, shards_out: dict) -> str:
    """Lists a corpus's (or the eval pairs') shards within data.io_retries and reads its first sample. A
    corpus may have fewer shards than the streams that read it (its epochs are then read by a few streams at a
    time)."""
    from data_pipeline.storage_io import list_shards
    from data_pipeline.loader import corpus_shards

    try:
        if isinstance(source_of, str):
            shards = list_shards(source_of, policy)
        else:
            shards = corpus_shards(source_of, policy)
            shards_out[source_of.key] = shards
    except TransientError as err:
        raise UserError(f"{key}: {err}; {_storage_hint()}") from None
    first_item(source, shards[0][0], cfg, tok, policy)
    size = sum(s for _, s in shards)
    return (f"{len(shards)} shards, {size / 1e6:.1f} MB; first sample of "
            f"{shards[0][0].rsplit('/', 1)[-1]} read")


def _storage_hint() -> str:
    endpoint = storage.endpoint_url() or "AWS S3"
    return (f"check that the storage is up (S3 endpoint: {endpoint}, from AWS_ENDPOINT_URL) and reachable "
            "from here, or raise data.io_retries / data.io_backoff_max_s to ride out an outage")


def newest_checkpoint_state(run_dir: str) -> tuple[str, dict, dict[str, str]] | None:
    """(location, trainer_state, {file: text}) of the newest checkpoint with a manifest whose small files the
    pre-flight reads (trainer_state.json, the elastic view) match it, read without downloading shards.

    A newer checkpoint that does not match (a file cut short or changed since the save) is passed over, as the
    trainer's verification passes over it: before, its unreadable JSON ended the job in the pre-flight
    ("checkpoint (resume): Expecting value"), although the trainer would have resumed from the one before
    (found by the fault campaign: a truncated data_elastic_view.json of the newest checkpoint).
    """
    import json

    from trainer import checkpoint as ckpt

    for found in ckpt.list_step_dirs(storage.join(run_dir, "checkpoints")):
        texts = _small_files(str(found.path), (ckpt.STATE, ckpt.ELASTIC_VIEW))
        if texts is not None and texts.get(ckpt.STATE) is not None:
            return str(found.path), json.loads(texts[ckpt.STATE]), texts
    return None


def _small_files(location: str, names: tuple[str, ...]) -> dict[str, str | None] | None:
    """{name: text (None: absent)} of a checkpoint's small files, each checked against the manifest where
    the manifest lists it; None when the manifest is missing or unreadable, or a listed file does not match
    (the checkpoint is torn)."""
    import hashlib
    import json

    from trainer import checkpoint as ckpt

    text = storage.read_text(storage.join(location, ckpt.MANIFEST))
    try:
        files = json.loads(text)["files"] if text is not None else None
    except (ValueError, KeyError, TypeError):
        files = None
    if not isinstance(files, dict):
        return None
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = storage.read_text(storage.join(location, name))
        except UnicodeDecodeError:  # cut in the middle of a character
            return None
        meta = files.get(name)
        if meta is None:
            continue  # not listed (an older layout): read as it is
        data = None if out[name] is None else out[name].encode("utf-8")
        if data is None or len(data) != meta.get("size") or \
                hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            return None
    return out


def check_resume(cfg: RunConfig, run_dir: str, shards: dict) -> str:
    """On resume: the checkpoint's model config and data cursor fit this config (else a worker would fail)."""
    from data_pipeline.storage_io import shard_digest
    from trainer import checkpoint as ckpt

    found = newest_checkpoint_state(run_dir)
    if found is None:
        return "no checkpoint: a new run"
    where, state, texts = found
    diffs = ckpt.config_mismatch(state["config"]["model"], to_dict(cfg)["model"], "model.")
    diffs = [d for d in diffs if not d.startswith("model.activation_checkpointing")]  # as the trainer does
    if diffs:
        raise UserError(f"checkpoint {where} was saved with another model config: {'; '.join(diffs)}. Use "
                        "the original config or start a new run name (run.name=...).")
    from trainer.checkpointing.cursors import first_cursor

    # schema 3: the elastic view (one O(shards) file); before, rank 0's cursor in trainer_state.json
    cursor = first_cursor(state, lambda rel: texts[rel] if rel in texts else
                          storage.read_text(storage.join(where, rel)))
    if cursor and cursor.get("seed") != cfg.data.seed:
        raise UserError(f"data.seed={cfg.data.seed}: checkpoint {where} was saved with data.seed="
                        f"{cursor.get('seed')}; resume with the same seed or start a new run name")
    for src, saved in (cursor.get("sources") or {}).items():
        if saved.get("seq_len", cfg.seq_len) != cfg.seq_len:
            raise UserError(f"train.seq_len: checkpoint {where} packed {src} text to {saved['seq_len']} "
                            f"tokens, this config to {cfg.seq_len}; resume with the same seq_len")
        if src in shards:
            digest = shard_digest([u for u, _ in shards[src]])
            if saved.get("num_shards") != len(shards[src]) or saved.get("digest") != digest:
                setting = _corpus_setting(cfg, src)
                raise UserError(f"{setting}: checkpoint {where} read {saved.get('num_shards')} shards, the "
                                f"source now lists {len(shards[src])} (other shards): the data cursor cannot "
                                "be applied to them; point it at the original shards or start a new run name")
    return f"resumes {where} (step {state.get('step')}, world size {state.get('world_size')}): config matches"


def _corpus_setting(cfg: RunConfig, key: str) -> str:
    """The setting that names a corpus's shards: data.<m>.urls for the shorthand, else its corpora entry."""
    for src in cfg.data.active_sources():
        for corpus in cfg.data.corpora(src):
            if corpus.key == key:
                return f"data.{src}.urls" if not getattr(cfg.data, src).corpora else \
                    f"data.{src}.corpora[{corpus.name}]"
    return f"data corpus {key}"


def check_local_resources(cfg: RunConfig) -> str | tuple[str, str]:
    """Without scaling.address the embedded Ray gets this machine: GPUs must exist, CPUs may be shared."""
    s = cfg.scaling
    need_workers = s.min_workers or s.num_workers
    if s.address:
        return "skip", f"checked against the cluster at {s.address} when the driver joins it"
    if s.use_gpu:
        import torch

        have = torch.cuda.device_count()
        if have < need_workers:
            raise UserError(f"scaling.use_gpu=true with scaling.num_workers={s.num_workers} needs "
                            f"{need_workers} GPU(s); this machine has {have}. Lower scaling.num_workers, set "
                            "scaling.use_gpu=false, or run on a cluster (scaling.address)")
    cpus = os.cpu_count() or 1
    need = s.num_workers * s.cpus_per_worker
    if need > cpus:
        return "warn", (f"{need} CPUs requested (scaling.num_workers x cpus_per_worker), {cpus} here: the "
                        "workers share them")
    return (f"{s.num_workers} worker(s) x {s.cpus_per_worker} CPU{' + 1 GPU' if s.use_gpu else ''} "
            "fit this machine")


def cluster_wait_s() -> float:
    return float(os.environ.get(CLUSTER_WAIT_ENV, DEFAULT_CLUSTER_WAIT_S))


def check_cluster(cfg: RunConfig, resources: dict | None = None) -> str | None:
    """Once Ray is up: the cluster can hold the smallest worker group the config accepts.

    Returns a warning when it cannot yet (an autoscaler may add nodes within ``cluster_wait_s``); raises a
    UserError for an embedded Ray, whose resources are fixed.
    """
    import ray

    s = cfg.scaling
    total = resources if resources is not None else ray.cluster_resources()
    need_workers = s.min_workers or s.num_workers
    need = {"CPU": need_workers * s.cpus_per_worker, **({"GPU": need_workers} if s.use_gpu else {})}
    short = {k: (v, total.get(k, 0)) for k, v in need.items() if total.get(k, 0) < v}
    if not short:
        return None
    what = ", ".join(f"{k}: needs {v:g}, has {have:g}" for k, (v, have) in short.items())
    where = f"the Ray cluster at {s.address}" if s.address else "the embedded Ray on this machine"
    message = (f"scaling: {where} cannot hold {need_workers} worker(s) x {s.cpus_per_worker} CPU"
               f"{' + 1 GPU' if s.use_gpu else ''} ({what})")
    if not s.address:
        raise UserError(message + "; lower scaling.num_workers or scaling.cpus_per_worker")
    return (message + f"; waiting up to {cluster_wait_s():.0f} s ({CLUSTER_WAIT_ENV}) for nodes to join, "
            "then stopping with an error")


def check_shared_sqlite(tracking_uri: str, node_addresses: list[str] | None = None) -> None:
    """A SQLite tracking store is one file: written from several machines (rank 0, each node's system
    sampler, the driver) over a shared filesystem it corrupts or locks up. Refused when the cluster's nodes
    span more than one machine (nodes of one machine, as in a loopback test cluster, share its disk)."""
    if not tracking_uri.startswith("sqlite:"):
        return
    if node_addresses is None:
        import ray

        node_addresses = [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]
    machines = sorted(set(node_addresses))
    if len(machines) > 1:
        shown = ", ".join(machines[:4]) + (", ..." if len(machines) > 4 else "")
        raise UserError(f"tracking.uri: the SQLite store {tracking_uri} would be written from "
                        f"{len(machines)} machines ({shown}); SQLite is not safe over a shared filesystem. "
                        "Start a tracking server (`unimo mlflow --host HOST`, or your MLflow server) and set "
                        "tracking.uri=http://HOST:5000")


# ----- the whole list ---------------------------------------------------------------------------------------

def _sources(cfg: RunConfig) -> Iterator[tuple[str, Any, str]]:
    """(config key, corpus or eval url, source kind) of every data the run reads: each corpus of each training
    modality (the one-corpus shorthand `data.<m>.urls` included) and the eval pairs."""
    for src in cfg.data.active_sources():
        corpora = cfg.data.corpora(src)
        shorthand = not getattr(cfg.data, src).corpora
        for corpus in corpora:
            yield (f"data.{src}.urls" if shorthand else f"data.{src}.corpora[{corpus.name}]"), corpus, src
    if cfg.data.eval_pairs:
        yield "data.eval_pairs", cfg.data.eval_pairs, "pair"


def run_preflight(cfg: RunConfig, *, on_check: Callable[[Check], None] | None = None,
                  tracking: bool | str = True, resources: bool = True) -> Report:
    """Runs every check (local paths are made absolute as the driver does); raises PreflightError on the first
    error, after ``on_check`` has seen its row. Returns the report when all pass (warnings included).

    ``tracking``: True checks the server, "warn" turns its failure into a warning (a submitting machine may
    not reach a server the cluster reaches), False skips it. ``resources``: check GPUs/CPUs of this
    machine."""
    from data_pipeline.loader import io_policy
    from orchestrator.driver import run_dir_of, with_absolute_paths

    cfg = with_absolute_paths(cfg)
    runner = _Runner(on_check)
    policy = io_policy(cfg.data)
    runner.run("stages", lambda: check_plan(cfg))
    run_dir = str(run_dir_of(cfg))
    runner.run("run.storage", lambda: check_storage(run_dir))
    if tracking == "warn":
        runner.run("tracking.uri", lambda: _as_warning(lambda: check_tracking(cfg, run_dir)))
    elif tracking:
        runner.run("tracking.uri", lambda: check_tracking(cfg, run_dir))
    tok_box: list = [None]
    if cfg.data.tokenizer or {"text", "pair"} & set(cfg.data.active_sources()):
        def tokenizer_check() -> str:
            detail, tok_box[0] = check_tokenizer(cfg, policy)
            return detail

        runner.run("data.tokenizer", tokenizer_check)
    shards: dict = {}
    for key, source_of, src in _sources(cfg):
        runner.run(key, lambda key=key, source_of=source_of, src=src: check_source(
            cfg, key, source_of, src, tok_box[0], policy, shards))
    runner.run("checkpoint (resume)", lambda: check_resume(cfg, run_dir, shards))
    if resources:
        runner.run("scaling", lambda: check_local_resources(cfg))
    return runner.report


TABLE_HEADER = f"{'STATUS':6s} {'CHECK':<22s} {'TIME':>6s}  DETAIL"


def _as_warning(check: Callable[[], str | tuple[str, str]]) -> str | tuple[str, str]:
    try:
        return check()
    except UserError as err:
        return "warn", str(err)


def missing_local_paths(cfg: RunConfig) -> list[str]:
    """Local paths of the config that do not exist on this machine (they may on a cluster's shared
    storage)."""
    from pathlib import Path

    d = cfg.data
    paths = {"run.storage": cfg.run.storage, "data.text.urls": d.text.urls, "data.image.urls": d.image.urls,
             "data.pair.urls": d.pair.urls, "data.eval_pairs": d.eval_pairs, "data.tokenizer": d.tokenizer}
    here = {k: v for k, v in paths.items() if v and "://" not in v and "{" not in v}
    # run.storage may not exist yet: the run creates it, so its parent is what must be here
    return [f"{k}={v}" for k, v in here.items()
            if not (Path(os.path.expanduser(v)).parent if k == "run.storage"
                    else Path(os.path.expanduser(v))).exists()]


def print_check(check: Check, out=None) -> None:
    """One table row, printed as soon as it is checked, so a slow check shows what it is waiting on."""
    out = out or sys.stdout
    print(f"{check.status.upper():6s} {check.name:<22s} {check.seconds:5.1f}s  {check.detail}", file=out,
          flush=True)
