"""unimo data pipeline: shards on S3/local streamed into mixed text/image/pair micro-batches with a resumable
cursor."""

from .config import DataConfig, SourceConfig
from .cursor import merge_states
from .storage_io import DataReadError, DataSourceError
from .loader import MixedLoader, build_eval_pairs, build_loader
from .synthetic import write_synthetic_dataset
from .tokenizer import load_tokenizer

__all__ = ["DataConfig", "DataReadError", "DataSourceError", "MixedLoader", "SourceConfig",
           "build_eval_pairs", "build_loader", "load_tokenizer", "merge_states", "write_synthetic_dataset"]
