"""Configuration dataclasses of the data pipeline (sources, tokenizer, workers, masking, retries)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from model.validation import check, check_choices

SOURCES = ("text", "image", "pair")
OnChange = Literal["error", "continue"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")   # corpus names travel into metric names and cursors


def _check(ok: bool, name: str, value, rule: str) -> None:
    check(ok, f"data.{name}", value, rule)


def _urls_ok(urls) -> bool:
    return isinstance(urls, str) or (isinstance(urls, (list, tuple))
                                     and all(isinstance(u, str) and u for u in urls))


@dataclass
class CorpusConfig:
    """One corpus of a modality (e.g. COCO among the pair corpora).

    urls: a brace pattern, a folder or key prefix whose shards (.tar, .tar.gz, .tgz, ...) are listed, or a
    list of them; any fsspec URL (local, s3://, http(s)://, gs://, hf://...).
    weight: the share of the modality's samples this corpus supplies, relative to the other corpora's weights.
    A corpus that runs out starts its next epoch at once, so up-weighting a small corpus repeats it.
    """

    # names the corpus in metrics (pipeline/corpus/<modality>/<name>/...) and in the data cursor
    name: str = ""
    urls: Any = ""
    weight: float = 1.0

    def __post_init__(self):
        _check(isinstance(self.name, str) and bool(_NAME.match(self.name)), "corpora.name", self.name,
               "must be a non-empty name of letters, digits, '_', '.' or '-'")
        _check(_urls_ok(self.urls) and bool(self.urls), f"corpora[{self.name}].urls", self.urls,
               "must be a non-empty URL string or list of URL strings")
        _check(isinstance(self.weight, (int, float)) and not isinstance(self.weight, bool)
               and self.weight > 0, f"corpora[{self.name}].weight", self.weight, "must be a number > 0")
        self.weight = float(self.weight)


@dataclass
class SourceConfig:
    """One modality's shards: one corpus (``urls``) or several weighted ones (``corpora``).

    urls: the one-corpus shorthand: a brace pattern ("s3://b/pairs/shard-{000000..000009}.tar"), a prefix or
    folder whose shards are listed, or a list of them; "" (and no corpora) means the modality is unused.
    corpora: [{name, urls, weight}, ...]; each sample of the modality comes from one corpus, chosen by weight.
    batch_size: samples of this modality in every micro-batch on every rank, whatever corpora they come from;
    fixed, because ZeRO-3 needs every rank to run the same modules at every step.
    """

    urls: Any = ""
    batch_size: int = 8
    corpora: list[CorpusConfig] = field(default_factory=list)

    def __post_init__(self):
        _check(_urls_ok(self.urls), "urls", self.urls, "must be a string or a list of URL strings")
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", self.batch_size,
               "must be an integer >= 1")
        self.corpora = [CorpusConfig(**c) if isinstance(c, dict) else c for c in self.corpora]
        _check(all(isinstance(c, CorpusConfig) for c in self.corpora), "corpora", self.corpora,
               "must be a list of {name, urls, weight}")
        _check(not (self.corpora and self.urls), "urls", self.urls,
               "give either urls (one corpus) or corpora (several), not both")
        names = [c.name for c in self.corpora]
        _check(len(set(names)) == len(names), "corpora", names, "corpus names must be unique")

    def corpus_list(self, modality: str) -> list[Corpus]:
        """The modality's corpora; the shorthand ``urls`` is one corpus keyed by the modality's name alone,
        so cursors saved before corpora existed still apply."""
        if self.corpora:
            return [Corpus(modality, c.name, f"{modality}/{c.name}", c.urls, c.weight) for c in self.corpora]
        if self.urls:
            return [Corpus(modality, modality, modality, self.urls, 1.0)]
        return []


@dataclass(frozen=True)
class Corpus:
    """A resolved corpus: ``key`` names it in the cursor, the counters and the metrics."""

    modality: str
    name: str
    key: str
    urls: Any
    weight: float


@dataclass
class DataConfig:
    """Everything the loader needs besides rank, world size and the model's input geometry."""

    text: SourceConfig = field(default_factory=SourceConfig)
    image: SourceConfig = field(default_factory=SourceConfig)
    pair: SourceConfig = field(default_factory=SourceConfig)
    eval_pairs: str = ""          # held-out pair shards for retrieval eval
    tokenizer: str = ""           # tokenizer.json (local or s3://) or a folder holding one
    num_workers: int = 1          # DataLoader worker processes per rank (0 = read in the training process)
    prefetch_factor: int = 2      # batches each worker keeps ready
    shuffle_buffer: int = 64      # samples per stream held for shuffling (1 = no shuffling)
    seed: int = 0                 # shard order, shuffling and masking; the same seed gives the same batches
    mlm_probability: float = 0.15  # share of text tokens masked for MLM (whole words or concept phrases)
    mim_mask_ratio: float = 0.5   # share of image patches masked for masked image modelling

    # Hard negatives for CMCL: relative weights of word-, phrase- and sentence-level rewrites.
    rewrite_weights: list = field(default_factory=lambda: [0.6, 0.2, 0.2])
    # Reading retries: a failed read reopens the shard at the byte already reached, with exponential backoff
    # from io_backoff_s up to io_backoff_max_s, io_retries times; then the run stops with an error.
    io_retries: int = 8
    io_backoff_s: float = 0.5     # the first wait between read retries; it doubles at each retry
    io_backoff_max_s: float = 20.0  # the longest wait between read retries
    read_block_bytes: int = 8 * 1024 * 1024   # size of one ranged GET when streaming a shard from S3

    # On resume, when the tokenizer differs from the checkpoint's (its tokenizer.json hash) or a corpus of the
    # same name lists other URLs: error (the default: stop, naming both) | continue (log a warning and start
    # the data afresh, from a fresh data cursor; weights and optimizer are still restored)
    on_change: OnChange = "error"

    def __post_init__(self):
        for name in SOURCES:
            value = getattr(self, name)
            if isinstance(value, dict):  # a YAML loader may hand in plain mappings
                value = SourceConfig(**value)
                setattr(self, name, value)
            _check(isinstance(value, SourceConfig), name, value, "must be a SourceConfig")
        for name in ("eval_pairs", "tokenizer"):
            _check(isinstance(getattr(self, name), str), name, getattr(self, name), "must be a string")
        for name, low in (("num_workers", 0), ("prefetch_factor", 1), ("shuffle_buffer", 1), ("seed", 0),
                          ("io_retries", 0), ("read_block_bytes", 4096)):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= low, name, value,
                   f"must be an integer >= {low}")
        _check(0.0 < self.mlm_probability < 1.0, "mlm_probability", self.mlm_probability,
               "must be in (0, 1)")
        _check(0.0 <= self.mim_mask_ratio < 1.0, "mim_mask_ratio", self.mim_mask_ratio, "must be in [0, 1)")
        _check(self.io_backoff_s >= 0 and self.io_backoff_max_s >= self.io_backoff_s, "io_backoff_s",
               (self.io_backoff_s, self.io_backoff_max_s), "needs 0 <= io_backoff_s <= io_backoff_max_s")
        check_choices(self, "data.")
        w = self.rewrite_weights
        _check(isinstance(w, (list, tuple)) and len(w) == 3 and all(x >= 0 for x in w) and sum(w) > 0,
               "rewrite_weights", w, "must be three non-negative weights [word, phrase, sentence], not all 0")

    def active_sources(self) -> list[str]:
        """Names of the sources with shards, in the fixed order text, image, pair."""
        return [name for name in SOURCES if getattr(self, name).corpus_list(name)]

    def corpora(self, modality: str) -> list[Corpus]:
        return getattr(self, modality).corpus_list(modality)

    def map_urls(self, fn) -> None:
        """Applies ``fn`` to every shard URL of every modality and corpus, in place (e.g. to make paths
        absolute)."""
        def each(urls):
            return [fn(u) for u in urls] if isinstance(urls, (list, tuple)) else fn(urls)

        for name in SOURCES:
            src = getattr(self, name)
            src.urls = each(src.urls)
            for c in src.corpora:
                c.urls = each(c.urls)
