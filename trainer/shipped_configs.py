"""The named run configs that ship with unimo (debug, small, base, large, xl) and how a config argument is
resolved.

In a checkout they are the YAML files of the repository's ``configs/`` folder; in an installed unimo (a wheel,
the training image) the same files travel inside the package ``unimo_configs`` (pyproject.toml maps that
package to ``configs/``). A config argument is a path when such a file exists, else a shipped name (``debug``
or ``debug.yaml`` or ``configs/debug.yaml``), so ``unimo train debug`` works from any folder.
"""

from __future__ import annotations

from pathlib import Path


def shipped_dir() -> Path | None:
    """The folder holding the shipped YAML configs, or None when neither the package nor a checkout has
    them."""
    try:
        import unimo_configs  # installed (wheel or editable): the package that pyproject maps to configs/
    except ImportError:
        unimo_configs = None
    if unimo_configs is not None:
        for entry in getattr(unimo_configs, "__path__", []):
            if any(Path(entry).glob("*.yaml")):
                return Path(entry)
    checkout = Path(__file__).resolve().parent.parent / "configs"
    return checkout if checkout.is_dir() else None


def shipped_names() -> list[str]:
    """Names of the shipped configs (file stems), sorted."""
    folder = shipped_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder else []


def shipped_path(name: str) -> Path | None:
    """The shipped config called NAME (``debug``, ``debug.yaml`` or ``configs/debug.yaml``), or None."""
    folder = shipped_dir()
    if folder is None:
        return None
    stem = Path(name).name
    stem = stem[:-5] if stem.endswith(".yaml") else stem
    if Path(name).parent not in (Path("."), Path("configs")):
        return None  # another folder was named: that is a path, not a shipped name
    candidate = folder / f"{stem}.yaml"
    return candidate if candidate.is_file() else None


def resolve(arg: str | Path) -> Path | None:
    """A config argument as a file: the path itself when it exists, else the shipped config of that name."""
    p = Path(arg)
    if p.is_file():
        return p
    return shipped_path(str(arg))
