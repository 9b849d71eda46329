"""The committed lock matches pyproject.toml, and pyproject installs every package of the source tree.

The wheel built from this tree, installed outside the checkout, is tested in tests/integration/test_wheel.py.
"""

import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# The platform the lock is for (scripts/lock.sh): Linux x86-64, CPython 3.11.
LOCK_ENV = {**default_environment(), "python_version": "3.11", "python_full_version": "3.11.7",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lock: str) -> dict[str, str]:
    """name -> version of every `name==version` line of a lock file."""
    text = (ROOT / "requirements" / lock).read_text()
    return {canonical(m.group(1)): m.group(2)
            for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)", text, re.M)}


def declared(extra: str | None = None) -> list[Requirement]:
    reqs = PYPROJECT["project"]["dependencies"] + (PYPROJECT["project"]["optional-dependencies"][extra]
                                                   if extra else [])
    return [Requirement(r) for r in reqs]


@pytest.mark.parametrize("lock,extra", [("lock.txt", None), ("lock-dev.txt", "dev")])
def test_the_lock_satisfies_pyproject(lock, extra):
    locked = pins(lock)
    problems = []
    for req in declared(extra):
        if req.marker is not None and not req.marker.evaluate(LOCK_ENV):
            continue
        name = canonical(req.name)
        if name == "torch":  # installed apart: the CPU wheel here, the user's CUDA build on GPUs
            assert name not in locked, "torch must stay out of the lock"
            continue
        if name not in locked:
            problems.append(f"{req} is not in requirements/{lock}")
        elif not req.specifier.contains(locked[name], prereleases=True):
            problems.append(f"{req} is not satisfied by the locked {name}=={locked[name]}")
    assert not problems, "run `bash scripts/lock.sh`:\n" + "\n".join(problems)


def test_extras_are_locked_too():
    locked = pins("lock.txt")
    assert "boto3" in locked and "aiobotocore" in locked  # imported directly; s3fs's botocore
    assert "aiohttp-cors" in locked or "aiohttp" in locked  # ray[default]
    assert "pyarrow" in locked  # ray[train] and our own S3 filesystem


def test_the_runtime_lock_is_the_dev_lock_without_the_dev_tools():
    runtime, dev = pins("lock.txt"), pins("lock-dev.txt")
    differ = {n: (v, dev.get(n)) for n, v in runtime.items() if dev.get(n) != v}
    assert not differ, f"lock.txt and lock-dev.txt disagree: {differ}"
    assert "pytest" in dev and "pytest" not in runtime


def test_every_lock_line_is_hashed():
    for lock in ("lock.txt", "lock-dev.txt"):
        text = (ROOT / "requirements" / lock).read_text()
        entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
        unhashed = [e.split()[0] for e in entries if "==" in e and "--hash=sha256:" not in e]
        assert not unhashed, f"{lock}: no hash for {unhashed}"


def test_every_package_folder_is_installed():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {p.parent.relative_to(ROOT).as_posix().replace("/", ".")
             for top in ("orchestrator", "trainer", "model", "data_pipeline")
             for p in (ROOT / top).rglob("__init__.py")}
    assert found - listed == set(), \
        f"add these to [tool.setuptools] packages in pyproject.toml: {found - listed}"
    assert PYPROJECT["tool"]["setuptools"]["package-dir"]["unimo_configs"] == "configs"
    assert {p.stem for p in (ROOT / "configs").glob("*.yaml")} >= {"debug", "small", "base", "large", "xl"}
