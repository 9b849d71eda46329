"""The step loop that runs on every rank: build, restore, train stage by stage, report, checkpoint.

Ray-specific calls are behind the small ``Reporter`` interface (trainer/ray_worker.py implements it), so the loop
is plain DeepSpeed + torch.distributed code.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

from trainer import checkpoint as ckpt
from trainer import preemption
from trainer import storage
from trainer.config import RunConfig, StageConfig
from trainer.config_loader import digest, to_dict
from trainer.ds_config import build_ds_config, grad_accum_steps
from trainer.metrics import step_metrics
from trainer.optim import build_adamw
from trainer.watchdog import Watchdog
from trainer.zero_stage import (
    announce,
    make_loadable_under_any_stage,
    needs_universal,
    resolve_zero_stage,
    universal_load_fixed,
)

log = logging.getLogger(__name__)
# Where a node converts a checkpoint for a new world size (in the temp folder; deleted once loaded).
UNIVERSAL_PREFIX = "unimo-universal-"


STOP_FILE = "STOP"
# On S3 the STOP file costs a request: rank 0 looks at most this often (a preemption notice gives ~30 s).
REMOTE_STOP_POLL_S = 2.0


class Reporter(Protocol):
    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None, step: int) -> None: ...

    def latest_checkpoint(self) -> Path | str | None: ...


@dataclass
class StepResult:
    losses: dict[str, float]
    total: float
    samples: dict[str, int]
    step_time: float
    data_time: float
    grad_norm: float = float("nan")
    lr: float = 0.0


@dataclass
class Progress:
    """What is restored from a checkpoint and saved into the next one."""

    step: int = 0
    data_state: dict | None = None
    extra: dict = field(default_factory=dict)


def stage_at(stages: list[StageConfig], step: int) -> tuple[int, StageConfig, int]:
    """(stage index, stage, step within the stage) for a global step in [0, total)."""
    start = 0
    for i, stage in enumerate(stages):
        if step < start + stage.steps:
            return i, stage, step - start
        start += stage.steps
    return len(stages) - 1, stages[-1], stages[-1].steps


def lr_at(cfg: RunConfig, stage: StageConfig, step_in_stage: int) -> float:
    """Warm-up then cosine/linear/constant decay, restarted at each stage (MVP trains stages separately)."""
    peak = stage.lr or cfg.optimizer.lr
    warmup = cfg.optimizer.warmup_steps if stage.warmup_steps < 0 else stage.warmup_steps
    if warmup and step_in_stage < warmup:
        return peak * (step_in_stage + 1) / warmup
    span = max(1, stage.steps - warmup)
    frac = min(1.0, (step_in_stage - warmup) / span)
    floor = peak * cfg.optimizer.min_lr_ratio
    if cfg.optimizer.schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * frac))
    if cfg.optimizer.schedule == "linear":
        return peak - (peak - floor) * frac
    return peak


# Parameters whose size is a multiple of this many elements (64 bytes in fp32) keep the alignment of the flat
# buffer DeepSpeed packs every group's partition into (one after another, in group order).
ALIGN_ELEMENTS = 16


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Groups by top-level submodule (so a stage can freeze one by setting its LR to 0) and by decay.

    The few parameters whose size is not a multiple of ALIGN_ELEMENTS (a scalar temperature, a 2-way bias,
    level-mixing logits) go in groups of their own at the end. ZeRO-3 views every weight inside one flat buffer
    in group order, so a 1-element parameter early on would leave every later weight 4 bytes off a 64-byte
    boundary (bench/bench_trainer.py on a quiet Xeon: 1.24x -> 1.19x of the plain step, docs/BENCHMARKS.md).
    """
    groups: dict[tuple[bool, str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        top = name.split(".")[0]
        decay = p.ndim >= 2 and "embed" not in name  # no decay on biases, norms, embeddings, scales
        odd_size = p.numel() % ALIGN_ELEMENTS != 0
        groups.setdefault((odd_size, top, decay), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "module": top}
            for (_, top, decay), ps in sorted(groups.items())]


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """``param_groups`` without the module names, ready for a torch optimizer (benchmarks, tests)."""
    return [{k: v for k, v in g.items() if k != "module"} for g in param_groups(model, weight_decay)]


def build_engine(cfg: RunConfig, module: torch.nn.Module, world_size: int, on_gpu: bool,
                 universal: bool = False) -> tuple[Any, Any, list[str]]:
    """The DeepSpeed engine over ``module`` (the objectives module): parameter groups, the fused AdamW and the
    DeepSpeed config from ``cfg``; ``universal`` sets it to load a universal checkpoint.

    Returns the engine, its optimizer, and each parameter group's top-level module (per-stage learning rates).
    The process group must exist already (Ray Train's, or the caller's).
    """
    import deepspeed

    from model.layers import compile_blocks
    from trainer.zero_compat import register_external_parameters

    register_external_parameters(module)
    if cfg.train.compile:
        compile_blocks(module.model)  # in place: names, hooks and checkpoints unchanged
    groups = param_groups(module.model, cfg.optimizer.weight_decay)
    group_modules = [g.pop("module") for g in groups]
    ds_config = build_ds_config(cfg, world_size, on_gpu)
    if universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    engine, optimizer, _, _ = deepspeed.initialize(model=module, optimizer=build_adamw(groups, cfg.optimizer),
                                                   config=ds_config, dist_init_required=False)
    return engine, optimizer, group_modules


# Why the loader skipped samples (data_pipeline/samples.py, tario.py): one metric each, summed over ranks, so a
# run that quietly drops a share of its data shows it in MLflow, not only in the workers' warnings.
SKIP_REASONS = ("bad_image", "bad_text", "bad_json", "missing_field", "empty_text", "corrupt_member",
                "truncated_shard")


def data_counters(stats: dict[str, int]) -> dict[str, int]:
    """This rank's loader counters since it started, in a fixed order (every rank all-reduces the same vector)."""
    out = {f"skipped_{r}": int(stats.get(f"skipped_{r}", 0)) for r in SKIP_REASONS}
    out["skipped_total"] = sum(int(v) for k, v in stats.items() if k.startswith("skipped_"))
    out["read_retries"] = int(stats.get("read_retries", 0))
    return out


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    return batch


def _rng_state() -> str:
    buf = io.BytesIO()
    torch.save({"cpu": torch.get_rng_state()}, buf)
    return base64.b64encode(buf.getvalue()).decode()


def _set_rng_state(blob: str) -> None:
    state = torch.load(io.BytesIO(base64.b64decode(blob)), weights_only=True)
    torch.set_rng_state(state["cpu"])


class Trainer:
    """One rank's trainer: a DeepSpeed engine over the objectives module, the loader and the step loop."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, reporter: Reporter,
                 mlflow_run_id: str | None = None, tracking_uri: str = "", local_rank: int | None = None,
                 control_dir: str | None = None):
        self.cfg = cfg
        self.rank = rank
        self.local_rank = rank if local_rank is None else local_rank
        self.world_size = world_size
        self.reporter = reporter
        self.mlflow_run_id = mlflow_run_id
        self.tracking_uri = tracking_uri
        self.on_gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")
        self.accum = grad_accum_steps(cfg, world_size)
        self.progress = Progress()
        self.metrics_logger = None
        self.watchdog = Watchdog(cfg.train.watchdog_seconds, name=f"rank {rank}",
                                 phase_timeout_s=cfg.train.watchdog_phase_seconds)
        self.last_result: StepResult | None = None
        self.eval_set: dict | None = None
        # The run's folder or s3:// prefix: the driver drops a STOP file there on SIGTERM (preemption), rank 0
        # looks for it every step (every REMOTE_STOP_POLL_S on S3); checkpoints live under checkpoints/.
        self.run_location = control_dir
        self.stop_file = storage.join(control_dir, STOP_FILE) if control_dir else None
        self._stop_seen = False
        self._stop_polled = float("-inf")
        self._restored_copy: Path | None = None  # a checkpoint downloaded from S3, deleted once loaded
        self.restored_from: str | None = None  # where that checkpoint lives (a folder or an s3:// URL)
        self.last_save = time.monotonic()
        self.stopped_early = False

    # ----- building -------------------------------------------------------------------------------------------
    def build(self, universal: bool = False) -> None:
        """Model, objectives module, optimizer and DeepSpeed engine (set to load a universal checkpoint)."""
        from data_pipeline.tokenizer import load_tokenizer
        from model.unimo import UnimoModel
        from trainer.objectives import PretrainObjectives

        torch.manual_seed(self.cfg.run.seed)  # identical initial weights on every rank
        self.tokenizer = load_tokenizer(self.cfg.data.tokenizer)
        self._check_tokenizer()
        self.module = PretrainObjectives(UnimoModel(self.cfg.model), self.rank, self.world_size)
        self.engine, self.optimizer, self.group_modules = build_engine(self.cfg, self.module, self.world_size,
                                                                       self.on_gpu, universal)

    def _check_tokenizer(self) -> None:
        text = self.cfg.model.text
        tok = self.tokenizer
        if tok.vocab_size > text.vocab_size:
            raise ValueError(f"tokenizer {self.cfg.data.tokenizer} has {tok.vocab_size} tokens but "
                             f"model.text.vocab_size={text.vocab_size}; raise model.text.vocab_size")
        expected = {"pad_token_id": tok.pad_id, "bos_token_id": tok.cls_id, "eos_token_id": tok.sep_id,
                    "mask_token_id": tok.mask_id}
        wrong = [f"model.text.{k}={getattr(text, k)} (tokenizer: {v})" for k, v in expected.items()
                 if getattr(text, k) != v]
        if wrong:
            raise ValueError("model special-token ids do not match the tokenizer "
                             f"{self.cfg.data.tokenizer}: {', '.join(wrong)}; set them in the config")

    def build_loader(self) -> None:
        from data_pipeline.loader import build_loader

        m = self.cfg.model
        self.loader = build_loader(self.cfg.data, rank=self.rank, world_size=self.world_size,
                                   seq_len=self.cfg.seq_len,
                                   image_size=m.vision.image_size, patch_size=m.vision.patch_size,
                                   state=self.progress.data_state,
                                   objectives=self._objectives())  # batches hold only what these read
        self.batches: Iterator[dict] = iter(self.loader)

    def _objectives(self) -> set[str]:
        """Every objective some stage trains: one loader serves the whole plan."""
        return {name for s in self.cfg.stages for name, w in s.objectives.items() if w > 0}

    # ----- checkpoints ----------------------------------------------------------------------------------------
    def find_checkpoint(self) -> tuple[Path, dict] | None:
        """The newest valid checkpoint: Ray's latest, or a newer complete one in storage that Ray did not register
        (a driver killed between the upload and Ray's bookkeeping), or an older valid one if the newest is torn.

        Returns a local folder: a checkpoint on S3 is verified and loaded from a copy downloaded once per node.
        """
        candidates: dict[str, int] = {}
        reported = self.reporter.latest_checkpoint()
        if reported is not None:
            candidates[str(reported)] = ckpt.step_of(reported)
        roots = {storage.parent_of(reported) if reported is not None else None, self._checkpoints_root()}
        for root in roots - {None}:
            for found in ckpt.list_step_dirs(root):
                candidates.setdefault(str(found.path), found.step)
        for location in sorted(candidates, key=lambda p: candidates[p], reverse=True):
            try:
                local = ckpt.checked_local_copy(location, self._restore_cache())
            except ckpt.TornCheckpoint as err:
                log.warning("skipping torn checkpoint: %s", err)
                continue
            state = ckpt.read_state(local)
            self._check_compatible(state, location)
            if storage.is_remote(location):
                self._restored_copy = local
                log.info("checkpoint %s verified in the local copy %s", location, local)
            self.restored_from = location
            return local, state
        if candidates:
            log.warning("no valid checkpoint left; starting from scratch")
        return None

    def _checkpoints_root(self) -> str | None:
        return storage.join(self.run_location, "checkpoints") if self.run_location else None

    def _restore_cache(self) -> Path:
        return Path(tempfile.gettempdir()) / "unimo-checkpoint-cache" / self.cfg.run.name

    def restore(self, found: tuple[Path, dict]) -> None:
        """Loads weights, optimizer, data cursor and RNG; converts the checkpoint if the world size changed."""
        path, state = found
        tag = "ds"
        converted = None
        if needs_universal(found, self.cfg, self.world_size, self.on_gpu):  # another world size or ZeRO stage
            path, tag = converted = self._to_universal(path, state["step"])
        with universal_load_fixed(self.optimizer):  # two slips of DeepSpeed's stage-3 universal load
            self.engine.load_checkpoint(str(path), tag=tag, load_module_strict=True, load_optimizer_states=True,
                                        load_lr_scheduler_states=False)
        if converted is not None:
            self._drop_universal(converted[0])
        # Every rank's cursor: the loader resumes exactly at the same world size, elastically otherwise.
        self.progress = Progress(step=state["step"], data_state=state["data_states"],
                                 extra=state.get("extra", {}))
        if state["world_size"] == self.world_size:
            _set_rng_state(state["rng"][self.rank])
        self._drop_restored_copy()
        if self.rank == 0:
            how = "" if state["world_size"] == self.world_size else \
                f" (elastic: saved by {state['world_size']} ranks, now {self.world_size})"
            log.info("resumed from %s at step %d%s", self.restored_from or found[0], state["step"], how)

    def _drop_restored_copy(self) -> None:
        """Deletes the node's download of an S3 checkpoint once every rank has loaded it (not for local ones)."""
        import torch.distributed as dist

        if self._restored_copy is None:
            return
        if self.world_size > 1:
            dist.barrier()
        if self.local_rank == 0:
            ckpt.drop_copy(self._restored_copy)
        self._restored_copy = None

    def _to_universal(self, path: Path, step: int) -> tuple[Path, str]:
        """Converts a ZeRO checkpoint to DeepSpeed's universal format once per node, then every rank loads it.

        The conversion is as large as the checkpoint; it lives only until every rank has loaded it
        (`_drop_universal`), and a leftover of a conversion that crashed part-way is removed first, never loaded."""
        import hashlib
        import subprocess
        import sys

        import torch.distributed as dist

        key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        out = Path(tempfile.gettempdir()) / f"{UNIVERSAL_PREFIX}{self.cfg.run.name}-{step}-{key}"
        if self.local_rank == 0:
            shutil.rmtree(out, ignore_errors=True)
            # progress on long work: the conversion reads and rewrites the whole checkpoint
            log.info("converting checkpoint %s to DeepSpeed's universal format in %s (world size changed)", path, out)
            started = time.monotonic()
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path / "ds"),
                   "--output_folder", str(out / "ds_universal"), "--num_extract_workers", "1",
                   "--num_merge_workers", "1", "--inject_missing_state"]  # stages 1-2 lack the version info
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"converting checkpoint {path} for a new world size failed:\n{done.stderr[-2000:]}")
            (out / "latest_universal").write_text("ds_universal")
            make_loadable_under_any_stage(out / "ds_universal")  # also under another ZeRO stage
            log.info("converted checkpoint %s in %.1f s", path, time.monotonic() - started)
        dist.barrier()
        return out, "ds_universal"

    def _drop_universal(self, out: Path) -> None:
        """Deletes the node's universal conversion once every rank on it has loaded it."""
        import torch.distributed as dist

        dist.barrier()
        if self.local_rank == 0:
            shutil.rmtree(out, ignore_errors=True)

    def _check_compatible(self, state: dict, path: Path) -> None:
        saved_model = state["config"]["model"]
        current = to_dict(self.cfg)["model"]
        diffs = ckpt.config_mismatch(saved_model, current, "model.")
        diffs = [d for d in diffs if not d.startswith("model.activation_checkpointing")]
        if diffs:
            raise ValueError(f"checkpoint {path} was saved with another model config: " + "; ".join(diffs)
                             + ". Use the original config or start a new run name.")

    def save(self, step: int) -> Path:
        """Saves this rank's shards into a fresh local folder; rank 0 adds the state and the manifest."""
        import torch.distributed as dist

        from trainer.tracking import safe_config, secret_values

        root = Path(tempfile.mkdtemp(prefix=f"unimo-ckpt-{step}-r{self.rank}-"))
        self.engine.save_checkpoint(str(root), tag="ds", save_latest=True)
        data_state = self.loader.state_dict()
        per_rank = [None] * self.world_size
        dist.all_gather_object(per_rank, {"data": data_state, "rng": _rng_state(),
                                          "files": ckpt.describe_files(root)})
        if self.rank == 0:
            state = {
                "step": step,
                "stage": stage_at(self.cfg.stages, max(step - 1, 0))[1].name,
                "world_size": self.world_size,
                "data_states": [r["data"] for r in per_rank],
                "rng": [r["rng"] for r in per_rank],
                "mlflow_run_id": self.mlflow_run_id,
                # The config without credentials (a URL's user:password, secret keys, the environment's secret
                # values): a checkpoint is copied, shared and exported, and must not carry them.
                "config": safe_config(self.cfg, secret_values(dict(os.environ))),
                "config_digest": digest(to_dict(self.cfg)),
                "extra": self.progress.extra,
            }
            ckpt.write_json_atomic(root / ckpt.STATE, state)
            files = {}
            for r in per_rank:
                files.update(r["files"])
            files[ckpt.STATE] = {"size": (root / ckpt.STATE).stat().st_size,
                                 "sha256": ckpt.sha256_file(root / ckpt.STATE)}
            ckpt.write_manifest(root, files, step)  # written last: it is what makes the checkpoint count
        return root

    # ----- the loop -------------------------------------------------------------------------------------------
    def forward_backward(self, batch: dict, weights: dict[str, float]) -> tuple[float, dict[str, float]]:
        total, parts = self.engine(batch, weights)
        self.engine.backward(total)
        return float(total.detach()), {k: float(v.detach()) for k, v in parts.items()}

    def set_lr(self, stage: StageConfig, step_in_stage: int) -> float:
        lr = lr_at(self.cfg, stage, step_in_stage)
        for group, module in zip(self.optimizer.param_groups, self.group_modules):
            group["lr"] = 0.0 if module in stage.frozen else lr
        return lr

    def train_step(self, stage: StageConfig, step_in_stage: int) -> StepResult:
        lr = self.set_lr(stage, step_in_stage)
        t0 = time.perf_counter()
        data_time = 0.0
        sums: dict[str, float] = {}
        total = 0.0
        samples: dict[str, int] = {}
        for _ in range(self.accum):
            td = time.perf_counter()
            batch = next(self.batches)
            data_time += time.perf_counter() - td
            for src in ("text", "image", "pair"):
                if src in batch:
                    samples[src] = samples.get(src, 0) + len(batch["keys"][src])
            batch = move_to(batch, self.device)
            loss, parts = self.forward_backward(batch, stage.objectives)
            self.engine.step()
            self.watchdog.beat()
            total += loss / self.accum
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v / self.accum
        norm = self.engine.get_global_grad_norm()
        return StepResult(losses=sums, total=total, samples=samples, step_time=time.perf_counter() - t0,
                          data_time=data_time, grad_norm=float(norm) if norm is not None else float("nan"), lr=lr)

    def reduce_metrics(self, result: StepResult) -> dict[str, float]:
        """Averages losses over ranks (one small all-reduce) and adds throughput figures."""
        import torch.distributed as dist

        names = sorted(result.losses)
        counts = data_counters(self.loader.stats() if getattr(self, "loader", None) is not None else {})
        n = len(names) + 1
        vec = torch.tensor([result.losses[k] for k in names] + [result.total] + list(counts.values()),
                           dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(vec)  # losses are averaged over ranks, data counters summed
            vec[:n] /= self.world_size
        metrics = {f"loss/{k}": float(v) for k, v in zip(names, vec[:n - 1])}
        metrics["loss/total"] = float(vec[n - 1])
        metrics.update({f"data/{k}": float(v) for k, v in zip(counts, vec[n:])})
        metrics.update(step_metrics(result, self.cfg, self.world_size))
        return metrics

    def should_evaluate(self, step: int) -> bool:
        every = self.cfg.train.eval_every
        return bool(self.cfg.data.eval_pairs) and (step == self.cfg.total_steps or (every > 0 and step % every == 0))

    def evaluate(self, step: int) -> dict[str, float]:
        """Retrieval on the held-out pairs; every rank runs it (ZeRO-3 gathers need all ranks), rank 0 logs."""
        from data_pipeline.loader import build_eval_pairs
        from trainer.evaluation import evaluate

        if self.eval_set is None:
            self.eval_set = build_eval_pairs(self.cfg.data.eval_pairs, seq_len=self.cfg.seq_len,
                                             image_size=self.cfg.model.vision.image_size, tokenizer=self.tokenizer,
                                             limit=self.cfg.train.eval_samples)
            self.eval_set = {k: v for k, v in self.eval_set.items() if isinstance(v, torch.Tensor)}
        metrics, captions = evaluate(self.engine.module.model, move_to(self.eval_set, self.device),
                                     rerank_k=self.cfg.train.eval_rerank_k, decode=self.tokenizer.decode)
        if self.rank == 0:
            if self.metrics_logger is not None:
                self.metrics_logger.log(metrics, step)
            shown = " ".join(f"{k.split('/')[1]}={v:.3f}" for k, v in metrics.items() if "R@" in k)
            print(f"[unimo] eval step {step}: {shown} (t2i chance R@1 = {1 / max(metrics['eval/candidates'], 1):.3f})",
                  flush=True)
            for i, caption in enumerate(captions):
                print(f"[unimo] eval step {step}: caption of eval image {i}: {caption!r}", flush=True)
            if captions and self.metrics_logger is not None:  # evaluate() may also run outside run()
                self.metrics_logger.log_text("\n".join(captions) + "\n", f"eval/captions_step_{step:08d}.txt")
        return metrics

    def should_checkpoint(self, step: int, due_by_time: bool) -> bool:
        every = self.cfg.checkpoint.every_steps
        return step == self.cfg.total_steps or due_by_time or (every > 0 and step % every == 0)

    def control_flags(self) -> tuple[bool, bool]:
        """(stop requested, checkpoint due by time), agreed by all ranks with one tiny all-reduce.

        Rank 0's view decides (the driver's STOP file, the checkpoint clock), and a SIGTERM to any rank's process
        requests a stop too; every rank stops or saves at the same step (ZeRO-3 saves are collective).
        """
        import torch.distributed as dist

        flags = torch.zeros(2)
        if self.rank == 0:
            minutes = self.cfg.checkpoint.every_minutes
            flags[0] = float(self.stop_requested())
            flags[1] = float(minutes > 0 and time.monotonic() - self.last_save >= minutes * 60)
        if preemption.requested():  # a SIGTERM to any rank's process (trainer/preemption.py)
            flags[0] = 1.0
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    def stop_requested(self) -> bool:
        """Whether the driver has asked for a stop (rank 0 only; a STOP seen once stays seen)."""
        if self._stop_seen or self.stop_file is None:
            return self._stop_seen
        now = time.monotonic()
        if storage.is_remote(self.stop_file):
            if now - self._stop_polled < REMOTE_STOP_POLL_S:
                return False
            self._stop_polled = now
        try:
            self._stop_seen = storage.exists(self.stop_file)
        except OSError as err:  # an S3 hiccup must not end the run: the next poll asks again
            log.warning("could not check %s: %s", self.stop_file, err)
        return self._stop_seen

    def checkpoint(self, step: int, metrics: dict[str, float]) -> None:
        with self.watchdog.phase(f"the checkpoint save of step {step}"):
            self._checkpoint(step, metrics)

    def _checkpoint(self, step: int, metrics: dict[str, float]) -> None:
        root = self.save(step)
        # before the report: with async upload Ray deletes the local folder once it is uploaded
        self.tracker.checkpoint_saved(root, step)  # rank 0 queues its manifest as an artifact
        self.reporter.report({"step": step, "stopped_early": float(self.stopped_early), **metrics}, root, step)
        if not self.cfg.checkpoint.async_upload:
            shutil.rmtree(root, ignore_errors=True)
        keep = self.cfg.checkpoint
        if keep.keep_every and self.rank == 0 and self.run_location:
            ckpt.prune(self._checkpoints_root(), keep.keep_last, keep.keep_every)
        self.last_save = time.monotonic()

    def run(self) -> dict[str, float]:
        """Trains from the restored step to the end of the plan; returns the last logged metrics."""
        self.watchdog.start()
        try:
            with self.watchdog.phase("start-up (engine build, checkpoint restore)"):
                self._start_up()
            with preemption.training():
                last = self._step_loop(self.progress.step, self.cfg.total_steps, time.perf_counter())
        finally:
            self.watchdog.stop()
            self._stop_logging()
        return last

    def _start_up(self) -> None:
        """Engine (converting the checkpoint if the world size changed), restore, loader, logging."""
        found = self.find_checkpoint()
        self.build(universal=found is not None and needs_universal(found, self.cfg, self.world_size, self.on_gpu))
        if found is not None:
            self.restore(found)
        if self.rank == 0:
            # On CPU the intra-op threads are the worker's CPUs (Ray sets OMP_NUM_THREADS to
            # scaling.cpus_per_worker): the first thing to check when steps are slower than expected.
            print(f"[unimo] {self.world_size} rank(s) on {self.device.type}; rank 0 runs {torch.get_num_threads()} "
                  f"intra-op thread(s) and {self.accum} micro-batch(es) per optimizer step", flush=True)
        self.build_loader()
        self._start_logging()

    def _step_loop(self, start_step: int, total_steps: int, t_start: float) -> dict[str, float]:
        """Steps until the plan ends or a stop is requested; checkpoints, logs and evaluates on the way."""
        last: dict[str, float] = {}
        for step in range(start_step, total_steps):
            _, stage, in_stage = stage_at(self.cfg.stages, step)
            result = self.train_step(stage, in_stage)
            done = step + 1
            self.progress.step = done
            if done % self.cfg.train.log_every == 0 or done == total_steps:
                last = self.reduce_metrics(result)
                self._log(last, done, stage.name, t_start, start_step)
            if self.should_evaluate(done):
                with self.watchdog.phase(f"the evaluation at step {done}"):
                    last.update(self.evaluate(done))
            stop, due = self.control_flags()
            if stop and done < total_steps:
                self.stopped_early = True
                if self.rank == 0:
                    print(f"[unimo] stop requested: saving a checkpoint at step {done} and exiting", flush=True)
            if self.should_checkpoint(done, due or stop):
                self.checkpoint(done, last)
            if self.stopped_early:
                break
        return last

    # ----- logging --------------------------------------------------------------------------------------------
    def _start_logging(self) -> None:
        """Every rank: rank 0 gets the MetricLogger, each node's first rank a system-metrics sampler."""
        from trainer.tracking import start_tracking

        self.tracker = start_tracking(self.cfg, self.rank, self.world_size, self.mlflow_run_id, self.tracking_uri,
                                      step_fn=lambda: self.progress.step)
        self.metrics_logger = self.tracker.metrics
        announce(resolve_zero_stage(self.cfg, self.world_size, self.on_gpu), self.rank, self.metrics_logger)

    def _stop_logging(self) -> None:
        if getattr(self, "tracker", None) is not None:
            self.tracker.close()

    def _log(self, metrics: dict[str, float], step: int, stage: str, t_start: float, start_step: int) -> None:
        if self.rank != 0:
            return
        if self.metrics_logger is not None:
            self.metrics_logger.log(metrics, step)
        elapsed = time.perf_counter() - t_start
        rate = (step - start_step) / max(elapsed, 1e-9)
        eta = (self.cfg.total_steps - step) / max(rate, 1e-9)
        losses = " ".join(f"{k.split('/')[1]}={v:.3f}" for k, v in metrics.items() if k.startswith("loss/"))
        print(f"[unimo] stage={stage} step {step}/{self.cfg.total_steps} {losses} "
              f"lr={metrics['lr']:.2e} {rate:.2f} steps/s eta {eta:.0f}s", flush=True)


def summarize(metrics: dict[str, float]) -> str:
    return json.dumps({k: round(v, 4) for k, v in metrics.items() if k.startswith("loss/")})


__all__ = ["Trainer", "Reporter", "stage_at", "lr_at", "summarize"]
