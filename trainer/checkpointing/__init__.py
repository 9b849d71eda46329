"""The checkpoint lifecycle: one owner of the run's checkpoint folders.

``CheckpointManager`` (manager.py) finds, verifies, restores, saves, reports and prunes checkpoints and
carries the RNG state; ``universal`` converts a checkpoint for another world size; ``records`` keeps Ray
Train's run snapshot in agreement with the folders on disk; ``StopFile`` is the driver's stop request. The
folder format itself (manifest, verification, listing) is trainer/checkpoint.py.

The names are imported on first use: the driver needs only the stop file's name (stop.py), and the manager
would import torch into it.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"CheckpointManager": "manager", "Progress": "manager", "STOP_FILE": "stop", "StopFile": "stop",
          "UNIVERSAL_PREFIX": "universal"}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'trainer.checkpointing' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
