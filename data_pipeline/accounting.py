"""Per-corpus accounting for the tracker: counters in a fixed order, then shares and weights as metrics.

Every rank all-reduces one vector of counters, so the names must be the same on every rank: they follow the
configured corpora, not what a rank happened to see. Per corpus ``corpus/<key>/samples`` (delivered),
``corpus/<key>/epoch`` (the highest epoch a sample came from; after the sum over ranks divided by the world
size, so the mean over ranks) and ``corpus/<key>/skipped_<reason>``; then ``share`` (of its modality's samples
so far) next to ``weight`` (configured, normalised), so a corpus that delivers less than its weight shows it.
"""

from __future__ import annotations

from .cursor import modality_of


def corpus_counters(stats: dict, keys: list[str], reasons) -> dict[str, float]:
    """The loader's per-corpus counters (``MixedLoader.stats()``) for ``keys``, every name always present."""
    out = {}
    for key in keys:
        out[f"corpus/{key}/samples"] = float(stats.get(f"corpus/{key}/samples", 0))
        out[f"corpus/{key}/epoch"] = float(stats.get(f"corpus/{key}/epoch", 0))
        for reason in reasons:
            out[f"corpus/{key}/skipped_{reason}"] = float(stats.get(f"corpus/{key}/skipped_{reason}", 0))
    return out


def corpus_metrics(summed: dict[str, float], world_size: int, weights: dict[str, float],
                   prefix: str = "pipeline/") -> dict[str, float]:
    """From counters summed over ranks: the mean epoch over ranks, each corpus's realised share and its
    weight."""
    out = {}
    totals: dict[str, float] = {}
    for key in weights:
        totals[modality_of(key)] = (totals.get(modality_of(key), 0.0)
                                    + summed.get(f"{prefix}corpus/{key}/samples", 0))
    for key, weight in weights.items():
        samples = summed.get(f"{prefix}corpus/{key}/samples", 0.0)
        out[f"{prefix}corpus/{key}/epoch"] = summed.get(f"{prefix}corpus/{key}/epoch", 0.0) / world_size
        out[f"{prefix}corpus/{key}/share"] = (samples / totals[modality_of(key)] if totals[modality_of(key)]
                                              else 0.0)
        out[f"{prefix}corpus/{key}/weight"] = weight
    return out


def weight_params(data_cfg) -> dict[str, str]:
    """The configured corpus weights as run params: data.weights.<modality>.<corpus> (normalised)."""
    out = {}
    for modality in data_cfg.active_sources():
        corpora = data_cfg.corpora(modality)
        total = sum(c.weight for c in corpora)
        out.update({f"data.weights.{modality}.{c.name}": f"{c.weight / total:.6g}" for c in corpora})
    return out
