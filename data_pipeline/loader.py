"""The mixed-source loader: per-rank DataLoader over per-worker streams, with an exact and elastic cursor.

torchdata's StatefulDataLoader was weighed: its state is a per-rank, per-worker snapshot that restores only
onto the same world size and worker count, while our cursor must also be redistributed across ranks (see
cursor.py); the plain DataLoader plus a cursor riding on each batch gives both.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .batch import BatchSpec, features_for, image_batch, pair_batch, pixels_tensor, text_batch
from .config import SOURCES, Corpus, DataConfig
from .cursor import (VERSION, StreamState, epochs_view, fresh_streams, is_complete, merge_states, modality_of,
                     redistribute)
from .storage_io import DataSourceError, RetryingReader, RetryPolicy, list_shards, safe_url, shard_digest
from .mix import Mixer, fresh_mix, reweighted, total_picks, weights_change
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
    sources: list[str]            # the active modalities, in the order text, image, pair
    corpora: dict                 # modality -> [Corpus, ...]
    shards: dict                  # corpus key -> [(url, size), ...]
    tokenizer_json: str | None
    spec: BatchSpec

    def weights(self, modality: str) -> dict[str, float]:
        return {c.key: c.weight for c in self.corpora[modality]}


def buffer_share(buffer: int, share: float) -> int:
    """A corpus's shuffle buffer: its weight's share of data.shuffle_buffer (at least 1), so that the samples
    a worker holds stay bounded by the buffer plus one per corpus, however many corpora there are."""
    return max(1, round(buffer * share))


def _counting(counters: Counter, key: str):
    """The count callback of one corpus's stream: totals as before, and skips per corpus too."""
    def count(name: str, n: int) -> None:
        counters[name] += n
        if name.startswith("skipped_"):
            counters[f"corpus/{key}/{name}"] += n
    return count


FORKSERVER_PRELOAD = ["torch", "data_pipeline.loader"]


def worker_start_context():
    """How the loader's worker processes start: forked from a clean server process, not from this one.

    A trainer process (a Ray worker) runs many threads, some of them Ray's native threads calling into Python.
    On CPython 3.11 a fork while one of them holds the interpreter's thread-state lock leaves the child stuck
    inside ``os.fork()`` (``PyOS_AfterFork_Child`` waits for that lock before it re-initialises it): the
    fault campaign found a rank waiting for data until the watchdog ended it. The forkserver is started once
    per process, by fork+exec, and forks the workers from its own single thread; the modules they need are
    imported there once. The data set reaches each worker pickled.
    """
    import multiprocessing

    global _SERVER_ENVIRON
    if _SERVER_ENVIRON is None:  # the environment the server will start with (it starts at the first loader)
        _SERVER_ENVIRON = dict(os.environ)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(FORKSERVER_PRELOAD)  # takes effect when the server first starts
    return ctx


_SERVER_ENVIRON: dict[str, str] | None = None  # see worker_start_context and _WorkerStreams


def _take_environment(environ: dict[str, str], removed: list[str]) -> None:
    """Gives this (worker) process the parent's variables ``environ`` and drops those the parent removed
    since the server started. Nothing else is dropped: a variable that C code set in the parent (setenv, not
    os.environ) reached the server, as it would have reached a forked worker, and stays."""
    for key in removed:
        os.environ.pop(key, None)
    os.environ.update(environ)


class _WorkerStreams(IterableDataset):
    """Runs inside each DataLoader worker: yields whole mixed micro-batches with the worker's cursor
    attached."""

    def __init__(self, plan: _Plan, states: dict, mix: dict, first_worker: int):
        super().__init__()
        self.plan, self.states, self.mix, self.first_worker = plan, states, mix, first_worker
        # a worker started by the forkserver does not inherit the trainer's logging set-up: it gets its level
        self.log_level = logging.getLogger().getEffectiveLevel()
        # ... nor this process's environment as it is now: the server forks the workers from its own, a copy
        # of this process's at the server's start (the first loader of the process). Storage credentials or an
        # endpoint set after that (S3's AWS_* variables) would not reach the workers, which then fail with "no
        # usable S3 credentials" although the process has them. The workers take the variables as they are
        # when this loader starts iterating (set or changed since the server started, and removed since).
        self.environ = dict(os.environ)
        self.removed = sorted(set(_SERVER_ENVIRON or ()) - set(self.environ))

    def __iter__(self):
        info = get_worker_info()
        if info is not None:
            _take_environment(self.environ, self.removed)
        if info is not None and not logging.getLogger().handlers:
            logging.basicConfig(level=self.log_level, format="%(levelname)s %(name)s: %(message)s")
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
        streams, mixers = {}, {}
        for src in self.plan.sources:
            weights = self.plan.weights(src)
            total = sum(weights.values())
            for c in self.plan.corpora[src]:
                own = dataclasses.replace(ctx, buffer_size=buffer_share(cfg.shuffle_buffer, c.weight / total),
                                          count=_counting(counters, c.key))
                streams[c.key] = SourceStream(c.key, self.plan.shards[c.key],
                                              StreamState.from_json(self.states[c.key][str(stream_index)]),
                                              own)
            mixers[src] = Mixer(weights, self.mix[src][str(stream_index)])
        try:
            while True:
                batch = self._batch(streams, mixers, tok, counters, worker)
                yield _pack(batch) if info else batch
        finally:
            for s in streams.values():
                s.close()

    def _batch(self, streams, mixers, tok, counters, worker) -> dict:
        batch, keys, corpus_of = {}, {}, {}
        for src, mixer in mixers.items():
            refs, items = [], []
            for _ in range(getattr(self.plan.cfg, src).batch_size):
                corpus = mixer.pick()
                (ref,), (item,) = streams[corpus].take(1)
                refs.append([*ref, corpus])
                items.append(item)
                counters[f"corpus/{corpus}/samples"] += 1
                counters[f"corpus/{corpus}/epoch"] = max(counters[f"corpus/{corpus}/epoch"], ref[0])
            if src == "text":
                batch[src] = text_batch(refs, items, tok, self.plan.spec)
            elif src == "image":
                batch[src] = image_batch(refs, items, self.plan.spec)
            else:
                batch[src] = pair_batch(refs, items, tok, self.plan.spec)
            keys[src] = [it["key"] for it in items]
            corpus_of[src] = [ref[3] for ref in refs]
            counters[f"samples_{src}"] += len(items)
        batch["keys"] = keys
        batch["corpus"] = corpus_of   # per modality, the corpus key of every sample
        # One JSON string: DataLoader would otherwise walk every list of the cursor converting it.
        batch["_cursor"] = json.dumps({"worker": worker, "stats": dict(counters),
                                       "streams": {s: st.snapshot() for s, st in streams.items()},
                                       "mix": {m: mx.snapshot() for m, mx in mixers.items()}})
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
    """Infinite iterator of micro-batches {"text", "image", "pair", "keys", "corpus"} for one rank.

    ``state_dict()`` is the cursor of the batches handed out so far (not of what workers prefetched); gather
    it from every rank and pass the list (or ``merge_states`` of it) back as ``state`` to resume.
    """

    def __init__(self, plan: _Plan, world_size: int, states: dict, mix: dict,
                 mix_meta: dict, next_worker: int):
        self._plan, self._world_size = plan, world_size
        self._states = states                 # corpus key -> {str(stream index): stream state json}
        self._mix = mix                       # modality -> {str(stream index): mix state}
        self._mix_meta = mix_meta             # modality -> {"weights", "history", "base_picks"}
        self._next_worker = next_worker
        self._worker_stats: dict[int, dict] = {}
        self._base_stats: Counter = Counter()

    def __iter__(self):
        # Counters of an earlier iteration's workers are kept; the new workers count from zero.
        for stats in self._worker_stats.values():
            _add_stats(self._base_stats, stats)
        self._worker_stats = {}
        cfg = self._plan.cfg
        # A generator of its own: DataLoader draws its workers' base seed at each iterator's start, from the
        # process's global generator unless given one, which put the trainer's random stream (ITM's negative
        # draws) one draw apart between a run and its resume (the loader starts at another point of the run).
        # The streams' own randomness comes from the cursor, not from the base seed.
        loader = DataLoader(_WorkerStreams(self._plan, self._states, self._mix, self._next_worker),
                            batch_size=None, num_workers=cfg.num_workers,
                            generator=torch.Generator().manual_seed(cfg.seed),
                            prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None,
                            multiprocessing_context=worker_start_context() if cfg.num_workers else None)
        for batch in loader:
            _unpack(batch)
            cursor = json.loads(batch.pop("_cursor"))
            worker = cursor["worker"]
            index = str(self._plan.rank * self._plan.workers + worker)
            for src, st in cursor["streams"].items():
                self._states[src][index] = st
            for modality, st in cursor["mix"].items():
                self._mix[modality][index] = st
            self._worker_stats[worker] = cursor["stats"]
            self._next_worker = (worker + 1) % self._plan.workers
            yield batch

    def state_dict(self) -> dict:
        state = {"version": VERSION, "world_size": self._world_size, "num_workers": self._plan.workers,
                 "seed": self._plan.cfg.seed, "next_worker": self._next_worker, "sources": {}, "mix": {}}
        for src in self._plan.sources:
            for c in self._plan.corpora[src]:
                urls = [u for u, _ in self._plan.shards[c.key]]
                state["sources"][c.key] = {"num_shards": len(urls), "digest": shard_digest(urls),
                                           "streams": {k: v for k, v in self._states[c.key].items()}}
                if src == "text":  # text items are packed sequences: their ordinals depend on seq_len
                    state["sources"][c.key]["seq_len"] = self._plan.spec.seq_len
            state["mix"][src] = {**self._mix_meta[src], "streams": dict(self._mix[src])}
        return merge_states([state])

    def stats(self) -> dict[str, int]:
        """Counters summed over this rank's workers; per corpus: corpus/<key>/samples, .../skipped_<reason>
        and .../epoch (the highest epoch a sample was drawn from, over the workers)."""
        total = Counter(self._base_stats)
        for stats in self._worker_stats.values():
            _add_stats(total, stats)
        return dict(total)

    def corpus_keys(self) -> list[str]:
        """Every corpus's key, in the same order on every rank."""
        return [c.key for src in self._plan.sources for c in self._plan.corpora[src]]

    def corpus_weights(self) -> dict[str, float]:
        """Configured weight of each corpus, normalised within its modality."""
        out = {}
        for src in self._plan.sources:
            total = sum(self._plan.weights(src).values())
            out.update({k: w / total for k, w in self._plan.weights(src).items()})
        return out


def _add_stats(total: Counter, stats: dict) -> None:
    for k, v in stats.items():
        total[k] = max(total[k], v) if k.endswith("/epoch") else total[k] + v


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


def corpus_shards(corpus: Corpus, policy: RetryPolicy | None = None) -> list[tuple[str, int]]:
    """(url, size) of a corpus's shards: each of its URLs listed in turn, a shard named twice counted once."""
    found: dict[str, int] = {}
    for url in corpus.urls if isinstance(corpus.urls, (list, tuple)) else [corpus.urls]:
        for shard, size in list_shards(url, policy):
            found.setdefault(shard, size)
    return list(found.items())


def _list_sources(corpora: list[Corpus], streams: int, policy: RetryPolicy | None = None) -> dict:
    """Shards of every corpus. A corpus may have fewer shards than the streams that read it (see
    cursor.planned_share): its epochs are then read by a few streams at a time."""
    shards = {}
    for c in corpora:
        shards[c.key] = corpus_shards(c, policy)
        if len(shards[c.key]) < streams:
            log.info("source %s has %d shards for %d streams: each epoch is read by %d of them", c.key,
                     len(shards[c.key]), streams, len(shards[c.key]))
    return shards


def _initial_states(state: dict | None, plan: _Plan, world_size: int) -> tuple[dict, dict, dict, int]:
    """Per corpus, the states of this rank's streams (exact when the world matches, else redistributed); per
    modality, their corpus-picking states and the weights' history; the next worker."""
    streams = world_size * plan.workers
    mine = range(plan.rank * plan.workers, (plan.rank + 1) * plan.workers)
    out, next_worker = {}, 0
    exact = bool(state) and state["world_size"] == world_size and state["num_workers"] == plan.workers
    if exact:
        next_worker = state["next_worker"]
    saved_sources = (state or {}).get("sources", {})
    _check_corpora_kept(saved_sources, plan)
    for c in (c for src in plan.sources for c in plan.corpora[src]):
        saved = saved_sources.get(c.key)
        if saved is None:
            out[c.key] = {str(i): st.to_json() for i, st in fresh_streams(streams, mine).items()}
            continue
        _check_same_shards(c.key, saved, plan.shards[c.key])
        if saved.get("seq_len", plan.spec.seq_len) != plan.spec.seq_len:
            raise ValueError(f"seq_len = {plan.spec.seq_len}: the data cursor of source {c.key} counts "
                             f"sequences packed to {saved['seq_len']} tokens; resume with the same seq_len")
        if exact and all(str(i) in saved["streams"] for i in mine):
            out[c.key] = {str(i): saved["streams"][str(i)] for i in mine}
            continue
        view = saved if "epochs" in saved else None
        if view is None:
            if not is_complete(saved, state):
                raise ValueError(f"data cursor of source {c.key} holds {len(saved['streams'])} of the "
                                 f"{state['world_size'] * state['num_workers']} streams it was saved with: "
                                 f"pass the state_dict() of every rank (a list, or merge_states of it)")
            view = epochs_view([StreamState.from_json(s) for s in saved["streams"].values()], state["seed"],
                               c.key, saved["num_shards"])
        new = redistribute(view, plan.cfg.seed, c.key, len(plan.shards[c.key]), streams)
        out[c.key] = {str(i): new[i].to_json() for i in mine}
    mix, meta = _initial_mix(state, plan, streams, mine, exact)
    return out, mix, meta, next_worker


def _check_corpora_kept(saved_sources: dict, plan: _Plan) -> None:
    """Corpora added or removed on resume are logged; a modality none of whose saved corpora is kept fails,
    since its data would silently start over."""
    for src in [m for m in SOURCES if m in plan.sources or any(modality_of(k) == m for k in saved_sources)]:
        before = sorted(k for k in saved_sources if modality_of(k) == src)
        now = sorted(c.key for c in plan.corpora.get(src, []))
        if before == now or not before:
            continue
        if not now:
            log.warning("data.%s: the data cursor has corpora %s, the config none: the modality is not read",
                        src, before)
            continue
        if not set(before) & set(now):
            raise ValueError(f"data.{src}: the data cursor was saved with corpora {before}, the config has "
                             f"{now}: no corpus is kept, so the {src} data would silently start over; keep "
                             f"at least one corpus under its name (the shorthand data.{src}.urls is the "
                             f"corpus '{src}') or start a new run")
        log.warning("data.%s: corpora changed on resume: kept %s continue; added %s start at epoch 0; "
                    "removed %s are dropped from the cursor", src, sorted(set(before) & set(now)),
                    sorted(set(now) - set(before)), sorted(set(before) - set(now)))


def _initial_mix(state: dict | None, plan: _Plan, streams: int, mine, exact: bool) -> tuple[dict, dict]:
    mix, meta = {}, {}
    for src in plan.sources:
        weights = plan.weights(src)
        saved = (state or {}).get("mix", {}).get(src)
        history = weights_change(src, saved, weights)
        if exact and saved and all(str(i) in saved["streams"] for i in mine):
            mix[src] = {str(i): reweighted(saved["streams"][str(i)], weights) for i in mine}
            base = saved.get("base_picks", 0)
        else:  # a new world size: new streams pick afresh (each corpus's own cursor keeps exactly-once)
            mix[src] = {str(i): fresh_mix(plan.cfg.seed, src, streams, i, weights) for i in mine}
            base = total_picks(saved) if saved else 0
        meta[src] = {"weights": weights, "history": history, "base_picks": base}
    return mix, meta


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
        raise ValueError("data: no source has urls (set data.text.urls, data.image.urls or data.pair.urls, "
                         "or their corpora)")
    workers = max(1, cfg.num_workers)
    tok = None
    if {"text", "pair"} & set(sources) or cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer, io_policy(cfg))
    corpora = {src: cfg.corpora(src) for src in sources}
    plan = _Plan(cfg=cfg, rank=rank, workers=workers, sources=sources, corpora=corpora,
                 shards=_list_sources([c for src in sources for c in corpora[src]], world_size * workers,
                                      io_policy(cfg)),
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
    states, mix, mix_meta, next_worker = _initial_states(state, plan, world_size)
    return MixedLoader(plan, world_size, states, mix, mix_meta, next_worker)


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
        raise DataSourceError(f"no usable eval pairs in {safe_url(url)}")
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
