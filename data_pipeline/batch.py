"""Per-source micro-batches: padding, pixel normalisation, MLM/MIM masks, concepts and CMCL rewrites."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import get_worker_info

from model.objective_registry import OBJECTIVES

from .concepts import phrase_spans
from .masking import mask_units, mlm_mask, patch_mask, sample_rng
from .rewrite import KINDS, hard_negative
from .tokenizer import TextTokenizer

# The parts of a batch beyond ids, attention masks, pixels and ids of images, by the objective that reads them
# (model/objective_registry.py). Building only what a run's objectives read is most of the per-sample work
# saved: rewriting, concept spans and MLM masks cost more than decoding a small image.
OBJECTIVE_FEATURES = {name: set(o.batch_parts) for name, o in OBJECTIVES.items()}
# Object tags as text: no objective reads them yet, so only a caller that names no objectives gets them.
ALL_FEATURES = frozenset(set().union(*OBJECTIVE_FEATURES.values()) | {"tags"})


def features_for(objectives: Iterable[str] | None) -> frozenset:
    """The batch parts the given objectives read; every part when ``objectives`` is None."""
    if objectives is None:
        return ALL_FEATURES
    unknown = sorted(set(objectives) - set(OBJECTIVE_FEATURES))
    if unknown:
        raise ValueError(f"objectives: unknown {unknown}; known: {sorted(OBJECTIVE_FEATURES)}")
    return frozenset(set().union(*(OBJECTIVE_FEATURES[o] for o in objectives)))


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
    features: frozenset = ALL_FEATURES


def pixels_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """(B, 3, H, W) float32 from (H, W, 3) uint8 images, normalised per channel as (x/255 - 0.5)/0.5.

    The batch is made channels-first while still uint8 (a quarter of the bytes of floats), in one copy;
    measured in the workers, that beat a copy per image and beat reading the transposed uint8 straight into
    the float division (a strided read that the single-threaded kernel does slowly)."""
    chw = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W) uint8
    return _float_like(chw).copy_(chw).div_(127.5).sub_(1.0)


def _float_like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised float32 tensor of ``t``'s shape. In a DataLoader worker it lives in shared memory from
    the start, as torch's default_collate does it: the trip to the training process then copies nothing,
    where copying a batch of pixels into shared memory took a tenth of a worker's time."""
    if get_worker_info() is None:
        return torch.empty(t.shape, dtype=torch.float32)
    storage = torch.UntypedStorage._new_shared(t.numel() * 4)
    return torch.empty(0, dtype=torch.float32).set_(storage, 0, t.shape)


def _pad(rows: list[list[int]], length: int, value: int) -> torch.Tensor:
    out = np.full((len(rows), length), value, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row[:length]
    return torch.from_numpy(out)


def _ids_fields(tok: TextTokenizer, spec: BatchSpec, ids, prefix: str = "") -> dict:
    return {f"{prefix}input_ids": _pad(ids, spec.seq_len, tok.pad_id),
            f"{prefix}attention_mask": _pad([[1] * len(r) for r in ids], spec.seq_len, 0)}


def _mlm_fields(tok: TextTokenizer, spec: BatchSpec, masked, labels) -> dict:
    return {"mlm_input_ids": _pad(masked, spec.seq_len, tok.pad_id),
            "mlm_labels": _pad(labels, spec.seq_len, -100)}


def _mlm(tok: TextTokenizer, spec: BatchSpec, ids, units, rng):
    return mlm_mask(ids, units, rng, spec.mlm_probability, tok.mask_id, tok.vocab_size, tok.special_ids)


# A ref is [epoch, shard, ordinal, corpus key]: the key salts each sample's RNG, so two corpora's samples at
# the same position draw different masks (the one-corpus shorthand's key is the modality: "text", "image",
# "pair").

def _epochs(refs) -> torch.Tensor:
    return torch.tensor([r[0] for r in refs], dtype=torch.long)


def text_batch(refs, items, tok: TextTokenizer, spec: BatchSpec) -> dict:
    ids = [item["ids"] for item in items]
    out = _ids_fields(tok, spec, ids)
    if "text_mlm" in spec.features:
        masks = [_mlm(tok, spec, item["ids"], mask_units(item["word_ids"]),
                      sample_rng(spec.seed, key, e, s, o))
                 for (e, s, o, key), item in zip(refs, items)]
        out.update(_mlm_fields(tok, spec, [m for m, _ in masks], [lab for _, lab in masks]))
    out["epoch"] = _epochs(refs)
    return out


def image_batch(refs, items, spec: BatchSpec) -> dict:
    out = {"pixels": pixels_tensor([it["pixels"] for it in items]),
           "image_ids": torch.tensor([it["image_id"] for it in items], dtype=torch.long),
           "epoch": _epochs(refs)}
    if "patch_mask" in spec.features:
        n = (spec.image_size // spec.patch_size) ** 2
        out["patch_mask"] = torch.from_numpy(np.stack([
            patch_mask(n, spec.mim_mask_ratio, sample_rng(spec.seed, key, e, s, o))
            for e, s, o, key in refs]))
    return out


def _phrase_ids(offsets, word_ids, spans) -> list[int]:
    """Per token: 0, or k+1 when the token lies in the k-th concept phrase."""
    out = [0] * len(offsets)
    for k, (start, end) in enumerate(spans):
        for i, (a, b) in enumerate(offsets):
            if word_ids[i] >= 0 and a >= start and b <= end:
                out[i] = k + 1
    return out


def _choose_captions(refs, items, spec: BatchSpec) -> list[tuple]:
    """Per pair: (its RNG, the caption to train on, another caption of the image as an extra positive)."""
    chosen = []
    for (epoch, shard, ordinal, key), item in zip(refs, items):
        rng = sample_rng(spec.seed, key, epoch, shard, ordinal)
        caps = item["captions"]
        c = int(rng.integers(len(caps)))
        p = (c + 1 + int(rng.integers(len(caps) - 1))) % len(caps) if len(caps) > 1 else c
        chosen.append((rng, caps[c], caps[p]))
    return chosen


def pair_batch(refs, items, tok: TextTokenizer, spec: BatchSpec) -> dict:
    """Pairs: image and one of its captions; as the objectives need them, the caption masked for MLM, another
    caption as an extra positive with a rewritten hard negative (CMCL), concept phrase ids per token, and the
    object tags as text. Each pair's RNG draws its caption, then its MLM mask, then its rewrite."""
    feats = spec.features
    chosen = _choose_captions(refs, items, spec)
    use_spans = bool(feats & {"pair_mlm", "contrast", "phrases"})
    spans_of = [phrase_spans(caption, item["phrases"]) if use_spans else [] for (_, caption, _), item
                in zip(chosen, items)]
    encs = [tok.encode_words(caption, spec.seq_len) for _, caption, _ in chosen]
    out = _ids_fields(tok, spec, [enc.ids for enc in encs])
    out["pixels"] = pixels_tensor([it["pixels"] for it in items])
    out["image_ids"] = torch.tensor([it["image_id"] for it in items], dtype=torch.long)
    if "pair_mlm" in feats:
        masks = [_mlm(tok, spec, enc.ids, mask_units(enc.word_ids, enc.offsets, spans), rng)
                 for enc, spans, (rng, _, _) in zip(encs, spans_of, chosen)]
        out.update(_mlm_fields(tok, spec, [m for m, _ in masks], [lab for _, lab in masks]))
    if "contrast" in feats:
        out.update(_contrast_fields(encs, chosen, spans_of, items, tok, spec))
    if "phrases" in feats:
        out["phrase_ids"] = _pad([_phrase_ids(enc.offsets, enc.word_ids, spans) for enc, spans
                                  in zip(encs, spans_of)], spec.seq_len, 0)
    if "tags" in feats:
        out.update(_ids_fields(tok, spec, [tok.encode(" ".join(it["tags"]), spec.seq_len) for it in items],
                               "tag_"))
    out["epoch"] = _epochs(refs)
    return out


def _contrast_fields(encs, chosen, spans_of, items, tok: TextTokenizer, spec: BatchSpec) -> dict:
    """CMCL: the extra positive and the rewritten hard negative of every caption, and the negative's kind."""
    pos, neg, kinds = [], [], []
    # Texts the batch already encoded are not encoded again: a sole caption is its own positive, and a
    # sentence-level negative (or a failed rewrite) is a caption of the batch.
    encoded = {caption: enc.ids for enc, (_, caption, _) in zip(encs, chosen)}

    def ids_of(text: str) -> list[int]:
        if text not in encoded:
            encoded[text] = tok.encode(text, spec.seq_len)
        return encoded[text]

    image_ids = [it["image_id"] for it in items]
    captions = [caption for _, caption, _ in chosen]
    phrases = [[caption[a:b] for a, b in spans] for caption, spans in zip(captions, spans_of)]
    for i, (rng, caption, positive) in enumerate(chosen):
        # phrase- and sentence-level rewrites borrow from the other images of the batch
        others = [j for j, image in enumerate(image_ids) if image != image_ids[i]]
        rewrite = hard_negative(caption, rng, spans=spans_of[i],
                                donors=[p for j in others for p in phrases[j]],
                                others=[captions[j] for j in others], weights=spec.rewrite_weights,
                                known=tok.in_vocabulary)  # word-level: swap in words the corpus uses
        if rewrite is not None and ids_of(rewrite.text) == ids_of(caption):
            # a swap past the last of seq_len tokens leaves what the model reads unchanged: no negative (CMCL
            # drops rows of kind -1), not the caption itself labelled as its own hard negative
            rewrite = None
        pos.append(ids_of(positive))
        neg.append(ids_of(rewrite.text) if rewrite else ids_of(caption))
        kinds.append(KINDS.index(rewrite.kind.split(":")[0]) if rewrite else -1)
    out = {**_ids_fields(tok, spec, pos, "pos_"), **_ids_fields(tok, spec, neg, "neg_")}
    out["neg_kind"] = torch.tensor(kinds, dtype=torch.long)  # 0 word, 1 phrase, 2 sentence, -1 none
    return out
