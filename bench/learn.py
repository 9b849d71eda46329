"""Evidence that the model learns: trains a flavor in-process on the synthetic world, prints held-out R@1 of
100."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from data_pipeline import build_eval_pairs, build_loader, load_tokenizer, write_synthetic_dataset
from data_pipeline.synthetic import PALETTE, SHAPES, world_version
from model.unimo import UnimoModel
from trainer.config import RunConfig, load_config
from trainer.evaluation import CAPTION_IMAGES, evaluate
from trainer.loop import lr_at, param_groups, stage_at
from trainer.objectives import PretrainObjectives

ROOT = Path(__file__).resolve().parents[1]
TAIL = 25  # steps whose losses are averaged into final_losses
STEPS_SCALE = 1.0  # the demo's own plan (configs/debug.yaml: 60 + 240 steps); >1 stretches every stage
CANDIDATES = 100  # held-out images (and one caption each) in the strict retrieval pool: chance R@1 = 1/100
# a colour word followed by a shape word ("red square", "yellow triangles"): what a caption says is there
CONCEPT = re.compile(rf"\b({'|'.join(PALETTE)}) ({'|'.join(SHAPES)})s?\b")


def synthetic_data(folder: Path, n_pairs: int) -> dict[str, str]:
    """Writes the synthetic world once per folder, size and version of the world; later runs reuse it."""
    version = world_version()
    marker = folder / f"urls-{n_pairs}-{version}.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    urls = write_synthetic_dataset(str(folder / f"n{n_pairs}-{version}"), n_pairs=n_pairs, n_text=n_pairs,
                                   n_images=n_pairs, n_eval=CANDIDATES, samples_per_shard=250,
                                   image_size=64, seed=0)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(urls))
    return urls


def build_config(config: str, overrides: list[str], urls: dict[str, str],
                 steps_scale: float = 1.0) -> RunConfig:
    """The config file's recipe on the synthetic data; steps_scale stretches every stage (same weights,
    LRs)."""
    data = [f"data.text.urls={urls['text']}", f"data.image.urls={urls['image']}",
            f"data.pair.urls={urls['pair']}",
            f"data.eval_pairs={urls['eval']}", f"data.tokenizer={urls['tokenizer']}"]
    cfg = load_config(config, data + list(overrides))
    for stage in cfg.stages:
        stage.steps = max(1, round(stage.steps * steps_scale))
    return cfg


def seed_overrides(seed: int | None) -> list[str]:
    """--seed N: the model's initialisation (run.seed) and the data's order and masks (data.seed) together;
    None keeps the config's."""
    return [] if seed is None else [f"run.seed={seed}", f"data.seed={seed}"]


def strict_eval_set(full: dict) -> dict:
    """The first caption of each held-out image only: a 100 x 100 pool in both directions."""
    owner = full["text_image_index"]
    first = torch.tensor([int((owner == i).nonzero()[0]) for i in range(full["pixels"].shape[0])])
    out = dict(full, input_ids=full["input_ids"][first], attention_mask=full["attention_mask"][first],
               text_image_index=torch.arange(first.shape[0]))
    out["captions"] = [full["captions"][int(i)] for i in first]
    return out


class InProcessTrainer:
    """One rank, no Ray/DeepSpeed: AdamW over PretrainObjectives with the loop's stage plan, LR and groups."""

    def __init__(self, cfg: RunConfig, threads: int):
        torch.manual_seed(cfg.run.seed)
        torch.set_num_threads(threads)
        self.cfg = cfg
        self.model = UnimoModel(cfg.model)
        self.objectives = PretrainObjectives(self.model, rank=0, world_size=1)
        groups = param_groups(self.model, cfg.optimizer.weight_decay)
        self.group_modules = [g.pop("module") for g in groups]
        opt = cfg.optimizer
        self.optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)
        m = cfg.model
        self.loader = iter(build_loader(cfg.data, rank=0, world_size=1, seq_len=cfg.seq_len,
                                        image_size=m.vision.image_size, patch_size=m.vision.patch_size))

    def step(self, step: int) -> dict[str, float]:
        _, stage, in_stage = stage_at(self.cfg.stages, step)
        lr = lr_at(self.cfg, stage, in_stage)
        for group, module in zip(self.optimizer.param_groups, self.group_modules):
            group["lr"] = 0.0 if module in stage.frozen else lr
        accum = self.cfg.train.global_micro_batches  # the whole global batch on this one rank
        sums: dict[str, float] = {}
        for _ in range(accum):
            total, parts = self.objectives(next(self.loader), stage.objectives)
            (total / accum).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / accum
        if self.cfg.optimizer.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optimizer.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"stage": stage.name, "lr": lr, **sums}


def held_out(cfg: RunConfig) -> tuple[dict, dict]:
    full = build_eval_pairs(cfg.data.eval_pairs, seq_len=cfg.seq_len, image_size=cfg.model.vision.image_size,
                            tokenizer=cfg.data.tokenizer, limit=CANDIDATES)
    return full, strict_eval_set(full)


def concepts(caption: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a caption of the synthetic world names, in order."""
    return CONCEPT.findall(caption)


def caption_hits(generated: list[str], full: dict) -> dict[str, float]:
    """How often an image's generated caption names, first, what the image shows (any of its held-out captions
    names it): "colour_shape" a colour-shape pair of one of its groups ("names the right shape and colour"),
    "colour" and "shape" each alone."""
    owner = full["text_image_index"].tolist()
    shown: dict[int, set] = {}
    for caption, image in zip(full["captions"], owner):
        shown.setdefault(image, set()).update(concepts(caption))
    hits = {"colour_shape": 0, "colour": 0, "shape": 0}
    for i, caption in enumerate(generated):
        named = concepts(caption)
        if not named:
            continue
        colour, shape = named[0]
        truth = shown.get(i, set())
        hits["colour_shape"] += (colour, shape) in truth
        hits["colour"] += colour in {c for c, _ in truth}
        hits["shape"] += shape in {s for _, s in truth}
    return {k: round(v / max(len(generated), 1), 3) for k, v in hits.items()}


def retrieval(model: UnimoModel, strict: dict, full: dict, rerank_k: int, decode,
              caption_all: bool = False) -> dict:
    """R@K both ways (ITC, and ITM re-ranked) among 100 and among all held-out captions; sample captions (of
    every held-out image when ``caption_all``, with the share that names a right colour and shape)."""
    n_caps = strict["pixels"].shape[0] if caption_all else CAPTION_IMAGES
    metrics, captions = evaluate(model, {k: v for k, v in strict.items() if isinstance(v, torch.Tensor)},
                                 rerank_k=rerank_k, caption_images=n_caps, decode=decode)
    out = {k.split("/")[1]: v for k, v in metrics.items() if "R@" in k}
    all_caps, _ = evaluate(model, {k: v for k, v in full.items() if isinstance(v, torch.Tensor)},
                           caption_images=0)
    out.update({f"allcaps_{k.split('/')[1]}": v for k, v in all_caps.items() if "R@" in k})
    out["captions"] = [{"generated": c, "reference": strict["captions"][i]} for i, c in enumerate(captions)]
    if caption_all:
        out.update({f"caption_right_{k}": v for k, v in caption_hits(captions, full).items()})
    return out


def train(cfg: RunConfig, minutes: float, threads: int = 1, eval_every: int = 0, rerank_k: int = 10,
          log_every: int = 25, tag: str = "", clock: str = "wall") -> dict:
    """Trains until the plan ends or ``minutes`` pass; returns the final retrieval figures and the run's
    facts.

    clock "wall" counts elapsed time; "cpu" counts this process's CPU time, a budget that other jobs on a
    shared machine do not eat into (used to give ablation arms the same compute).
    """
    trainer = InProcessTrainer(cfg, threads)
    full, strict = held_out(cfg)
    decode = load_tokenizer(cfg.data.tokenizer).decode
    t0, c0, step, total = time.perf_counter(), time.process_time(), 0, cfg.total_steps
    recent: list[dict] = []
    spent = (lambda: time.process_time() - c0) if clock == "cpu" else (lambda: time.perf_counter() - t0)
    while step < total and spent() < minutes * 60:
        logs = trainer.step(step)
        step += 1
        recent = (recent + [logs])[-TAIL:]
        if step % log_every == 0 or step == total:
            losses = " ".join(f"{k}={v:.3f}" for k, v in logs.items() if k not in ("stage", "lr"))
            # CPU seconds of this process next to wall seconds: on a busy machine the wall clock overstates
            print(f"{tag}step {step}/{total} [{logs['stage']}] lr={logs['lr']:.1e} {losses} "
                  f"({time.perf_counter() - t0:.0f}s, cpu {time.process_time() - c0:.0f}s)", flush=True)
        if eval_every and step % eval_every == 0 and step < total:
            m = retrieval(trainer.model, strict, full, 0, decode)
            print(f"{tag}  eval step {step}: i2t R@1={m['i2t_R@1']:.3f} t2i R@1={m['t2i_R@1']:.3f}",
                  flush=True)
    train_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    out = retrieval(trainer.model, strict, full, rerank_k, decode, caption_all=True)
    out.update(steps=step, planned_steps=total, train_seconds=round(train_s, 1),
               train_cpu_seconds=round(cpu_s, 1),
               chance=1 / strict["pixels"].shape[0], final_losses=_mean_losses(recent))
    return out


def _mean_losses(logs: list[dict]) -> dict[str, float]:
    """Each loss averaged over the last steps that logged it (one step's loss is noisy)."""
    names = {k for entry in logs for k in entry if k not in ("stage", "lr")}
    return {k: round(sum(e[k] for e in logs if k in e) / sum(1 for e in logs if k in e), 4)
            for k in sorted(names)}


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default=str(ROOT / "configs" / "debug.yaml"))
    p.add_argument("--data", default="/tmp/unimo-learn-data",
                   help="folder for the synthetic data set (reused)")
    p.add_argument("--pairs", type=int, default=2000,
                   help="training pairs (and unpaired texts, images) to write")
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of the training loop")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: the data worker takes the other core)")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--rerank-k", type=int, default=10)
    p.add_argument("--steps-scale", type=float, default=STEPS_SCALE,
                   help="multiply every stage's steps (default 1: the demo's own plan)")
    p.add_argument("--seed", type=int, default=None,
                   help="sets run.seed (initialisation) and data.seed (data order, masks) together; default: "
                        "the config's")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. optimizer.lr=0.002")
    args = p.parse_args(argv)
    urls = synthetic_data(Path(args.data), args.pairs)
    cfg = build_config(args.config, seed_overrides(args.seed) + args.overrides, urls, args.steps_scale)
    res = train(cfg, args.minutes, args.threads, args.eval_every, args.rerank_k)
    for c in res.pop("captions")[:CAPTION_IMAGES]:
        print(f"caption: {c['generated']!r}   (reference: {c['reference']!r})")
    chance = res["chance"]
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}))
    print(f"machine: {machine()}")
    ok = res["i2t_R@1"] >= 5 * chance and res["t2i_R@1"] >= 5 * chance
    print(f"held-out R@1 of {CANDIDATES} candidates: image->text {res['i2t_R@1']:.3f}, text->image "
          f"{res['t2i_R@1']:.3f} (chance {chance:.3f}; target >= {5 * chance:.3f} both ways: "
          f"{'MET' if ok else 'NOT MET'})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
