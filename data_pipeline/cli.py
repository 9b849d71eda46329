"""`unimo data ...` commands: write shards, train a tokenizer, write the synthetic dataset, inspect a
source."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

from .storage_io import (DataSourceError, RetryingReader, RetryPolicy, filesystem, list_shards, safe_url,
                         scrub_urls)
from .webdataset_tar import iter_samples

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)i?b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"size {text!r}: use a number with an optional unit, e.g. 256MB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unimo data", description="Data tools of unimo.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("shards",
                       help="write WebDataset shards from a manifest, COCO JSON, image folder or text",
                       description="Inputs: .jsonl/.csv manifest (image + caption columns), COCO captions "
                                   ".json, a folder of images (with optional same-named .txt captions), or "
                                   ".txt/.jsonl documents. A re-run keeps finished shards and continues.")
    s.add_argument("inputs", nargs="+", help="input files or folders (local or s3://)")
    s.add_argument("--out", required=True, help="output folder (local or s3://bucket/prefix)")
    s.add_argument("--format", default="auto", choices=["auto", "manifest", "coco", "images", "text"])
    s.add_argument("--root", default="", help="folder that relative image paths are relative to")
    s.add_argument("--shard-size", type=parse_size, default="256MB", help="target bytes per shard (256MB)")
    s.add_argument("--max-samples", type=int, default=0, help="at most this many samples per shard")
    s.add_argument("--resize", type=int, default=0,
                   help="shrink images larger than this side (re-encoded JPEG)")
    s.add_argument("--prefix", default="shard", help="shard file prefix")

    t = sub.add_parser("tokenizer", help="train a WordPiece/WordLevel tokenizer on text shards or files")
    t.add_argument("inputs", nargs="+",
                   help="shard URLs/prefixes (their .txt and json captions) or .txt/.jsonl")
    t.add_argument("--out", required=True, help="tokenizer.json path or folder (local or s3://)")
    t.add_argument("--vocab-size", type=int, default=30000)
    t.add_argument("--kind", default="wordpiece", choices=["wordpiece", "wordlevel"])

    y = sub.add_parser("synthetic", help="write the synthetic shapes dataset and its tokenizer")
    y.add_argument("--out", required=True)
    for name, default in (("pairs", 2000), ("text", 2000), ("images", 2000), ("eval", 200),
                          ("samples-per-shard", 250), ("image-size", 64), ("seed", 0)):
        y.add_argument(f"--{name}", type=int, default=default)

    v = sub.add_parser("preview",
                       help="which corpus the first samples of each modality come from, and the epochs "
                            "of each corpus in the configured steps",
                       description="Runs the loader's plan at world size 1 on the data section of CONFIG (no "
                                   "sample is decoded). Epochs: steps x train.global_micro_batches x "
                                   "batch_size samples per modality, shared by weight; epoch sizes counted "
                                   "from sidecars or estimated from each corpus's first shard.")
    v.add_argument("config", help="a run config file, or a shipped config's name as `unimo train` takes "
                                   "(only its data, stages and train sections are read)")
    v.add_argument("--samples", type=int, default=1000, help="samples of each modality to attribute (1000)")
    v.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default: the stages' steps; 0 = skip)")
    v.add_argument("--micro-batches", type=int, default=None,
                   help="micro-batches per step over all ranks (default: train.global_micro_batches, else 1)")
    v.add_argument("--json", action="store_true", help="print one object: modality -> corpus -> count")

    i = sub.add_parser("inspect", help="list a source's shards and count their samples and skips")
    i.add_argument("url")
    i.add_argument("--max-shards", type=int, default=0, help="read only the first N shards (0 = all)")
    return p


def _shards(args) -> int:
    from .progress import Progress
    from .shard_writer import input_samples, write_shards

    samples = input_samples(args.inputs, args.format, args.root, args.resize or None)
    # the inputs stream (their count is unknown up front): the bar shows inputs read and their rate
    with Progress(None, "shards", "inputs") as bar:
        summary = write_shards(_counted(samples, bar.update), args.out, shard_bytes=args.shard_size,
                               max_samples=args.max_samples, prefix=args.prefix, progress=bar.write)
    print(json.dumps(summary.to_json()))
    return 0


def _counted(items, tick):
    for item in items:
        tick(1)
        yield item


def _texts_of(inputs):
    """Texts for tokenizer training: .txt members and json captions of shards, or .txt/.jsonl files."""
    for url in inputs:
        if url.endswith((".txt", ".jsonl")):
            fs, path = filesystem(url)
            with fs.open(path, "r", encoding="utf-8") as f:
                for line in f:
                    yield (json.loads(line).get("text", "") if url.endswith(".jsonl") and line.strip()
                           else line)
            continue
        for shard, _ in list_shards(url):
            with RetryingReader(shard, RetryPolicy()) as r:
                for _, _, files in iter_samples(r, lambda *a: None):
                    if "txt" in files:
                        yield files["txt"].decode("utf-8", "replace")
                    if "json" in files:
                        meta = json.loads(files["json"] or b"{}")
                        yield from (c for c in meta.get("captions", []) if isinstance(c, str))


def _tokenizer(args) -> int:
    from .tokenizer import save_tokenizer, train_tokenizer

    tok = train_tokenizer(_texts_of(args.inputs), vocab_size=args.vocab_size, kind=args.kind)
    path = save_tokenizer(tok, args.out)
    print(json.dumps({"tokenizer": path, "vocab_size": tok.vocab_size}))
    return 0


def _synthetic(args) -> int:
    from .progress import Progress
    from .synthetic import write_synthetic_dataset

    total = sum(max(0, n) for n in (args.pairs, args.text, args.images, args.eval))
    with Progress(total, "synthetic data", "samples") as bar:
        urls = write_synthetic_dataset(args.out, n_pairs=args.pairs, n_text=args.text, n_images=args.images,
                                       n_eval=args.eval, samples_per_shard=args.samples_per_shard,
                                       image_size=args.image_size, seed=args.seed, progress=bar.update)
    print(json.dumps(urls))
    return 0


def _inspect(args) -> int:
    """Counts samples, members and skips of a source's shards; exits 1 when a shard is no readable tar."""
    shards = list_shards(args.url)
    counts: Counter = Counter()
    unreadable = {}
    for url, _ in shards[:args.max_shards or None]:
        def issue(reason, key, url=url):
            counts[f"skipped_{reason}"] += 1
            if reason in ("not_a_tar", "bad_compression"):
                unreadable[safe_url(url)] = reason

        with RetryingReader(url, RetryPolicy()) as r:
            for _, _, files in iter_samples(r, issue):
                counts["samples"] += 1
                counts.update(f"member_{ext}" for ext in files)
    print(json.dumps({"url": safe_url(args.url), "shards": len(shards), "bytes": sum(s for _, s in shards),
                      "read_shards": len(shards[:args.max_shards or None]), **counts,
                      **({"unreadable": unreadable} if unreadable else {})}))
    for url, reason in unreadable.items():
        example = " - e.g. an HTML page" if reason == "not_a_tar" else ""
        print(f"error: {url}: {reason} (it is not a tar shard{example})",
              file=sys.stderr)
    return 1 if unreadable else 0


def _preview(args) -> int:
    from .preview import data_config_from_yaml, preview, render

    if args.samples < 1:
        raise ValueError(f"--samples = {args.samples}: must be >= 1")
    config = args.config
    if args.resolve_config is not None and "://" not in config:
        config = str(args.resolve_config(config) or config)  # a shipped config's name, as `unimo train` takes
    cfg, tree = data_config_from_yaml(config)
    train = tree.get("train") or {}
    steps = args.steps
    if steps is None:
        steps = sum(int(s.get("steps", 0)) for s in tree.get("stages") or [] if isinstance(s, dict))
    micro = args.micro_batches or int(train.get("global_micro_batches", 1))
    result = preview(cfg, args.samples, steps=0 if args.json else steps, micro_batches=micro,
                     seq_len=train.get("seq_len"))
    print(json.dumps(result["mix"]) if args.json else render(result, args.samples, steps))
    return 0


def main(argv: list[str] | None = None, resolve_config: Callable[[str], Any] | None = None) -> int:
    """Entry point of `unimo data ...`; returns the exit status. ``resolve_config``: a config argument as a
    file, or None (`unimo`'s dispatcher passes the trainer's resolver of shipped config names, which
    data_pipeline/ does not import)."""
    args = _parser().parse_args(argv)
    args.resolve_config = resolve_config
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return {"shards": _shards, "tokenizer": _tokenizer, "synthetic": _synthetic,
                "inspect": _inspect, "preview": _preview}[args.command](args)
    except (DataSourceError, ValueError) as exc:
        print(f"error: {scrub_urls(exc)}", file=sys.stderr)  # the last guard: no URL secret printed
        return 2


if __name__ == "__main__":
    sys.exit(main())
