"""Trainer overhead: our DeepSpeed ZeRO-3 step (one rank) against a plain PyTorch loop, and checkpoint I/O.

Same model (`small` flavor of configs/small.yaml by default), same batches, same objectives, same run, CPU.
Prints the step-time ratio (target <= 1.15x) against a plain loop with torch's default AdamW and against one
with the fused AdamW our trainer uses, and checkpoint save/load times against torch.save/torch.load of the
same tensors.

One rank as configs/small.yaml runs it by default: as many intra-op threads as `scaling.cpus_per_worker` (Ray
sets each worker's OMP_NUM_THREADS to its CPUs) and one micro-batch per optimizer step (the job's global batch
of two micro-batches over its two workers); `--threads` and `--accumulation` change either.

    .venv/bin/python bench/bench_trainer.py [--flavor small] [--steps 10] [--threads N] [--accumulation N]
                                            [--geometry shipped|reduced] [config overrides...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29561"), RANK="0",
                  WORLD_SIZE="1", LOCAL_RANK="0")

import torch

# DeepSpeed's memory-efficient Linear (deepspeed.memory_efficient_linear) replaces torch.nn.functional.linear
# for the whole process; the plain loops must run PyTorch's own, so they keep a reference taken before
# DeepSpeed loads.
NATIVE_LINEAR = torch.nn.functional.linear

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Overrides on top of configs/small.yaml (vocabulary 1024, 64 px / patch 16, 32 tokens, 8 text + 8 image +
# 16 pair samples per micro-batch).
GEOMETRIES = {
    "shipped": [],
    "reduced": ["model.text.vocab_size=30522", "data.text.batch_size=4", "data.image.batch_size=4",
                "data.pair.batch_size=8"],
}


def make_batches(cfg, n: int, data_dir: str) -> list[dict]:
    """Real micro-batches from the synthetic data set, read once up front so neither loop waits on data."""
    from data_pipeline.loader import build_loader
    from data_pipeline.synthetic import write_synthetic_dataset

    if not os.path.isdir(os.path.join(data_dir, "pairs")):
        write_synthetic_dataset(data_dir, n_pairs=400, n_text=400, n_images=400, n_eval=50,
                                samples_per_shard=100)
    m = cfg.model
    loader = build_loader(cfg.data, rank=0, world_size=1, seq_len=cfg.seq_len, image_size=m.vision.image_size,
                          patch_size=m.vision.patch_size)
    it = iter(loader)
    return [next(it) for _ in range(n)]


def with_native_linear(step):
    """Runs ``step`` with PyTorch's F.linear, whatever DeepSpeed installed (and puts DeepSpeed's back)."""
    def run(batches):
        installed = torch.nn.functional.linear
        torch.nn.functional.linear = NATIVE_LINEAR
        try:
            step(batches)
        finally:
            torch.nn.functional.linear = installed

    return run


def paired_ratio(ours: list[float], base: list[float]) -> float:
    """Median of step-by-step ratios: both steps of a pair ran on the same batch within seconds of each other,
    so a slow spell of this shared machine scales both (less noisy than a ratio of two medians)."""
    return statistics.median(a / b for a, b in zip(ours, base))


def time_interleaved(steps: dict, groups: list[list[dict]], warmup: int) -> dict[str, list[float]]:
    """Runs each loop's optimizer step on the same micro-batches back to back, so load from other processes
    hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i, group in enumerate(groups):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(group)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def plain_loop(cfg, weights, fused: bool = False):
    """The baseline: model, objectives, ``torch.optim.AdamW`` (default or fused kernel), grad clipping;
    gradients accumulated over the micro-batches of one optimizer step."""
    from model.unimo import UnimoModel
    from trainer.loop import optimizer_groups
    from trainer.objectives import PretrainObjectives

    torch.manual_seed(0)
    module = PretrainObjectives(UnimoModel(cfg.model))
    groups = optimizer_groups(module.model, cfg.optimizer.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.optimizer.lr, fused=fused or None)

    def step(micro_batches):
        for b in micro_batches:
            total, _ = module(b, weights)
            (total / len(micro_batches)).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.optimizer.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, module, opt


def deepspeed_loop(cfg, weights):
    """Our trainer's engine, built by the function Trainer.build uses (trainer.loop.build_engine)."""
    import deepspeed

    from model.unimo import UnimoModel
    from trainer.loop import build_engine
    from trainer.objectives import PretrainObjectives

    deepspeed.init_distributed(dist_backend="gloo")  # one rank; Ray Train creates the group in a real run
    torch.manual_seed(0)
    engine, _, _ = build_engine(cfg, PretrainObjectives(UnimoModel(cfg.model)), world_size=1, on_gpu=False)

    def step(micro_batches):
        for b in micro_batches:  # DeepSpeed scales the loss and steps the optimizer at the last one
            total, _ = engine(b, weights)
            engine.backward(total)
            engine.step()

    return step, engine


def checkpoint_io(engine, module, opt) -> dict[str, float]:
    """DeepSpeed save/load of the engine vs torch.save/load of the plain loop's model + optimizer state."""
    out = {}
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        engine.save_checkpoint(d, tag="ds")
        out["ds_save_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.load_checkpoint(d, tag="ds")
        out["ds_load_s"] = time.perf_counter() - t0
        out["ds_bytes"] = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "state.pt")
        t0 = time.perf_counter()
        torch.save({"model": module.state_dict(), "optim": opt.state_dict()}, path)
        out["torch_save_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        torch.load(path, weights_only=True)
        out["torch_load_s"] = time.perf_counter() - t0
        out["torch_bytes"] = os.path.getsize(path)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="small")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads for every loop; default: the config's "
                             "scaling.cpus_per_worker, the threads each Ray worker of the job gets (Ray sets "
                             "OMP_NUM_THREADS to it)")
    parser.add_argument("--accumulation", type=int, default=1,
                        help="micro-batches per optimizer step (1: one rank of configs/small.yaml's "
                             "two-worker job, 2: its whole global batch on one rank)")
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="shipped",
                        help="shipped: configs/small.yaml's model and micro-batch as they are; reduced: "
                             "BERT's 30522-token vocabulary and half the micro-batch (the first "
                             "figures' setting)")
    parser.add_argument("overrides", nargs="*",
                        help="extra config overrides, e.g. deepspeed.overlap_comm=true")
    args = parser.parse_args()

    from trainer.config import load_config

    # ZeRO-3 as this bench has always measured it (the default is now auto, which takes stage 1 here)
    overrides = [f"model.flavor={args.flavor}", "scaling.num_workers=1", "deepspeed.zero_stage=3",
                 f"train.global_micro_batches={args.accumulation}",
                 *GEOMETRIES[args.geometry], *args.overrides]
    data_dir = os.path.expanduser("~/.cache/unimo-bench/data")
    overrides += [f"data.{src}.urls={data_dir}/{sub}" for src, sub in
                  (("text", "text"), ("image", "images"), ("pair", "pairs"))]
    overrides += [f"data.tokenizer={data_dir}/tokenizer/tokenizer.json", "data.num_workers=0",
                  "model.text.bos_token_id=2", "model.text.eos_token_id=3", "model.text.mask_token_id=4"]
    cfg = load_config(os.path.join(REPO, "configs", "small.yaml"), overrides)
    # One rank of the job as the config runs it: its threads are the worker's CPUs.
    threads = args.threads or max(1, int(cfg.scaling.cpus_per_worker))
    torch.set_num_threads(threads)
    weights = {"mlm_text": 1.0, "mim": 1.0, "itc": 1.0, "itm": 1.0, "mlm_pair": 1.0}
    batches = make_batches(cfg, (args.steps + args.warmup) * args.accumulation, data_dir)
    groups = [batches[i:i + args.accumulation] for i in range(0, len(batches), args.accumulation)]
    n_params = sum(p.numel() for p in __import__("model.unimo", fromlist=["UnimoModel"]).UnimoModel(cfg.model)
                   .parameters())
    print(f"flavor={args.flavor} geometry={args.geometry} params={n_params / 1e6:.1f}M threads={threads} "
          f"steps={args.steps} micro-batches/step={args.accumulation}")
    plain_step, module, opt = plain_loop(cfg, weights)
    fused_step, _, _ = plain_loop(cfg, weights, fused=True)
    ds_step, engine = deepspeed_loop(cfg, weights)
    loops = {"plain": with_native_linear(plain_step), "plain_fused": with_native_linear(fused_step),
             "deepspeed": ds_step}
    times = time_interleaved(loops, groups, args.warmup)
    p, f, d = (statistics.median(times[k]) for k in ("plain", "plain_fused", "deepspeed"))
    print(f"plain PyTorch step, torch.optim.AdamW defaults : median {p * 1000:.0f} ms")
    print(f"plain PyTorch step, AdamW(fused=True)          : median {f * 1000:.0f} ms")
    print(f"our trainer: DeepSpeed ZeRO-3, one rank        : median {d * 1000:.0f} ms")
    paired = paired_ratio(times['deepspeed'], times['plain'])
    print(f"ratio ours / plain (AdamW defaults) = {d / p:.3f}x of medians, {paired:.3f}x "
          f"median of paired steps  (target <= 1.15x)")
    print(f"ratio ours / plain (same fused AdamW) = {d / f:.3f}x of medians, "
          f"{paired_ratio(times['deepspeed'], times['plain_fused']):.3f}x median of paired steps  "
          "(ZeRO-3's own overhead)")
    io = checkpoint_io(engine, module, opt)
    print(f"checkpoint save: DeepSpeed {io['ds_save_s']:.2f}s vs torch.save {io['torch_save_s']:.2f}s "
          f"= {io['ds_save_s'] / io['torch_save_s']:.2f}x "
          f"({io['ds_bytes'] / 1e6:.0f} MB vs {io['torch_bytes'] / 1e6:.0f} MB)")
    print(f"checkpoint load: DeepSpeed {io['ds_load_s']:.2f}s vs torch.load {io['torch_load_s']:.2f}s "
          f"= {io['ds_load_s'] / io['torch_load_s']:.2f}x")


if __name__ == "__main__":
    main()
