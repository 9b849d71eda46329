"""Text concepts (MVP): phrase spans from a sample's metadata, else maximal runs of non-stopword words."""

from __future__ import annotations

import re

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


def locate_phrases(text: str, phrases: list[str]) -> list[tuple[int, int]]:
    """Character spans of the given phrases in ``text`` (case-insensitive, whole words, no overlaps)."""
    low, taken, spans = text.lower(), [], []
    for phrase in sorted({p.strip().lower() for p in phrases if p and p.strip()}, key=len, reverse=True):
        for m in re.finditer(r"(?<![A-Za-z0-9])" + re.escape(phrase) + r"(?![A-Za-z0-9])", low):
            if all(m.end() <= a or m.start() >= b for a, b in taken):
                taken.append(m.span())
                spans.append(m.span())
    return sorted(spans)


def phrase_spans(text: str, phrases: list[str] | None = None) -> list[tuple[int, int]]:
    """The concepts of a text: the metadata's phrases where they occur in it, else the stopword rule."""
    found = locate_phrases(text, phrases) if phrases else []
    return found or rule_phrases(text)
