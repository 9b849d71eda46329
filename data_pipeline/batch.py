"""Per-source micro-batches: padding, pixel normalisation, MLM/MIM masks, concepts and CMCL rewrites."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .concepts import phrase_spans
from .masking import mask_units, mlm_mask, patch_mask, sample_rng
from .rewrite import KINDS, hard_negative
from .tokenizer import TextTokenizer


@dataclass
class BatchSpec:
    """What shapes and masks a batch gets."""

    seq_len: int
    image_size: int
    patch_size: int
    seed: int
    mlm_probability: float
    mim_mask_ratio: float
    rewrite_weights: tuple = (0.6, 0.2, 0.2)


def pixels_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """(B, 3, H, W) float32 from (3, H, W) uint8 images, normalised per channel as (x/255 - 0.5)/0.5."""
    return torch.from_numpy(np.stack(images)).float().div_(127.5).sub_(1.0)


def _pad(rows: list[list[int]], length: int, value: int) -> torch.Tensor:
    out = np.full((len(rows), length), value, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row[:length]
    return torch.from_numpy(out)


def _text_fields(tok: TextTokenizer, spec: BatchSpec, ids, masked, labels, prefix: str = "") -> dict:
    attn = [[1] * len(r) for r in ids]
    return {f"{prefix}input_ids": _pad(ids, spec.seq_len, tok.pad_id),
            f"{prefix}attention_mask": _pad(attn, spec.seq_len, 0),
            f"{prefix}mlm_input_ids": _pad(masked, spec.seq_len, tok.pad_id),
            f"{prefix}mlm_labels": _pad(labels, spec.seq_len, -100)}


def _mlm(tok: TextTokenizer, spec: BatchSpec, ids, units, rng):
    return mlm_mask(ids, units, rng, spec.mlm_probability, tok.mask_id, tok.vocab_size, tok.special_ids)


def text_batch(refs, items, tok: TextTokenizer, spec: BatchSpec) -> dict:
    ids, masked, labels = [], [], []
    for (epoch, shard, ordinal), item in zip(refs, items):
        rng = sample_rng(spec.seed, "text", epoch, shard, ordinal)
        m, lab = _mlm(tok, spec, item["ids"], mask_units(item["word_ids"]), rng)
        ids.append(item["ids"])
        masked.append(m)
        labels.append(lab)
    out = _text_fields(tok, spec, ids, masked, labels)
    out["epoch"] = torch.tensor([r[0] for r in refs], dtype=torch.long)
    return out


def image_batch(refs, items, spec: BatchSpec) -> dict:
    n = (spec.image_size // spec.patch_size) ** 2
    masks = [patch_mask(n, spec.mim_mask_ratio, sample_rng(spec.seed, "image", e, s, o)) for e, s, o in refs]
    return {"pixels": pixels_tensor([it["pixels"] for it in items]),
            "patch_mask": torch.from_numpy(np.stack(masks)),
            "image_ids": torch.tensor([it["image_id"] for it in items], dtype=torch.long),
            "epoch": torch.tensor([r[0] for r in refs], dtype=torch.long)}


def _phrase_ids(offsets, word_ids, spans) -> list[int]:
    """Per token: 0, or k+1 when the token lies in the k-th concept phrase."""
    out = [0] * len(offsets)
    for k, (start, end) in enumerate(spans):
        for i, (a, b) in enumerate(offsets):
            if word_ids[i] >= 0 and a >= start and b <= end:
                out[i] = k + 1
    return out


def pair_batch(refs, items, tok: TextTokenizer, spec: BatchSpec) -> dict:
    """Pairs: image, one of its captions (masked for MLM), another caption as an extra positive, a rewritten
    hard negative, concept phrase ids per token and the object tags as text."""
    rows = {k: [] for k in ("ids", "masked", "labels", "pos", "neg", "neg_kind", "phrase", "tags")}
    chosen, spans_of = [], []
    for (epoch, shard, ordinal), item in zip(refs, items):
        rng = sample_rng(spec.seed, "pair", epoch, shard, ordinal)
        caps = item["captions"]
        c = int(rng.integers(len(caps)))
        p = (c + 1 + int(rng.integers(len(caps) - 1))) % len(caps) if len(caps) > 1 else c
        chosen.append((rng, caps[c], caps[p]))
        spans_of.append(phrase_spans(caps[c], item["phrases"]))
    for i, ((rng, caption, positive), item) in enumerate(zip(chosen, items)):
        enc = tok.encode_words(caption, spec.seq_len)
        spans = spans_of[i]
        m, lab = _mlm(tok, spec, enc.ids, mask_units(enc.word_ids, enc.offsets, spans), rng)
        neg = _negative(i, caption, spans, chosen, spans_of, items, rng, spec, tok)
        rows["ids"].append(enc.ids)
        rows["masked"].append(m)
        rows["labels"].append(lab)
        rows["pos"].append(tok.encode(positive, spec.seq_len))
        rows["neg"].append(tok.encode(neg.text if neg else caption, spec.seq_len))
        rows["neg_kind"].append(KINDS.index(neg.kind.split(":")[0]) if neg else -1)
        rows["phrase"].append(_phrase_ids(enc.offsets, enc.word_ids, spans))
        rows["tags"].append(tok.encode(" ".join(item["tags"]), spec.seq_len))
    out = _text_fields(tok, spec, rows["ids"], rows["masked"], rows["labels"])
    out["pixels"] = pixels_tensor([it["pixels"] for it in items])
    out["image_ids"] = torch.tensor([it["image_id"] for it in items], dtype=torch.long)
    for name, key in (("pos_", "pos"), ("neg_", "neg"), ("tag_", "tags")):
        out[f"{name}input_ids"] = _pad(rows[key], spec.seq_len, tok.pad_id)
        out[f"{name}attention_mask"] = _pad([[1] * len(r) for r in rows[key]], spec.seq_len, 0)
    out["neg_kind"] = torch.tensor(rows["neg_kind"], dtype=torch.long)  # 0 word, 1 phrase, 2 sentence, -1 none
    out["phrase_ids"] = _pad(rows["phrase"], spec.seq_len, 0)
    out["epoch"] = torch.tensor([r[0] for r in refs], dtype=torch.long)
    return out


def _negative(i, caption, spans, chosen, spans_of, items, rng, spec: BatchSpec, tok: TextTokenizer):
    """A rewrite of caption i; phrase- and sentence-level ones borrow from the other images of the batch;
    word-level ones only swap in words the tokenizer spells without [UNK]."""
    others = [j for j in range(len(items)) if items[j]["image_id"] != items[i]["image_id"]]
    donors = [chosen[j][1][a:b] for j in others for a, b in spans_of[j]]
    return hard_negative(caption, rng, spans=spans, donors=donors, others=[chosen[j][1] for j in others],
                         weights=spec.rewrite_weights, known=lambda w: tok.unk_id not in tok.encode_plain(w).ids)
