"""Config overrides for short integration-test runs of the debug flavor."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEBUG_CONFIG = str(ROOT / "configs" / "debug.yaml")
# The bound of a wait that covers a job's start-up (Ray, worker group, engine build): ~35 s on the idle
# 2-core machine, minutes under load (scripts/flake_hunt.sh). Only a hang takes this long; the tests wait on
# the event itself.
STARTUP_S = 600


def jobs_bound(jobs: int):
    """pytest-timeout's bound for a test that runs ``jobs`` jobs one after another: STARTUP_S each.

    The suite-wide 900 s covers one or two jobs; three in a row took longer than that under load
    (scripts/flake_hunt.sh), with no hang.
    """
    return pytest.mark.timeout(jobs * STARTUP_S)


# One training worker, one micro-batch per step: for tests whose subject is the driver's or rank 0's work
# (tracking, fail-fast, the Jobs API), where a group of one shows what a group of two would. Such a job costs
# about a quarter less CPU than one of two workers (docs/BENCHMARKS.md, session 14); the 2-rank paths are
# the subject of the other integration tests.
ONE_WORKER = ["scaling.num_workers=1", "train.global_micro_batches=1"]


def data_overrides(base: str) -> list[str]:
    """Points every data source of the debug config at ``base`` (a local folder or s3:// prefix)."""
    return [f"data.pair.urls={base}/pairs", f"data.text.urls={base}/text", f"data.image.urls={base}/images",
            f"data.eval_pairs={base}/eval", f"data.tokenizer={base}/tokenizer/tokenizer.json"]


def small_run(name: str, storage: Path, data: str, *, steps: int = 20, every: int = 10,
              extra: list[str] | None = None, evaluate: bool = False) -> list[str]:
    """Overrides for a short single-stage run of the debug flavor (fast enough for integration tests).

    Retrieval evaluation (reading the held-out shards, generating captions) is off unless asked for: it is
    covered by the walking-skeleton test and would otherwise add to every run. Images are the flavor's 32 px,
    not the demo's 48 (which is there for what the demo learns, at ~15% more CPU per step: docs/LEARNING.md).
    """
    return [f"run.name={name}", f"run.storage={storage}", *data_overrides(data),
            *([] if evaluate else ["data.eval_pairs="]),
            f"stages=[{{name: main, steps: {steps}, "
            "objectives: {mlm_text: 1, mim: 1, itc: 1, itm: 1, mlm_pair: 1}}]",
            "model.vision.image_size=32", "optimizer.warmup_steps=2", "train.log_every=1",
            f"checkpoint.every_steps={every}",
            "checkpoint.keep_last=10", *(extra or [])]
