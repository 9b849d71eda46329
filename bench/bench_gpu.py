"""GPU throughput and MFU of one training step per flavor: the plain PyTorch loop against the trainer's
engine.

For each flavor: the largest micro-batch that fits (per source, doubling until out of memory; or --batch),
then, same batches, same run: the plain loop (fp32 weights, bf16 autocast, fused AdamW) and the trainer's
engine (trainer.loop.build_engine, one rank, bf16) at each of --stages (default `auto` and ZeRO-3 forced):
ms/step, samples/s, TFLOP/s from the analytic FLOPs of model/flops.py, MFU against the GPU's dense bf16 peak,
peak memory, and per step the GPU kernels launched (torch profiler; aten ops on CPU) and module calls.
--data-wait adds data_wait_fraction: the trainer's engine fed by the real loader from local JPEG shards stored
at --stored-size px and fed at the flavor's image size. --json writes every figure; --device cpu is a smoke
run.

    python bench/bench_gpu.py --flavors debug small base large [--batch 0] [--stages auto 3] [--json out.json]
                              [--data-wait base] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

# tests.fake_batch gives the benchmark its batches: the checkout's root on the path, from wherever it runs
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WEIGHTS = {"mlm_text": 1.0, "mim": 1.0, "itc": 1.0, "mlm_pair": 1.0}


def make_batch(cfg, b: int, L: int, device) -> dict:
    from tests.fake_batch import random_batch

    return random_batch(cfg, b=b, seq_len=L, device=device)


def flops_per_step(cfg, b: int, L: int) -> float:
    from model.flops import flops_per_sample

    objectives = {"text": ("mlm",), "image": ("mim",), "pair": ("itc", "mlm")}  # model/flops.py's names
    return b * sum(flops_per_sample(cfg.model, src, seq_len=L, objectives=objs)
                   for src, objs in objectives.items())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(step, batch, steps: int, warmup: int, device: str = "cuda") -> float:
    for _ in range(warmup):
        step(batch)
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(batch)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def launches_per_step(step, batch, device: str) -> dict:
    """One more step under the torch profiler: kernels launched on the GPU (on CPU: aten ops), and module
    calls (a global forward hook) -- what "fewer, larger kernels per step" is measured by."""
    calls = [0]

    def count(module, args, output) -> None:
        calls[0] += 1

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        with torch.profiler.profile(activities=activities) as prof:
            step(batch)
            sync(device)
    finally:
        handle.remove()
    events = prof.events()
    if device == "cuda":
        launched = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    else:
        launched = sum(1 for e in events if e.name.startswith("aten::"))
    return {"kernels_per_step" if device == "cuda" else "aten_ops_per_step": launched,
            "module_calls_per_step": calls[0]}


def plain_step_fn(cfg, device: str = "cuda"):
    from model.unimo import UnimoModel
    from trainer.loop import optimizer_groups
    from trainer.objectives import PretrainObjectives

    torch.manual_seed(0)
    module = PretrainObjectives(UnimoModel(cfg.model)).to(device)
    groups = optimizer_groups(module.model, 0.01)
    opt = torch.optim.AdamW(groups, lr=1e-4, fused=True)

    def step(batch):
        with torch.autocast(device, dtype=torch.bfloat16):
            total, _ = module(batch, WEIGHTS)
        total.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, module


def engine_step_fn(cfg, device: str = "cuda", deepcompile: bool = False):
    """The trainer's engine (trainer.loop.build_engine) at the config's deepspeed.zero_stage.

    deepcompile: an experiment, not a trainer option: DeepSpeed's compiler (DeepSpeed's config
    ``compile.deepcompile`` and ``engine.compile()``, CUDA only in DeepSpeed 0.19) over the whole objectives
    module, whose forward branches on the batch's sources and objectives."""
    from model.unimo import UnimoModel
    from trainer.loop import build_engine
    from trainer.objectives import PretrainObjectives
    from trainer.zero_stage import resolve_zero_stage

    torch.manual_seed(0)
    on_gpu = device == "cuda"
    overrides = {"compile": {"deepcompile": True}} if deepcompile else None
    module = PretrainObjectives(UnimoModel(cfg.model))
    engine, _, _ = build_engine(cfg, module, 1, on_gpu, ds_overrides=overrides)
    if deepcompile:
        engine.compile()

    def step(batch):
        total, _ = engine(batch, WEIGHTS)
        engine.backward(total)
        engine.step()

    return step, engine, resolve_zero_stage(cfg, 1, on_gpu)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def largest_batch(cfg, L: int, device: str, start: int, limit: int) -> int:
    """The largest micro-batch per source (doubling from ``start``) that the plain loop runs twice without
    OOM."""
    good, b = 0, start
    while b <= limit:
        step = batch = None
        try:
            step, _ = plain_step_fn(cfg, device)
            batch = make_batch(cfg, b, L, device)
            step(batch)
            step(batch)
            sync(device)
            good = b
        except Exception as err:  # noqa: BLE001
            if not is_oom(err):
                raise
            break
        finally:
            step = batch = None  # frees the model and batch before the next size
            if device == "cuda":
                torch.cuda.empty_cache()
        b *= 2
    return good


def peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure(name: str, build, batch, args, flops: float, peak: float | None, b: int) -> dict:
    reset_peak(args.device)
    try:
        built = build()
        t = timed(built[0], batch, args.steps, args.warmup, args.device)
    except Exception as err:  # noqa: BLE001
        if name.endswith("-deepcompile") and not is_oom(err):  # an experiment: its failure is a finding
            return {"loop": name, "error": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}"}
        if not is_oom(err):
            raise
        return {"loop": name, "error": "out of memory"}
    row = {"loop": name, "ms_per_step": 1000 * t, "samples_per_s": 3 * b / t, "tflops": flops / t / 1e12,
           "mfu": flops / t / peak if peak else None, "peak_mem_gib": peak_gib(args.device)}
    row.update(launches_per_step(built[0], batch, args.device))
    if len(built) > 2:
        row["zero_stage"], row["zero_reason"] = built[2].stage, built[2].reason
    del built
    return row


def data_wait(flavor: str, args, b: int) -> dict:
    """data_wait_fraction of the trainer's engine fed by the real loader from local JPEG shards."""
    import tempfile

    from data_pipeline.loader import build_loader
    from data_pipeline.synthetic import write_synthetic_dataset
    from trainer.loop import move_to

    cfg = bench_config(flavor, "auto", args)
    out = tempfile.mkdtemp(prefix="unimo-gpu-data-")
    n = max(4 * b * (args.steps + args.warmup), 256)
    urls = write_synthetic_dataset(out, n_pairs=n, n_text=n, n_images=n, n_eval=16, samples_per_shard=128,
                                   image_size=args.stored_size)
    for src in ("text", "image", "pair"):
        getattr(cfg.data, src).urls = urls[src]
        getattr(cfg.data, src).batch_size = b
    cfg.data.tokenizer, cfg.data.num_workers = urls["tokenizer"], args.data_workers
    m = cfg.model
    loader = build_loader(cfg.data, rank=0, world_size=1, seq_len=args.seq_len,
                          image_size=m.vision.image_size,
                          patch_size=m.vision.patch_size, objectives=set(WEIGHTS))
    step, engine, _ = engine_step_fn(cfg, args.device)
    it, wait, total = iter(loader), 0.0, 0.0
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        step(move_to(batch, torch.device(args.device)))
        sync(args.device)
        if i >= args.warmup:
            wait, total = wait + t1 - t0, total + time.perf_counter() - t0
    return {"flavor": flavor, "loop": "trainer_auto_real_loader", "batch": b, "stored_px": args.stored_size,
            "fed_px": m.vision.image_size, "workers": args.data_workers, "data_wait_fraction": wait / total,
            "ms_per_step": 1000 * total / args.steps}


def bench_config(flavor: str, stage: str, args):
    from trainer.config import load_config

    # DeepSpeed's own ZeRO-3: its hooks around every module, its per-group gradient norm
    per_module = stage == "3-per-module"
    overrides = [f"model.flavor={flavor}", "scaling.num_workers=1", "train.global_micro_batches=1",
                 f"deepspeed.zero_stage={stage.split('-')[0]}",
                 f"deepspeed.zero3_whole_units={str(not per_module).lower()}",
                 f"deepspeed.one_pass_grad_norm={str(not per_module).lower()}",
                 f"train.compile={str(args.compile).lower()}",
                 f"deepspeed.precision={args.precision}",
                 f"scaling.use_gpu={str(args.device == 'cuda').lower()}"]
    return load_config(None, overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavors", nargs="+", default=["debug", "small", "base", "large"])
    parser.add_argument("--batch", type=int, default=0,
                        help="micro-batch per source; 0 = the largest that fits")
    parser.add_argument("--max-batch", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--stages", nargs="*", default=["auto", "3"],
                        help="engine stages: auto, 0-3, 3-per-module (DeepSpeed's own ZeRO-3: no whole "
                             "units, its own gradient norm), 3-deepcompile")
    parser.add_argument("--compile", action="store_true", help="train.compile=true for the trainer's engine")
    # autocast: fp32 weights and bf16 compute, as the plain loop runs; on one rank `auto` then takes stage 0
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "autocast", "fp32"],
                        help="deepspeed.precision of the trainer's engine (auto: bf16 on a GPU)")
    parser.add_argument("--data-wait", nargs="*", default=[], metavar="FLAVOR")
    parser.add_argument("--stored-size", type=int, default=256)
    parser.add_argument("--data-workers", type=int, default=8)
    parser.add_argument("--json", default="", help="write every figure here")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a smoke run of the script")
    args = parser.parse_args()
    from trainer.metrics import peak_bf16_flops

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if args.device == "cuda" else "gloo")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = peak_bf16_flops(name) if args.device == "cuda" else None
    print(f"device: {name}  dense bf16 peak: {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s  "
          f"seq {args.seq_len}, stages {args.stages}, compile {args.compile}", flush=True)
    rows: list[dict] = []
    for flavor in args.flavors:
        cfg = bench_config(flavor, "auto", args)
        b = args.batch or largest_batch(cfg, args.seq_len, args.device, 8, args.max_batch)
        batch = make_batch(cfg, b, args.seq_len, args.device)
        flops = flops_per_step(cfg, b, args.seq_len)
        found = [measure("plain", lambda: plain_step_fn(cfg, args.device), batch, args, flops, peak, b)]
        for stage in args.stages:
            scfg, dc = bench_config(flavor, stage, args), stage.endswith("-deepcompile")
            found.append(measure(f"trainer_{stage}", lambda: engine_step_fn(scfg, args.device, dc), batch,
                                 args, flops, peak, b))
        base = found[0].get("ms_per_step")
        for row in found:
            row.update(flavor=flavor, batch=b)
            if base and "ms_per_step" in row:
                row["x_plain"] = row["ms_per_step"] / base
            rows.append(row)
            mfu = f"{row['mfu']:.1%}" if row.get("mfu") else "n/a"
            print(f"{flavor:6s} b={b:<4d} {row['loop']:14s} " + (row["error"] if "error" in row else
                  f"{row['ms_per_step']:8.1f} ms/step {row['samples_per_s']:8.0f} samples/s "
                  f"{row['tflops']:6.1f} TFLOP/s MFU {mfu} peak {row['peak_mem_gib']:.1f} GiB "
                  f"x{row.get('x_plain', float('nan')):.2f} "
                  f"{row.get('kernels_per_step', row.get('aten_ops_per_step'))} kernels/ops "
                  f"{row['module_calls_per_step']} module calls {row.get('zero_reason', '')}"), flush=True)
        batch = None
        if args.device == "cuda":
            torch.cuda.empty_cache()
    for flavor in args.data_wait:
        b = args.batch or next((r["batch"] for r in rows if r["flavor"] == flavor), 32)
        row = data_wait(flavor, args, b)
        rows.append(row)
        print(f"{flavor:6s} b={b:<4d} real loader ({row['stored_px']} px JPEG -> {row['fed_px']} px, "
              f"{row['workers']} workers): data_wait_fraction {row['data_wait_fraction']:.3f}, "
              f"{row['ms_per_step']:.1f} ms/step", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
