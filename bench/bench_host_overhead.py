"""Host work per training step: each flavor's module structure at a tiny width, so compute is near zero and
what is left is what bounds a GPU step from the host side (Python, dispatch, hooks, optimizer bookkeeping).

For each flavor: the plain PyTorch loop (fused AdamW, grad clipping) and the trainer's engine (trainer.loop.
build_engine, one gloo rank) at ZeRO stage 0, 1, 2, 3 and `auto`, same batches, interleaved step by step;
ms/step, the paired ratio to the plain loop, and per step the aten ops (torch profiler) and module calls (a
global forward hook). Stages 1-3 run as the trainer runs them (the one-pass gradient norm,
trainer/grad_norm.py; ZeRO-3 over whole units, trainer/zero3_units.py), and as `zero{1,2,3}_ds_norm` with
DeepSpeed's gradient norm; `zero3_per_module` is DeepSpeed's own ZeRO-3 (neither). Targets, same run: `auto`
<= 1.2x plain, ZeRO-3 forced <= 2x plain.

ZeRO-3's sizes are the real width's, counted in blocks: prefetch and reduce buckets hold as many (tiny) blocks
as they hold blocks of the real flavor, and the parameters kept gathered (persistent) are the tensors the real
width keeps gathered (1-D ones where its weight matrices exceed the threshold; at debug's width, all). The
sizes derived from the tiny width itself would keep every tensor gathered and prefetch the whole model, which
the real flavors do not.

    python bench/bench_host_overhead.py [--flavors debug small base large xl] [--steps 6] [--threads 1]
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch

# tests.fake_batch gives the benchmark its batches: the checkout's root on the path, from wherever it runs
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WEIGHTS = {"mlm_text": 1.0, "mim": 1.0, "itc": 1.0, "itm": 1.0, "mlm_pair": 1.0}
# Every flavor's depth (layers, levels, heads' structure) at this width: kernels take microseconds.
TINY_DIM, TINY_MLP = 32, 64
TINY = [f"model.{{p}}.dim={TINY_DIM}", "model.{p}.heads=2", f"model.{{p}}.mlp_dim={TINY_MLP}"]
TINY_REST = ["model.embed_dim=32", "model.text.vocab_size=512", "model.vision.image_size=32",
             "model.vision.patch_size=16", "model.text.max_positions=64", "model.text.bos_token_id=2",
             "model.text.eos_token_id=3", "model.text.mask_token_id=4", "model.text_init=",
             "model.vision_init="]
STAGES = ("0", "1", "2", "3", "auto")


@functools.lru_cache(maxsize=None)
def real_width(flavor: str):
    """The real flavor's config and ZeRO-3 sizes (every loop's config asks; loaded once per flavor)."""
    from trainer.config import load_config
    from trainer.ds_config import zero3_sizes

    real = load_config(None, [f"model.flavor={flavor}"])
    return real, zero3_sizes(real)


def real_width_zero3(flavor: str) -> list[str]:
    """ZeRO-3's bucket, prefetch and persistence overrides giving the tiny width the real flavor's layout."""
    real, sizes = real_width(flavor)
    h = max(real.model.text.dim, real.model.vision.dim, real.model.fusion.dim)
    mlp = max(real.model.text.mlp_dim, real.model.vision.mlp_dim, real.model.fusion.mlp_dim)
    # a block's weights: attention 4 d^2, MLP 2 d m (the tiny width's MLP is 2x its width, the real ones' 4x)
    blocks = (4 * TINY_DIM**2 + 2 * TINY_DIM * TINY_MLP) / (4 * h * h + 2 * h * mlp)
    threshold = sizes["param_persistence_threshold"]
    # the real width partitions its weight matrices (h x h) only where they exceed the threshold
    persistence = 16 * TINY_DIM if h * h > threshold else threshold
    return [f"deepspeed.prefetch_bucket_size={round(sizes['prefetch_bucket_size'] * blocks)}",
            f"deepspeed.reduce_bucket_size={round(sizes['reduce_bucket_size'] * blocks)}",
            f"deepspeed.param_persistence_threshold={persistence}"]


def tiny_config(flavor: str, stage: str, extra: tuple[str, ...] = ()):
    from trainer.config import load_config

    overrides = [*real_width_zero3(flavor), *extra, f"model.flavor={flavor}", "scaling.num_workers=1",
                 "train.global_micro_batches=1", f"deepspeed.zero_stage={stage}", "deepspeed.precision=fp32"]
    overrides += [o.format(p=p) for p in ("text", "vision", "fusion") for o in TINY] + TINY_REST
    return load_config(None, overrides)


def persistent_counts(flavor: str, engine) -> str:
    """'kept gathered: N of M tensors (real width: K of M)': the proxy's ZeRO-3 layout against the real."""
    from model.unimo import UnimoModel
    from trainer.objectives import PretrainObjectives

    real, sizes = real_width(flavor)
    with torch.device("meta"):  # the real width's shapes, nothing allocated
        shapes = [p.numel() for p in PretrainObjectives(UnimoModel(real.model)).parameters()]
    threshold = sizes["param_persistence_threshold"]
    proxy = [p.ds_persist for p in engine.module.parameters()]
    return (f"kept gathered: {sum(proxy)} of {len(proxy)} tensors "
            f"(real width: {sum(n <= threshold for n in shapes)} of {len(shapes)})")


def plain_loop(cfg):
    from model.unimo import UnimoModel
    from trainer.loop import optimizer_groups
    from trainer.objectives import PretrainObjectives
    from trainer.optim import build_adamw

    torch.manual_seed(0)
    module = PretrainObjectives(UnimoModel(cfg.model))
    opt = build_adamw(optimizer_groups(module.model, cfg.optimizer.weight_decay), cfg.optimizer)

    def step(batch):
        total, _ = module(batch, WEIGHTS)
        total.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.optimizer.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def engine_loop(cfg):
    from model.unimo import UnimoModel
    from trainer.loop import build_engine
    from trainer.objectives import PretrainObjectives
    from trainer.zero_stage import resolve_zero_stage

    torch.manual_seed(0)
    engine, _, _ = build_engine(cfg, PretrainObjectives(UnimoModel(cfg.model)), world_size=1, on_gpu=False)

    def step(batch):
        total, _ = engine(batch, WEIGHTS)
        engine.backward(total)
        engine.step()

    return step, resolve_zero_stage(cfg, 1, False), engine


def counts_per_step(step, batch) -> tuple[int, int]:
    """(aten ops, module calls) of one step: bench_gpu's count on the CPU."""
    from bench.bench_gpu import launches_per_step

    counts = launches_per_step(step, batch, "cpu")
    return counts["aten_ops_per_step"], counts["module_calls_per_step"]


def bench_flavor(flavor: str, steps: int, warmup: int) -> list[dict]:
    from tests.fake_batch import random_batch

    loops = {"plain": plain_loop(tiny_config(flavor, "auto"))}
    chosen, notes = {}, {}
    for stage in STAGES:
        loops[f"zero{stage}"], chosen[stage], engine = engine_loop(tiny_config(flavor, stage))
        if stage == "3":
            notes["zero3"] = persistent_counts(flavor, engine)
    for stage in ("1", "2", "3"):  # DeepSpeed's per-group gradient norm
        loops[f"zero{stage}_ds_norm"], _, _ = engine_loop(
            tiny_config(flavor, stage, ("deepspeed.one_pass_grad_norm=false",)))
    loops["zero3_per_module"], _, _ = engine_loop(tiny_config(  # DeepSpeed's own ZeRO-3
        flavor, "3", ("deepspeed.zero3_whole_units=false", "deepspeed.one_pass_grad_norm=false")))
    notes["zeroauto"] = f"auto -> stage {chosen['auto'].stage}"
    cfg = tiny_config(flavor, "auto")
    batches = [random_batch(cfg, b=4, seq_len=16, seed=i) for i in range(steps + warmup)]
    times = {name: [] for name in loops}
    for i, batch in enumerate(batches):  # interleaved: a busy spell of the shared machine hits all alike
        for name, step in loops.items():
            t0 = time.perf_counter()
            step(batch)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    rows = []
    for name, step in loops.items():
        ops, calls = counts_per_step(step, batches[0])
        paired = statistics.median(a / b for a, b in zip(times[name], times["plain"]))
        rows.append({"flavor": flavor, "loop": name, "ms": 1000 * statistics.median(times[name]),
                     "ratio": paired, "ops": ops, "calls": calls, "note": notes.get(name, "")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavors", nargs="+", default=["debug", "small", "base", "large", "xl"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    print(f"tiny width (dim 32), {args.threads} thread(s), {args.steps} timed steps after {args.warmup}; "
          "ratio = median of step-by-step ratios to the plain loop")
    print("| flavor | loop | ms/step | x plain | aten ops/step | module calls/step | |")
    print("|---|---|---|---|---|---|---|")
    verdicts = []
    for flavor in args.flavors:
        for r in bench_flavor(flavor, args.steps, args.warmup):
            print(f"| {r['flavor']} | {r['loop']} | {r['ms']:.1f} | {r['ratio']:.2f}x | {r['ops']} | "
                  f"{r['calls']} | {r['note']} |", flush=True)
            if r["loop"] == "zeroauto":
                verdicts.append(f"{flavor}: auto {r['ratio']:.2f}x (target <= 1.2x) "
                                f"{'met' if r['ratio'] <= 1.2 else 'MISSED'}")
            if r["loop"] == "zero3":
                verdicts.append(f"{flavor}: ZeRO-3 {r['ratio']:.2f}x (target <= 2x) "
                                f"{'met' if r['ratio'] <= 2.0 else 'MISSED'}")
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
