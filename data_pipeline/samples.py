"""Turning the raw members of a shard into prepared samples of each source (decode, validate, pack text)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from .compress import strip_suffix
from .storage_io import safe_url
from .webdataset_tar import iter_samples
from .tokenizer import TextTokenizer

log = logging.getLogger("unimo.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TOKENIZE_CHARS = 200_000     # a document is tokenized in pieces of at most this many characters
MAX_CAPTION_CHARS = 5_000


class BadSample(Exception):
    """A sample that cannot be used, met while writing shards or while reading them; ``reason`` is the counter
    it goes to (a counted, logged skip, never a silent one)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


@dataclass
class Prep:
    """What preparing a sample needs besides its bytes."""

    image_size: int
    seq_len: int
    tokenizer: TextTokenizer | None


def shard_name(url: str) -> str:
    return strip_suffix(url.rstrip("/").rsplit("/", 1)[-1])


def stable_id(text: str) -> int:
    """A 63-bit id from a string (for image ids when the metadata has none)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


EXIF_ORIENTATION = 0x0112


def upright(img: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: a phone photo stored sideways with an EXIF orientation tag (common
    in web crawls) is turned, so that "at the top" in its caption is at the top. Untagged images are returned
    as they are (no copy)."""
    if img.getexif().get(EXIF_ORIENTATION, 1) in (1, None):
        return img
    return ImageOps.exif_transpose(img)


def decode_image(data: bytes, size: int) -> np.ndarray:
    """(size, size, 3) uint8 RGB, resized with PIL bilinear. Channels stay last, as PIL hands them out: the
    batch makes its whole stack channels-first in one copy (batch.pixels_tensor) instead of a copy per
    image."""
    try:
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when the file is much larger
        img = upright(img)
        # convert and resize return copies even when there is nothing to do: skip them then
        img = img.convert("RGB") if img.mode != "RGB" else img
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        return np.frombuffer(img.tobytes(), dtype=np.uint8).reshape(size, size, 3)
    except Exception as exc:  # noqa: BLE001 - any decoder failure makes the image unusable
        raise BadSample("bad_image", f"{type(exc).__name__}: {exc}") from None


def _text(data: bytes, limit: int) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadSample("bad_text", str(exc)) from None
    return text[:limit].strip()


def _meta(files: dict) -> dict:
    if "json" not in files:
        return {}
    try:
        meta = json.loads(files["json"].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadSample("bad_json", str(exc)) from None
    return meta if isinstance(meta, dict) else {}


def _image_bytes(files: dict) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in files:
            return files[ext]
    raise BadSample("missing_field", f"no image member ({'/'.join(IMAGE_EXTS)}); has {sorted(files)}")


def _str_list(value) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def image_ids_of(corpus: str, url: str) -> Callable[[dict, str], int]:
    """The image ids of one shard's samples: ``(meta, key) -> id``, equal for the captions of one image and
    apart for different images, across every corpus a batch mixes.

    The metadata's ``id`` (COCO's image id: one image's five captions as five samples) within its corpus;
    without one, the shard's URL and the sample's key. Ids are only compared within a batch (ITC's
    positives, the images ITM's negatives and rewrites must avoid), so they are hashes of those, never the raw
    numbers: two corpora both numbered from 0 (COCO's and Visual Genome's ids, two folders written by `unimo
    data shards`, ``shard-000000.tar`` with keys from ``000000000``) used to give different images one id,
    a false positive.
    """
    shard = safe_url(url)

    def image_id(meta: dict, key: str) -> int:
        value = meta.get("id")
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return stable_id(f"{corpus}\0id\0{value}")
        return stable_id(f"{corpus}\0{shard}\0{key}")

    return image_id


def prepare_image(files: dict, key: str, prep: Prep, image_id: Callable[[dict, str], int]) -> dict:
    meta = _meta(files)
    return {"key": key, "pixels": decode_image(_image_bytes(files), prep.image_size),
            "image_id": image_id(meta, key), "tags": _str_list(meta.get("tags"))}


def prepare_pair(files: dict, key: str, prep: Prep, image_id: Callable[[dict, str], int]) -> dict:
    meta = _meta(files)
    image = _image_bytes(files)
    captions = [_text(files["txt"], MAX_CAPTION_CHARS)] if "txt" in files else []
    captions += [c.strip()[:MAX_CAPTION_CHARS] for c in _str_list(meta.get("captions"))]
    if isinstance(meta.get("caption"), str):
        captions.append(meta["caption"].strip()[:MAX_CAPTION_CHARS])
    if "txt" not in files and "captions" not in meta and "caption" not in meta:
        raise BadSample("missing_field", f"no text member (txt or json captions); has {sorted(files)}")
    captions = list(dict.fromkeys(c for c in captions if c))  # unique, first caption first
    if not captions:
        raise BadSample("empty_text", "caption is empty")
    return {"key": key, "pixels": decode_image(image, prep.image_size), "captions": captions,
            "phrases": _str_list(meta.get("phrases")), "tags": _str_list(meta.get("tags")),
            "image_id": image_id(meta, key)}


def document_text(files: dict) -> str:
    """A text sample's whole document (a book is one: `unimo data shards` writes each .txt file as one)."""
    if "txt" in files:
        text = _text(files["txt"], len(files["txt"]))
    elif isinstance(_meta(files).get("text"), str):
        text = _meta(files)["text"].strip()
    else:
        raise BadSample("missing_field", f"no text member (txt or json text); has {sorted(files)}")
    if not text:
        raise BadSample("empty_text", "document is empty")
    return text


def text_pieces(text: str, limit: int) -> Iterator[str]:
    """``text`` in pieces of at most ``limit`` characters, each cut after whitespace where there is some (a
    word is never split but in a run of ``limit`` characters without a space): a tokenizer's memory and time
    grow with its input, and a book is ~500k characters. Nothing is dropped: the pieces join to ``text``."""
    start = 0
    while len(text) - start > limit:
        cut = max(text.rfind(" ", start, start + limit), text.rfind("\n", start, start + limit))
        end = cut + 1 if cut > start else start + limit
        yield text[start:end]
        start = end
    yield text[start:]


class Packer:
    """Packs documents into [CLS] doc [SEP] doc [SEP] ... sequences of exactly seq_len tokens (the last may be
    shorter); a long document continues in the next sequence. Word ids stay distinct across documents so that
    whole-word masking never joins two documents' words."""

    def __init__(self, tok: TextTokenizer, seq_len: int):
        self.tok, self.seq_len = tok, seq_len
        self._word_base = 0
        self._reset()

    def _reset(self):
        self.ids, self.words, self.first_key = [self.tok.cls_id], [-1], None

    def add(self, key: str, text: str) -> Iterator[dict]:
        pieces = list(text_pieces(text, TOKENIZE_CHARS))
        for i, piece in enumerate(pieces):
            yield from self._add_tokens(key, piece, last=i == len(pieces) - 1)

    def _add_tokens(self, key: str, text: str, last: bool) -> Iterator[dict]:
        enc = self.tok.encode_plain(text)
        ids = enc.ids + ([self.tok.sep_id] if last else [])
        words = [w + self._word_base if w >= 0 else -1 for w in enc.word_ids] + ([-1] if last else [])
        self._word_base += max(enc.word_ids, default=-1) + 1
        while ids:
            if self.first_key is None:
                self.first_key = key
            room = self.seq_len - len(self.ids)
            self.ids += ids[:room]
            self.words += words[:room]
            ids, words = ids[room:], words[room:]
            if len(self.ids) >= self.seq_len:
                yield self._emit()

    def _emit(self) -> dict:
        out = {"key": self.first_key, "ids": self.ids, "word_ids": self.words}
        self._reset()
        return out

    def flush(self) -> Iterator[dict]:
        if len(self.ids) > 1:
            yield self._emit()


PREPARE = {"image": prepare_image, "pair": prepare_pair}


def shard_items(source: str, url: str, stream, prep: Prep, count: Callable[[str], None],
                wanted: Callable[[int], bool], corpus: str = "") -> Iterator[tuple[int, dict | None]]:
    """(ordinal, item) for every item of one shard of ``corpus`` (its key, ``pair/coco``; the source's name
    when it has no corpora), in shard order.

    Images and pairs: one item per tar sample, ordinal = the sample's position in the tar. Text: the packed
    sequences, ordinal = their position. Items that ``wanted`` rejects come as (ordinal, None), unprepared, so
    resuming does not decode what it skips. Unusable samples are counted, logged with shard and key, skipped.
    """
    name = shard_name(url)

    def issue(reason: str, key: str, detail: str = ""):
        count(f"skipped_{reason}")
        log.warning("skipped %s sample: shard=%s key=%s reason=%s %s", source, safe_url(url),
                    key, reason, detail)

    samples = iter_samples(stream, lambda reason, key: issue(reason, key))
    if source == "text":
        yield from _text_items(samples, name, prep, issue)
        return
    image_id = image_ids_of(corpus or source, url)
    for ordinal, key, files in samples:
        if not wanted(ordinal):
            yield ordinal, None
            continue
        try:
            yield ordinal, PREPARE[source](files, f"{name}/{key}", prep, image_id)
        except BadSample as bad:
            issue(bad.reason, key, str(bad))


def _text_items(samples, name: str, prep: Prep, issue) -> Iterator[tuple[int, dict]]:
    packer, ordinal = Packer(prep.tokenizer, prep.seq_len), 0
    for _, key, files in samples:
        try:
            text = document_text(files)
        except BadSample as bad:
            issue(bad.reason, key, str(bad))
            continue
        for item in packer.add(f"{name}/{key}", text):
            item["key"] = f"{item['key']}#{ordinal}"
            yield ordinal, item
            ordinal += 1
    for item in packer.flush():
        item["key"] = f"{item['key']}#{ordinal}"
        yield ordinal, item
