"""Time to the answer for each user mistake of issue #26: `unimo train configs/debug.yaml <mistake>`, 2
workers.

Writes a small synthetic data set, then runs the real CLI once per mistake (each alone) and prints its exit
code, wall time, the machine's load average and the first line of its error. The reference line is an unknown
config key (rc 2), which never reached a worker even before the pre-flight: the difference to it is what the
checks cost. docs/ERRORS.md holds the latest figures.

    .venv/bin/python bench/bench_fail_fast.py
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def refused_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def mistakes(data: Path, refused: str) -> list[tuple[str, list[str], dict[str, str]]]:
    s3 = {"AWS_ENDPOINT_URL": refused, "AWS_ACCESS_KEY_ID": "AKIAFAKEBENCH",
          "AWS_SECRET_ACCESS_KEY": "fake-bench"}
    return [
        ("unknown key (reference)", ["optimizer.lrr=1"], {}),
        ("MLflow refuses connections", [f"tracking.uri={refused}"], {}),
        ("tokenizer path missing", [f"data.tokenizer={data}/nope/tokenizer.json"], {}),
        ("data folder missing", [f"data.pair.urls={data}/nope"], {}),
        ("S3 refuses, io_retries=1", ["data.pair.urls=s3://bucket/pairs", "data.io_retries=1"], s3),
    ]


def main() -> None:
    from data_pipeline.synthetic import write_synthetic_dataset

    with tempfile.TemporaryDirectory(prefix="bench-fail-fast-") as tmp:
        data = Path(tmp) / "data"
        write_synthetic_dataset(str(data), n_pairs=400, n_text=400, n_images=400, n_eval=100,
                                samples_per_shard=100)
        base = [f"run.storage={tmp}/runs", f"data.pair.urls={data}/pairs", f"data.text.urls={data}/text",
                f"data.image.urls={data}/images", f"data.eval_pairs={data}/eval",
                f"data.tokenizer={data}/tokenizer/tokenizer.json"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
               "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
        print(f"{'mistake':30s} {'rc':>3s} {'time':>7s} {'load':>5s}  answer")
        for name, extra, extra_env in mistakes(data, refused_endpoint()):
            started = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", "configs/debug.yaml",
                                   *base, *extra], cwd=ROOT, env={**env, **extra_env}, capture_output=True,
                                  text=True, timeout=900)
            took = time.monotonic() - started
            answer = next((line for line in done.stderr.splitlines() if line.startswith("unimo:")), "")
            print(f"{name:30s} {done.returncode:3d} {took:6.1f}s {os.getloadavg()[0]:5.1f}  {answer[:110]}",
                  flush=True)


if __name__ == "__main__":
    main()
