"""The data cursor: per-stream reading state, its rank-independent per-epoch view, merging and redistribution.

Every source is read by S = world_size x workers streams. In each epoch the shards are permuted by a seed of
(seed, source, epoch) and stream i of S reads ``order[i::S]`` in that order (fewer shards than streams: see
planned_share), then moves to its share of the next
epoch (streams of one source may be in different epochs). A stream's state says which shards it still owns
(``todo``, the ``head`` it is reading, ``open`` ones with items still in its shuffle buffer), which items of
them were yielded, the buffer's content as item ids and its RNG draw counter. From the states of all streams
follows the per-epoch view: for each epoch, the finished shards and, for partly read ones, the yielded item
ordinals. The view is what another world size resumes from; the stream states give an exact resume.

A "source" of the cursor is one corpus: the modality's name for the one-corpus shorthand ("pair"), else
"modality/name" ("pair/coco"); every corpus has its own shards, epochs and streams. ``mix`` holds, per
modality, the corpus weights (and their history) and each stream's corpus-picking state (see mix.py).
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

VERSION = 1


def order_seed(seed: int, source: str, epoch: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{source}/{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@lru_cache(maxsize=64)
def epoch_order(seed: int, source: str, epoch: int, n: int) -> tuple[int, ...]:
    """The shard order of one epoch of one source."""
    return tuple(int(i) for i in np.random.default_rng(order_seed(seed, source, epoch)).permutation(n))


def planned_share(seed: int, source: str, epoch: int, n: int, streams: int, index: int) -> list[int]:
    """The shards stream ``index`` of ``streams`` reads in ``epoch``, in order.

    With at least as many shards as streams, stream i reads ``order[i::streams]``. With fewer (a small corpus
    read by many ranks and workers) the epochs' shards are dealt on where the previous epoch stopped, so every
    stream gets a shard every few epochs and an epoch may leave a stream empty-handed (it moves to the next).
    """
    order = epoch_order(seed, source, epoch, n)
    if n >= streams:
        return list(order[index::streams])
    # Shard j of the epoch goes to stream (start + j) % streams; with n < streams at most one j is this
    # stream's, found directly: scanning all n per stream made planning every stream's epoch O(streams x n).
    j = (index - (epoch * n) % streams) % streams
    return [order[j]] if j < n else []


def to_ranges(values) -> list[list[int]]:
    """Sorted ints as inclusive [first, last] runs: item sets stay small in JSON."""
    out = []
    for v in sorted(values):
        if out and v == out[-1][1] + 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return out


def from_ranges(ranges) -> set[int]:
    return {v for a, b in ranges for v in range(a, b + 1)}


def modality_of(source: str) -> str:
    """The modality of a cursor source key ("pair" or "pair/coco" -> "pair")."""
    return source.split("/", 1)[0]


def shard_key(epoch: int, shard: int) -> str:
    return f"{epoch}:{shard}"


def parse_key(key: str) -> tuple[int, int]:
    e, s = key.split(":")
    return int(e), int(s)


@dataclass
class StreamState:
    """Where one stream of one source stands (see the module docstring)."""

    streams: int                   # S of the plan this stream follows for fresh epochs
    index: int                     # its index in that plan
    fresh_epoch: int = 0           # its shares of this epoch and later are untouched
    todo: list = field(default_factory=list)     # [[epoch, shard], ...] owned, not yet opened, in read order
    head: list | None = None       # [epoch, shard, next ordinal to read]
    done: dict = field(default_factory=dict)     # "epoch:shard" -> yielded ordinals, for every unfinished
                                                 # shard
    buffer: list = field(default_factory=list)   # [[epoch, shard, ordinal], ...] in buffer order
    draws: int = 0                 # shuffle RNG counter

    def to_json(self) -> dict:
        return {"plan": [self.streams, self.index], "fresh_epoch": self.fresh_epoch,
                "todo": [list(t) for t in self.todo], "head": list(self.head) if self.head else None,
                "open": {k: to_ranges(v) for k, v in self.done.items()},
                "buffer": [list(b) for b in self.buffer], "draws": self.draws}

    @classmethod
    def from_json(cls, d: dict) -> StreamState:
        return cls(streams=d["plan"][0], index=d["plan"][1], fresh_epoch=d["fresh_epoch"],
                   todo=[list(t) for t in d["todo"]], head=list(d["head"]) if d["head"] else None,
                   done={k: from_ranges(v) for k, v in d["open"].items()},
                   buffer=[list(b) for b in d["buffer"]], draws=d["draws"])


def epochs_view(streams: list[StreamState], seed: int, source: str, n: int) -> dict:
    """The rank-independent view: {"fresh_from": F, "epochs": {e: {"order_seed", "finished", "partial"}}}.

    Epochs below the lowest listed one are complete; epochs from F on are untouched.
    """
    return view_from_parts([view_part(streams)], seed, source, n)


def view_part(streams: list[StreamState]) -> dict:
    """What some streams (one rank's) contribute to the per-epoch view: each stream's plan and fresh epoch,
    and the shards they own with the ordinals yielded of them. Its size is O(the shards these streams own):
    no shuffle buffer, so rank 0 can gather every rank's part at save and build the view without every
    rank's whole cursor (``view_from_parts``)."""
    remaining: dict[str, dict[str, list]] = {}
    for st in streams:
        for key, done in st.done.items():
            e, s = parse_key(key)
            remaining.setdefault(str(e), {})[str(s)] = to_ranges(done)
        for e, s in st.todo + ([st.head[:2]] if st.head else []):
            remaining.setdefault(str(e), {}).setdefault(str(s), [])
    return {"plans": [[st.streams, st.index, st.fresh_epoch] for st in streams], "remaining": remaining}


def view_from_parts(parts: list[dict], seed: int, source: str, n: int) -> dict:
    """The per-epoch view (see ``epochs_view``) from the ``view_part`` of every rank's streams."""
    plans = [plan for part in parts for plan in part["plans"]]
    fresh_from = max(fresh for _, _, fresh in plans)
    remaining: dict[int, dict[int, set]] = {}
    for part in parts:
        for e, shards in part["remaining"].items():
            for s, ranges in shards.items():
                remaining.setdefault(int(e), {}).setdefault(int(s), set()).update(from_ranges(ranges))
    for streams, index, fresh in plans:  # a stream behind the others still owes its share of those epochs
        for e in range(fresh, fresh_from):
            for s in planned_share(seed, source, e, n, streams, index):
                remaining.setdefault(e, {}).setdefault(s, set())
    epochs = {}
    for e in sorted(remaining):
        rem = remaining[e]
        epochs[str(e)] = {"order_seed": order_seed(seed, source, e),
                          "finished": sorted(set(range(n)) - set(rem)),
                          "partial": {str(s): to_ranges(d) for s, d in sorted(rem.items()) if d}}
    return {"fresh_from": fresh_from, "epochs": epochs}


def redistribute(view: dict, seed: int, source: str, n: int, streams: int) -> list[StreamState]:
    """New stream states for ``streams`` streams that together read exactly what the view says remains."""
    out = [StreamState(streams=streams, index=i, fresh_epoch=view["fresh_from"]) for i in range(streams)]
    turn = 0
    for e in sorted(view["epochs"], key=int):
        ep = view["epochs"][e]
        finished = set(ep["finished"])
        partial = {int(s): from_ranges(r) for s, r in ep["partial"].items()}
        for s in epoch_order(seed, source, int(e), n):
            if s in finished:
                continue
            st = out[turn % streams]  # round-robin, carried across epochs, keeps stream loads even
            st.todo.append([int(e), s])
            if s in partial:
                st.done[shard_key(int(e), s)] = partial[s]
            turn += 1
    return out


def fresh_streams(streams: int, indices) -> dict[int, StreamState]:
    return {i: StreamState(streams=streams, index=i) for i in indices}


def merge_states(states: list[dict]) -> dict:
    """Combine the state_dict() of every rank into one rank-independent cursor (idempotent)."""
    if isinstance(states, dict):
        states = [states]
    if not states:
        raise ValueError("merge_states needs at least one state")
    first = states[0]
    for st in states:
        if st.get("version") != VERSION:
            raise ValueError(f"data cursor version {st.get('version')!r} is not {VERSION}")
        for k in ("world_size", "num_workers", "seed"):
            if st[k] != first[k]:
                raise ValueError(f"data cursors disagree on {k}: {st[k]} vs {first[k]}")
    out = {k: copy.deepcopy(v) for k, v in first.items() if k not in ("sources", "mix")}
    out["mix"] = {}
    for modality, mix in first.get("mix", {}).items():
        out["mix"][modality] = {k: copy.deepcopy(v) for k, v in mix.items() if k != "streams"}
        out["mix"][modality]["streams"] = {}
        for st in states:
            out["mix"][modality]["streams"].update(copy.deepcopy(st.get("mix", {}).get(modality, {})
                                                                 .get("streams", {})))
    out["sources"] = {}
    for name in first["sources"]:
        src = {k: v for k, v in first["sources"][name].items()
               if k not in ("streams", "fresh_from", "epochs")}
        src["streams"] = {}
        for st in states:
            src["streams"].update(copy.deepcopy(st["sources"][name]["streams"]))
        _add_view(src, name, first)
        out["sources"][name] = src
    return out


def _add_view(src: dict, name: str, state: dict) -> None:
    expected = state["world_size"] * max(1, state["num_workers"])
    plans = {tuple(s["plan"]) for s in src["streams"].values()}
    if len(src["streams"]) == expected and len({p[0] for p in plans}) == 1:
        view = epochs_view([StreamState.from_json(s) for s in src["streams"].values()], state["seed"], name,
                           src["num_shards"])
        src.update(view)


def is_complete(src: dict, state: dict) -> bool:
    return len(src["streams"]) == state["world_size"] * max(1, state["num_workers"])


# ----- the elastic view: what a resume at another world size reads, O(shards) -------------------------------
def rank_view_part(state: dict) -> dict:
    """One rank's contribution to the elastic view, from its ``state_dict()``: per corpus its streams'
    ``view_part`` (no shuffle buffers), per modality the picks its streams made. Rank 0 gathers these at save
    (a few KB to a few hundred per rank, where a whole state is ~0.6 MB at xl's data settings)."""
    meta = {k: v for k, v in state.items() if k not in ("sources", "mix")}
    sources = {}
    for name, src in state.get("sources", {}).items():
        sources[name] = {**{k: v for k, v in src.items() if k not in ("streams", "fresh_from", "epochs")},
                         "part": view_part([StreamState.from_json(s) for s in src["streams"].values()])}
    mix = {modality: {**{k: v for k, v in m.items() if k != "streams"},
                      "picks": sum(s["picks"] for s in m.get("streams", {}).values())}
           for modality, m in state.get("mix", {}).items()}
    return {"meta": meta, "sources": sources, "mix": mix}


def elastic_view(parts: list[dict]) -> dict:
    """The cursor another world size resumes from (``loader.build_loader(state=...)``), built from every
    rank's ``rank_view_part``: the per-epoch view of each corpus and each modality's weights and picks so
    far, without any stream's state. O(shards) whatever the world size."""
    first = parts[0]
    out = {**copy.deepcopy(first["meta"]), "sources": {}, "mix": {}}
    for name, src in first["sources"].items():
        mine = [p["sources"][name]["part"] for p in parts]
        expected = out["world_size"] * max(1, out["num_workers"])
        if sum(len(m["plans"]) for m in mine) != expected:
            raise ValueError(f"data cursor of source {name}: the ranks' parts hold "
                             f"{sum(len(m['plans']) for m in mine)} of the {expected} streams")
        view = view_from_parts(mine, out["seed"], name, src["num_shards"])
        out["sources"][name] = {**{k: v for k, v in src.items() if k != "part"}, "streams": {}, **view}
    for modality, mix in first["mix"].items():
        picks = sum(p["mix"][modality]["picks"] for p in parts)
        out["mix"][modality] = {**{k: v for k, v in mix.items() if k != "picks"}, "streams": {},
                                "base_picks": mix.get("base_picks", 0) + picks}
    return out
