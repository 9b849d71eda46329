"""What data a checkpoint was trained on: the tokenizer and each corpus's URLs, recorded at save, checked at
resume.

A checkpoint keeps the tokenizer.json it was trained with (``checkpoint.TOKENIZER``, in its manifest like
every file) and, in trainer_state.json, ``data_identity``: the sha256 of that file and a digest of each
corpus's URLs (credentials and query strings left out). At resume a different tokenizer, or a corpus of the
same name whose URLs changed (the same name now pointing at other shards), is an error naming the checkpoint,
both values and the fix; with ``data.on_change: continue`` it is a warning and the data starts afresh (the
weights and the optimizer are still restored).

What the data cursor already handles by design is not checked here (docs/DATA.md, "Resuming"): corpora added
or removed, weights changed. A checkpoint written before these records (``data_identity`` None) resumes
unchecked, with one line in the log saying so.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from data_pipeline.errors import UserError
from data_pipeline.storage_io import safe_url
from trainer.checkpoint import TOKENIZER

log = logging.getLogger(__name__)


class DataChanged(UserError, ValueError):
    """The tokenizer or a corpus's URLs differ from the checkpoint's, and data.on_change is error (a restart
    meets the same difference: never retried)."""


def sha256_text(text: str) -> str:
    """The sha256 of a tokenizer.json's text as its bytes (UTF-8): the same as the file's."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def corpus_digests(data_cfg: Any) -> dict[str, str]:
    """{corpus key: digest of its URLs} for every configured corpus (e.g. "pair/coco"); the URLs as a set,
    without credentials, so that reordering them or rotating a presigned URL's signature is no change."""
    from data_pipeline.config import SOURCES

    out = {}
    for modality in SOURCES:
        for corpus in data_cfg.corpora(modality):
            urls = corpus.urls if isinstance(corpus.urls, (list, tuple)) else [corpus.urls]
            canonical = json.dumps(sorted({safe_url(u) for u in urls}))
            out[corpus.key] = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    return out


def data_identity(data_cfg: Any, tokenizer_text: str | None) -> dict[str, Any]:
    """What trainer_state.json records: the tokenizer's sha256 (None without one) and the corpora's
    digests."""
    return {"tokenizer_sha256": sha256_text(tokenizer_text) if tokenizer_text is not None else None,
            "corpora": corpus_digests(data_cfg)}


def differences(saved: dict[str, Any], now: dict[str, Any], location: str, tokenizer_path: str) -> list[str]:
    """What changed since the checkpoint, one sentence each; what either side does not know is no
    change."""
    found = []
    before, after = saved.get("tokenizer_sha256"), now.get("tokenizer_sha256")
    if before and after and before != after:
        found.append(f"the tokenizer differs: the checkpoint was trained with tokenizer.json sha256 {before} "
                     f"(a copy is {location}/{TOKENIZER}), data.tokenizer={tokenizer_path} has "
                     f"sha256 {after}")
    for key in sorted(set(saved.get("corpora", {})) & set(now.get("corpora", {}))):
        if saved["corpora"][key] != now["corpora"][key]:
            found.append(f"corpus {key} lists other URLs than when the checkpoint was saved (URL digest "
                         f"{saved['corpora'][key]}, now {now['corpora'][key]})")
    return found


def data_changed(saved: dict[str, Any] | None, now: dict[str, Any], location: str, data_cfg: Any,
                 rank: int) -> bool:
    """Whether the data must start afresh: raises DataChanged for a change under data.on_change=error, logs
    it and returns True under continue; False when nothing changed or the checkpoint predates the records."""
    if saved is None:
        if rank == 0:
            log.info("checkpoint %s was saved before unimo recorded the tokenizer and the data sources: they "
                     "are not checked on this resume", location)
        return False
    changes = differences(saved, now, location, data_cfg.tokenizer)
    if not changes:
        return False
    if data_cfg.on_change == "error":
        raise DataChanged(f"cannot resume from checkpoint {location}: " + "; ".join(changes)
                          + ". Resume with the original tokenizer and data sources, or set "
                          "data.on_change=continue to go on with these from a fresh data cursor (the weights "
                          "and the optimizer are restored; the data starts over)")
    if rank == 0:
        log.warning("resuming from checkpoint %s with other data (data.on_change=continue): %s; the data "
                    "cursor starts afresh, the weights and the optimizer are restored", location,
                    "; ".join(changes))
    return True
