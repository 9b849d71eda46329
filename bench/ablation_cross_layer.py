"""Cross-layer ablation: trains each fusion mode (none, bridge, adaptive, gated) on the same budget, side by
side."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/learn.py, also when run from elsewhere

import learn

MODES = ("none", "bridge", "adaptive", "gated")
# What the fusion encoder decides: ITC retrieval reads the unimodal encoders only (fusion reaches it through
# shared gradients), so the ITM-re-ranked figures and the fused objectives' losses are the ones to compare.
COLUMNS = ("i2t_R@1", "t2i_R@1", "itm_i2t_R@1", "itm_t2i_R@1", "itm_i2t_R@5", "itm_t2i_R@5")
LOSSES = ("itm", "mlm_pair", "caption", "grounding")


def table(results: dict[str, dict]) -> str:
    head = ["mode", "steps", "train s", "cpu s", *COLUMNS, *(f"loss/{n}" for n in LOSSES)]
    rows = [head]
    for mode, r in results.items():
        losses = r["final_losses"]
        rows.append([mode, str(r["steps"]), f"{r['train_seconds']:.0f}", f"{r['train_cpu_seconds']:.0f}",
                     *(f"{r[c]:.2f}" for c in COLUMNS),
                     *(f"{losses.get(n, float('nan')):.3f}" for n in LOSSES)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join([lines[0], "-|-".join("-" * w for w in widths), *lines[1:]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default=str(learn.ROOT / "configs" / "debug.yaml"))
    p.add_argument("--data", default="/tmp/unimo-learn-data")
    p.add_argument("--pairs", type=int, default=2000)
    p.add_argument("--minutes", type=float, default=3.0,
                   help="cap of each mode's training loop, in CPU minutes of the training process: the same "
                        "compute for every mode even when other jobs share the machine")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rerank-k", type=int, default=10)
    p.add_argument("--steps-scale", type=float, default=learn.STEPS_SCALE, help="as bench/learn.py")
    p.add_argument("overrides", nargs="*",
                   help="dotted config overrides applied to every mode (e.g. the plan)")
    args = p.parse_args(argv)
    urls = learn.synthetic_data(Path(args.data), args.pairs)
    results = {}
    for mode in args.modes.split(","):
        cfg = learn.build_config(args.config, [*args.overrides, f"model.fusion.cross_layer={mode}"], urls,
                                 args.steps_scale)
        r = learn.train(cfg, args.minutes, args.threads, rerank_k=args.rerank_k, tag=f"[{mode}] ",
                        clock="cpu", log_every=100)
        r.pop("captions")
        results[mode] = r
        print(f"[{mode}] " + json.dumps({k: r[k] for k in ("steps", "train_seconds", *COLUMNS)}), flush=True)
    print(f"\nheld-out retrieval R@1 of {learn.CANDIDATES} candidates (chance 0.01); ITM re-ranks the ITC "
          f"top {args.rerank_k}; losses averaged over the last {learn.TAIL} steps")
    print(table(results))
    print(f"machine: {learn.machine()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
