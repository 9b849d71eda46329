"""The config tree's documentation, read from where each field is declared, and the resolved config printed
with it.

Every field of the config dataclasses (trainer/config.py, model/config.py, data_pipeline/config.py) carries
its documentation as a comment at its declaration: the comment lines directly above it, and/or a comment at
the end of its line. ``field_docs`` reads them from the source; ``unimo config show NAME --doc`` prints the
resolved config as YAML with each key's documentation beside it, so the explanation a user reads is the one
next to the code (tests/trainer/test_config_docs.py checks that every field has one).
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from functools import lru_cache
from typing import Any


def field_docs(cls: type) -> dict[str, str]:
    """{field name: its documentation} for a dataclass, from the comments at each field's declaration: the
    comment lines directly above the field, then the comment at the end of its line."""
    return _read_docs(cls)[0]


def ambiguous_comments(cls: type) -> list[str]:
    """Comment blocks that directly follow a field ending in a comment: they could continue that comment or
    introduce the next field, so the convention forbids them (put the whole text above the field instead)."""
    return _read_docs(cls)[1]


@lru_cache(maxsize=None)
def _read_docs(cls: type) -> tuple[dict[str, str], list[str]]:
    lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    trailing = _comments_by_line("\n".join(lines) + "\n")
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, str] = {}
    ambiguous: list[str] = []
    for i, line in enumerate(lines):
        name = _declared_field(line)
        if name not in names or name in docs:
            continue
        above: list[str] = []
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            above.insert(0, lines[j].strip().lstrip("#").strip())
            j -= 1
        if above and j >= 0 and _declared_field(lines[j]) is not None and (j + 1) in trailing:
            ambiguous.append(f"{cls.__qualname__}: the comment above {name!r} follows "
                             f"{_declared_field(lines[j])!r}, whose line ends in a comment")
        docs[name] = " ".join(p for p in (*above, trailing.get(i + 1, "")) if p)
    for name, text in _docstring_fields(cls).items():
        docs[name] = docs.get(name) or text
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        section = hints.get(f.name)
        if not docs.get(f.name) and dataclasses.is_dataclass(section) and section.__doc__:
            docs[f.name] = section.__doc__.strip().split("\n\n")[0].replace("\n", " ")  # a section: its class
    return docs, ambiguous


def _docstring_fields(cls: type) -> dict[str, str]:
    """``name: text`` paragraphs of the class docstring that name a field (a class may document its fields
    together there instead of beside each one)."""
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, list[str]] = {}
    current = None
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        head, _, rest = line.partition(":")
        if head.strip() in names and rest and not line.startswith(" "):
            current = head.strip()
            out[current] = [rest.strip()]
        elif current and line.strip():
            out[current].append(line.strip())
        else:
            current = None
    return {k: " ".join(v) for k, v in out.items()}


def _declared_field(line: str) -> str | None:
    """The field a class-body line declares (``    name: type = value``), else None."""
    stripped = line.strip()
    if not line.startswith("    ") or line.startswith("     ") or stripped.startswith(("#", "def ", "@")):
        return None
    head = stripped.split(":", 1)[0]
    return head if head.isidentifier() and ":" in stripped else None


def _comments_by_line(source: str) -> dict[int, str]:
    """{1-based line: the text of a comment that ends a code line} (comment-only lines are not included)."""
    out: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            if tok.start[0] in code_lines:
                out[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENCODING):
            code_lines.add(tok.start[0])
    return out


# ------------------------------------------------------------------------------------------- printing

def _scalar(value: Any) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def render(cfg: Any) -> str:
    """The resolved config as YAML, each key followed by its documentation as a comment."""
    out: list[str] = []
    _render_node(cfg, 0, out)
    return "\n".join(out) + "\n"


def _render_node(node: Any, indent: int, out: list[str], first_prefix: str | None = None) -> None:
    docs = field_docs(type(node))
    pad = " " * indent
    for k, f in enumerate(dataclasses.fields(node)):
        value = getattr(node, f.name)
        prefix = first_prefix if (first_prefix is not None and k == 0) else pad
        doc = docs.get(f.name, "")
        note = f"  # {doc}" if doc else ""
        if dataclasses.is_dataclass(value):
            out.append(f"{prefix}{f.name}:{note}")
            _render_node(value, indent + 2, out)
        elif isinstance(value, list) and value and all(dataclasses.is_dataclass(v) for v in value):
            out.append(f"{prefix}{f.name}:{note}")
            for item in value:
                _render_node(item, indent + 4, out, first_prefix=" " * (indent + 2) + "- ")
        else:
            out.append(f"{prefix}{f.name}: {_scalar(_plain(value))}{note}")


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def undocumented(root: type) -> list[str]:
    """Dotted names of the fields under ``root`` (a config dataclass) without documentation."""
    missing: list[str] = []
    _walk(root, "", missing, set())
    return missing


def _walk(cls: type, path: str, missing: list[str], seen: set) -> None:
    if cls in seen:
        return
    seen.add(cls)
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not docs.get(f.name):
            missing.append(f"{path}{f.name} ({cls.__module__}.{cls.__qualname__})")
        for inner in _dataclasses_in(hints.get(f.name)):
            _walk(inner, f"{path}{f.name}.", missing, seen)


def _dataclasses_in(tp: Any) -> list[type]:
    if tp is None:
        return []
    if dataclasses.is_dataclass(tp):
        return [tp]
    return [c for arg in typing.get_args(tp) for c in _dataclasses_in(arg)]
