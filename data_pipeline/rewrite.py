"""Text rewriting for CMCL hard negatives (UNIMO): word-, phrase- and sentence-level, deterministic per
RNG."""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

COLOURS = ("red", "blue", "green", "yellow", "orange", "purple", "pink", "white", "black", "brown", "gray")
NUMBERS_PLURAL = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
SIZES = ("small", "large", "big", "tiny", "huge")
# Objects as (singular, plural): a swap keeps the grammatical number, so only the concept changes. Each is
# another concept than every other: a word with a broader one among them (person: man, woman, child) or a
# synonym would make negatives that are still true of the image ("a man riding" -> "a person riding").
OBJECTS = (("circle", "circles"), ("square", "squares"), ("triangle", "triangles"), ("star", "stars"),
           ("diamond", "diamonds"), ("ring", "rings"), ("dog", "dogs"), ("cat", "cats"), ("horse", "horses"),
           ("bird", "birds"), ("car", "cars"), ("bus", "buses"), ("train", "trains"), ("boat", "boats"),
           ("man", "men"), ("woman", "women"), ("child", "children"),
           ("table", "tables"), ("chair", "chairs"), ("tree", "trees"), ("house", "houses"))
# Relations swap within a group of words that fill the same slot, none a synonym of another (so no "under"
# beside "below").
RELATIONS = (("left", "right", "top", "bottom", "middle"), ("above", "below", "beside", "behind"),
             ("inside", "outside"))

WORD_CLASSES = ("colour", "number", "object", "relation")
KINDS = ("word", "phrase", "sentence")

_WORD = re.compile(r"[A-Za-z]+")


def _lexicon() -> dict[str, dict[str, list[str]]]:
    """word -> {class: the words of the same class and form it may become}."""
    groups = [("colour", COLOURS), ("number", NUMBERS_PLURAL), ("object", tuple(o[0] for o in OBJECTS)),
              ("object", tuple(o[1] for o in OBJECTS))] + [("relation", g) for g in RELATIONS]
    out: dict[str, dict[str, list[str]]] = {}
    for cls, words in groups:
        for w in words:
            out.setdefault(w, {})[cls] = [x for x in words if x != w]
    return out


_LEXICON = _lexicon()


def _alternatives(word: str) -> dict[str, list[str]]:
    return _LEXICON.get(word, {})


def _match_case(new: str, old: str) -> str:
    return new.capitalize() if old[:1].isupper() else new


@dataclass
class Rewrite:
    """A rewritten text and what changed: ``span`` in the original was replaced by ``new``."""

    text: str
    kind: str          # "word:colour", "word:number", "word:object", "word:relation", "phrase", "sentence"
    span: tuple[int, int]
    old: str
    new: str


def word_candidates(text: str, classes=WORD_CLASSES, known=None) -> list[tuple[str, int, int, list[str]]]:
    """(class, start, end, alternatives) of every word a word-level rewrite may swap.

    known(word) -> bool, when given, keeps only the alternatives it accepts; the batch builder passes the
    tokenizer's ``in_vocabulary``: a swap to a word the corpus never uses (or one the tokenizer maps to [UNK])
    makes a negative told apart by that word alone, not by what the image shows.
    """
    out = []
    for m in _WORD.finditer(text):
        for cls, alts in _alternatives(m.group().lower()).items():
            alts = alts if known is None else [a for a in alts if known(a)]
            if cls in classes and alts:
                out.append((cls, m.start(), m.end(), alts))
    return out


def word_rewrite(text: str, rng: np.random.Generator, classes=WORD_CLASSES, known=None) -> Rewrite | None:
    """Swap one colour/number/object/relation word for another of its class; None when there is none."""
    cands = word_candidates(text, classes, known)
    if not cands:
        return None
    cls, start, end, alts = cands[int(rng.integers(len(cands)))]
    old = text[start:end]
    new = _match_case(alts[int(rng.integers(len(alts)))], old)
    return Rewrite(text[:start] + new + text[end:], f"word:{cls}", (start, end), old, new)


@lru_cache(maxsize=65536)
def phrase_kind(phrase: str) -> str:
    """"object" for a phrase naming a thing, "relation" for a place or relation, else "other"."""
    classes = {c for m in _WORD.finditer(phrase) for c in _alternatives(m.group().lower())}
    return "object" if "object" in classes else "relation" if "relation" in classes else "other"


def phrase_rewrite(text: str, spans: list[tuple[int, int]], donors: list[str],
                   rng: np.random.Generator) -> Rewrite | None:
    """Replace one concept phrase of ``text`` by a different phrase from ``donors``, of the same kind when one
    exists (an object phrase for an object phrase), so the negative stays a fluent, plausible caption."""
    if not spans:
        return None
    start, end = spans[int(rng.integers(len(spans)))]
    old = text[start:end]
    choices = sorted({d.strip() for d in donors if d.strip() and d.strip().lower() != old.lower()})
    same_kind = [d for d in choices if phrase_kind(d) == phrase_kind(old)]
    choices = same_kind or choices
    if not choices:
        return None
    new = choices[int(rng.integers(len(choices)))]
    return Rewrite(text[:start] + new + text[end:], "phrase", (start, end), old, new)


def sentence_rewrite(text: str, others: list[str], rng: np.random.Generator) -> Rewrite | None:
    """Another caption (of another image) in place of this one."""
    choices = sorted({o for o in others if o.strip() and o.strip().lower() != text.strip().lower()})
    if not choices:
        return None
    new = choices[int(rng.integers(len(choices)))]
    return Rewrite(new, "sentence", (0, len(text)), text, new)


@lru_cache(maxsize=16)
def _cdf(weights: tuple) -> list[float]:
    """The cumulative distribution that ``rng.choice(len(weights), p=...)`` draws from, computed as it does;
    drawing one ``rng.random()`` against it picks the same kind from the same RNG state, without choice()'s
    checks of ``p`` that cost more than the rest of a word-level rewrite."""
    w = np.asarray(weights, dtype=float)
    cdf = (w / w.sum()).cumsum()
    cdf /= cdf[-1]
    return cdf.tolist()


def hard_negative(text: str, rng: np.random.Generator, *, spans: list[tuple[int, int]], donors: list[str],
                  others: list[str], weights=(0.6, 0.2, 0.2), known=None) -> Rewrite | None:
    """A hard negative of the kind drawn by ``weights``, falling back to the other kinds when it cannot
    apply."""
    first = bisect.bisect_right(_cdf(tuple(weights)), rng.random())
    for kind in [KINDS[first]] + [k for k in KINDS if k != KINDS[first]]:
        if kind == "word":
            out = word_rewrite(text, rng, known=known)
        elif kind == "phrase":
            out = phrase_rewrite(text, spans, donors, rng)
        else:
            out = sentence_rewrite(text, others, rng)
        if out is not None:
            return out
    return None
