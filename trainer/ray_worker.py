"""The function every Ray Train worker runs: sets the device up, builds the Trainer and bridges it to Ray."""

from __future__ import annotations

import logging
import os
import traceback
from pathlib import Path

from data_pipeline.errors import UserError
from trainer.config import config_from_dict


class RayReporter:
    """Reports metrics and checkpoint folders to Ray Train; hands back the checkpoint Ray restored."""

    def __init__(self, async_upload: bool = True):
        import ray.train

        self._train = ray.train
        self.async_upload = async_upload

    def latest_checkpoint(self) -> str | None:
        """Where Ray's newest reported checkpoint lives (a local folder or an s3:// URL), not downloaded: the
        trainer verifies its manifest first and fetches only the checkpoint it will load."""
        from trainer.storage import url_of_ray_path

        checkpoint = self._train.get_checkpoint()
        if checkpoint is None:
            return None
        return url_of_ray_path(checkpoint.path, checkpoint.filesystem)

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None, step: int) -> None:
        from trainer.checkpoint import step_dir_name

        checkpoint = self._train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        # ASYNC: Ray copies to storage in the background and deletes the local copy afterwards, so the step
        # loop only waits for the local save.
        mode = (self._train.CheckpointUploadMode.ASYNC if self.async_upload
                else self._train.CheckpointUploadMode.SYNC)
        self._train.report(metrics, checkpoint=checkpoint,
                           checkpoint_dir_name=step_dir_name(step) if checkpoint else None,
                           checkpoint_upload_mode=mode)


def train_func(payload: dict) -> None:
    """Ray's ``train_loop_per_worker``: ``payload`` carries the resolved config and the MLflow run."""
    if not _has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import ray.train

    _quiet_report_echo()

    from data_pipeline.storage_io import set_default_policy
    from data_pipeline.loader import io_policy
    from trainer.loop import Trainer

    ctx = ray.train.get_context()
    cfg = config_from_dict(payload["run_config"])
    # data.io_retries bounds every storage call of this process, also those made without an explicit policy
    set_default_policy(io_policy(cfg.data))
    trainer = Trainer(cfg, rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                      reporter=RayReporter(cfg.checkpoint.async_upload),
                      mlflow_run_id=payload.get("mlflow_run_id"),
                      tracking_uri=payload.get("tracking_uri", ""),
                      local_rank=ctx.get_local_rank(), control_dir=payload.get("control_dir"))
    try:
        trainer.run()
    except UserError as err:
        # The driver's failure policy ends the job on it (no retry) and prints its message; the traceback
        # rides along for the run's error log, and what Ray prints from here is this frame, not the whole
        # stack.
        err.detail = traceback.format_exc()
        raise err.with_traceback(None) from None


def _quiet_report_echo() -> None:
    """Ray Train logs each report at INFO from every rank with its whole metrics dict ("Reporting training
    result 3: TrainingReport(... 40 metrics ...)"): a screen per checkpoint repeating the trainer's own step
    line. Its logger is named after its file; warnings and errors still show. Nothing happens if Ray renames
    it."""
    for name in list(logging.root.manager.loggerDict):
        if name.replace("\\", "/").endswith("train/v2/_internal/execution/context.py"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
