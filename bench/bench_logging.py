"""Logging overhead: step time with one MetricLogger.log per step vs none, same run, a real MLflow server.

The debug config's model and objectives train in one process (plain PyTorch on CPU: a faster step than a
DeepSpeed rank's, so the overhead ratio is, if anything, overstated). Blocks of steps with and without logging
alternate so that drift in machine load hits both alike. A logged step computes ``step_metrics`` (throughput,
FLOP/s, memory) and queues every metric; the background thread sends them to an MLflow server on 127.0.0.1.
Prints the overhead (target <= 1% of step time) and checks that every logged metric arrived.

    .venv/bin/python bench/bench_logging.py [--rounds 6] [--block 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def load_debug_config(data_dir: Path):
    from data_pipeline.synthetic import write_synthetic_dataset
    from trainer.config import load_config

    write_synthetic_dataset(str(data_dir), n_pairs=200, n_text=200, n_images=200, n_eval=20,
                            samples_per_shard=100)
    d = str(data_dir)
    return load_config(ROOT / "configs" / "debug.yaml", [
        f"data.pair.urls={d}/pairs", f"data.text.urls={d}/text", f"data.image.urls={d}/images",
        f"data.eval_pairs={d}/eval", f"data.tokenizer={d}/tokenizer/tokenizer.json", "data.num_workers=0"])


def read_batches(cfg, n: int) -> list[dict]:
    """Micro-batches read once up front, so that no step waits on data in either arm."""
    from data_pipeline.loader import build_loader

    m = cfg.model
    it = iter(build_loader(cfg.data, rank=0, world_size=1, seq_len=cfg.seq_len,
                           image_size=m.vision.image_size, patch_size=m.vision.patch_size))
    return [next(it) for _ in range(n)]


class Step:
    """One optimizer step of the debug model on the first stage's objectives (what the loop's step does)."""

    def __init__(self, cfg):
        from model.unimo import UnimoModel
        from trainer.loop import optimizer_groups
        from trainer.objectives import PretrainObjectives

        torch.manual_seed(0)
        self.cfg = cfg
        self.module = PretrainObjectives(UnimoModel(cfg.model))
        groups = optimizer_groups(self.module.model, 0.01)
        self.opt = torch.optim.AdamW(groups, lr=1e-4)
        self.weights = cfg.stages[0].objectives

    def __call__(self, batch: dict):
        from trainer.loop import StepResult

        t0 = time.perf_counter()
        total, parts = self.module(batch, self.weights)
        total.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        samples = {s: len(batch["keys"][s]) for s in ("text", "image", "pair") if s in batch}
        return StepResult(losses={k: float(v.detach()) for k, v in parts.items()},
                          total=float(total.detach()), samples=samples,
                          step_time=time.perf_counter() - t0, data_time=0.0, grad_norm=float(norm), lr=1e-4)


def run(rounds: int, block: int, flush_seconds: float) -> dict:
    from mlflow.tracking import MlflowClient

    from tests.integration.services import mlflow_server
    from trainer.metrics import step_metrics
    from trainer.metric_logger import MetricLogger

    work = Path(tempfile.mkdtemp(prefix="unimo-bench-logging-"))
    cfg = load_debug_config(work / "data")
    batches = read_batches(cfg, 8)
    step = Step(cfg)
    for b in batches[:3]:  # warm-up: allocator, autograd graphs
        step(b)
    with mlflow_server(work / "mlflow") as uri:
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("bench-logging")).info.run_id
        logger = MetricLogger(uri, run_id, flush_seconds=flush_seconds, spool_dir=work / "spool")
        plain, logged, log_cost = [], [], []
        n = 0
        for i in range(rounds):
            # Pairs of neighbouring steps, one per arm, in alternating order: both arms see the same load.
            for with_logging in ((False, True) if i % 2 == 0 else (True, False)):
                for _ in range(block):
                    n += 1
                    t0 = time.perf_counter()
                    result = step(batches[n % len(batches)])
                    if with_logging:
                        t1 = time.perf_counter()
                        metrics = {f"loss/{k}": v for k, v in result.losses.items()}
                        metrics["loss/total"] = result.total
                        metrics.update(step_metrics(result, cfg, world_size=1))
                        logger.log(metrics, n)
                        log_cost.append(time.perf_counter() - t1)
                    (logged if with_logging else plain).append(time.perf_counter() - t0)
        delivered = logger.close(timeout=60)
        history = client.get_metric_history(run_id, "loss/total")
    return {"plain": plain, "logged": logged, "log_cost": log_cost, "metrics_per_step": len(metrics),
            "delivered": delivered, "steps_in_mlflow": len(history), "steps_logged": len(logged)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=200, help="alternations of the two arms")
    p.add_argument("--block", type=int, default=1, help="steps per arm per round")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a Ray worker with 1 CPU has 1)")
    p.add_argument("--flush-seconds", type=float, default=2.0, help="tracking.flush_seconds")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    r = run(args.rounds, args.block, args.flush_seconds)
    plain_mean, logged_mean = statistics.mean(r["plain"]), statistics.mean(r["logged"])
    plain_med, logged_med = statistics.median(r["plain"]), statistics.median(r["logged"])
    direct = statistics.mean(r["log_cost"])
    print(f"debug config, {len(r['plain'])} + {len(r['logged'])} steps, {r['metrics_per_step']} metrics per "
          f"logged step, flush every {args.flush_seconds}s")
    print(f"step time without logging : mean {plain_mean * 1e3:8.2f} ms   median {plain_med * 1e3:8.2f} ms")
    print(f"step time with logging    : mean {logged_mean * 1e3:8.2f} ms   median {logged_med * 1e3:8.2f} ms")
    print(f"on-step cost (step_metrics + log): {direct * 1e6:.0f} us = {100 * direct / plain_med:.3f}% of a "
          "step")
    for name, ratio in (("median", logged_med / plain_med), ("mean", logged_mean / plain_mean)):
        print(f"overhead ratio ({name}){' ' * (9 - len(name))}: {ratio:.4f}  ({100 * (ratio - 1):+.2f}%)")
    paired = statistics.median(b / a for a, b in zip(r["plain"], r["logged"]))  # neighbouring steps
    print(f"overhead ratio (paired)   : {paired:.4f}  ({100 * (paired - 1):+.2f}%)  <- the figure (target "
          "<= 1.01)")
    print(f"delivered: {r['delivered']}, steps in MLflow {r['steps_in_mlflow']} of {r['steps_logged']} "
          "logged")
    return 0 if r["delivered"] and r["steps_in_mlflow"] == r["steps_logged"] else 1


if __name__ == "__main__":
    sys.exit(main())
