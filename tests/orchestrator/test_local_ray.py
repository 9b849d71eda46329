"""The embedded Ray of a run with no scaling.address is a new instance on 127.0.0.1, whatever else is running.

ray.init() without an address joins the cluster named by RAY_ADDRESS (or the last `ray start` on the machine),
and then refuses the num_cpus the driver passes: `unimo train` failed on any machine where a cluster was up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import local_cluster as lc

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import json, os, ray
from orchestrator.driver import init_ray
from trainer.config import load_config
init_ray(load_config({config!r}, ["scaling.num_workers=1", "scaling.dashboard=true",
                                  "scaling.worker_niceness=3"]))
ctx = ray.get_runtime_context()
nice = ray.get(ray.remote(lambda: os.nice(0)).remote())
settings = ray._private.worker._global_node._ray_params._system_config  # what the node was started with
print(json.dumps({{"gcs": ctx.gcs_address, "dashboard": ray._private.worker.get_dashboard_url() or "",
                  "worker_nice": nice,
                  "prestart": settings.get("prestart_worker_first_driver", "Ray's default")}}))
ray.shutdown()
"""


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_no_address_starts_an_embedded_ray_even_with_ray_address_set(tmp_path):
    pytest.importorskip("ray")
    head = lc.start_head(num_cpus=1)
    try:
        env = {**head.client_env(), "RAY_ADDRESS": head.address}
        probe = PROBE.format(config=str(ROOT / "configs" / "debug.yaml"))
        done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=150)
    finally:
        lc.stop_all(head)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["gcs"].startswith("127.0.0.1:") and got["gcs"] != head.address, (got, head.address)
    # its dashboard (off unless scaling.dashboard asks for it) listens on loopback too
    assert got["dashboard"].startswith("127.0.0.1:"), got
    # and its workers run at scaling.worker_niceness, not Ray's 15 (3: neither Ray's default nor ours)
    assert got["worker_nice"] == 3, got
    # and it starts no Python workers ahead for the driver (orchestrator/driver.py EMBEDDED_RAY_SETTINGS: Ray
    # starts one per CPU; an idle one is reaped after about a second when over its limit, so counting them
    # would race the reaper)
    assert got["prestart"] is False, got
