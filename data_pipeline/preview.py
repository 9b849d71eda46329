"""`unimo data preview`: which corpus the first samples of each modality come from, and how many epochs of
each corpus the configured steps go through, from the loader's own plan at world size 1 (no sample is
decoded).

The corpus of every sample is fixed by the mix (mix.py) before any shard is read, so the counts are exactly
what the loader will deliver. Epoch sizes are estimates: a corpus's first shard is counted (its samples; for
text the packed sequences when the tokenizer is configured, else documents) and scaled by the corpus's bytes,
unless the shards carry the sidecars ``shard-NNNNNN.json`` that ``unimo data shards`` writes, which give exact
counts.
"""

from __future__ import annotations

import json
from collections import Counter

from .batch import BatchSpec
from .config import DataConfig
from .storage_io import RetryingReader, RetryPolicy, filesystem
from .mix import Mixer
from .samples import Prep, shard_items
from .webdataset_tar import iter_samples


def data_config_from_yaml(path: str) -> tuple[DataConfig, dict]:
    """The data section of a run config file as a DataConfig, and the whole file's mapping."""
    import yaml

    fs, p = filesystem(path)
    with fs.open(p, "r", encoding="utf-8") as f:
        tree = yaml.safe_load(f) or {}
    if not isinstance(tree, dict) or not isinstance(tree.get("data"), dict):
        raise ValueError(f"{path}: no 'data' section (a mapping) in the config file")
    return DataConfig(**tree["data"]), tree


def corpus_mix(cfg: DataConfig, samples: int) -> dict[str, Counter]:
    """Per modality, how many of its first ``samples`` samples each corpus supplies at world size 1."""
    from .loader import _initial_states, _list_sources, _Plan

    sources = cfg.active_sources()
    if not sources:
        raise ValueError("data: no source has urls or corpora")
    workers = max(1, cfg.num_workers)
    corpora = {src: cfg.corpora(src) for src in sources}
    plan = _Plan(cfg=cfg, rank=0, workers=workers, sources=sources, corpora=corpora,
                 shards=_list_sources([c for src in sources for c in corpora[src]], workers),
                 tokenizer_json=None,
                 spec=BatchSpec(4, 8, 8, cfg.seed, cfg.mlm_probability, cfg.mim_mask_ratio,
                                tuple(cfg.rewrite_weights), frozenset()))
    _, mix, _, _ = _initial_states(None, plan, 1)
    out = {}
    for src in sources:
        # The DataLoader takes batches from its workers in turn, starting with worker 0.
        mixers = [Mixer(plan.weights(src), mix[src][str(w)]) for w in range(workers)]
        names = {c.key: c.name for c in corpora[src]}
        counts: Counter = Counter({c.name: 0 for c in corpora[src]})
        size, batch = getattr(cfg, src).batch_size, 0
        while sum(counts.values()) < samples:
            mixer = mixers[batch % workers]
            for _ in range(min(size, samples - sum(counts.values()))):
                counts[names[mixer.pick()]] += 1
            batch += 1
        out[src] = counts
    out["_shards"] = plan.shards  # for the epoch estimates
    return out


def _sidecar_samples(url: str) -> int | None:
    from .compress import strip_suffix

    side = strip_suffix(url) + ".json"
    try:
        fs, path = filesystem(side)
        with fs.open(path, "r") as f:
            return int(json.load(f)["samples"])
    except Exception:  # noqa: BLE001 - no sidecar (or another writer's): count the shard instead
        return None


def epoch_size(modality: str, shards: list[tuple[str, int]], cfg: DataConfig, seq_len: int | None) -> float:
    """Items in one epoch of a corpus (estimated, see the module docstring)."""
    sides = [_sidecar_samples(u) for u, _ in shards] if modality != "text" else [None]
    if all(s is not None for s in sides):
        return float(sum(sides))
    url, size = shards[0]
    with RetryingReader(url, RetryPolicy(retries=2)) as reader:
        if modality == "text" and cfg.tokenizer and seq_len:
            from .tokenizer import load_tokenizer

            prep = Prep(8, seq_len, load_tokenizer(cfg.tokenizer))
            n = sum(1 for _ in shard_items("text", url, reader, prep, lambda name: None, lambda o: True))
        else:
            n = sum(1 for _ in iter_samples(reader, lambda *a: None))
    total = sum(s for _, s in shards)
    return n * total / size if size else float(n * len(shards))


def preview(cfg: DataConfig, samples: int, steps: int = 0, micro_batches: int = 1, seq_len: int | None = None
            ) -> dict:
    """{"mix": modality -> corpus -> count, "weights": ..., "epochs": modality -> corpus -> epochs in
    steps}."""
    mix = corpus_mix(cfg, samples)
    shards = mix.pop("_shards")
    out = {"mix": {m: dict(c) for m, c in mix.items()}, "weights": {}, "epochs": {}, "epoch_size": {}}
    for src in mix:
        corpora = cfg.corpora(src)
        total_w = sum(c.weight for c in corpora)
        out["weights"][src] = {c.name: c.weight / total_w for c in corpora}
        if not steps:
            continue
        drawn = steps * micro_batches * getattr(cfg, src).batch_size
        out["epoch_size"][src], out["epochs"][src] = {}, {}
        for c in corpora:
            size = epoch_size(src, shards[c.key], cfg, seq_len)
            out["epoch_size"][src][c.name] = round(size)
            out["epochs"][src][c.name] = drawn * c.weight / total_w / size if size else float("inf")
    return out


def render(result: dict, samples: int, steps: int) -> str:
    lines = []
    for src, counts in result["mix"].items():
        lines.append(f"{src}: first {samples} samples by corpus (count, share vs weight"
                     f"{', epochs in ' + str(steps) + ' steps' if steps else ''})")
        for name, n in counts.items():
            row = f"  {name:<24} {n:>7}  {n / samples:6.3f} vs {result['weights'][src][name]:6.3f}"
            if steps:
                row += (f"  {result['epochs'][src][name]:8.2f} epochs of ~{result['epoch_size'][src][name]} "
                        f"{'sequences' if src == 'text' else 'samples'}")
            lines.append(row)
    return "\n".join(lines)
