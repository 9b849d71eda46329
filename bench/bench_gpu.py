"""GPU throughput and MFU of one training step (plain PyTorch, bf16 autocast) per flavor, and ZeRO-3 vs plain.

For each flavor: samples/s of a mixed micro-batch (text, image, pair sources; MLM, MIM, ITC, MLM-pair), achieved
TFLOP/s from the analytic FLOPs of model/flops.py, MFU against the GPU's dense bf16 peak; then the same step
under a one-rank DeepSpeed ZeRO-3 engine (bf16), same batches, same run: the ratio is the trainer's overhead.

    python bench/bench_gpu.py --flavors small base [--batch 32] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch

WEIGHTS = {"mlm_text": 1.0, "mim": 1.0, "itc": 1.0, "mlm_pair": 1.0}


def make_batch(cfg, b: int, L: int, device) -> dict:
    from trainer.fake_batch import random_batch

    return random_batch(cfg, b=b, seq_len=L, device=device)


def flops_per_step(cfg, b: int, L: int) -> float:
    from model.flops import flops_per_sample

    objectives = {"text": ("mlm",), "image": ("mim",), "pair": ("itc", "mlm")}  # model/flops.py's names
    return b * sum(flops_per_sample(cfg.model, src, seq_len=L, objectives=objs) for src, objs in objectives.items())


def timed(step, batch, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step(batch)
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(batch)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def plain_step_fn(cfg):
    from model.unimo import UnimoModel
    from trainer.loop import optimizer_groups
    from trainer.objectives import PretrainObjectives

    torch.manual_seed(0)
    module = PretrainObjectives(UnimoModel(cfg.model)).cuda()
    groups = optimizer_groups(module.model, 0.01)
    opt = torch.optim.AdamW(groups, lr=1e-4, fused=True)

    def step(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            total, _ = module(batch, WEIGHTS)
        total.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, module


def zero3_step_fn(cfg):
    import deepspeed

    from model.unimo import UnimoModel
    from trainer.ds_config import build_ds_config
    from trainer.loop import optimizer_groups
    from trainer.objectives import PretrainObjectives
    from trainer.zero_compat import register_external_parameters

    torch.manual_seed(0)
    module = PretrainObjectives(UnimoModel(cfg.model))
    register_external_parameters(module)
    groups = optimizer_groups(module.model, 0.01)
    opt = torch.optim.AdamW(groups, lr=1e-4, fused=True)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=build_ds_config(cfg, 1, True))

    def step(batch):
        total, _ = engine(batch, WEIGHTS)
        engine.backward(total)
        engine.step()

    return step, engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavors", nargs="+", default=["small", "base"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-zero3", action="store_true")
    args = parser.parse_args()
    from trainer.config import load_config
    from trainer.metrics import peak_bf16_flops

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")
    name = torch.cuda.get_device_name()
    peak = peak_bf16_flops(name)
    print(f"device: {name}  dense bf16 peak: {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s  "
          f"batch {args.batch} per source, seq {args.seq_len}")
    for flavor in args.flavors:
        cfg = load_config(None, [f"model.flavor={flavor}", "scaling.num_workers=1", "train.global_micro_batches=1",
                                 "scaling.use_gpu=true"])
        batch = make_batch(cfg, args.batch, args.seq_len, "cuda")
        flops = flops_per_step(cfg, args.batch, args.seq_len)
        step, module = plain_step_fn(cfg)
        t_plain = timed(step, batch, args.steps, args.warmup)
        del step, module
        torch.cuda.empty_cache()
        line = (f"{flavor:6s} plain: {t_plain * 1000:7.1f} ms/step  {3 * args.batch / t_plain:8.0f} samples/s  "
                f"{flops / t_plain / 1e12:6.1f} TFLOP/s  MFU {flops / t_plain / peak:.1%}" if peak else "")
        if not args.no_zero3:
            step, engine = zero3_step_fn(cfg)
            t_z3 = timed(step, batch, args.steps, args.warmup)
            line += f" | ZeRO-3: {t_z3 * 1000:7.1f} ms/step  ratio {t_z3 / t_plain:.2f}x"
            del step, engine
            torch.cuda.empty_cache()
        print(line, flush=True)


if __name__ == "__main__":
    main()
