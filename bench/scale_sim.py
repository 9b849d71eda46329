"""Beyond this machine, by simulation: the data cursor at 8-1,024 ranks, and the checkpoint layout's costs.

Part 1 (data cursor). The real plan and cursor code of data_pipeline (loader._initial_states, MixedLoader's
state_dict, cursor.merge_states / redistribute, stream.SourceStream, mix.Mixer) runs every rank of a world in
this one process, without torch.distributed, DataLoader processes or tar files. The seam: a corpus's listing
is ``[(url, size), ...]`` (loader.corpus_shards) and a stream reads a shard only through
``SourceStream._open``; here the listing is synthetic (100,000 shards over text, image and two pair corpora,
the size field holding the shard's sample count) and ``_open`` yields the shard's ordinals instead of reading
a tar. Each simulated rank draws its micro-batches as ``_WorkerStreams._batch`` does (per modality, the mixer
picks a corpus, the corpus's stream takes one sample; workers take turns) and writes the worker's cursor back
into its MixedLoader as ``MixedLoader.__iter__`` does. A run: W ranks x 4 workers for some steps, save (every
rank's state_dict(); rank 0 builds the elastic view from every rank's view part, as a checkpoint save does),
resume at 3/4 W from that view, run, save, resume at W, run, save (and 64 -> 8). After each save the view is
checked against every sample key drawn so far: no key twice, and each drawn (corpus, epoch, shard) is exactly
what the view says was yielded (finished shards wholly, partial shards the listed ordinals).

Then, to the epoch's end (``drained_part``): 64 -> 48 -> 64, 256 -> 192 -> 256, 1,024 -> 768 -> 1,024 and
64 -> 8 ranks, 4 steps per phase, then the last world reads on until every sample of epoch 0 of every
corpus has been drawn, each exactly once, and the cursor saved then matches every draw. These runs use 20,000
shards and shuffle_buffer 8 (``--drain-shards``, ``--drain-buffer``): an epoch ends only when its last sample
has left each stream's buffer, about buffer x ln(streams x buffer) draws per stream, and with buffer 64 that
is some 400 steps at 1,024 ranks, over 20 minutes on this machine.

Per world size it prints the cursor's size (every rank's state, as a schema-2 trainer_state.json's
data_states held them, and merged), the time and tracemalloc peak of one rank's save (state_dict), of the
merge of all ranks' states (what every rank did on resume before schema 3) and of one rank's redistribution
to the new world size from the view (loader._initial_states); then (after "|") one rank's exact resume from
its own cursor file, the view parts rank 0 gathers, the view's size and rank 0's time and peak building it;
with each figure's growth exponent against the previous world size (1 = linear in ranks): fresh saves at W,
elastic resumes to 3W/4, and the resumes back to W.

Only the simulation's bookkeeping is shortened: ``shard_digest`` (O(shards), identical on every rank) and the
per-corpus ``redistribute`` (O(shards + streams), identical on every rank: each real rank computes it once, in
parallel) are memoised while the other ranks are built; the timed rank runs them unmemoised.

``--xl-cursor`` runs the same at configs/xl.yaml's data settings (shuffle_buffer 2000, 6 workers) at 8, 16 and
32 ranks and fits a line to 1,024 ranks (filling 2,000-sample buffers of thousands of streams is beyond this
machine), before (checkpoint schema 2: every rank reads and merges every rank's cursor) and now (schema 3: a
rank's own cursor file, measured at any world size by simulating that rank alone; the elastic view; rank 0's
build of it at save).

Part 2 (checkpoint layout, ``checkpoint_part``): the xl flavor's ZeRO-3 shards per rank (parameter tensors
counted on the meta device, partitioned as DeepSpeed pads them), the manifest's build and verification over
the real file layout of N ranks with tiny files (per-file cost) and sha256 over a sample file (per-byte cost,
extrapolated: a 49 GiB checkpoint is not written), and the S3 requests of a save (pyarrow upload, as Ray
Train's), a prune and a resume (checkpoint.prune / newest_valid) counted on moto's S3 server on 127.0.0.1.

Part 3 (``capacity``): the capacity model of docs/SCALE.md computed from part 2's figures and stated
bandwidths, S3 per-prefix limits and node MTBF.

    python bench/scale_sim.py            # 8, 64, 256, 1,024 ranks (~25 min on the shared 2-core VM)
    python bench/scale_sim.py --quick    # 8 and 64 ranks, 10,000 shards (drains: 2,000): CI-sized (~1 min)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import tracemalloc
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline import loader as loader_mod  # noqa: E402
from data_pipeline.batch import BatchSpec  # noqa: E402
from data_pipeline.config import CorpusConfig, DataConfig, SourceConfig  # noqa: E402
from data_pipeline.cursor import (StreamState, elastic_view, from_ranges, merge_states,  # noqa: E402
                                  rank_view_part)
from data_pipeline.loader import MixedLoader, _initial_states, _Plan, buffer_share  # noqa: E402
from data_pipeline.mix import Mixer  # noqa: E402
from data_pipeline.stream import SourceStream, StreamContext  # noqa: E402

WORKERS = 4


# ------------------------------------------------------------------------------------------ synthetic listing
def synthetic_config(seed: int = 0, buffer: int = 64, batch: int = 8, workers: int = WORKERS,
                     pair_batch: int | None = None) -> DataConfig:
    """Text, image and two weighted pair corpora (a large web one and a small COCO-like one)."""
    return DataConfig(text=SourceConfig(urls="sim://text", batch_size=batch),
                      image=SourceConfig(urls="sim://image", batch_size=batch),
                      pair=SourceConfig(batch_size=pair_batch or batch, corpora=[
                          CorpusConfig(name="web", urls="sim://pair/web", weight=4.0),
                          CorpusConfig(name="coco", urls="sim://pair/coco", weight=1.0)]),
                      num_workers=workers, shuffle_buffer=buffer, seed=seed)


# Shares of the shard total per corpus: the COCO-like corpus has fewer shards than 1,024 x 4 streams, so the
# fewer-shards-than-streams plan (cursor.planned_share) is exercised too.
SHARE = {"text": 0.45, "image": 0.3, "pair/web": 0.23, "pair/coco": 0.02}


def synthetic_listing(total_shards: int, min_samples: int = 2, max_samples: int = 16,
                      seed: int = 0) -> dict[str, list[tuple[str, int]]]:
    """corpus key -> [(url, samples in the shard)]: the listing loader.corpus_shards would return, with the
    size field carrying the sample count (nothing is written)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, share in SHARE.items():
        n = max(1, round(total_shards * share))
        counts = rng.integers(min_samples, max_samples + 1, size=n)
        out[key] = [(f"sim://{key}/shard-{i:06d}.tar", int(c)) for i, c in enumerate(counts)]
    return out


class _NoReader:
    def close(self):
        pass


class SimStream(SourceStream):
    """A real SourceStream whose shards are read from the synthetic listing instead of tar files."""

    def _open(self, shard: int, wanted):
        self.ctx.count("shards_opened", 1)
        n, key = self.shards[shard][1], self.source

        def items():
            for ordinal in range(n):
                yield ordinal, ({"key": f"{key}/{shard}/{ordinal}"} if wanted(ordinal) else None)
        return _NoReader(), items()


# ------------------------------------------------------------------------------------------ simulated ranks
def make_plan(cfg: DataConfig, listing: dict, rank: int) -> _Plan:
    sources = cfg.active_sources()
    return _Plan(cfg=cfg, rank=rank, workers=max(1, cfg.num_workers), sources=sources,
                 corpora={s: cfg.corpora(s) for s in sources}, shards=listing, tokenizer_json=None,
                 spec=BatchSpec(32, 32, 8, cfg.seed, 0.15, 0.5))


@dataclass
class Drawn:
    """Every sample drawn so far: (corpus, epoch, shard) -> ordinals; a key drawn twice is an error at
    once."""

    seen: dict = field(default_factory=dict)
    count: int = 0
    by_epoch: dict = field(default_factory=dict)  # epoch -> samples drawn from it (a drain's O(1) test)

    def add(self, corpus: str, ref: list, key: str) -> None:
        e, s, o = ref
        if key != f"{corpus}/{s}/{o}":
            raise AssertionError(f"sample {key} came with the reference {corpus} {ref}")
        got = self.seen.setdefault((corpus, e, s), set())
        if o in got:
            raise AssertionError(f"sample {key} of epoch {e} drawn twice")
        got.add(o)
        self.count += 1
        self.by_epoch[e] = self.by_epoch.get(e, 0) + 1


class SimRank:
    """One rank: its MixedLoader (the cursor) and, per worker, the streams a DataLoader worker would hold."""

    def __init__(self, plan: _Plan, world: int, state: dict | None):
        self.plan = plan
        states, mix, meta, next_worker = _initial_states(state, plan, world)
        self.loader = MixedLoader(plan, world, states, mix, meta, next_worker)
        self._workers: dict[int, tuple[dict, dict]] = {}

    def _worker(self, worker: int) -> tuple[dict, dict]:
        """Streams and mixers of a worker, built from the cursor as _WorkerStreams.__iter__ builds them."""
        if worker not in self._workers:
            plan, cfg, index = self.plan, self.plan.cfg, str(self.plan.rank * self.plan.workers + worker)
            streams, mixers = {}, {}
            for src in plan.sources:
                weights = plan.weights(src)
                total = sum(weights.values())
                for c in plan.corpora[src]:
                    ctx = StreamContext(seed=cfg.seed,
                                        buffer_size=buffer_share(cfg.shuffle_buffer, c.weight / total),
                                        prep=None, retry=None, block_bytes=0, count=lambda name, n: None)
                    streams[c.key] = SimStream(c.key, plan.shards[c.key],
                                               StreamState.from_json(self.loader._states[c.key][index]), ctx)
                mixers[src] = Mixer(weights, self.loader._mix[src][index])
            self._workers[worker] = (streams, mixers)
        return self._workers[worker]

    def step(self, drawn: Drawn) -> None:
        """One micro-batch from the next worker; its cursor goes back into the loader as MixedLoader does."""
        ld, plan = self.loader, self.plan
        worker = ld._next_worker
        streams, mixers = self._worker(worker)
        for src, mixer in mixers.items():
            for _ in range(getattr(plan.cfg, src).batch_size):
                corpus = mixer.pick()
                (ref,), (item,) = streams[corpus].take(1)
                drawn.add(corpus, ref, item["key"])
        index = str(plan.rank * plan.workers + worker)
        for key, st in streams.items():
            ld._states[key][index] = st.snapshot()
        for modality, mx in mixers.items():
            ld._mix[modality][index] = mx.snapshot()
        ld._next_worker = (worker + 1) % plan.workers


@contextmanager
def memoised_shared_work():
    """While the other ranks are built or saved, compute the rank-independent parts once (see the
    docstring)."""
    digest, redistribute = loader_mod.shard_digest, loader_mod.redistribute
    digests, plans = {}, {}

    def digest_once(urls):
        key = (len(urls), urls[0] if urls else "", urls[-1] if urls else "")
        if key not in digests:
            digests[key] = digest(urls)
        return digests[key]

    def redistribute_once(view, seed, source, n, streams):
        key = (id(view), seed, source, n, streams)
        if key not in plans:
            # view kept: its id stays unique
            plans[key] = (view, redistribute(view, seed, source, n, streams))
        return plans[key][1]

    loader_mod.shard_digest, loader_mod.redistribute = digest_once, redistribute_once
    try:
        yield
    finally:
        loader_mod.shard_digest, loader_mod.redistribute = digest, redistribute


def measured(fn, with_memory: bool = True):
    """(result, seconds, peak bytes of Python allocations or None): timed once plain, once under tracemalloc.

    The simulation's own heap (every rank's streams, every drawn key) is frozen out of the cyclic GC first: a
    real rank holds one rank's objects, and collections scanning the other ranks' would bill the measured
    operation for the simulation's size."""
    gc.collect()
    gc.freeze()
    try:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        peak = None
        if with_memory:
            tracemalloc.start()
            fn()
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    finally:
        gc.unfreeze()
    return out, seconds, peak


# ----------------------------------------------------------------------------------------- exactly-once check
def check_exactly_once(merged: dict, listing: dict, drawn: Drawn) -> int:
    """The merged cursor's per-epoch view against every sample drawn: for each corpus and epoch, a shard the
    view calls finished was drawn wholly, a partial shard exactly in the listed ordinals, an unfinished shard
    in none; epochs below the view's lowest are wholly drawn, epochs from ``fresh_from`` not at all. Returns
    the number of samples it accounted for; raises AssertionError naming the first mismatch."""
    by_corpus: dict[str, dict[int, dict[int, set]]] = {}
    for (corpus, e, s), ords in drawn.seen.items():
        by_corpus.setdefault(corpus, {}).setdefault(e, {})[s] = ords
    accounted = 0
    for corpus, shards in listing.items():
        src = merged["sources"][corpus]
        n, views = len(shards), src["epochs"]
        lowest = min((int(e) for e in views), default=src["fresh_from"])
        for e, got in by_corpus.get(corpus, {}).items():
            if e >= src["fresh_from"]:
                raise AssertionError(f"{corpus}: epoch {e} drawn from, but the cursor says it is untouched")
            if e < lowest or str(e) not in views:  # the view lists only the epochs with something left
                finished, partial = range(n), {}
            else:
                finished = views[str(e)]["finished"]
                partial = {int(s): from_ranges(r) for s, r in views[str(e)]["partial"].items()}
            for s in finished:
                if got.get(s, set()) != set(range(shards[s][1])):
                    raise AssertionError(f"{corpus} epoch {e}: shard {s} is finished in the cursor, but "
                                         f"{len(got.get(s, ()))} of its {shards[s][1]} samples were drawn")
            for s, ords in got.items():
                if s in partial and ords != partial[s]:
                    raise AssertionError(f"{corpus} epoch {e}: shard {s} drew {sorted(ords)}, the cursor "
                                         f"lists {sorted(partial[s])}")
                if s not in partial and len(ords) != shards[s][1]:
                    raise AssertionError(f"{corpus} epoch {e}: shard {s} drew {len(ords)} samples the cursor "
                                         f"does not record")
                accounted += len(ords)
    if accounted != drawn.count:
        raise AssertionError(f"{drawn.count} samples drawn, {accounted} accounted for by the cursor")
    return accounted


# ------------------------------------------------------------------------------------------ one world
def build_world(cfg: DataConfig, listing: dict, world: int, state: dict | None,
                measure: bool = True) -> tuple[list[SimRank], dict]:
    """Every rank of a world resumed from ``state``; rank 0 timed alone (its _initial_states is the per-rank
    cost of a resume: redistribution to this world size when it differs from the saved one)."""
    plan0 = make_plan(cfg, listing, 0)
    if state is not None and measure:
        text = json.dumps(state)  # the elastic view file, parsed and redistributed as a rank does
        _, seconds, peak = measured(lambda: _initial_states(json.loads(text), plan0, world))
    else:
        seconds = peak = None
    with memoised_shared_work():
        ranks = [SimRank(make_plan(cfg, listing, r), world, state) for r in range(world)]
    return ranks, {"resume_rank_s": seconds, "resume_rank_peak": peak}


def save_world(ranks: list[SimRank], measure: bool = True) -> tuple[list[dict], dict, dict]:
    """Every rank's state_dict (rank 0 timed alone); before (checkpoint schema 2): the merge of all of them
    that every rank ran on resume, timed; now: rank 0's elastic view from every rank's view part (at save),
    and one rank's exact resume from its own cursor file, timed. Returns (states, elastic view, figures)."""
    save_s = save_peak = exact_s = exact_peak = None
    if measure:
        _, save_s, save_peak = measured(lambda: ranks[0].loader.state_dict())
    with memoised_shared_work():
        states = [r.loader.state_dict() for r in ranks]
    merged, merge_s, merge_peak = measured(lambda: merge_states(states), with_memory=measure)
    parts = [rank_view_part(st) for st in states]  # each rank its own, gathered to rank 0
    view, view_s, view_peak = measured(lambda: elastic_view(parts), with_memory=measure)
    if measure:
        own = json.dumps(states[0])  # rank 0's cursor file, read back at the same world size
        _, exact_s, exact_peak = measured(lambda: _initial_states(json.loads(own), ranks[0].plan, len(ranks)))
    figures = {"world": len(ranks), "save_rank_s": save_s, "save_rank_peak": save_peak,
               "merge_s": merge_s, "merge_peak": merge_peak,
               "rank_bytes": len(json.dumps(states[0])),
               "all_ranks_bytes": len(json.dumps(states)), "merged_bytes": len(json.dumps(merged)),
               "parts_bytes": len(json.dumps(parts)), "view_bytes": len(json.dumps(view)),
               "view_s": view_s, "view_peak": view_peak,
               "exact_rank_s": exact_s, "exact_rank_peak": exact_peak}
    return states, view, figures


def epoch_samples(listing: dict) -> int:
    """Samples in one epoch of every corpus."""
    return sum(n for shards in listing.values() for _, n in shards)


def epoch_drawn_whole(listing: dict, drawn: Drawn, epoch: int = 0) -> bool:
    """Whether every sample of ``epoch`` of every corpus has been drawn: Drawn refuses repeats and keys that
    are not the listing's, so a count equal to the epoch's samples is every sample exactly once."""
    return drawn.by_epoch.get(epoch, 0) == epoch_samples(listing)


def drain_epoch(cfg: DataConfig, listing: dict, world: int, cursor: dict, drawn: Drawn,
                epoch: int = 0) -> dict:
    """Every rank of ``world``, resumed from ``cursor`` (a save's elastic view), reads on until every sample
    of ``epoch`` is drawn; the cursor saved then is checked against every draw since the run began. Returns
    the steps it took and the samples of the epoch (all of them, each once)."""
    ranks, _ = build_world(cfg, listing, world, cursor, measure=False)
    steps, total = 0, epoch_samples(listing)
    while not epoch_drawn_whole(listing, drawn, epoch):
        run_steps(ranks, 1, drawn)
        steps += 1
    _, view, _ = save_world(ranks, measure=False)
    check_exactly_once(view, listing, drawn)
    if drawn.by_epoch[epoch] != total:
        raise AssertionError(f"epoch {epoch}: {drawn.by_epoch[epoch]} samples drawn of {total}")
    return {"drain_steps": steps, "epoch_samples": total, "drawn": drawn.count}


def run_steps(ranks: list[SimRank], steps: int, drawn: Drawn) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        for r in ranks:
            r.step(drawn)
    return time.perf_counter() - t0


def simulate(worlds: list[int], cfg: DataConfig, listing: dict, steps: int, drawn: Drawn | None = None,
             log=print, measure: bool = True) -> list[dict]:
    """Start at worlds[0], then resume at each next world size; after each save check exactly-once.
    Every resume at another world size starts from the elastic view rank 0 built at the save (what a
    checkpoint holds since schema 3). Returns one figures dict per save (the last one also holds that view,
    ``cursor``)."""
    drawn = drawn or Drawn()
    state, out = None, []
    for i, world in enumerate(worlds):
        ranks, resume = build_world(cfg, listing, world, state, measure)
        step_s = run_steps(ranks, steps, drawn)
        _, state, figures = save_world(ranks, measure)
        accounted = check_exactly_once(state, listing, drawn)
        figures.update(resume, from_world=worlds[i - 1] if i else None, steps=steps, step_s=step_s,
                       samples=accounted)
        out.append(figures)
        log(_row(figures))
        del ranks
    out[-1]["cursor"] = state  # the elastic view of the last save, to resume from
    return out


def _mb(n) -> str:
    return "-" if n is None else f"{n / 2 ** 20:8.2f}"


def _s(x) -> str:
    return "-" if x is None else f"{x * 1000:8.1f}"


HEADER = (f"{'world':>9} {'steps':>5} {'samples':>9} {'rank KB':>8} {'all MB':>8} {'merged MB':>9} "
          f"{'save ms':>8} {'save MB':>8} {'merge ms':>8} {'merge MB':>8} {'resume ms':>9} {'resume MB':>9} "
          f"{'run s':>6} | {'exact ms':>8} {'exact MB':>8} {'parts MB':>8} {'view MB':>8} {'view ms':>8} "
          f"{'view pk MB':>10}")


def _row(f: dict) -> str:
    world = f"{f['from_world']}->{f['world']}" if f["from_world"] else str(f["world"])
    return (f"{world:>9} {f['steps']:>5} {f['samples']:>9} {f['rank_bytes'] / 1024:8.1f} "
            f"{_mb(f['all_ranks_bytes'])} {_mb(f['merged_bytes']):>9} {_s(f['save_rank_s'])} "
            f"{_mb(f['save_rank_peak'])} {_s(f['merge_s'])} {_mb(f['merge_peak'])} "
            f"{_s(f['resume_rank_s']):>9} {_mb(f['resume_rank_peak']):>9} {f['step_s']:6.1f} | "
            f"{_s(f['exact_rank_s'])} {_mb(f['exact_rank_peak'])} {_mb(f['parts_bytes'])} "
            f"{_mb(f['view_bytes'])} {_s(f['view_s'])} {_mb(f['view_peak']):>10}")


def growth(rows: list[dict], keys=("all_ranks_bytes", "merged_bytes", "save_rank_s", "merge_s", "merge_peak",
                                    "resume_rank_s", "resume_rank_peak", "rank_bytes", "exact_rank_s",
                                    "exact_rank_peak", "view_bytes", "view_s", "view_peak")) -> list[str]:
    """Per figure, the exponent k of figure ~ world^k between consecutive world sizes (1 = linear)."""
    lines = []
    for a, b in zip(rows, rows[1:]):
        ratio = math.log(b["world"] / a["world"])
        parts = []
        for k in keys:
            if a.get(k) and b.get(k):
                parts.append(f"{k}={math.log(b[k] / a[k]) / ratio:.2f}")
        lines.append(f"  {a['world']:>5} -> {b['world']:<5} " + " ".join(parts))
    return lines


def cursor_part(quick: bool, total_shards: int, steps: int, worlds: list[int] | None = None) -> dict:
    cfg = synthetic_config()
    listing = synthetic_listing(total_shards)
    print(f"data cursor: {total_shards:,} shards "
          f"({', '.join(f'{k} {len(v):,}' for k, v in listing.items())}), {WORKERS} workers/rank, "
          f"shuffle_buffer {cfg.shuffle_buffer}, batch 8 per modality, {steps} steps per phase")
    print(HEADER)
    worlds = worlds or ([8, 64] if quick else [8, 64, 256, 1024])
    results = {}
    fresh = []
    for w in worlds:
        rows = simulate([w, w * 3 // 4, w], cfg, listing, steps)
        results[w] = rows
        fresh.append(rows[0])
    if 64 in worlds:
        results["64->8"] = simulate([64, 8], cfg, listing, steps)
    print("growth with the world size, fresh saves (exponent k of figure ~ ranks^k; 1 = linear):")
    for line in growth(fresh):
        print(line)
    resumed = [results[w][1] for w in worlds]
    print("growth, elastic resumes (3/4 W):")
    for line in growth(resumed):
        print(line)
    back = [results[w][2] for w in worlds]
    print("growth, elastic resumes back to W (3W/4 -> W):")
    for line in growth(back):
        print(line)
    return results


def drained_part(cases: list[list[int]], total_shards: int, buffer: int, steps: int) -> list[dict]:
    """Exactly once to the epoch's end: per case (world sizes in turn), ``steps`` steps at each world with a
    save and check after each, then the last world reads on until epoch 0 of every corpus is drawn whole
    (drain_epoch). A smaller listing and shuffle buffer than the figures' run: the end of an epoch waits for
    the last old sample to leave each stream's buffer, about buffer x ln(streams x buffer) draws per stream
    (with buffer 64, some 400 steps at 1,024 ranks: over 20 minutes here)."""
    cfg, listing = synthetic_config(buffer=buffer), synthetic_listing(total_shards)
    print(f"exactly once to the end of epoch 0: {total_shards:,} shards ({epoch_samples(listing):,} samples "
          f"an epoch), shuffle_buffer {buffer}, {WORKERS} workers/rank, batch 8 per modality, {steps} steps "
          f"per phase, then the last world drains epoch 0")
    print(f"{'worlds':>19} {'drain steps':>11} {'epoch 0 samples':>15} {'drawn in all':>12} {'s':>6}")
    out = []
    for worlds in cases:
        t0 = time.perf_counter()
        drawn = Drawn()
        rows = simulate(worlds, cfg, listing, steps, drawn=drawn, log=lambda line: None, measure=False)
        row = {"worlds": worlds, **drain_epoch(cfg, listing, worlds[-1], rows[-1]["cursor"], drawn),
               "seconds": time.perf_counter() - t0}
        out.append(row)
        print(f"{' -> '.join(map(str, worlds)):>19} {row['drain_steps']:>11} {row['epoch_samples']:>15,} "
              f"{row['drawn']:>12,} {row['seconds']:6.0f}", flush=True)
        del drawn, rows
    print("  every sample of epoch 0 of every corpus drawn exactly once, across the world-size changes; "
          "every save's cursor matched every draw before it")
    return out


# ---------------------------------------------------------------------------------------- part 2: checkpoints
GIB = 2 ** 30
ADAM_BYTES = 12          # per parameter in a ZeRO-3 optimizer shard: fp32 master weight, exp_avg, exp_avg_sq


def xl_partition(world: int) -> dict:
    """Bytes per rank of the xl flavor's ZeRO-3 checkpoint: every parameter tensor is split into ``world``
    equal, padded parts (DeepSpeed's partitioning), and each rank's optimizer shard holds ADAM_BYTES per
    element of its parts. The model_states files of ZeRO-3 hold parameter shapes and buffers, not weights."""
    import torch

    from model.flavors import get_flavor
    from model.unimo import UnimoModel

    with torch.device("meta"):
        numels = [p.numel() for p in UnimoModel(get_flavor("xl")).parameters()]
    per_rank = sum(-(-n // world) for n in numels)
    return {"params": sum(numels), "tensors": len(numels), "elements_per_rank": per_rank,
            "optim_bytes_per_rank": ADAM_BYTES * per_rank}


class RequestCounter:
    """Counts the S3 requests moto's server handles, by kind, from the request lines werkzeug logs."""

    KINDS = ("PUT object", "PUT part", "POST create-multipart", "POST complete-multipart",
             "POST delete-objects", "DELETE object", "GET list", "GET object", "HEAD")

    def __init__(self):
        import logging

        self.lines: list[str] = []
        self._logger = logging.getLogger("werkzeug")
        self._handler = logging.Handler(logging.INFO)
        self._handler.emit = lambda record: self.lines.append(record.getMessage())
        self._logger.addHandler(self._handler)
        self._logger.setLevel(logging.INFO)
        self._logger.propagate = False

    def take(self) -> dict[str, int]:
        """Counts since the last call."""
        import re

        out = dict.fromkeys(self.KINDS, 0)
        for line in self.lines:
            # werkzeug colours some lines (a 206 of a ranged GET) with ANSI codes before the method
            m = re.search(r'"(?:\x1b\[[0-9;]*m)*([A-Z]+) (\S+) HTTP', line)
            if not m:
                continue
            method, target = m.groups()
            query = target.split("?", 1)[1] if "?" in target else ""
            if method == "PUT":
                kind = "PUT part" if "partNumber=" in query else "PUT object"
            elif method == "POST":
                kind = ("POST create-multipart" if query.startswith("uploads") else
                        "POST complete-multipart" if "uploadId=" in query else "POST delete-objects")
            elif method == "GET":
                kind = "GET list" if ("list-type" in query or "prefix=" in query or "delimiter" in query
                                      or target.rstrip("/").count("/") <= 1) else "GET object"
            else:
                kind = "HEAD" if method == "HEAD" else "DELETE object"
            out[kind] += 1
        self.lines.clear()
        out["total"] = sum(out.values())
        return out


def write_layout(root: Path, world: int, rank: int, payload: int = 64) -> None:
    """What rank ``rank`` of ``world`` writes into its checkpoint folder, as tiny files (names as DeepSpeed's
    ZeRO-3 save names them, and its data cursor file; rank 0 adds DeepSpeed's own files, the cursor's elastic
    view and the trainer state: checkpoint schema 3)."""
    from trainer import checkpoint as ckpt

    ds = root / "ds"
    ds.mkdir(parents=True, exist_ok=True)
    for kind in ("model", "optim"):
        prefix = "bf16_" if kind == "optim" else ""
        (ds / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt").write_bytes(b"x" * payload)
    names = [ckpt.RANK_STATE.format(rank=rank)]
    if rank == 0:
        names += ["latest", "zero_to_fp32.py", ckpt.ELASTIC_VIEW]
        (root / "trainer_state.json").write_text(json.dumps({"schema": ckpt.SCHEMA_VERSION, "step": 0,
                                                            "world_size": world}))
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x" * payload)


def hash_rate(sample_mib: int = 64) -> float:
    """Bytes per second of the manifest's sha256 (checkpoint.sha256_file) over a sample file."""
    import os
    import tempfile

    from trainer.checkpoint import sha256_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sample"
        path.write_bytes(os.urandom(sample_mib * 2 ** 20))
        sha256_file(path)  # page cache warm, as a checkpoint just written is
        best = math.inf
        for _ in range(3):  # best of three: the machine is shared
            t0 = time.perf_counter()
            sha256_file(path)
            best = min(best, time.perf_counter() - t0)
        return sample_mib * 2 ** 20 / best


def manifest_figures(world: int) -> dict:
    """describe_files + write_manifest + verify over the file layout of ``world`` ranks (tiny files: the
    per-file cost; the per-byte cost is hash_rate's)."""
    import tempfile

    from trainer.checkpoint import MANIFEST, describe_files, verify, write_manifest

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for r in range(world):
            write_layout(root, world, r)
        t0 = time.perf_counter()
        files = describe_files(root)
        write_manifest(root, files, 100)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        verify(root, check_sums=True)
        check = time.perf_counter() - t0
        return {"files": len(files) + 1, "manifest_bytes": (root / MANIFEST).stat().st_size,
                "build_s": build, "verify_s": check}


def s3_requests(worlds: list[int], multipart_mib: int = 24) -> dict:
    """Requests of a save (every rank uploads its folder through the pyarrow S3 filesystem Ray Train is
    given), a prune (checkpoint.prune, keep_last=1, of two checkpoints) and a resume (checkpoint.newest_valid:
    list, manifest, download, verify) against moto's S3 server on loopback; plus one multipart upload's
    parts."""
    import os
    import tempfile

    import pyarrow.fs

    from tests.integration.services import S3Server, aws_env
    from trainer import checkpoint as ckpt
    from trainer import storage

    server = S3Server()
    server.start()
    counter = RequestCounter()
    out = {}
    try:
        with aws_env(server.url):
            storage.s3_client().create_bucket(Bucket="scale")
            path_root, fs = storage.ray_storage("s3://scale/run")
            with tempfile.TemporaryDirectory() as tmp:
                big = Path(tmp) / "big"
                big.mkdir()
                (big / "one.pt").write_bytes(os.urandom(multipart_mib * 2 ** 20))
                counter.take()
                pyarrow.fs.copy_files(str(big), f"{path_root}/multipart", destination_filesystem=fs)
                out["multipart"] = {"mib": multipart_mib, **counter.take()}
            for world in worlds:
                run = f"run{world}"
                with tempfile.TemporaryDirectory() as tmp:
                    roots = []
                    for r in range(world):
                        roots.append(Path(tmp) / f"rank{r}")
                        write_layout(roots[-1], world, r)
                    files = {}
                    for root in roots:
                        files.update(ckpt.describe_files(root))
                    ckpt.write_manifest(roots[0], files, 0)
                    counter.take()
                    t0 = time.perf_counter()
                    for step in (100, 200):
                        for root in roots:
                            pyarrow.fs.copy_files(str(root),
                                                  f"scale/{run}/checkpoints/{ckpt.step_dir_name(step)}",
                                                  destination_filesystem=fs)
                        if step == 100:
                            save = counter.take()
                            save_s = time.perf_counter() - t0
                    counter.take()
                    removed = ckpt.prune(f"s3://scale/{run}/checkpoints", keep_last=1, keep_every=0)
                    prune = counter.take()
                    assert len(removed) == 1, removed
                    found = ckpt.newest_valid(f"s3://scale/{run}/checkpoints", cache_dir=Path(tmp) / "cache")
                    resume = counter.take()
                    assert found is not None and found.step == 200, found
                    t0 = time.perf_counter()
                    now = every_rank_resumes(f"s3://scale/{run}/checkpoints", world, Path(tmp) / "nodes")
                    now.update(counter.take(), seconds_loopback=time.perf_counter() - t0)
                out[world] = {"save": save, "prune": prune, "resume": resume, "resume_now": now,
                              "save_s_loopback": save_s}
                print(f"  {world:>5} ranks: save {save['total']:>6} requests ({_kinds(save)}), prune "
                      f"{prune['total']:>5} ({_kinds(prune)}), resume (one node, whole checkpoint) "
                      f"{resume['total']:>6} ({_kinds(resume)}); resume now (every rank, "
                      f"{GPUS_PER_NODE} per node, partial copies) {now['total']:>6} ({_kinds(now)}; "
                      f"{now['files_per_node']:.1f} files per node) in {now['seconds_loopback']:.1f} s",
                      flush=True)
    finally:
        server.stop()
    return out


def every_rank_resumes(root: str, world: int, cache: Path) -> dict:
    """What a resume at the same world size reads from S3 now, every rank as CheckpointManager.find does:
    its listing of the checkpoints folder, then verification.verify_part, which reads the manifest and
    downloads into its node's partial copy (one per GPUS_PER_NODE ranks) only the files its ranks read.
    Returns the files the nodes downloaded, per node on average (the requests are counted by the caller)."""
    from trainer import checkpoint as ckpt
    from trainer.checkpointing.verification import verify_part

    for rank in range(world):
        (newest, *_) = ckpt.list_step_dirs(root)
        part = verify_part(str(newest.path), cache / f"node{rank // GPUS_PER_NODE}", rank,
                           lambda local, state: False, world_size=world)
        assert part.problem is None, part.problem
    nodes = list(cache.iterdir())
    files = sum(1 for node in nodes for copy in node.glob("*.files") for p in copy.rglob("*") if p.is_file())
    return {"files_per_node": files / max(1, len([n for n in nodes if n.is_dir()]))}


def _kinds(c: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in c.items() if v and k in RequestCounter.KINDS)


def checkpoint_part(quick: bool) -> dict:
    worlds = [8, 64] if quick else [8, 64, 256, 1024]
    rate = hash_rate(16 if quick else 64)
    print(f"checkpoint layout (xl flavor, ZeRO-3); sha256 over a warm sample file: {rate / 2 ** 20:.0f} "
          "MiB/s")
    print(f"{'ranks':>6} {'GiB/rank':>9} {'files':>6} {'manifest KB':>11} {'build ms':>9} {'verify ms':>9} "
          f"{'hash/rank s':>11} {'verify-all s':>12}")
    rows = {}
    for w in worlds:
        part = xl_partition(w)
        m = manifest_figures(w)
        per_rank_hash = part["optim_bytes_per_rank"] / rate          # each rank describes its own files
        verify_all = part["optim_bytes_per_rank"] * w / rate         # resume: a node verifies the whole
                                                                     # checkpoint
        rows[w] = {**part, **m, "hash_rate": rate, "hash_rank_s": per_rank_hash, "verify_all_s": verify_all}
        print(f"{w:>6} {part['optim_bytes_per_rank'] / GIB:9.3f} {m['files']:>6} "
              f"{m['manifest_bytes'] / 1024:11.1f} {m['build_s'] * 1000:9.1f} {m['verify_s'] * 1000:9.1f} "
              f"{per_rank_hash:11.2f} {verify_all:12.1f}")
    print(f"  xl: {rows[worlds[0]]['params']:,} parameters in {rows[worlds[0]]['tensors']} tensors; hash "
          f"columns extrapolated from the sample's rate (not written: {ADAM_BYTES} B/parameter would be "
          f"{ADAM_BYTES * rows[worlds[0]]['params'] / GIB:.0f} GiB)")
    print("S3 requests against moto on 127.0.0.1 (tiny files; large files add parts, see multipart):")
    requests = s3_requests(worlds)
    mp = requests["multipart"]
    print(f"  one {mp['mib']} MiB file: {mp['total']} requests ({_kinds(mp)})")
    print_capacity(capacity(rows, requests))
    return {"layout": rows, "requests": requests}


# ------------------------------------------------------------------------------------------ part 3: capacity
GPUS_PER_NODE = 8
PART_BYTES = 10 * 2 ** 20      # Arrow's S3 multipart part (a 24 MiB upload took 3 parts: see s3_requests)
PUT_LIMIT, GET_LIMIT = 3500, 5500   # S3 requests per second per partitioned prefix (AWS's documented rates)


def capacity(layout: dict, requests: dict, node_gbps=(1.25, 5.0), disk_gbps: float = 2.0,
             node_mtbf_h: float = 5000.0) -> list[dict]:
    """The xl flavor's checkpoint capacity model per world size from the measured layout and request counts:
    upload and download times at each stated node-to-S3 bandwidth (GB/s), the request floors against S3's
    per-prefix limits, resume verification at the measured hash rate, and the Young/Daly interval
    sqrt(2 x blocking save x MTBF of the job) for a node MTBF (the job fails when any of its nodes does)."""
    rows = []
    for world, lay in layout.items():
        nodes = max(1, world // GPUS_PER_NODE)
        rank_bytes = lay["optim_bytes_per_rank"]
        node_bytes = rank_bytes * min(world, GPUS_PER_NODE)
        total = rank_bytes * world
        req = requests.get(world)
        tiny = req["save"] if req else None
        # Measured per rank with tiny files (each a 3-request multipart); a real shard adds its extra parts.
        extra_parts = world * (math.ceil(rank_bytes / PART_BYTES) - 1)
        writes = (tiny["total"] - tiny["HEAD"] + extra_parts) if tiny else None
        files = lay["files"]
        # Before: every node downloaded the whole checkpoint (one node's resume counted, times the nodes);
        # now: every rank's reads counted, each node downloading only its ranks' files (every_rank_resumes).
        gets = nodes * reads(req["resume"]) if req else None
        gets_now = reads(req["resume_now"]) if req else None
        local_save = node_bytes / (disk_gbps * 1e9)
        hash_s = rank_bytes / lay["hash_rate"]
        blocking = local_save + hash_s
        mtbf_job = node_mtbf_h * 3600 / nodes
        rows.append({
            "world": world, "nodes": nodes, "rank_gib": rank_bytes / GIB, "node_gib": node_bytes / GIB,
            "files": files, "upload_s": [node_bytes / (b * 1e9) for b in node_gbps],
            "save_writes": writes, "put_floor_s": writes / PUT_LIMIT if writes else None,
            "download_s": [total / (b * 1e9) for b in node_gbps], "resume_gets": gets,
            "get_floor_s": gets / GET_LIMIT if gets else None, "egress_tb": total * nodes / 1e12,
            "download_now_s": [node_bytes / (b * 1e9) for b in node_gbps], "resume_gets_now": gets_now,
            "get_floor_now_s": gets_now / GET_LIMIT if gets_now else None, "egress_now_tb": total / 1e12,
            "verify_s": rank_bytes / lay["hash_rate"], "blocking_save_s": blocking,
            "mtbf_job_h": mtbf_job / 3600,
            "young_daly_s": math.sqrt(2 * blocking * mtbf_job)})
    return rows


def reads(counts: dict) -> int:
    """The GET-class requests of a count (object GETs, listings, HEADs): what S3's 5,500/s per prefix
    limits."""
    return counts["GET object"] + counts["GET list"] + counts["HEAD"]


def print_capacity(rows: list[dict], node_gbps=(1.25, 5.0)) -> None:
    bw = "/".join(f"{b:g}" for b in node_gbps)
    print(f"capacity model, xl (node = {GPUS_PER_NODE} GPUs; S3 at {bw} GB/s per node; local disk 2 GB/s; "
          f"node MTBF 5,000 h):")
    print("  resume columns: before (every node downloads the whole checkpoint) -> now (a node downloads its "
          "ranks' files); verify: one rank's own files")
    print(f"{'ranks':>6} {'GiB/rank':>8} {'GiB/node':>8} {'upload s':>13} {'save PUT/POST':>13} "
          f"{'PUT floor s':>11} {'resume GETs':>17} {'GET floor s':>12} {'download s':>22} "
          f"{'egress TB':>12} {'verify s':>8} {'blocking s':>10} {'Young/Daly':>10}")
    fmt = (lambda x, spec: "-" if x is None else format(x, spec))
    for r in rows:
        up = "/".join(f"{x:.1f}" for x in r["upload_s"])
        down = ("/".join(f"{x:.1f}" for x in r["download_s"]) + " -> "
                + "/".join(f"{x:.1f}" for x in r["download_now_s"]))
        gets = f"{fmt(r['resume_gets'], ',')} -> {fmt(r['resume_gets_now'], ',')}"
        floor = f"{fmt(r['get_floor_s'], '.1f')} -> {fmt(r['get_floor_now_s'], '.1f')}"
        print(f"{r['world']:>6} {r['rank_gib']:8.3f} {r['node_gib']:8.2f} {up:>13} "
              f"{fmt(r['save_writes'], ','):>13} {fmt(r['put_floor_s'], '.2f'):>11} {gets:>17} {floor:>12} "
              f"{down:>22} {r['egress_tb']:5.2f} -> {r['egress_now_tb']:.2f} {r['verify_s']:8.1f} "
              f"{r['blocking_save_s']:10.1f} {r['young_daly_s'] / 60:8.0f} m")


def planning_cost() -> list[tuple[int, int, float]]:
    """cursor.epochs_view over streams lagging up to three epochs on a corpus with fewer shards than streams
    (the merge's planning of each stream's untouched shares): (streams, shards, seconds)."""
    from data_pipeline.cursor import epochs_view

    out = []
    for streams, n in ((256, 200), (1024, 800), (4096, 2000)):
        states = [StreamState(streams=streams, index=i, fresh_epoch=0 if i % 2 else 3)
                  for i in range(streams)]
        epochs_view(states, 0, "pair/coco", n)  # epoch orders cached, as in a merge after reading
        t0 = time.perf_counter()
        epochs_view(states, 0, "pair/coco", n)
        out.append((streams, n, time.perf_counter() - t0))
        print(f"  {streams:>5} streams over {n:>5} shards: epochs_view {out[-1][2] * 1000:8.1f} ms")
    return out


def xl_cursor(worlds=(8, 16, 32), steps: int = 6) -> list[dict]:
    """The cursor with configs/xl.yaml's data settings (shuffle_buffer 2000, 6 workers, batches 32/32/64) over
    shards of 500-1,500 samples, at small world sizes only (filling 2,000-sample buffers for thousands of
    streams is beyond this machine); per-rank figures are then extrapolated linearly (part 1 measures the
    growth). Before (checkpoint schema 2) against now: what one rank reads, spends and holds at resume, and
    what rank 0 does at save."""
    cfg = synthetic_config(buffer=2000, batch=32, pair_batch=64, workers=6)
    listing = synthetic_listing(100_000, min_samples=500, max_samples=1500)
    print("data cursor with configs/xl.yaml's data settings (shuffle_buffer 2000, 6 workers/rank):")
    print(HEADER)
    rows = []
    for world in worlds:
        row = simulate([world], cfg, listing, steps)[-1]
        text = json.dumps(row["cursor"])  # an elastic resume at 3/4 of the world: rank 0 parses and deals
        _, row["elastic_rank_s"], row["elastic_rank_peak"] = measured(
            lambda: _initial_states(json.loads(text), make_plan(cfg, listing, 0), world * 3 // 4))
        rows.append(row)
    measured_at = {r["world"]: r for r in rows}

    def fit(key, world):  # the least-squares line through the measured world sizes
        slope, intercept = np.polyfit([r["world"] for r in rows], [r[key] for r in rows], 1)
        return intercept + slope * world

    def figures(world):
        if world in measured_at:
            return measured_at[world]
        return {**{k: fit(k, world) for k in XL_KEYS}, **own_cursor(cfg, listing, world, steps)}

    print("per rank at resume, before (every rank reads every rank's cursor from trainer_state.json and "
          "merges them) and now (exact: its own cursor file; elastic: the view); rank 0 at save:")
    print(f"{'ranks':>6} | {'before: read MB':>15} {'merge s':>8} {'peak MB':>8} | {'exact: read KB':>14} "
          f"{'s':>6} {'peak MB':>8} | {'elastic: read MB':>16} {'s':>6} {'peak MB':>8} | "
          f"{'rank 0 save: gathered MB':>24} {'s':>6} {'peak MB':>8}")
    for world in sorted(set(worlds) | {64, 256, 1024}):
        f = figures(world)
        print(f"{world:>6} | {f['all_ranks_bytes'] / 2 ** 20:15.1f} {f['merge_s']:8.2f} "
              f"{f['merge_peak'] / 2 ** 20:8.0f} | {f['rank_bytes'] / 1024:14.0f} {f['exact_rank_s']:6.3f} "
              f"{f['exact_rank_peak'] / 2 ** 20:8.1f} | {f['view_bytes'] / 2 ** 20:16.2f} "
              f"{f['elastic_rank_s']:6.2f} {f['elastic_rank_peak'] / 2 ** 20:8.1f} | "
              f"{f['parts_bytes'] / 2 ** 20:24.2f} {f['view_s']:6.2f} {f['view_peak'] / 2 ** 20:8.1f}"
              + ("" if world in worlds else "  (before, elastic, rank 0: fitted; exact: measured)"))
    return rows


def own_cursor(cfg: DataConfig, listing: dict, world: int, steps: int) -> dict:
    """An exact resume's cost, measured at any world size: only rank 0 is simulated (its cursor holds only its
    own streams), its cursor file read back and its streams restored as at the same world size."""
    rank = SimRank(make_plan(cfg, listing, 0), world, None)
    run_steps([rank], steps, Drawn())
    own = json.dumps(rank.loader.state_dict())
    _, seconds, peak = measured(lambda: _initial_states(json.loads(own), rank.plan, world))
    return {"rank_bytes": len(own), "exact_rank_s": seconds, "exact_rank_peak": peak}


XL_KEYS = ("all_ranks_bytes", "merge_s", "merge_peak", "rank_bytes", "exact_rank_s", "exact_rank_peak",
           "view_bytes", "elastic_rank_s", "elastic_rank_peak", "parts_bytes", "view_s", "view_peak")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="8 and 64 ranks, 10,000 shards (CI-sized)")
    p.add_argument("--shards", type=int, default=None, help="total shards (default 100,000; quick 10,000)")
    p.add_argument("--steps", type=int, default=8, help="micro-batches per rank per phase")
    p.add_argument("--worlds", type=int, nargs="*", default=None, help="world sizes of the cursor part")
    p.add_argument("--skip-cursor", action="store_true")
    p.add_argument("--skip-checkpoint", action="store_true")
    p.add_argument("--xl-cursor", action="store_true",
                   help="also the cursor at configs/xl.yaml's data settings")
    p.add_argument("--skip-drain", action="store_true", help="no run to the end of epoch 0")
    p.add_argument("--drain-shards", type=int, default=20_000, help="total shards of the drained runs")
    p.add_argument("--drain-buffer", type=int, default=8, help="shuffle_buffer of the drained runs")
    p.add_argument("--drain-steps", type=int, default=4, help="steps per phase before the drain")
    args = p.parse_args(argv)
    shards = args.shards or (10_000 if args.quick else 100_000)
    if not args.skip_cursor:
        print("planning a small corpus's epochs for every stream (cursor.planned_share, shards < streams):")
        planning_cost()
        cursor_part(args.quick, shards, args.steps, args.worlds)
    if not args.skip_drain:
        cases = ([[8, 6, 8], [64, 48, 64], [64, 8]] if args.quick
                 else [[64, 48, 64], [256, 192, 256], [1024, 768, 1024], [64, 8]])
        drained_part(cases, 2_000 if args.quick else args.drain_shards, args.drain_buffer, args.drain_steps)
    if args.xl_cursor:
        xl_cursor()
    if not args.skip_checkpoint:
        checkpoint_part(args.quick)


if __name__ == "__main__":
    main()
