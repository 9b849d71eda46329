"""unimo data pipeline: shards on S3/local streamed into mixed text/image/pair micro-batches with a resumable
cursor.

The public names are imported on first use (PEP 562): the loader pulls in torch, and every command of the CLI
reaches this package through its errors module (`unimo --version` took 1.6 CPU-s, most of it importing torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "DataConfig": "config", "SourceConfig": "config", "merge_states": "cursor",
    "DataReadError": "storage_io", "DataSourceError": "storage_io",
    "MixedLoader": "loader", "build_eval_pairs": "loader", "build_loader": "loader",
    "write_synthetic_dataset": "synthetic", "load_tokenizer": "tokenizer",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
