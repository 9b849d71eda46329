"""The step loop that runs on every rank: build, train stage by stage, log, evaluate, checkpoint when due.

Checkpoints (find, verify, restore, save, prune, RNG) are trainer/checkpointing's CheckpointManager, which the
loop calls at start (``load``) and when a checkpoint is due (``save``); the engine is built by
trainer/engine.py. Ray-specific calls are behind the small ``Reporter`` interface (trainer/ray_worker.py
implements it), so the loop is plain DeepSpeed + torch.distributed code.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from data_pipeline.accounting import corpus_counters, corpus_metrics
from model.objective_registry import OBJECTIVES
from trainer import fault_gate, preemption
from trainer.checkpointing.manager import CheckpointManager, Progress, Reporter
from trainer.checkpointing.stop import STOP_FILE, StopFile
from trainer.config import RunConfig, StageConfig
from trainer.ds_config import grad_accum_steps
from trainer.engine import ALIGN_ELEMENTS, build_engine, optimizer_groups, param_groups
from trainer.metrics import step_metrics
from trainer.watchdog import Watchdog
from trainer.zero3_units import uses_whole_units
from trainer.zero_stage import announce, resolve_zero_stage

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    losses: dict[str, float]
    total: float
    samples: dict[str, int]
    step_time: float
    data_time: float
    grad_norm: float = float("nan")
    lr: float = 0.0


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


# Why the loader skipped samples (data_pipeline/samples.py, webdataset_tar.py): one metric each, summed over
# ranks, so a run that quietly drops a share of its data shows it in MLflow, not only in the workers'
# warnings.
SKIP_REASONS = ("bad_image", "bad_text", "bad_json", "missing_field", "empty_text", "corrupt_member",
                "truncated_shard", "bad_compression", "not_a_tar")


def data_counters(stats: dict[str, int]) -> dict[str, int]:
    """This rank's loader counters since it started, in a fixed order (every rank all-reduces the same
    vector)."""
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
        self.device = (torch.device("cuda", torch.cuda.current_device()) if self.on_gpu
                       else torch.device("cpu"))
        self.accum = grad_accum_steps(cfg, world_size)
        self.progress = Progress()
        self.metrics_logger = None
        self.watchdog = Watchdog(cfg.train.watchdog_seconds, name=f"rank {rank}",
                                 phase_timeout_s=cfg.train.watchdog_phase_seconds)
        self.last_result: StepResult | None = None
        self.eval_set: dict | None = None
        # Set by build() and build_loader() (the engine needs the checkpoint's world size first), by tracking
        # at start.
        self.tokenizer: Any = None
        self.module: Any = None
        self.engine: Any = None
        self.optimizer: Any = None
        self.group_modules: list[str] = []
        self.loader: Any = None
        self.batches: Iterator[dict] = iter(())
        self.tracker: Any = None
        self.ledger: Any = None  # rank 0's goodput account of this attempt (trainer/goodput.py)
        # The run's folder or s3:// prefix (control_dir): checkpoints live under checkpoints/, and the driver
        # drops a STOP file there on SIGTERM (preemption), which rank 0 polls.
        self.checkpoints = CheckpointManager(cfg, rank, world_size, reporter, run_location=control_dir,
                                             local_rank=self.local_rank, mlflow_run_id=mlflow_run_id,
                                             on_gpu=torch.cuda.is_available())
        self.stop = StopFile(control_dir)
        self.stopped_early = False
        # pipeline/* values last sent to MLflow (_changed_data_counters)
        self._sent_data: dict[str, float] = {}

    # ----- building -----------------------------------------------------------------------------------------
    def build(self, universal: bool = False) -> Any:
        """Model, objectives module, optimizer and DeepSpeed engine (set to load a universal checkpoint)."""
        from model.unimo import UnimoModel
        from trainer.objectives import PretrainObjectives

        torch.manual_seed(self.cfg.run.seed)  # identical initial weights on every rank
        if self.tokenizer is None:
            self.load_tokenizer()
        self.module = PretrainObjectives(UnimoModel(self.cfg.model), self.rank, self.world_size)
        self.engine, self.optimizer, self.group_modules = build_engine(self.cfg, self.module, self.world_size,
                                                                       self.on_gpu, universal)
        return self.engine

    def load_tokenizer(self) -> None:
        """The run's tokenizer, checked against model.text; the checkpoint manager keeps its text (saved with
        each checkpoint, compared with the checkpoint's at resume)."""
        from data_pipeline.tokenizer import load_tokenizer
        from trainer.config import tokenizer_mismatch

        self.tokenizer = load_tokenizer(self.cfg.data.tokenizer)
        problem = tokenizer_mismatch(self.cfg, self.tokenizer)
        if problem:
            raise ValueError(problem)
        self.checkpoints.use_tokenizer(self.tokenizer.source_text)

    def build_loader(self) -> None:
        from data_pipeline.loader import build_loader

        m = self.cfg.model
        self.loader = build_loader(self.cfg.data, rank=self.rank, world_size=self.world_size,
                                   seq_len=self.cfg.seq_len,
                                   image_size=m.vision.image_size, patch_size=m.vision.patch_size,
                                   state=self.progress.data_state,
                                   objectives=self._objectives())  # batches hold only what these read
        self.batches = iter(self.loader)

    def _objectives(self) -> set[str]:
        """Every objective some stage trains: one loader serves the whole plan."""
        return {name for s in self.cfg.stages for name, w in s.objectives.items() if w > 0}

    # ----- the loop -----------------------------------------------------------------------------------------
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
                          data_time=data_time,
                          grad_norm=float(norm) if norm is not None else float("nan"), lr=lr)

    def reduce_metrics(self, result: StepResult) -> dict[str, float]:
        """Averages losses over ranks (one small all-reduce) and adds throughput figures."""
        import torch.distributed as dist

        names = sorted(result.losses)
        loader = self.loader
        counts = data_counters(loader.stats() if loader is not None else {})
        weights = loader.corpus_weights() if hasattr(loader, "corpus_weights") else {}
        counts.update(corpus_counters(loader.stats(), list(weights), SKIP_REASONS) if weights else {})
        n = len(names) + 1
        vec = torch.tensor([result.losses[k] for k in names] + [result.total] + list(counts.values()),
                           dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(vec)  # losses are averaged over ranks, data counters summed
            vec[:n] /= self.world_size
        metrics = {OBJECTIVES[k].metric: float(v) for k, v in zip(names, vec[:n - 1])}
        metrics["loss/total"] = float(vec[n - 1])
        metrics.update({f"pipeline/{k}": float(v) for k, v in zip(counts, vec[n:])})
        metrics.update(corpus_metrics(metrics, self.world_size, weights))  # per corpus: share next to weight
        metrics.update(step_metrics(result, self.cfg, self.world_size))
        return metrics

    def should_evaluate(self, step: int) -> bool:
        every = self.cfg.train.eval_every
        return bool(self.cfg.data.eval_pairs) and (step == self.cfg.total_steps
                                                   or (every > 0 and step % every == 0))

    def evaluate(self, step: int) -> dict[str, float]:
        """Retrieval on the held-out pairs; every rank runs it (ZeRO-3 gathers need all ranks), rank 0
        logs."""
        from data_pipeline.loader import build_eval_pairs
        from trainer.evaluation import evaluate

        if self.eval_set is None:
            self.eval_set = build_eval_pairs(self.cfg.data.eval_pairs, seq_len=self.cfg.seq_len,
                                             image_size=self.cfg.model.vision.image_size,
                                             tokenizer=self.tokenizer, limit=self.cfg.train.eval_samples)
            self.eval_set = {k: v for k, v in self.eval_set.items() if isinstance(v, torch.Tensor)}
        metrics, captions = evaluate(self.engine.module.model, move_to(self.eval_set, self.device),
                                     rerank_k=self.cfg.train.eval_rerank_k, decode=self.tokenizer.decode)
        if self.rank == 0:
            if self.tracker is not None:
                self.tracker.log(metrics, step)  # not again for a step the run has (a restart's re-run)
            shown = " ".join(f"{k.split('/')[1]}={v:.3f}" for k, v in metrics.items() if "R@" in k)
            print(f"[unimo] eval step {step}: {shown} (t2i chance R@1 = "
                  f"{1 / max(metrics['eval/candidates'], 1):.3f})", flush=True)
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

        Rank 0's view decides (the driver's STOP file, the checkpoint clock), and a SIGTERM to any rank's
        process requests a stop too; every rank stops or saves at the same step (ZeRO-3 saves are collective).
        """
        import torch.distributed as dist

        flags = torch.zeros(2)
        if self.rank == 0:
            flags[0] = float(self.stop.requested())
            flags[1] = float(self.checkpoints.due_by_time())
        if preemption.requested():  # a SIGTERM to any rank's process (trainer/preemption.py)
            flags[0] = 1.0
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    def checkpoint(self, step: int, metrics: dict[str, float]) -> None:
        with self.watchdog.phase(f"the checkpoint save of step {step}"):
            self.checkpoints.save(step, self.engine, self.loader, self.progress.extra,
                                  {"step": step, "stopped_early": float(self.stopped_early), **metrics})

    def run(self) -> dict[str, float]:
        """Trains from the restored step to the end of the plan; returns the last logged metrics."""
        from trainer.goodput import AttemptLedger
        from trainer.preemption_notice import watch

        self.watchdog.start()
        notice = watch(self.cfg.checkpoint.preemption_notice, self.cfg.checkpoint.notice_poll_seconds)
        # rank 0's account of this attempt's time (trainer/goodput.py); the driver sums the job's at its end
        root = self.checkpoints.run_location
        self.ledger = AttemptLedger(str(root)) if self.rank == 0 and root else None
        try:
            with self.watchdog.phase("start-up (engine build, checkpoint restore)"):
                self._start_up()
            if self.ledger is not None:
                self.ledger.started(self.progress.step)
            with preemption.training():
                last = self._step_loop(self.progress.step, self.cfg.total_steps, time.perf_counter())
            if self.ledger is not None:
                self.ledger.finish()
        finally:
            if notice is not None:
                notice.stop()
            self.watchdog.stop()
            self._stop_logging()
        return last

    def _start_up(self) -> None:
        """Tokenizer, engine (converting the checkpoint if the world size changed), restore, loader,
        logging."""
        self.load_tokenizer()  # before the restore, which compares it with the checkpoint's
        self.progress = self.checkpoints.load(self.build)
        if self.rank == 0:
            # On CPU the intra-op threads are the worker's CPUs (Ray sets OMP_NUM_THREADS to
            # scaling.cpus_per_worker): the first thing to check when steps are slower than expected.
            print(f"[unimo] {self.world_size} rank(s) on {self.device.type}; rank 0 runs "
                  f"{torch.get_num_threads()} intra-op thread(s) and {self.accum} micro-batch(es) per "
                  "optimizer step", flush=True)
        self.build_loader()
        self._start_logging()

    def _step_loop(self, start_step: int, total_steps: int, t_start: float) -> dict[str, float]:
        """Steps until the plan ends or a stop is requested; checkpoints, logs and evaluates on the way."""
        last: dict[str, float] = {}
        gates = fault_gate.parse(os.environ.get(fault_gate.ENV))  # set only by fault tests
        for step in range(start_step, total_steps):
            if ("step", step + 1) in gates:
                with self.watchdog.phase(f"the fault gate before step {step + 1}"):
                    fault_gate.wait_at(step + 1, self.rank)
            t_step = time.perf_counter()
            _, stage, in_stage = stage_at(self.cfg.stages, step)
            result = self.train_step(stage, in_stage)
            done = step + 1
            self.progress.step = done
            if done % self.cfg.train.log_every == 0 or done == total_steps:
                last = self.reduce_metrics(result)
                self._log(last, done, stage.name, t_start, start_step)
            t_eval = time.perf_counter()
            if self.should_evaluate(done):
                with self.watchdog.phase(f"the evaluation at step {done}"):
                    last.update(self.evaluate(done))
            t_eval = time.perf_counter() - t_eval
            stop, due = self.control_flags()
            if stop and done < total_steps:
                self.stopped_early = True
                if self.rank == 0:
                    print(f"[unimo] stop requested: saving a checkpoint at step {done} and exiting",
                          flush=True)
            t_save, saved = time.perf_counter(), self.should_checkpoint(done, due or stop)
            if saved:
                self.checkpoint(done, last)
            self._account(done, time.perf_counter() - t_step, result.data_time, t_eval,
                          time.perf_counter() - t_save, saved)
            if self.stopped_early:
                break
        return last

    def _account(self, step: int, total_s: float, data_s: float, eval_s: float, save_s: float,
                 saved: bool) -> None:
        """The step's wall time, split for the goodput ledger: data wait, evaluation, checkpoint, the rest
        (compute, logging, the control all-reduce) as step time."""
        if self.ledger is not None:
            self.ledger.step_done(step, total_s - data_s - eval_s - save_s, data_s, eval_s, save_s, saved)

    # ----- logging ------------------------------------------------------------------------------------------
    def _start_logging(self) -> None:
        """Every rank: rank 0 gets the MetricLogger, each node's first rank a system-metrics sampler."""
        from trainer.tracking import start_tracking

        self.tracker = start_tracking(self.cfg, self.rank, self.world_size, self.mlflow_run_id,
                                      self.tracking_uri, step_fn=lambda: self.progress.step)
        self.metrics_logger = self.tracker.metrics
        self.checkpoints.attach(self.tracker)
        choice = resolve_zero_stage(self.cfg, self.world_size, self.on_gpu)
        announce(choice, self.rank, self.metrics_logger, uses_whole_units(self.cfg, choice.stage))

    def _stop_logging(self) -> None:
        if self.tracker is not None:
            self.tracker.close()

    def _log(self, metrics: dict[str, float], step: int, stage: str, t_start: float, start_step: int) -> None:
        if self.rank != 0:
            return
        if self.tracker is not None:
            self.tracker.log(self._changed_data_counters(metrics), step)  # skips steps the run already has
        elapsed = time.perf_counter() - t_start
        rate = (step - start_step) / max(elapsed, 1e-9)
        eta = (self.cfg.total_steps - step) / max(rate, 1e-9)
        losses = " ".join(f"{k.split('/')[1]}={v:.3f}" for k, v in metrics.items() if k.startswith("loss/"))
        print(f"[unimo] stage={stage} step {step}/{self.cfg.total_steps} {losses} "
              f"lr={metrics['lr']:.2e} {rate:.2f} steps/s eta {eta:.0f}s", flush=True)


    def _changed_data_counters(self, metrics: dict[str, float]) -> dict[str, float]:
        """The step's metrics with each ``pipeline/*`` value kept only when it changed since this attempt last
        logged it (the first log has them all). The loader's counters are zero in a healthy run; logged at
        every step, a dozen flat zero charts filled the top of MLflow's metric page (its sections sort by
        name), above the losses. A counter that moves is logged at each step it moves, so its chart and latest
        value stay exact."""
        sent, out = self._sent_data, {}
        for key, value in metrics.items():
            if key.startswith("pipeline/"):
                if sent.get(key) == value:
                    continue
                sent[key] = value
            out[key] = value
        return out


def summarize(metrics: dict[str, float]) -> str:
    return json.dumps({k: round(v, 4) for k, v in metrics.items() if k.startswith("loss/")})


# (build_engine and the parameter groups live in trainer/engine.py; benchmarks and tests import them from
# here)
__all__ = ["Trainer", "Reporter", "Progress", "STOP_FILE", "stage_at", "lr_at", "summarize", "ALIGN_ELEMENTS",
           "build_engine", "optimizer_groups", "param_groups"]
