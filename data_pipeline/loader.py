"""The mixed-source loader: per-rank DataLoader over per-worker streams, with an exact and elastic cursor.

torchdata's StatefulDataLoader was weighed: its state is a per-rank, per-worker snapshot that restores only onto
the same world size and worker count, while our cursor must also be redistributed across ranks (see cursor.py);
the plain DataLoader plus a cursor riding on each batch gives both.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .batch import BatchSpec, features_for, image_batch, pair_batch, pixels_tensor, text_batch
from .config import DataConfig
from .cursor import VERSION, StreamState, epochs_view, fresh_streams, is_complete, merge_states, redistribute
from .io import DataSourceError, RetryingReader, RetryPolicy, list_shards, shard_digest
from .samples import Prep, shard_items
from .stream import SourceStream, StreamContext
from .tokenizer import TextTokenizer, load_tokenizer

log = logging.getLogger("unimo.data")

__all__ = ["MixedLoader", "build_eval_pairs", "build_loader", "merge_states"]


@dataclass
class _Plan:
    """Everything a worker process needs to build its streams (picklable)."""

    cfg: DataConfig
    rank: int
    workers: int                  # logical workers per rank (num_workers, at least 1)
    sources: list[str]
    shards: dict                  # source -> [(url, size), ...]
    tokenizer_json: str | None
    spec: BatchSpec


class _WorkerStreams(IterableDataset):
    """Runs inside each DataLoader worker: yields whole mixed micro-batches with the worker's cursor attached."""

    def __init__(self, plan: _Plan, states: dict, first_worker: int):
        super().__init__()
        self.plan, self.states, self.first_worker = plan, states, first_worker

    def __iter__(self):
        info = get_worker_info()
        # DataLoader always starts with worker 0; rotating the logical ids resumes the saved worker order.
        worker = ((info.id if info else 0) + self.first_worker) % self.plan.workers
        stream_index = self.plan.rank * self.plan.workers + worker
        counters: Counter = Counter()
        tok = TextTokenizer.from_str(self.plan.tokenizer_json) if self.plan.tokenizer_json else None
        cfg = self.plan.cfg
        ctx = StreamContext(seed=cfg.seed, buffer_size=cfg.shuffle_buffer,
                            prep=Prep(self.plan.spec.image_size, self.plan.spec.seq_len, tok),
                            retry=RetryPolicy(cfg.io_retries, cfg.io_backoff_s, cfg.io_backoff_max_s),
                            block_bytes=cfg.read_block_bytes,
                            count=lambda name, n: counters.update({name: n}))
        streams = {src: SourceStream(src, self.plan.shards[src],
                                     StreamState.from_json(self.states[src][str(stream_index)]), ctx)
                   for src in self.plan.sources}
        try:
            while True:
                batch = self._batch(streams, tok, counters, worker)
                yield _pack(batch) if info else batch
        finally:
            for s in streams.values():
                s.close()

    def _batch(self, streams, tok, counters, worker) -> dict:
        batch, keys = {}, {}
        for src, stream in streams.items():
            refs, items = stream.take(getattr(self.plan.cfg, src).batch_size)
            if src == "text":
                batch[src] = text_batch(refs, items, tok, self.plan.spec)
            elif src == "image":
                batch[src] = image_batch(refs, items, self.plan.spec)
            else:
                batch[src] = pair_batch(refs, items, tok, self.plan.spec)
            keys[src] = [it["key"] for it in items]
            counters[f"samples_{src}"] += len(items)
        batch["keys"] = keys
        # One JSON string: DataLoader would otherwise walk every list of the cursor converting it.
        batch["_cursor"] = json.dumps({"worker": worker, "stats": dict(counters),
                                       "streams": {s: st.snapshot() for s, st in streams.items()}})
        return batch


_PACK_LIMIT = 1 << 20  # bytes; larger tensors (pixels) travel alone, since joining them would be a copy


def _pack(batch: dict) -> dict:
    """Joins the small tensors of a worker's batch into one flat tensor per dtype.

    The DataLoader hands every tensor to the training process through its own shared-memory file and a
    socket round trip; for a pair batch's dozen small tensors that was half of the training process's data
    loading time, more than the copy that joins them."""
    flat, layout, sizes = {}, [], {}
    for src, fields in batch.items():
        if not isinstance(fields, dict):
            continue
        for name, t in list(fields.items()):
            if isinstance(t, torch.Tensor) and t.numel() * t.element_size() <= _PACK_LIMIT:
                layout.append((src, name, t.dtype, sizes.get(t.dtype, 0), tuple(t.shape)))
                sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
                flat.setdefault(t.dtype, []).append(fields.pop(name).reshape(-1))
    batch["_packed"] = ({dtype: torch.cat(parts) for dtype, parts in flat.items()}, layout)
    return batch


def _unpack(batch: dict) -> None:
    """Puts back, as views of the flat tensors, what ``_pack`` joined."""
    if "_packed" not in batch:
        return
    flat, layout = batch.pop("_packed")
    for src, name, dtype, offset, shape in layout:
        batch[src][name] = flat[dtype][offset:offset + math.prod(shape)].view(shape)


class MixedLoader:
    """Infinite iterator of micro-batches {"text", "image", "pair", "keys"} for one rank.

    ``state_dict()`` is the cursor of the batches handed out so far (not of what workers prefetched); gather
    it from every rank and pass the list (or ``merge_states`` of it) back as ``state`` to resume.
    """

    def __init__(self, plan: _Plan, world_size: int, states: dict, next_worker: int):
        self._plan, self._world_size = plan, world_size
        self._states = states                 # source -> {str(stream index): stream state json}
        self._next_worker = next_worker
        self._worker_stats: dict[int, dict] = {}
        self._base_stats: Counter = Counter()

    def __iter__(self):
        # Counters of an earlier iteration's workers are kept; the new workers count from zero.
        for stats in self._worker_stats.values():
            self._base_stats.update(stats)
        self._worker_stats = {}
        cfg = self._plan.cfg
        loader = DataLoader(_WorkerStreams(self._plan, self._states, self._next_worker), batch_size=None,
                            num_workers=cfg.num_workers,
                            prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None)
        for batch in loader:
            _unpack(batch)
            cursor = json.loads(batch.pop("_cursor"))
            worker = cursor["worker"]
            index = str(self._plan.rank * self._plan.workers + worker)
            for src, st in cursor["streams"].items():
                self._states[src][index] = st
            self._worker_stats[worker] = cursor["stats"]
            self._next_worker = (worker + 1) % self._plan.workers
            yield batch

    def state_dict(self) -> dict:
        state = {"version": VERSION, "world_size": self._world_size, "num_workers": self._plan.workers,
                 "seed": self._plan.cfg.seed, "next_worker": self._next_worker, "sources": {}}
        for src in self._plan.sources:
            urls = [u for u, _ in self._plan.shards[src]]
            state["sources"][src] = {"num_shards": len(urls), "digest": shard_digest(urls),
                                     "streams": {k: v for k, v in self._states[src].items()}}
            if src == "text":  # text items are packed sequences: their ordinals depend on seq_len
                state["sources"][src]["seq_len"] = self._plan.spec.seq_len
        return merge_states([state])

    def stats(self) -> dict[str, int]:
        total = Counter(self._base_stats)
        for stats in self._worker_stats.values():
            total.update(stats)
        return dict(total)


def _check_args(rank: int, world_size: int, seq_len: int, image_size: int, patch_size: int) -> None:
    for name, value in (("world_size", world_size), ("seq_len", seq_len), ("image_size", image_size),
                        ("patch_size", patch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} = {value!r}: must be an integer >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank = {rank}: must be in [0, world_size={world_size})")
    if seq_len < 4:
        raise ValueError(f"seq_len = {seq_len}: must be >= 4 ([CLS], [SEP] and some text)")
    if image_size % patch_size:
        raise ValueError(f"image_size = {image_size}: must be a multiple of patch_size = {patch_size}")


def io_policy(cfg: DataConfig) -> RetryPolicy:
    """The retries of every storage call of a run: data.io_retries with its backoff (listing included)."""
    return RetryPolicy(cfg.io_retries, cfg.io_backoff_s, cfg.io_backoff_max_s)


def _list_sources(cfg: DataConfig, sources: list[str], streams: int) -> dict:
    shards = {}
    for src in sources:
        url = getattr(cfg, src).urls
        shards[src] = list_shards(url, io_policy(cfg))
        if len(shards[src]) < streams:
            raise DataSourceError(f"source {src} ({url}) has {len(shards[src])} shards, fewer than the "
                                  f"{streams} streams (world_size x num_workers) that read it: each stream needs "
                                  f"a shard per epoch; write more, smaller shards or use fewer workers")
    return shards


def _initial_states(state: dict | None, plan: _Plan, world_size: int) -> tuple[dict, int]:
    """Per source, the states of this rank's streams: exact when the world matches, else redistributed."""
    streams = world_size * plan.workers
    mine = range(plan.rank * plan.workers, (plan.rank + 1) * plan.workers)
    out, next_worker = {}, 0
    exact = bool(state) and state["world_size"] == world_size and state["num_workers"] == plan.workers
    if exact:
        next_worker = state["next_worker"]
    for src in plan.sources:
        saved = (state or {}).get("sources", {}).get(src)
        if saved is None:
            out[src] = {str(i): st.to_json() for i, st in fresh_streams(streams, mine).items()}
            continue
        _check_same_shards(src, saved, plan.shards[src])
        if saved.get("seq_len", plan.spec.seq_len) != plan.spec.seq_len:
            raise ValueError(f"seq_len = {plan.spec.seq_len}: the data cursor of source {src} counts sequences "
                             f"packed to {saved['seq_len']} tokens; resume with the same seq_len")
        if exact and all(str(i) in saved["streams"] for i in mine):
            out[src] = {str(i): saved["streams"][str(i)] for i in mine}
            continue
        view = saved if "epochs" in saved else None
        if view is None:
            if not is_complete(saved, state):
                raise ValueError(f"data cursor of source {src} holds {len(saved['streams'])} of the "
                                 f"{state['world_size'] * state['num_workers']} streams it was saved with: pass "
                                 f"the state_dict() of every rank (a list, or merge_states of it)")
            view = epochs_view([StreamState.from_json(s) for s in saved["streams"].values()], state["seed"],
                               src, saved["num_shards"])
        new = redistribute(view, plan.cfg.seed, src, len(plan.shards[src]), streams)
        out[src] = {str(i): new[i].to_json() for i in mine}
    return out, next_worker


def _check_same_shards(src: str, saved: dict, shards) -> None:
    digest = shard_digest([u for u, _ in shards])
    if saved["num_shards"] != len(shards) or saved["digest"] != digest:
        raise ValueError(f"data cursor of source {src} was saved for {saved['num_shards']} shards "
                         f"(digest {saved['digest']}); the source now lists {len(shards)} (digest {digest}): "
                         f"the cursor cannot be applied to different shards")


def build_loader(cfg: DataConfig, *, rank: int, world_size: int, seq_len: int, image_size: int,
                 patch_size: int, state: dict | list | None = None,
                 objectives: Iterable[str] | None = None) -> MixedLoader:
    """The loader of one rank. ``state``: a cursor from ``state_dict()`` (merged over ranks), or the list of
    every rank's ``state_dict()``; same world size resumes exactly, another world size resumes elastically.
    ``objectives``: the names of every objective the run trains (e.g. {"itc", "mlm_pair"}); batches then hold
    only what those read (see batch.OBJECTIVE_FEATURES). None builds every part. The samples and the cursor
    do not depend on it (a pair's rewrite is drawn after its MLM mask: without MLM it is another rewrite)."""
    _check_args(rank, world_size, seq_len, image_size, patch_size)
    sources = cfg.active_sources()
    if not sources:
        raise ValueError("data: no source has urls (set data.text.urls, data.image.urls or data.pair.urls)")
    workers = max(1, cfg.num_workers)
    tok = None
    if {"text", "pair"} & set(sources) or cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer, io_policy(cfg))
    plan = _Plan(cfg=cfg, rank=rank, workers=workers, sources=sources,
                 shards=_list_sources(cfg, sources, world_size * workers),
                 tokenizer_json=tok.to_str() if tok else None,
                 spec=BatchSpec(seq_len, image_size, patch_size, cfg.seed, cfg.mlm_probability,
                                cfg.mim_mask_ratio, tuple(cfg.rewrite_weights), features_for(objectives)))
    if isinstance(state, list):
        state = merge_states(state)
    if state is not None and state.get("seed") != cfg.seed:
        # Streams plan their epochs' shard orders from the seed; mixing two seeds in one epoch would lose or
        # repeat shards.
        raise ValueError(f"data.seed = {cfg.seed}: the data cursor was saved with seed {state.get('seed')}; "
                         f"resume with the same seed")
    states, next_worker = _initial_states(state, plan, world_size)
    return MixedLoader(plan, world_size, states, next_worker)


def build_eval_pairs(url: str, *, seq_len: int, image_size: int, tokenizer, limit: int | None = None) -> dict:
    """A fixed held-out set for retrieval: every image once, every caption of it as a text.

    Returns {"pixels" (N,3,H,W), "image_ids" (N,), "keys" [N], "input_ids" (T,L), "attention_mask" (T,L),
    "text_image_index" (T,) row of each caption's image, "captions" [T]}; shards in sorted order, no shuffle.
    """
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    prep = Prep(image_size, seq_len, tokenizer)
    images, image_ids, keys, captions, owner = [], [], [], [], []
    counters: Counter = Counter()
    policy = RetryPolicy()
    for shard_url, _ in list_shards(url):
        with RetryingReader(shard_url, policy) as reader:
            for _, item in shard_items("pair", shard_url, reader, prep, lambda n: counters.update([n]),
                                       lambda o: True):
                if limit is not None and len(images) >= limit:
                    break
                owner += [len(images)] * len(item["captions"])
                captions += item["captions"]
                images.append(item["pixels"])
                image_ids.append(item["image_id"])
                keys.append(item["key"])
        if limit is not None and len(images) >= limit:
            break
    if not images:
        raise DataSourceError(f"no usable eval pairs in {url}")
    enc = [tokenizer.encode(c, seq_len) for c in captions]
    ids = torch.full((len(enc), seq_len), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(enc), seq_len), dtype=torch.long)
    for i, row in enumerate(enc):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return {"pixels": pixels_tensor(images), "image_ids": torch.tensor(image_ids, dtype=torch.long),
            "keys": keys, "input_ids": ids, "attention_mask": mask,
            "text_image_index": torch.tensor(owner, dtype=torch.long), "captions": captions,
            "skipped": dict(counters)}
