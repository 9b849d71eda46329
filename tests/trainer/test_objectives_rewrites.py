"""The CMCL hard negatives as the objectives receive them: each rewrite in a pair batch changes exactly its
concept.

data_pipeline's own tests cover the rewrite functions on strings; here the batch that PretrainObjectives reads
(neg_input_ids, neg_kind, image_ids, pos_input_ids) is checked token by token against its caption.
"""

from __future__ import annotations

import re

import pytest

from data_pipeline import DataConfig, SourceConfig, build_loader, load_tokenizer, write_synthetic_dataset
from data_pipeline.rewrite import COLOURS, KINDS, NUMBERS_PLURAL, OBJECTS, RELATIONS
from data_pipeline.synthetic import SHAPES

# The word groups a word-level rewrite swaps within: a changed word and its replacement share one group.
GROUPS = [set(COLOURS), set(NUMBERS_PLURAL), {o[0] for o in OBJECTS}, {o[1] for o in OBJECTS},
          *[set(g) for g in RELATIONS]]


@pytest.fixture(scope="module")
def pair_batches(tmp_path_factory):
    root = tmp_path_factory.mktemp("rewrites")
    urls = write_synthetic_dataset(str(root), n_pairs=96, n_text=0, n_images=0, n_eval=0,
                                   samples_per_shard=48, image_size=32)
    tok = load_tokenizer(urls["tokenizer"])
    cfg = DataConfig(pair=SourceConfig(urls["pair"], 16), tokenizer=urls["tokenizer"], num_workers=0,
                     shuffle_buffer=8)
    loader = iter(build_loader(cfg, rank=0, world_size=1, seq_len=48, image_size=32, patch_size=8))
    return tok, [next(loader)["pair"] for _ in range(6)]


def _rows(tok, pair):
    """Per row: (caption words, negative words, extra-positive words, kind, image id)."""
    words = lambda key, i: re.findall(r"[a-z0-9]+", tok.decode(pair[key][i]))
    for i in range(pair["input_ids"].shape[0]):
        kind = int(pair["neg_kind"][i])
        yield (words("input_ids", i), words("neg_input_ids", i), words("pos_input_ids", i),
               KINDS[kind] if kind >= 0 else None, int(pair["image_ids"][i]))


def _differing_run(a: list[str], b: list[str]) -> tuple[list[str], list[str]]:
    """The middle parts of a and b left once their common prefix and suffix are removed."""
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    s = 0
    while s < min(len(a), len(b)) - p and a[-1 - s] == b[-1 - s]:
        s += 1
    return a[p:len(a) - s], b[p:len(b) - s]


def test_every_kind_of_rewrite_occurs(pair_batches):
    tok, batches = pair_batches
    kinds = {k for pair in batches for *_, k, _ in _rows(tok, pair)}
    assert {"word", "phrase", "sentence"} <= kinds


def test_word_rewrites_swap_one_word_within_its_class(pair_batches):
    tok, batches = pair_batches
    seen = shapes_swapped = 0
    for pair in batches:
        assert not bool((pair["neg_input_ids"] == tok.unk_id).any())  # no negative given away by an [UNK]
        for cap, neg, _, kind, _ in _rows(tok, pair):
            if kind != "word":
                continue
            seen += 1
            assert len(cap) == len(neg)
            changed = [(a, b) for a, b in zip(cap, neg) if a != b]
            assert len(changed) == 1, (cap, neg)
            old, new = changed[0]
            assert any(old in g and new in g for g in GROUPS), (old, new)
            # only words the corpus uses: a shape becomes another shape of the synthetic world, never one of
            # the lexicon's 19 other objects (a "dog" would be told apart by the word alone)
            if old.rstrip("s") in SHAPES:
                shapes_swapped += 1
                assert new.rstrip("s") in SHAPES, (old, new)
    assert seen > 0 and shapes_swapped > 0


def test_phrase_rewrites_swap_one_phrase_for_another_images_phrase(pair_batches):
    tok, batches = pair_batches
    seen = 0
    for pair in batches:
        rows = list(_rows(tok, pair))
        for cap, neg, _, kind, image in rows:
            if kind != "phrase":
                continue
            seen += 1
            old, new = _differing_run(cap, neg)
            assert new and new != old
            donors = [" ".join(c) for c, _, _, _, other in rows if other != image]
            assert any(" ".join(new) in d for d in donors), (new, donors)  # borrowed from another image
    assert seen > 0


def test_sentence_rewrites_are_another_images_caption(pair_batches):
    tok, batches = pair_batches
    seen = 0
    for pair in batches:
        rows = list(_rows(tok, pair))
        for cap, neg, _, kind, image in rows:
            if kind != "sentence":
                continue
            seen += 1
            assert neg != cap
            assert any(neg == c for c, _, _, _, other in rows if other != image)
    assert seen > 0


def test_no_rewrite_is_marked_and_extra_positives_differ_from_the_caption(pair_batches):
    """neg_kind = -1 rows carry the caption itself (CMCL must drop them); other rows are true rewrites."""
    tok, batches = pair_batches
    for pair in batches:
        for cap, neg, pos, kind, _ in _rows(tok, pair):
            assert (neg == cap) == (kind is None)
            assert pos != cap  # the synthetic world gives every image several distinct captions
