"""cluster/Dockerfile parses into sensible instructions: base first, DeepSpeed then the project, non-root."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"

DOCKERFILE = CLUSTER / "Dockerfile"
KNOWN = {
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
}


def parse(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker too
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), " ".join(args.split())))
    assert not pending, "dangling line continuation"
    return instructions


@pytest.fixture(scope="module")
def instructions():
    return parse(DOCKERFILE.read_text())


def test_every_instruction_is_known(instructions):
    assert {k for k, _ in instructions} <= KNOWN


def test_from_comes_first(instructions):
    # Docker allows only ARG before the first FROM (used here to make the base image a build argument).
    first = next(i for i, (k, _) in enumerate(instructions) if k != "ARG")
    assert instructions[first][0] == "FROM"
    base = instructions[first][1]
    if base.startswith("${"):
        name = base[2 : base.index("}")]
        base = next(
            a.split("=", 1)[1] for k, a in instructions[:first] if k == "ARG" and a.startswith(name + "=")
        )
    assert "pytorch" in base and "cuda" in base, base


def _index(instructions, predicate) -> int:
    return next(i for i, ins in enumerate(instructions) if predicate(*ins))


def test_installs_the_lock_then_the_project_without_dependencies(instructions):
    runs = [(i, a) for i, (k, a) in enumerate(instructions) if k == "RUN"]
    lock = next(i for i, a in runs if "-r requirements/lock.txt" in a)
    args = instructions[lock][1]
    # the lock is the whole closure but torch (the base image's); deepspeed builds against that torch
    assert "--no-deps" in args and "--require-hashes" in args and "--no-build-isolation" in args
    copy_lock = _index(instructions, lambda k, a: k == "COPY" and "requirements/lock.txt" in a)
    project = next(i for i, a in runs if re.search(r"pip install --no-deps \.(\s|$|&)", a))
    copy_pyproject = _index(instructions, lambda k, a: k == "COPY" and "pyproject.toml" in a)
    assert copy_lock < lock < project and copy_pyproject < project
    assert (ROOT / "requirements" / "lock.txt").is_file()


def test_copies_every_installed_package_and_the_configs(instructions):
    copied = " ".join(a for k, a in instructions if k == "COPY")
    for package in ("orchestrator", "trainer", "model", "data_pipeline", "configs"):
        assert (ROOT / package).is_dir(), package
        assert package in copied, f"{package} is not copied into the image"


def test_runs_as_non_root_with_home_set(instructions):
    users = [a for k, a in instructions if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    envs = " ".join(a for k, a in instructions if k == "ENV")
    assert "HOME=/home/" in envs  # `ray up` assumes /root without it


def test_entrypoint_runs_unimo_and_passes_other_commands(instructions):
    entry = [a for k, a in instructions if k == "ENTRYPOINT"]
    assert entry == ['["unimo-entrypoint"]']
    assert any(k == "COPY" and a.startswith("cluster/entrypoint.sh ") for k, a in instructions)
    script = (CLUSTER / "entrypoint.sh").read_text()
    # `ray up` runs `docker run ... IMAGE bash`: bash must not become `unimo bash`
    unimo_words = script.split("case", 1)[1].split(")", 1)[0]
    assert "bash" not in unimo_words and "train" in unimo_words and "exec \"$@\"" in script


def test_no_secrets(instructions, no_clear_secrets):
    for keyword, args in instructions:
        if keyword in ("ENV", "ARG"):
            for token in shlex.split(args):
                name = token.split("=", 1)[0].upper()
                assert not re.search(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY|API_KEY", name), token
    no_clear_secrets(DOCKERFILE)


def test_dockerignore_keeps_the_venv_out():
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore
