"""Configuration dataclasses of the data pipeline (sources, tokenizer, workers, masking, retries)."""

from __future__ import annotations

from dataclasses import dataclass, field

SOURCES = ("text", "image", "pair")


def _check(ok: bool, name: str, value, rule: str) -> None:
    if not ok:
        raise ValueError(f"data.{name} = {value!r}: {rule}")


@dataclass
class SourceConfig:
    """One stream of shards.

    urls: a brace pattern ("s3://b/pairs/shard-{000000..000009}.tar") or a prefix/folder whose ``*.tar``
    files are listed (local path or s3://); "" means the source is unused.
    batch_size: samples of this source in every micro-batch on every rank; fixed, because ZeRO-3 needs every
    rank to run the same modules at every step.
    """

    urls: str = ""
    batch_size: int = 8

    def __post_init__(self):
        _check(isinstance(self.urls, str), "urls", self.urls, "must be a string")
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", self.batch_size,
               "must be an integer >= 1")


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
    seed: int = 0
    mlm_probability: float = 0.15
    mim_mask_ratio: float = 0.5
    # Hard negatives for CMCL: relative weights of word-, phrase- and sentence-level rewrites.
    rewrite_weights: list = field(default_factory=lambda: [0.6, 0.2, 0.2])
    # Reading retries: a failed read reopens the shard at the byte already reached, with exponential backoff
    # from io_backoff_s up to io_backoff_max_s, io_retries times; then the run stops with an error.
    io_retries: int = 8
    io_backoff_s: float = 0.5
    io_backoff_max_s: float = 20.0
    read_block_bytes: int = 8 * 1024 * 1024   # size of one ranged GET when streaming a shard from S3

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
        w = self.rewrite_weights
        _check(isinstance(w, (list, tuple)) and len(w) == 3 and all(x >= 0 for x in w) and sum(w) > 0,
               "rewrite_weights", w, "must be three non-negative weights [word, phrase, sentence], not all 0")

    def active_sources(self) -> list[str]:
        """Names of the sources with shards, in the fixed order text, image, pair."""
        return [name for name in SOURCES if getattr(self, name).urls]
