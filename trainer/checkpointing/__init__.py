"""The checkpoint lifecycle: one owner of the run's checkpoint folders.

``CheckpointManager`` (manager.py) finds, verifies, restores, saves, reports and prunes checkpoints and
carries the RNG state; ``universal`` converts a checkpoint for another world size; ``records`` keeps Ray
Train's run snapshot in agreement with the folders on disk; ``StopFile`` is the driver's stop request. The
folder format itself (manifest, verification, listing) is trainer/checkpoint.py.

Import the names from their modules (trainer.checkpointing.manager, .stop, .universal): the package re-exports
nothing, so that the driver, which needs only the stop file's name, does not import the manager and torch
with it.
"""
