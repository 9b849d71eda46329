"""A real, small checkpoint written the way training writes one, for the eval/export CLI tests (one rank at
``deepspeed.zero_stage: auto``: stage 0, DeepSpeed without ZeRO, unless the overrides set a stage).

One gloo rank, DeepSpeed on CPU, Trainer.build and Trainer.save (no Ray, no training step: the weights are the
seeded initial ones, which is all the CLI tests need). Runs in a child process so that DeepSpeed's global
state and the process group stay out of the test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEP = 7  # the step of the checkpoint the orchestrator tests share
_CHILD = r"""
import json, os, shutil, sys
from pathlib import Path
import torch, torch.distributed as dist
torch.set_num_threads(1)
from trainer.config import load_config
from trainer.loop import Trainer
from trainer import checkpoint as ckpt

args = json.loads(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + args["pg"], rank=0, world_size=1)

class Reporter:
    def report(self, metrics, checkpoint_dir, step): ...
    def latest_checkpoint(self): return None

class Loader:
    def state_dict(self): return {"version": 1}

trainer = Trainer(load_config(None, args["overrides"]), rank=0, world_size=1, reporter=Reporter(),
                  mlflow_run_id=args["run_id"])
trainer.build()
trainer.loader = Loader()
root = trainer.checkpoints.save_local(args["step"], trainer.engine, trainer.loader, trainer.progress.extra)
dest = Path(args["dest"])
dest.parent.mkdir(parents=True, exist_ok=True)
shutil.move(str(root), dest)
dist.destroy_process_group()
"""


def write_checkpoint(run_dir: Path, tokenizer: str, step: int = STEP, run_id: str | None = None,
                     overrides: tuple[str, ...] = ()) -> Path:
    """<run_dir>/checkpoints/step_<step>: a verified DeepSpeed checkpoint of the debug flavor."""
    from trainer import checkpoint as ckpt

    dest = run_dir / "checkpoints" / ckpt.step_dir_name(step)
    pg = run_dir / "pg_file"
    pg.parent.mkdir(parents=True, exist_ok=True)
    args = {"pg": str(pg), "step": step, "run_id": run_id, "dest": str(dest),
            "overrides": [f"data.tokenizer={tokenizer}", f"run.name={run_dir.name}", "model.flavor=debug",
                          "model.text.pad_token_id=0", "model.text.bos_token_id=2",
                          "model.text.eos_token_id=3", "model.text.mask_token_id=4", *overrides]}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "",
           "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    pg.unlink(missing_ok=True)
    ckpt.verify(dest)
    return dest
