"""Tokenizer wrapper over Hugging Face `tokenizers`: loading (local or s3://), training, [CLS] ... [SEP]
encoding."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from .storage_io import (DataReadError, DataSourceError, RetryPolicy, call_with_retries, default_policy,
                         filesystem, storage_error)

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 in tokenizers we train
# Names of each special token in BERT-style and RoBERTa-style tokenizer.json files.
_ALIASES = {"pad": ("[PAD]", "<pad>"), "unk": ("[UNK]", "<unk>"), "cls": ("[CLS]", "<s>"),
            "sep": ("[SEP]", "</s>"), "mask": ("[MASK]", "<mask>")}


@dataclass
class Encoded:
    """Token ids with, per token, the index of its word (-1 for specials) and its character span."""

    ids: list[int]
    word_ids: list[int]
    offsets: list[tuple[int, int]]


class TextTokenizer:
    """The interface the pipeline and the trainer use; wraps a `tokenizers.Tokenizer`."""

    def __init__(self, tok: Tokenizer, source_text: str | None = None):
        self._tok = tok
        # A tokenizer.json may carry truncation or padding for another use (many Hub files do): they cut a
        # document at a few hundred tokens and padded captions before [SEP], silently. The pipeline truncates
        # and pads by itself.
        tok.no_truncation()
        tok.no_padding()
        # "[SEP]" or "</s>" written in a caption or a web page is text, not a separator or a pad in the middle
        # of the sequence (nor an MLM unit with a special label)
        tok.encode_special_tokens = True
        # the tokenizer.json text it was loaded from (None when built in memory): what a checkpoint stores and
        # hashes, so that a resume can tell whether the tokenizer is the same
        self.source_text = source_text
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        ids = {}
        for role, names in _ALIASES.items():
            found = [tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None]
            if not found:
                raise ValueError(f"tokenizer has no {role} token (looked for {names})")
            ids[role] = found[0]
        self.pad_id, self.unk_id, self.cls_id = ids["pad"], ids["unk"], ids["cls"]
        self.sep_id, self.mask_id = ids["sep"], ids["mask"]
        self.special_ids = frozenset(ids.values())
        self._whole: dict[str, bool] = {}

    def to_str(self) -> str:
        return self._tok.to_str()

    @classmethod
    def from_str(cls, text: str) -> TextTokenizer:
        return cls(Tokenizer.from_str(text), source_text=text)

    def encode_plain(self, text: str) -> Encoded:
        """Tokens of ``text`` without specials or truncation (for packing documents)."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return Encoded(list(enc.ids), [-1 if w is None else w for w in enc.word_ids], list(enc.offsets))

    def encode_words(self, text: str, max_len: int) -> Encoded:
        """[CLS] tokens [SEP], truncated to ``max_len``, with word ids and offsets."""
        enc = self.encode_plain(text)
        n = max(0, max_len - 2)
        return Encoded([self.cls_id, *enc.ids[:n], self.sep_id], [-1, *enc.word_ids[:n], -1],
                       [(0, 0), *enc.offsets[:n], (0, 0)])

    def encode(self, text: str, max_len: int) -> list[int]:
        """[CLS] token ids [SEP], truncated to ``max_len`` (ids only: no word ids or offsets to build)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.cls_id, *ids[:max(0, max_len - 2)], self.sep_id]

    def in_vocabulary(self, word: str) -> bool:
        """True when ``word``, as a word of a sentence, is one token of the vocabulary (WordPiece's
        ``word``, byte-level BPE's ``Ġword``, SentencePiece's ``▁word``): its training corpus used it often.
        A word-level rewrite swaps in only such words: one the corpus never uses (a "dog" among captions of
        shapes) makes a negative told apart by the word alone, and teaches nothing about the image."""
        known = self._whole.get(word)
        if known is None:
            # after a space, as inside a caption: the pre-tokenizer then marks it the way the vocabulary does
            ids = self._tok.encode(" " + word, add_special_tokens=False).ids
            known = self._whole[word] = len(ids) == 1 and ids[0] != self.unk_id
        return known

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return self._tok.decode([i for i in ids if i not in self.special_ids])

    def token_ids(self, words: Iterable[str]) -> list[int]:
        return [self._tok.token_to_id(w) for w in words]


def _read_text(path: str, policy: RetryPolicy | None = None) -> str:
    def read():
        fs, p = filesystem(path)
        if fs.isdir(p):
            p = p.rstrip("/") + "/tokenizer.json"
        with fs.open(p, "r", encoding="utf-8", newline="") as f:  # byte for byte: its hash is its identity
            return f.read()

    try:
        return call_with_retries(read, path, policy or default_policy())
    except (DataSourceError, DataReadError):
        raise
    except Exception as exc:  # noqa: BLE001 - anything else still names the path
        raise storage_error(path, exc) from None


def load_tokenizer(path: str, policy: RetryPolicy | None = None) -> TextTokenizer:
    """Load a tokenizer.json file, or a folder holding one, from a local path or s3:// (``policy``: the
    retries of the read; a run passes data.io_retries)."""
    if not path:
        raise ValueError("data.tokenizer is empty: give a tokenizer.json path or a folder holding one")
    return TextTokenizer.from_str(_read_text(path, policy))


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1000, kind: str = "wordpiece") -> TextTokenizer:
    """Train a lower-casing BERT-style tokenizer with [PAD]=0, [UNK], [CLS], [SEP], [MASK] on ``texts``."""
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS))
        tok.decoder = decoders.WordPiece()
    elif kind == "wordlevel":
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS))
    else:
        raise ValueError(f"tokenizer kind {kind!r}: must be 'wordpiece' or 'wordlevel'")
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainer)
    return TextTokenizer(tok)


def save_tokenizer(tok: TextTokenizer, path: str) -> str:
    """Write tokenizer.json to ``path`` (a file path, or a folder that gets tokenizer.json); returns the
    file."""
    if not path.endswith(".json"):
        path = path.rstrip("/") + "/tokenizer.json"
    fs, p = filesystem(path)
    try:
        fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(p, "w", encoding="utf-8") as f:
            f.write(tok.to_str())
    except Exception as exc:  # noqa: BLE001 - any storage failure becomes an error naming the path
        raise storage_error(path, exc) from None
    return path
