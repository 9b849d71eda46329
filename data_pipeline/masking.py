"""Masking for MLM (whole-word / whole-phrase, 80/10/10) and MIM (a fixed share of patches), per-sample
RNG."""

from __future__ import annotations

import zlib

import numpy as np

IGNORE = -100
_SOURCE_CODE = {"text": 1, "image": 2, "pair": 3, "eval": 4}


def sample_rng(seed: int, source: str, epoch: int, shard: int, item: int,
               salt: int = 0) -> np.random.Generator:
    """An RNG owned by one sample in one epoch: masks and rewrites do not depend on order, workers or
    resume."""
    return np.random.default_rng([seed, _SOURCE_CODE.get(source, zlib.crc32(source.encode())), epoch, shard,
                                  item, salt])


def mask_units(word_ids: list[int], offsets: list[tuple[int, int]] | None = None,
               spans: list[tuple[int, int]] | None = None) -> list[list[int]]:
    """Token positions grouped into masking units: one per phrase span (when given), else one per word."""
    units, by_word = [], {}
    in_phrase = set()
    if spans and offsets:
        for start, end in spans:
            unit = [i for i, w in enumerate(word_ids) if w >= 0 and offsets[i][0] >= start
                    and offsets[i][1] <= end]
            if unit:
                units.append(unit)
                in_phrase.update(unit)
    for i, w in enumerate(word_ids):
        if w >= 0 and i not in in_phrase:
            by_word.setdefault(w, []).append(i)
    return units + list(by_word.values())


def mlm_mask(ids: list[int], units: list[list[int]], rng: np.random.Generator, probability: float,
             mask_id: int, vocab_size: int, special_ids) -> tuple[list[int], list[int]]:
    """(masked ids, labels): whole units are chosen until ``probability`` of the maskable tokens are covered;
    each chosen token becomes [MASK] (80%), a random token (10%) or stays (10%)."""
    n_tokens = sum(len(u) for u in units)
    masked, labels = list(ids), [IGNORE] * len(ids)
    if n_tokens == 0:
        return masked, labels
    target = max(1, round(probability * n_tokens))
    chosen = 0

    def mask(unit: list[int]) -> None:
        for pos in unit:
            labels[pos] = ids[pos]
            roll = rng.random()
            if roll < 0.8:
                masked[pos] = mask_id
            elif roll < 0.9:
                masked[pos] = _random_token(rng, vocab_size, special_ids)

    for u in rng.permutation(len(units)):
        if chosen >= target:
            break
        if chosen + len(units[u]) > target:
            continue  # a unit that overshoots is passed over, so long phrases do not eat the whole budget
        mask(units[u])
        chosen += len(units[u])
    if chosen == 0:
        # Every unit is longer than the budget (a long phrase in a short text; a tokenizer that marks no word
        # boundaries, whose whole text is one "word"): single tokens, or the first unit drawn took the whole
        # text (63 of 64 tokens labelled) and masking overshot the rate by far.
        tokens = [pos for unit in units for pos in unit]
        for i in rng.permutation(len(tokens))[:target]:
            mask([tokens[i]])
    return masked, labels


def _random_token(rng: np.random.Generator, vocab_size: int, special_ids) -> int:
    while True:
        tok = int(rng.integers(vocab_size))
        if tok not in special_ids:
            return tok


def patch_mask(n_patches: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """(N,) bool with exactly round(ratio * N) patches masked (True)."""
    mask = np.zeros(n_patches, dtype=bool)
    mask[rng.permutation(n_patches)[:round(ratio * n_patches)]] = True
    return mask
