"""A CMCL hard negative is never the caption itself as the model reads it (seq_len tokens)."""

from __future__ import annotations

import numpy as np

from data_pipeline import batch
from data_pipeline.batch import BatchSpec, _contrast_fields
from data_pipeline.rewrite import Rewrite


class _Tokenizer:
    """One id per word, cut at seq_len: what TextTokenizer.encode does, minus the word pieces."""

    pad_id = 0
    in_vocabulary = None

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, text: str, seq_len: int) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab) + 1) for w in text.split()][:seq_len]


class _Enc:
    def __init__(self, ids):
        self.ids = ids


def test_a_word_swapped_past_seq_len_gives_no_negative(monkeypatch):
    """The rewrite swaps the caption's last word, beyond the 4 tokens the model reads: the row gets kind -1
    (CMCL drops it) instead of the caption labelled as its own hard negative; a swap inside the window is
    kept as a word-level negative."""
    tok, spec = _Tokenizer(), BatchSpec(seq_len=4, image_size=32, patch_size=8, seed=0, mlm_probability=0.15,
                                        mim_mask_ratio=0.5)
    captions = ["a red square at the top", "a blue circle at the bottom"]
    swaps = {captions[0]: (5, "left"), captions[1]: (1, "yellow")}  # word index -> new word

    def rewrite(text, rng, **kwargs):
        at, new = swaps[text]
        words = text.split()
        old, words[at] = words[at], new
        return Rewrite(" ".join(words), "word:colour", (0, 0), old, new)

    monkeypatch.setattr(batch, "hard_negative", rewrite)
    chosen = [(np.random.default_rng(i), c, c) for i, c in enumerate(captions)]
    encs = [_Enc(tok.encode(c, spec.seq_len)) for c in captions]
    items = [{"image_id": i} for i in range(2)]
    out = _contrast_fields(encs, chosen, [[], []], items, tok, spec)
    assert out["neg_kind"].tolist() == [-1, 0]
    assert out["neg_input_ids"][1].tolist() != encs[1].ids  # the kept negative differs where the model reads
