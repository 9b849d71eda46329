"""Text rewriting (CMCL hard negatives), concepts, masking and the tokenizer."""

import re

import numpy as np
import pytest

from data_pipeline.concepts import locate_phrases, phrase_spans, rule_phrases
from data_pipeline.masking import IGNORE, mask_units, mlm_mask, patch_mask
from data_pipeline.rewrite import (
    COLOURS,
    NUMBERS_PLURAL,
    OBJECTS,
    RELATIONS,
    hard_negative,
    phrase_rewrite,
    sentence_rewrite,
    word_candidates,
    word_rewrite,
)
from data_pipeline.tokenizer import load_tokenizer, train_tokenizer

CAPTION = "Two small red circles on the left and a blue square at the top"


def _words(text):
    return re.findall(r"[A-Za-z]+", text)


def _changed(a, b):
    wa, wb = _words(a), _words(b)
    assert len(wa) == len(wb)
    return [(x, y) for x, y in zip(wa, wb) if x != y]


@pytest.mark.parametrize("cls,lexicon", [
    ("colour", set(COLOURS)), ("number", set(NUMBERS_PLURAL)),
    ("object", {o[1] for o in OBJECTS} | {o[0] for o in OBJECTS}),
    ("relation", {w for g in RELATIONS for w in g})])
def test_word_rewrite_changes_exactly_one_word_of_its_class(cls, lexicon):
    for seed in range(20):
        out = word_rewrite(CAPTION, np.random.default_rng(seed), classes=(cls,))
        assert out.kind == f"word:{cls}"
        (old, new), = _changed(CAPTION, out.text)
        assert old.lower() in lexicon and new.lower() in lexicon and old != new
        assert old[0].isupper() == new[0].isupper()  # "Two" stays capitalised


def test_object_swap_keeps_grammatical_number():
    plural, singular = {o[1] for o in OBJECTS}, {o[0] for o in OBJECTS}
    for seed in range(20):
        out = word_rewrite("three green triangles", np.random.default_rng(seed), classes=("object",))
        assert out.new in plural
        out = word_rewrite("a green triangle", np.random.default_rng(seed), classes=("object",))
        assert out.new in singular


def test_word_rewrite_is_deterministic_per_seed():
    a = [word_rewrite(CAPTION, np.random.default_rng(s)).text for s in range(10)]
    b = [word_rewrite(CAPTION, np.random.default_rng(s)).text for s in range(10)]
    assert a == b and len(set(a)) > 3


def test_phrase_rewrite_replaces_one_concept_and_nothing_else():
    spans = phrase_spans(CAPTION, ["two small red circles", "a blue square", "the left", "the top"])
    donors = ["three large green triangles", "the bottom", "a purple circle"]
    for seed in range(10):
        out = phrase_rewrite(CAPTION, spans, donors, np.random.default_rng(seed))
        start, end = out.span
        assert (start, end) in spans and out.new in donors
        assert out.text == CAPTION[:start] + out.new + CAPTION[end:]
        if out.old in ("the left", "the top"):
            assert out.new == "the bottom"  # a place is swapped for a place, a thing for a thing


def test_sentence_rewrite_takes_another_caption():
    out = sentence_rewrite(CAPTION, [CAPTION, "a yellow star"], np.random.default_rng(0))
    assert out.text == "a yellow star" and out.kind == "sentence"
    assert sentence_rewrite(CAPTION, [CAPTION], np.random.default_rng(0)) is None


def test_hard_negative_falls_back_when_a_kind_cannot_apply():
    rng = np.random.default_rng(0)
    out = hard_negative("nothing to swap here", rng, spans=[], donors=[], others=["a red circle"],
                        weights=(1, 0, 0))
    assert out.kind == "sentence"
    assert hard_negative("plain", rng, spans=[], donors=[], others=[]) is None


def test_concepts_from_metadata_or_the_stopword_rule():
    text = "Two small red circles on the left, and a blue square."
    assert [text[a:b] for a, b in rule_phrases(text)] == ["Two small red circles", "left", "blue square"]
    assert [text[a:b] for a, b in locate_phrases(text, ["the left", "A blue square", "absent"])] == \
        ["the left", "a blue square"]
    assert phrase_spans(text, ["absent"]) == rule_phrases(text)


def test_mlm_masks_whole_units_at_the_rate(local_data):
    tok = load_tokenizer(local_data["tokenizer"])
    enc = tok.encode_words(CAPTION, 32)
    spans = phrase_spans(CAPTION, ["two small red circles"])
    units = mask_units(enc.word_ids, enc.offsets, spans)
    n_tokens = sum(len(u) for u in units)
    kinds = {"mask": 0, "same": 0, "other": 0}
    for seed in range(300):
        masked, labels = mlm_mask(enc.ids, units, np.random.default_rng(seed), 0.15, tok.mask_id,
                                  tok.vocab_size, tok.special_ids)
        chosen = {i for i, lab in enumerate(labels) if lab != IGNORE}
        for unit in units:  # a unit is masked whole or not at all
            assert set(unit) <= chosen or not set(unit) & chosen
        assert 1 <= len(chosen) <= round(0.15 * n_tokens) + 4
        assert labels[0] == IGNORE and labels[len(enc.ids) - 1] == IGNORE  # [CLS], [SEP]
        for i in chosen:
            assert labels[i] == enc.ids[i]
            kinds["mask" if masked[i] == tok.mask_id else "same" if masked[i] == enc.ids[i] else "other"] += 1
    total = sum(kinds.values())
    assert 0.7 < kinds["mask"] / total < 0.9 and kinds["other"] > 0 and kinds["same"] > 0


def test_patch_mask_masks_the_exact_share():
    m = patch_mask(64, 0.5, np.random.default_rng(0))
    assert m.dtype == bool and m.sum() == 32


def test_tokenizer_specials_truncation_and_s3(s3_server, tmp_path):
    from data_pipeline.tokenizer import save_tokenizer

    tok = train_tokenizer(["a red circle on the left", "two blue squares"] * 5, vocab_size=200)
    path = save_tokenizer(tok, "s3://unimo-test/tok/")
    loaded = load_tokenizer("s3://unimo-test/tok")
    assert path.endswith("tokenizer.json")
    assert (loaded.pad_id, loaded.unk_id, loaded.cls_id, loaded.sep_id, loaded.mask_id) == (0, 1, 2, 3, 4)
    ids = loaded.encode("two blue squares on the left", 5)
    assert len(ids) == 5 and ids[0] == loaded.cls_id and ids[-1] == loaded.sep_id
    assert loaded.decode(loaded.encode("two blue squares", 16)) == "two blue squares"


def test_in_vocabulary_means_one_token_as_a_word_of_a_sentence():
    """What a word-level rewrite may swap in: a word its corpus used often enough to be one token, in
    WordPiece (``word``) and in byte-level BPE (``Ġword``, RoBERTa's kind); not one spelled by pieces."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from data_pipeline.tokenizer import TextTokenizer

    corpus = ["a red circle and two blue squares", "the green triangle is small", "a dog"] * 40
    wordpiece = train_tokenizer(corpus, vocab_size=120)
    assert wordpiece.in_vocabulary("circle") and wordpiece.in_vocabulary("squares")
    assert not wordpiece.in_vocabulary("horses")  # spelled h ##o ##r ..., never a word of the corpus

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<unk>", "<s>", "</s>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    roberta_like = TextTokenizer(bpe)
    assert bpe.encode(" circle").tokens == ["\u0120circle"]
    assert roberta_like.in_vocabulary("circle") and roberta_like.in_vocabulary("dog")
    assert not roberta_like.in_vocabulary("horses")


def test_a_book_is_packed_whole(local_data):
    """A text sample is a whole document, and `unimo data shards` writes each .txt file (a book: ~500k
    characters) as one: every token of it is packed, in pieces the tokenizer takes at once. Documents used to
    be cut at 200,000 characters before tokenizing, silently: most of each book was lost."""
    from data_pipeline.samples import TOKENIZE_CHARS, Packer, document_text, text_pieces

    tok = load_tokenizer(local_data["tokenizer"])
    book = " ".join(f"chapter {i}: a red circle is next to a blue square." for i in range(10_000))
    assert len(book) > 2.5 * TOKENIZE_CHARS
    assert document_text({"txt": book.encode()}) == book
    pieces = list(text_pieces(book, TOKENIZE_CHARS))
    assert len(pieces) == 3 and "".join(pieces) == book and all(len(p) <= TOKENIZE_CHARS for p in pieces)
    assert all(p.endswith(" ") for p in pieces[:-1])  # cut between words
    packer = Packer(tok, 128)
    seqs = list(packer.add("book", book)) + list(packer.flush())
    packed = [t for s in seqs for t in s["ids"] if t not in (tok.cls_id, tok.sep_id)]
    assert packed == tok.encode_plain(book).ids  # the whole book, in order
    words = [w for s in seqs for w in s["word_ids"] if w >= 0]
    assert words == sorted(words)  # word ids run on across the pieces: whole-word masking joins no two words


def test_a_tokenizer_json_s_own_truncation_padding_and_specials_in_text_change_nothing(local_data, tmp_path):
    """Settings a tokenizer.json carries for another use (truncation, padding: common in Hub files) used to
    apply here: a 600-token document came out as 128 tokens, a caption padded before its [SEP]. And special
    tokens written in the text ("[SEP]", "[PAD]") became special ids inside a sequence."""
    from tokenizers import Tokenizer

    plain = load_tokenizer(local_data["tokenizer"])
    raw = Tokenizer.from_file(local_data["tokenizer"])
    raw.enable_truncation(128)
    raw.enable_padding(length=40)
    path = tmp_path / "tokenizer.json"
    raw.save(str(path))
    tok = load_tokenizer(str(path))
    doc = " ".join(["a red circle is next to a blue square"] * 80)
    assert tok.encode_plain(doc).ids == plain.encode_plain(doc).ids and len(tok.encode_plain(doc).ids) > 600
    words = tok.encode_words("a red circle", 16)
    assert words.ids[-1] == tok.sep_id and tok.pad_id not in words.ids
    text = tok.encode_plain("a red [MASK] circle [SEP] on the [PAD] left")
    # ordinary tokens (characters this vocabulary lacks are [UNK], as anywhere in a text)
    assert not set(text.ids) & {tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id}
    assert min(text.word_ids) >= 0


def test_word_swaps_never_make_a_negative_that_is_still_true():
    """A hard negative must be false of the image: no swap to a broader concept ("man" -> "person") or a
    synonym ("under" <-> "below")."""
    for caption, still_true in (("a man riding a horse", "person"), ("men near a table", "people"),
                                ("a cat below the table", "under"), ("a cat under the table", "below")):
        swaps = {w for _, _, _, options in word_candidates(caption, ("object", "relation")) for w in options}
        assert swaps and still_true not in swaps, (caption, sorted(swaps))


def test_masking_never_overshoots_the_rate_with_a_long_phrase_or_without_word_boundaries():
    """The first unit drawn used to be taken whatever its length: a 5-token phrase in a 20-token caption
    labelled 5 tokens against a budget of 3, and a tokenizer without word boundaries (the whole text one
    "word") had 63 of 64 tokens labelled."""
    caption = [[0, 1, 2, 3, 4]] + [[i] for i in range(5, 20)]  # a phrase and 15 one-token words
    one_word = [list(range(64))]
    for units, budget in ((caption, 3), (one_word, 10)):
        n = sum(len(u) for u in units)
        for seed in range(50):
            _, labels = mlm_mask(list(range(100, 100 + n)), units, np.random.default_rng(seed), 0.15, 4, 200,
                                 {0, 1, 2, 3, 4})
            assert sum(label != IGNORE for label in labels) == budget, (seed, units is caption)
