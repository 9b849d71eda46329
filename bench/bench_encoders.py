"""Forward+backward time of our text/vision encoders vs transformers' BertModel/ViTModel (sdpa), same run,
CPU.

Both sides get the same weights (ours are loaded from the reference's save_pretrained folder, and the outputs
are checked to agree), the same inputs and the same thread count; the two are timed in alternation so that
machine noise hits both alike. Prints median times and the ratio ours/theirs (< 1 means ours is faster).

    .venv/bin/python bench/bench_encoders.py [--iters 10] [--warmup 3] [--threads 1 --clock cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import ModelConfig
from model.flavors import get_flavor
from model.hf_loading import (
    load_text_encoder,
    load_vision_encoder,
    text_config_from_hf,
    vision_config_from_hf,
)
from model.unimo import UnimoModel

CLOCK = time.perf_counter


def _time(fn) -> float:
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


def _race(ours, theirs, warmup: int, iters: int) -> tuple[float, float, float]:
    """-> (median ours, median theirs, median of the paired ratios).

    Each iteration times both back to back (alternating which goes first); the ratio of a pair is robust to
    load that drifts over the run, which the separate medians are not.
    """
    for _ in range(warmup):
        ours()
        theirs()
    a, b = [], []
    for i in range(iters):
        if i % 2:
            a.append(_time(ours))
            b.append(_time(theirs))
        else:
            b.append(_time(theirs))
            a.append(_time(ours))
    return statistics.median(a), statistics.median(b), statistics.median(x / y for x, y in zip(a, b))


def _step(model, forward):
    def run():
        model.zero_grad(set_to_none=True)
        forward().mean().backward()
    return run


def bench_text(args, tmp: str) -> dict:
    import transformers

    s = get_flavor("small").text
    hf_cfg = transformers.BertConfig(vocab_size=s.vocab_size, hidden_size=s.dim, num_hidden_layers=s.layers,
                                     num_attention_heads=s.heads, intermediate_size=s.mlp_dim,
                                     max_position_embeddings=s.max_positions, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    theirs = transformers.BertModel(hf_cfg, add_pooling_layer=False).train()
    theirs.save_pretrained(tmp)
    ours = UnimoModel(ModelConfig(text=text_config_from_hf(tmp))).train()
    load_text_encoder(ours, tmp)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, s.vocab_size, (args.batch, args.seq_len), generator=g)
    results = {}
    for name, pad in (("text", 0), ("text, 25% padding", args.seq_len // 4)):
        mask = torch.ones_like(ids)
        if pad:
            mask[args.batch // 2:, -pad:] = 0  # half the rows padded
        with torch.no_grad():
            ref = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
            got = ours.encode_text(ids, mask)[-1]
        err = (got - ref)[mask.bool()].abs().max().item()
        a, b, ratio = _race(_step(ours.text, lambda m=mask: ours.encode_text(ids, m)[-1]),
                            _step(theirs,
                                  lambda m=mask: theirs(input_ids=ids, attention_mask=m).last_hidden_state),
                            args.warmup, args.iters)
        results[name] = {"ours": a, "theirs": b, "ratio": ratio, "err": err,
                         "shape": f"B={args.batch} L={args.seq_len}, {s.layers}x{s.dim}"}
    return results


def bench_vision(args, tmp: str) -> dict:
    import transformers

    v = get_flavor("small").vision
    hf_cfg = transformers.ViTConfig(image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.dim,
                                    num_hidden_layers=v.layers, num_attention_heads=v.heads,
                                    intermediate_size=v.mlp_dim, layer_norm_eps=v.layer_norm_eps,
                                    attn_implementation="sdpa")
    theirs = transformers.ViTModel(hf_cfg, add_pooling_layer=False).train()
    theirs.save_pretrained(tmp)
    ours = UnimoModel(ModelConfig(vision=vision_config_from_hf(tmp))).train()
    load_vision_encoder(ours, tmp)
    px = torch.randn(args.image_batch, 3, v.image_size, v.image_size,
                     generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (ours.encode_image(px)[-1] - theirs(pixel_values=px).last_hidden_state).abs().max().item()
    a, b, ratio = _race(_step(ours.vision, lambda: ours.encode_image(px)[-1]),
                        _step(theirs, lambda: theirs(pixel_values=px).last_hidden_state),
                        args.warmup, args.iters)
    return {"vision": {"ours": a, "theirs": b, "ratio": ratio, "err": err,
                       "shape": f"B={args.image_batch} {v.image_size}px/{v.patch_size}, {v.layers}x{v.dim}"}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--image-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    # cpu: process CPU time, steadier than wall time when other jobs share the cores (use with --threads 1:
    # with more threads it also counts OpenMP's spin-waiting)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = p.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {}
    with tempfile.TemporaryDirectory() as t1, tempfile.TemporaryDirectory() as t2:
        results.update(bench_text(args, t1))
        results.update(bench_vision(args, t2))
    print(f"torch {torch.__version__}, {args.threads} threads, {args.clock} clock, fwd+bwd, median of "
          f"{args.iters} (after {args.warmup} warm-up)")
    print(f"{'encoder':<20}{'shape':<32}{'ours ms':>10}{'theirs ms':>11}{'ratio':>8}{'max|diff|':>11}")
    print("(ms: medians; ratio: median of paired ours/theirs; max|diff|: outputs of the two, same weights)")
    for name, r in results.items():
        print(f"{name:<20}{r['shape']:<32}{r['ours'] * 1e3:>10.1f}{r['theirs'] * 1e3:>11.1f}"
              f"{r['ratio']:>7.3f}x{r['err']:>11.1e}")
    return results


if __name__ == "__main__":
    main()
