"""The checkpoint lifecycle: one owner of the run's checkpoint folders.

``CheckpointManager`` (manager.py) finds, verifies, restores, saves, reports and prunes checkpoints and
carries the RNG state; ``universal`` converts a checkpoint for another world size; ``records`` keeps Ray
Train's run snapshot in agreement with the folders on disk; ``StopFile`` is the driver's stop request. The
folder format itself (manifest, verification, listing) is trainer/checkpoint.py.
"""

from trainer.checkpointing.manager import CheckpointManager, Progress
from trainer.checkpointing.stop import STOP_FILE, StopFile
from trainer.checkpointing.universal import UNIVERSAL_PREFIX

__all__ = ["CheckpointManager", "Progress", "STOP_FILE", "StopFile", "UNIVERSAL_PREFIX"]
