"""Converting a checkpoint for another world size or ZeRO stage (DeepSpeed's universal format), once per
node."""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trainer.checkpointing.stage0 import stage0_to_universal
from trainer.zero_stage import make_loadable_under_any_stage, saved_zero_stage

log = logging.getLogger(__name__)

# Where a node converts a checkpoint for a new world size (in the temp folder; deleted once loaded).
UNIVERSAL_PREFIX = "unimo-universal-"
# DeepSpeed's converter (`python -m deepspeed.checkpoint.ds_to_universal`), run after importing DeepSpeed
# without its autotuner's MLflow import, the trick of trainer/ds_extensions.import_deepspeed (~0.7 CPU-second
# per conversion; the converter never uses MLflow). Self-contained: the subprocess need not find unimo's
# packages. (runpy with alter_sys sets sys.argv[0] to the module's file, as -m does.)
_CONVERTER = ("import runpy, sys\n"
              "hide = 'mlflow' not in sys.modules\n"
              "if hide: sys.modules['mlflow'] = None\n"
              "import deepspeed\n"
              "if hide: del sys.modules['mlflow']\n"
              "runpy.run_module('deepspeed.checkpoint.ds_to_universal', run_name='__main__', alter_sys=True)")


def to_universal(path: Path, step: int, run_name: str, local_rank: int) -> tuple[Path, str]:
    """Converts the checkpoint at ``path`` on the node's first rank (a ZeRO one with DeepSpeed's converter in
    a subprocess, a stage-0 one in process); every rank then loads it.

    Returns (folder, tag) for ``engine.load_checkpoint``. The conversion is as large as the checkpoint; it
    lives only until every rank has loaded it (``drop_universal``), and a leftover of a conversion that
    crashed part-way is removed first, never loaded.
    """
    import torch.distributed as dist

    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    out = Path(tempfile.gettempdir()) / f"{UNIVERSAL_PREFIX}{run_name}-{step}-{key}"
    if local_rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        # progress on long work: the conversion reads and rewrites the whole checkpoint
        log.info("converting checkpoint %s to DeepSpeed's universal format in %s (world size or ZeRO stage "
                 "changed)", path, out)
        started = time.monotonic()
        if saved_zero_stage(path) == 0:  # no ZeRO layout: DeepSpeed's converter cannot read it (stage0.py)
            stage0_to_universal(path / "ds", out / "ds_universal")
        else:
            _run_converter(path, out)
        (out / "latest_universal").write_text("ds_universal")
        make_loadable_under_any_stage(out / "ds_universal")  # also under another ZeRO stage
        log.info("converted checkpoint %s in %.1f s", path, time.monotonic() - started)
    dist.barrier()
    return out, "ds_universal"


def _run_converter(path: Path, out: Path) -> None:
    """DeepSpeed's converter of a ZeRO checkpoint, in a subprocess."""
    cmd = [sys.executable, "-c", _CONVERTER, "--input_folder",
           str(path / "ds"), "--output_folder", str(out / "ds_universal"), "--num_extract_workers", "1",
           "--num_merge_workers", "1", "--inject_missing_state"]  # stages 1-2 lack the version info
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"converting checkpoint {path} for a new world size or ZeRO stage "
                           f"failed:\n{done.stderr[-2000:]}")


def drop_universal(out: Path, local_rank: int) -> None:
    """Deletes the node's universal conversion once every rank on it has loaded it."""
    import torch.distributed as dist

    dist.barrier()
    if local_rank == 0:
        shutil.rmtree(out, ignore_errors=True)
