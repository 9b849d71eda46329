"""The one way the config dataclasses check their values (model/, data_pipeline/ and trainer/ configs alike).

A failed check raises ValueError("<field>=<value>: <rule>"), which the config loader turns into a ConfigError
prefixed with the section's path, so a user reads e.g. ``optimizer: lr=-1.0: must be > 0``. Enumerations are
``Literal`` types: ``check_choices`` refuses any other value for every such field of a dataclass, for configs
built in code as for those the loader builds (the loader checks them first, naming the key's full path).

Standard library only: the data pipeline, which may not import the model package, is allowed this module
(tests/test_layering.py).
"""

from __future__ import annotations

import typing
from typing import Any


def check(ok: bool, field: str, value: Any, rule: str) -> None:
    """Raises ValueError naming the field, its value and the rule it breaks, unless ``ok``."""
    if not ok:
        raise ValueError(f"{field}={value!r}: {rule}")


def check_choices(obj: Any, prefix: str = "") -> None:
    """Every Literal-typed field of the dataclass ``obj`` holds one of its choices."""
    for name, tp in typing.get_type_hints(type(obj)).items():
        if typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
            value = getattr(obj, name)
            check(value in choices, f"{prefix}{name}", value,
                  f"must be one of {', '.join(map(str, choices))}")
