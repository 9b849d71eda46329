"""Stand-ins for the CheckpointManager tests that run without DeepSpeed or Ray Train: an engine that writes
one ZeRO-3 shard file, a loader with a fixed cursor, a reporter that knows no checkpoint."""

from __future__ import annotations

from pathlib import Path


class StubEngine:
    """Saves one model-states shard as DeepSpeed's stage 3 names it; loading restores nothing."""

    def zero_optimization_stage(self) -> int:
        return 3  # its files are named as stage 3's

    def save_checkpoint(self, root: str, tag: str, save_latest: bool, client_state=None) -> None:
        (Path(root) / tag).mkdir(parents=True)
        (Path(root) / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"weights")

    def load_checkpoint(self, path: str, tag: str, **_) -> None: ...


class StubLoader:
    """A loader whose cursor is ``state`` (default ``{"version": 1}``)."""

    def __init__(self, state: dict | None = None):
        self.state = state or {"version": 1}

    def state_dict(self) -> dict:
        return dict(self.state)


class NoReporter:
    """Ray Train's side of the manager: reports go nowhere, and it knows no checkpoint."""

    def report(self, metrics, checkpoint_dir, step) -> None: ...

    def latest_checkpoint(self):
        return None
