"""How long the step loop is blocked while a checkpoint uploads to S3: async upload (the default) against
sync.

Starts moto's S3 server on 127.0.0.1 in its own process, then trains the same short run twice through Ray
Train (one worker, DeepSpeed ZeRO-3 on CPU, run.storage=s3://...): once with checkpoint.async_upload=false
(the baseline: the loop waits for the upload) and once with it true. Inside the worker the real Trainer's
save, report and steps are timed; with async upload the upload is over when Ray deletes the local folder it
copied from. Prints, per mode, the local save, the time report() held the loop, the total blocked time, when
the upload finished, and the median step time before / while / after the upload, then blocked(async) /
blocked(sync), blocked(async) / local save and the async step time while uploading against before.

    .venv/bin/python bench/bench_checkpoint_upload.py [--flavor small] [--before 3] [--after 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.services import FAKE_AWS, free_port, wait_http

BUCKET = "bench-ckpt"


def start_s3_server() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in its own process (its request handling must not share the trainer's GIL)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    wait_http(endpoint + "/moto-api/", timeout=60)
    return proc, endpoint


def timed_worker(payload: dict) -> None:
    """Ray Train's worker function: the real Trainer, with its steps, save and report timed (rank 0 writes
    them)."""
    import logging

    import ray.train

    from trainer.config import config_from_dict
    from trainer.loop import Trainer
    from trainer.ray_worker import RayReporter

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.basicConfig(level=logging.WARNING)
    ctx = ray.train.get_context()
    cfg = config_from_dict(payload["run_config"])
    trainer = Trainer(cfg, rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                      reporter=RayReporter(cfg.checkpoint.async_upload),
                      mlflow_run_id=payload.get("mlflow_run_id"),
                      tracking_uri=payload.get("tracking_uri", ""), local_rank=ctx.get_local_rank(),
                      control_dir=payload.get("control_dir"))
    events: dict[str, list] = {"steps": [], "save": [], "report": [], "upload_done": []}
    clock = time.perf_counter

    def timed(name, fn):
        def run(*args, **kwargs):
            t0 = clock()
            out = fn(*args, **kwargs)
            events[name].append((t0, clock()))
            return out
        return run

    save, report = trainer.checkpoints.save_local, trainer.reporter.report
    watchers: list[threading.Thread] = []
    trainer.train_step = timed("steps", trainer.train_step)
    trainer.checkpoints.save_local = timed("save", save)

    def report_and_watch(metrics, checkpoint_dir, step):
        timed("report", report)(metrics, checkpoint_dir, step)
        if checkpoint_dir is not None and cfg.checkpoint.async_upload:
            # Ray deletes the folder it uploaded from once the copy to S3 is complete.
            def watch():
                while Path(checkpoint_dir).exists():
                    time.sleep(0.01)
                events["upload_done"].append(clock())
            watchers.append(threading.Thread(target=watch, daemon=True))
            watchers[-1].start()

    trainer.reporter.report = report_and_watch
    # One checkpoint mid-run (after --before steps) and the final one, whatever checkpoint.every_steps says.
    trainer.should_checkpoint = lambda step, due: step in (payload["checkpoint_at"], cfg.total_steps)
    trainer.run()
    for watcher in watchers:  # Ray's upload threads go on after the loop ends: wait for them
        watcher.join(timeout=900)
    if ctx.get_world_rank() == 0:
        Path(payload["bench_out"]).write_text(json.dumps(events))


def run_mode(args, data_dir: str, work: Path, async_upload: bool) -> dict:
    """One training run with the given upload mode; returns the worker's timings."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from orchestrator.driver import init_ray, with_absolute_paths, worker_env
    from trainer import storage
    from trainer.config import load_config
    from trainer.config_loader import to_dict

    mode = "async" if async_upload else "sync"
    steps = args.before + args.after
    overrides = [f"run.name=bench-{mode}", f"run.storage=s3://{BUCKET}/runs", f"model.flavor={args.flavor}",
                 "scaling.num_workers=1", "scaling.cpus_per_worker=1", "train.global_micro_batches=1",
                 "train.log_every=1000", f"checkpoint.async_upload={str(async_upload).lower()}",
                 "checkpoint.keep_last=1", "data.eval_pairs=",
                 f"stages=[{{name: main, steps: {steps}, "
                 "objectives: {mlm_text: 1, mim: 1, itc: 1, mlm_pair: 1}}]",
                 f"data.text.urls={data_dir}/text", f"data.image.urls={data_dir}/images",
                 f"data.pair.urls={data_dir}/pairs", f"data.tokenizer={data_dir}/tokenizer/tokenizer.json",
                 "model.text.vocab_size=1024", "model.text.max_positions=64", "model.text.bos_token_id=2",
                 "model.text.eos_token_id=3", "model.text.mask_token_id=4", "model.vision.image_size=64",
                 "model.vision.patch_size=16", "train.seq_len=32", "data.text.batch_size=4",
                 "data.image.batch_size=4", "data.pair.batch_size=8"]
    cfg = with_absolute_paths(load_config(None, overrides))
    run_url = storage.join(cfg.run.storage, cfg.run.name)
    storage_path, storage_fs = storage.ray_storage(run_url)
    out = work / f"{mode}.json"
    init_ray(cfg)
    trainer = TorchTrainer(
        timed_worker,
        train_loop_config={"run_config": to_dict(cfg), "control_dir": run_url, "bench_out": str(out),
                           "checkpoint_at": args.before},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="checkpoints", storage_path=storage_path,
                                       storage_filesystem=storage_fs,
                                       worker_runtime_env={"env_vars": worker_env(cfg)}))
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    events = json.loads(out.read_text())
    if os.environ.get("BENCH_DEBUG"):
        print(mode, json.dumps(events))
    return events


def summarize(ev: dict) -> dict[str, float]:
    """Blocked time and step times around the first checkpoint (the one taken mid-run)."""
    save0, save1 = ev["save"][0]
    rep0, rep1 = ev["report"][0]
    upload_end = ev["upload_done"][0] if ev["upload_done"] else rep1  # sync: the upload ends inside report()
    before = [b - a for a, b in ev["steps"] if b <= save0]
    during = [b - a for a, b in ev["steps"] if a >= rep1 and a < upload_end]
    after = [b - a for a, b in ev["steps"] if a >= upload_end]
    med = lambda xs: statistics.median(xs) if xs else float("nan")
    return {"save": save1 - save0, "report": rep1 - rep0, "blocked": rep1 - save0,
            "upload_done": upload_end - save1, "before": med(before), "during": med(during),
            "n_during": len(during), "after": med(after)}


def checkpoint_size_mb(mode: str) -> float:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=f"runs/bench-{mode}/checkpoints/")
    sizes = {}
    for page in pages:
        for o in page.get("Contents", []):
            sizes.setdefault(o["Key"].split("/")[3], 0)
            sizes[o["Key"].split("/")[3]] += o["Size"]
    return max(sizes.values()) / 1e6 if sizes else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="small")
    parser.add_argument("--before", type=int, default=3, help="steps before the checkpoint")
    parser.add_argument("--after", type=int, default=8, help="steps after it (the upload overlaps these)")
    args = parser.parse_args()

    import boto3

    from data_pipeline.synthetic import write_synthetic_dataset

    data_dir = os.path.expanduser("~/.cache/unimo-bench/data")  # shared with bench_trainer.py
    if not os.path.isdir(os.path.join(data_dir, "pairs")):
        write_synthetic_dataset(data_dir, n_pairs=400, n_text=400, n_images=400, n_eval=50,
                                samples_per_shard=100)
    server, endpoint = start_s3_server()
    os.environ.update(FAKE_AWS, AWS_ENDPOINT_URL=endpoint, MLFLOW_DISABLE_TELEMETRY="true",
                      RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    try:
        import ray

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        results = {}
        with tempfile.TemporaryDirectory(prefix="unimo-bench-upload-") as work:
            for async_upload in (False, True):  # sync first: the baseline
                mode = "async" if async_upload else "sync"
                results[mode] = summarize(run_mode(args, data_dir, Path(work), async_upload))
                ray.shutdown()
        size = checkpoint_size_mb("sync")
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"\nflavor={args.flavor} checkpoint={size:.0f} MB to moto S3 on 127.0.0.1 (own process); "
          f"1 worker; load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    print(f"{'upload':7}{'local save':>12}{'report()':>10}{'blocked':>10}{'upload done':>13}"
          f"{'step before':>13}{'step during':>13}{'step after':>12}")
    for mode, r in results.items():
        print(f"{mode:7}{r['save']:>11.2f}s{r['report']:>9.2f}s{r['blocked']:>9.2f}s"
              f"{r['upload_done']:>12.2f}s{r['before']:>12.2f}s{r['during']:>10.2f}s/{r['n_during']}"
              f"{r['after']:>11.2f}s")
    a, s = results["async"], results["sync"]
    print(f"blocked async / sync       = {a['blocked'] / s['blocked']:.3f}x")
    print(f"blocked async / local save = {a['blocked'] / a['save']:.3f}x  (1.0x: the loop waits "
          "only for the save)")
    print(f"async step while uploading / before = {a['during'] / a['before']:.3f}x  (the upload's CPU and "
          "I/O share the machine with the step)")


if __name__ == "__main__":
    main()
