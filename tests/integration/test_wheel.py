"""An installed unimo works outside a checkout: the wheel built from this tree, installed into a fresh virtual
environment, runs `unimo --version`, `unimo config show debug` and the demo's first steps from an empty
folder.

The fresh environment reaches the already-installed dependencies through a .pth line (installing torch, Ray
and DeepSpeed again would take minutes); unimo itself comes only from the wheel, which the test checks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def run(cmd, cwd, env, timeout=120):
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} -> {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # built from a copy: setuptools writes build/ and *.egg-info into the tree it builds
    src = tmp / "src"
    skip = shutil.ignore_patterns(".venv*", ".git", "build", "demo_out", "runs", "*.egg-info", "__pycache__",
                                  ".pytest_cache", ".ruff_cache")
    shutil.copytree(ROOT, src, ignore=skip)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
         str(tmp / "dist"), str(src)], cwd=tmp, env=env, timeout=300)
    wheel = next((tmp / "dist").glob("unimo-*.whl"))
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp, env=env)
    site = next((venv / "lib").glob("python3*/site-packages"))
    # the dependencies: this environment's site-packages, after the fresh one (its .pth files are not run, so
    # the checkout's editable install of unimo is not visible there)
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        cwd=tmp, env=env, timeout=300)
    away = tmp / "elsewhere"
    away.mkdir()
    return {"venv": venv, "wheel": wheel, "cwd": away,
            "env": {**env, "PATH": f"{venv / 'bin'}:{env['PATH']}"}}


def test_the_wheel_carries_the_code_and_the_shipped_configs(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert "unimo_configs/debug.yaml" in names and "orchestrator/cli.py" in names
    assert not any(n.startswith(("tests/", "bench/", "cluster/")) for n in names)


def test_installed_unimo_runs_from_any_folder(installed):
    unimo, cwd, env = str(installed["venv"] / "bin" / "unimo"), installed["cwd"], installed["env"]
    where = run([str(installed["venv"] / "bin" / "python"), "-c",
                 "import orchestrator; print(orchestrator.__file__)"],
                cwd, env).stdout
    assert str(installed["venv"]) in where, f"unimo imported from {where}, not from the wheel"
    assert run([unimo, "--version"], cwd, env).stdout.startswith("unimo ")
    assert "flavor: debug" in run([unimo, "config", "show", "debug"], cwd, env).stdout
    assert "debug" in run([unimo, "config", "list"], cwd, env).stdout


def test_installed_unimo_runs_the_demo_s_first_steps(installed):
    # The shipped demo config and its data, 4 steps of every objective on one worker: what a new user of the
    # wheel meets first, without the 300 steps of the full demo.
    done = run([str(installed["venv"] / "bin" / "unimo"), "demo", "--out", "demo",
                "stages=[{name: s, steps: 4, "
                "objectives: {mlm_text: 0.1, itc: 1.0, itm: 0.5, caption: 0.25}}]",
                "checkpoint.every_steps=4", "scaling.num_workers=1", "optimizer.warmup_steps=1"],
               installed["cwd"], installed["env"], timeout=600)
    out = done.stdout + done.stderr
    assert "step_00000004" in out or (installed["cwd"] / "demo" / "runs" / "debug" / "checkpoints"
                                       / "step_00000004").is_dir(), out[-3000:]
