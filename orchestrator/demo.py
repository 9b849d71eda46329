"""`unimo demo`: synthetic shards -> the debug flavor on 2 Ray Train workers under ZeRO-3 -> where to look."""

from __future__ import annotations

import math
import time
from pathlib import Path

from orchestrator.driver import exit_code, fit, print_summary
from trainer.config import load_config

# the shipped config (trainer/shipped_configs.py): found in a checkout and when installed
DEFAULT_CONFIG = "debug"


def ensure_demo_data(data_dir: Path) -> dict[str, str]:
    """Writes the synthetic data set once; a second demo reuses it, unless it was written by another version
    of the synthetic world (its DONE marker names the version), which is written again."""
    import shutil

    from data_pipeline.synthetic import world_version, write_synthetic_dataset

    marker, version = data_dir / "DONE", world_version()
    paths = {"pair": data_dir / "pairs", "text": data_dir / "text", "image": data_dir / "images",
             "eval": data_dir / "eval", "tokenizer": data_dir / "tokenizer" / "tokenizer.json"}
    found = marker.read_text().strip() if marker.is_file() else None
    if found != f"world {version}":
        if found is not None:
            print(f"[demo] {data_dir} holds another version of the synthetic world: writing it again (to "
                  "train on it from scratch, give the demo a new run.name: the same name resumes its run)",
                  flush=True)
            shutil.rmtree(data_dir)
        t0 = time.perf_counter()
        print(f"[demo] writing the synthetic data set to {data_dir} ...", flush=True)
        written = write_synthetic_dataset(str(data_dir))
        paths = {k: Path(v) for k, v in written.items()}
        marker.write_text(f"world {version}\n")
        print(f"[demo] data written in {time.perf_counter() - t0:.1f}s", flush=True)
    return {k: str(v) for k, v in paths.items()}


# the losses of a model that guesses: ITM sees 1 matching pair in 3 rows (its two negatives), grounding picks
# one image of 2 for each phrase
GUESSING = {"loss/itm": -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3)), "loss/grounding": math.log(2)}


def what_it_learnt(metrics: dict) -> str:
    """ITM's and grounding's final losses beside a guesser's: below it, the fusion encoder tells matching
    pairs and phrases apart."""
    parts = [f"{name.split('/')[1]} {metrics[name]:.3f} (guessing: {prior:.3f})"
             for name, prior in GUESSING.items() if name in metrics]
    return "final losses of the cross-modal heads: " + ", ".join(parts) if parts else ""


def run_demo(out: str, config: str | None, overrides: list[str]) -> int:
    out_dir = Path(out).resolve()
    data = ensure_demo_data(out_dir / "data")
    demo_overrides = [
        f"run.storage={out_dir / 'runs'}",
        f"data.pair.urls={data['pair']}", f"data.text.urls={data['text']}",
        f"data.image.urls={data['image']}",
        f"data.eval_pairs={data['eval']}", f"data.tokenizer={data['tokenizer']}",
    ]
    cfg = load_config(config or DEFAULT_CONFIG, demo_overrides + list(overrides))
    print(f"[demo] training run '{cfg.run.name}': {cfg.total_steps} steps, {cfg.scaling.num_workers} Ray "
          f"workers, DeepSpeed ZeRO-{cfg.deepspeed.zero_stage}", flush=True)
    t0 = time.perf_counter()
    outcome = fit(cfg)
    print_summary(outcome)
    learnt = what_it_learnt(outcome.metrics)
    if learnt:
        print(f"[demo] {learnt}")
    print(f"[demo] {'stopped' if outcome.stopped_early else 'finished'} in {time.perf_counter() - t0:.0f}s; "
          "run it again with a new run.name=... to start afresh (the same name resumes).")
    return exit_code(outcome)
