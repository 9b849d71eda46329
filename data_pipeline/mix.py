"""Which corpus each sample of a modality comes from: weighted, deterministic per stream, held in the cursor.

Every stream (rank x worker) of a modality runs its own smooth weighted round robin over the modality's
corpora: each pick adds every corpus's normalised weight to its credit and takes the corpus with the most
credit, which then pays 1. Over any window of n picks a corpus's count stays within about one sample of weight
x n, so small batches already carry the configured shares, and the whole state is a credit per corpus and a
pick counter, which the cursor stores (an exact resume continues the same picks). The starting credits are
drawn from (seed, modality, stream), so streams do not all start on the same corpus.
"""

from __future__ import annotations

import hashlib
import logging

log = logging.getLogger("unimo.data")


def normalised(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {k: w / total for k, w in weights.items()}


def _phase(seed: int, modality: str, streams: int, index: int, key: str) -> float:
    digest = hashlib.blake2b(f"{seed}/{modality}/mix/{streams}/{index}/{key}".encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def fresh_mix(seed: int, modality: str, streams: int, index: int, weights: dict[str, float]) -> dict:
    """The mix state of a stream that has not picked yet."""
    w = normalised(weights)
    return {"credit": {k: _phase(seed, modality, streams, index, k) * w[k] for k in sorted(w)}, "picks": 0}


def reweighted(state: dict, weights: dict[str, float]) -> dict:
    """A saved mix state for other weights or corpora: kept corpora keep their credit, new ones start at 0."""
    credit = {k: float(state["credit"].get(k, 0.0)) for k in sorted(weights)}
    return {"credit": credit, "picks": state["picks"]}


class Mixer:
    """Picks the corpus of each next sample of one modality on one stream (see the module docstring)."""

    def __init__(self, weights: dict[str, float], state: dict):
        self._w = normalised(weights)
        self._keys = sorted(self._w)  # ties go to the first key: the order must not depend on dict order
        self.state = {"credit": {k: float(state["credit"].get(k, 0.0)) for k in self._keys},
                      "picks": int(state["picks"])}

    def pick(self) -> str:
        credit = self.state["credit"]
        best = None
        for k in self._keys:
            credit[k] += self._w[k]
            if best is None or credit[k] > credit[best]:
                best = k
        credit[best] -= 1.0
        self.state["picks"] += 1
        return best

    def snapshot(self) -> dict:
        return {"credit": dict(self.state["credit"]), "picks": self.state["picks"]}


def total_picks(saved: dict) -> int:
    """Picks of a saved modality mix since the run began (streams restart their counters on an elastic
    resume)."""
    return saved.get("base_picks", 0) + sum(s["picks"] for s in saved.get("streams", {}).values())


def weights_change(modality: str, saved: dict | None, weights: dict[str, float]) -> list[dict]:
    """The modality's weight history for the cursor; logs when the configured weights differ from the saved
    ones.

    Each entry is {"weights", "from_picks"}: the weights in force from that many picks (summed over
    streams)."""
    if not saved:
        return [{"weights": dict(weights), "from_picks": 0}]
    history = [dict(h) for h in saved.get("history", [])]
    before = history[-1]["weights"] if history else saved.get("weights", {})
    if before == dict(weights):
        return history or [{"weights": dict(weights), "from_picks": 0}]
    picks = total_picks(saved)
    added, removed = sorted(set(weights) - set(before)), sorted(set(before) - set(weights))
    log.warning("data.%s: corpus weights changed on resume after %d samples: %s -> %s%s%s", modality, picks,
                before, dict(weights), f"; added {added} (start at epoch 0)" if added else "",
                f"; removed {removed} (their cursor is dropped)" if removed else "")
    return history + [{"weights": dict(weights), "from_picks": picks}]
