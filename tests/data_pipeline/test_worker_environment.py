"""The loader's workers see the environment of the process as it is when the loader starts iterating.

They are forked by a server process (data_pipeline/loader.py, worker_start_context) that is started once per
process, with a copy of the environment of that moment. S3 credentials set later (here: after a first loader
over local data) reached no worker: the flake hunt (scripts/flake_hunt.sh) met "no usable S3 credentials"
in tests/data_pipeline/test_cursor.py whenever an earlier test of the same pytest worker had started the
server before the S3 fixture set the keys.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AWS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
       "AWS_EC2_METADATA_DISABLED")

# In a fresh process: a first loader over local data starts the fork server without S3 credentials and with
# AWS_PROFILE naming a profile that does not exist (boto refuses to start with it, keys or not); then the
# profile is removed, the credentials are set, and a loader over the S3 copy of the same data must read it.
SCRIPT = """
import json, os, sys
from data_pipeline import DataConfig, SourceConfig, build_loader

def first_batch(urls):
    cfg = DataConfig(text=SourceConfig(urls["text"], 2), image=SourceConfig(urls["image"], 2),
                     pair=SourceConfig(urls["pair"], 2), tokenizer=urls["tokenizer"], num_workers=1)
    batch = next(iter(build_loader(cfg, rank=0, world_size=1, seq_len=16, image_size=16, patch_size=8)))
    return sorted(batch["keys"]["pair"])

if __name__ == "__main__":
    local, remote, aws = (json.loads(a) for a in sys.argv[1:4])
    os.environ["AWS_PROFILE"] = "no-such-profile"
    before = first_batch(local)
    del os.environ["AWS_PROFILE"]
    os.environ.update(aws)
    print(json.dumps({"local": before, "s3": first_batch(remote)}))
"""


@pytest.mark.integration  # a subprocess with DataLoader workers and the S3 server
def test_a_profile_removed_and_keys_set_after_the_first_loader_reach_the_next_workers(s3_server, s3_data,
                                                                                     local_data):
    aws = {k: os.environ[k] for k in AWS}
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # none when the server starts
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(local_data), json.dumps(s3_data),
                           json.dumps(aws)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["s3"] and got["s3"] == got["local"]  # the same first samples, read from S3 this time
