"""Text concepts (MVP): phrase spans from a sample's metadata, else maximal runs of non-stopword words."""

from __future__ import annotations

import re
from collections.abc import Iterator

# Function words: a phrase never starts, ends or continues through one. A fixed list keeps the rule
# deterministic and free of downloaded models.
STOPWORDS = frozenset("""
a an the and or but of on in at to for from with by as is are was were be been being this that these those
there here it its it's they them their he she his her we our you your i me my some any each every no not
into onto over under above below near next behind beside between while who which what where when how
has have had do does did can could will would should may might very so than then too also just of while
""".split())

_WORD = re.compile(r"[A-Za-z0-9]+(?:[-'][A-Za-z0-9]+)*")


def words(text: str) -> list[tuple[int, int]]:
    """Character spans of the words of ``text``."""
    return [m.span() for m in _WORD.finditer(text)]


def rule_phrases(text: str) -> list[tuple[int, int]]:
    """Maximal runs of consecutive non-stopword words (punctuation ends a run), as character spans."""
    spans, run = [], None
    for start, end in words(text):
        stop = text[start:end].lower() in STOPWORDS
        if run is not None and not stop and text[run[1]:start].strip() == "":
            run = (run[0], end)
            continue
        if run is not None:
            spans.append(run)
        run = None if stop else (start, end)
    if run is not None:
        spans.append(run)
    return spans


def _is_word_char(ch: str) -> bool:
    return ch.isascii() and ch.isalnum()


def _whole_word_matches(low: str, phrase: str) -> Iterator[tuple[int, int]]:
    """Non-overlapping spans of ``phrase`` in ``low`` not touching a letter or digit, scanning left to right.
    Plain ``str.find``: a regular expression per phrase meant a compile per new phrase of every caption."""
    start = low.find(phrase)
    while start >= 0:
        end = start + len(phrase)
        if ((start == 0 or not _is_word_char(low[start - 1]))
                and (end == len(low) or not _is_word_char(low[end]))):
            yield start, end
            start = low.find(phrase, end)
        else:
            start = low.find(phrase, start + 1)


def locate_phrases(text: str, phrases: list[str]) -> list[tuple[int, int]]:
    """Character spans of the given phrases in ``text`` (case-insensitive, whole words, no overlaps)."""
    low, taken, spans = text.lower(), [], []
    for phrase in sorted({p.strip().lower() for p in phrases if p and p.strip()}, key=len, reverse=True):
        for span in _whole_word_matches(low, phrase):
            if all(span[1] <= a or span[0] >= b for a, b in taken):
                taken.append(span)
                spans.append(span)
    return sorted(spans)


def phrase_spans(text: str, phrases: list[str] | None = None) -> list[tuple[int, int]]:
    """The concepts of a text: the metadata's phrases where they occur in it, else the stopword rule."""
    found = locate_phrases(text, phrases) if phrases else []
    return found or rule_phrases(text)
