"""How a params.yaml key is declared and checked: config.py and every plug-in's own keys use this."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable

INT, NUM, STR, LIST, BOOL = (int,), (int, float), (str,), (list,), (bool,)
INT_OR_LIST = (int, list)
_TYPE_NAMES = {INT: "an integer", NUM: "a number", STR: "a string", LIST: "a list", BOOL: "true/false",
               INT_OR_LIST: "an integer or a list"}


@dataclass(frozen=True)
class Key:
    """One leaf of params.yaml: the types it may take and the range check on its value."""

    types: tuple[type, ...]
    check: Callable[[Any], bool] = lambda v: True
    expect: str = ""  # how the value must look, printed when `check` fails
    nullable: bool = False


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_ints(value: list) -> bool:
    return all(is_int(x) and x > 0 for x in value)


def finite(low: float = -math.inf, high: float = math.inf, low_open: bool = True, high_open: bool = True):
    """A check for a finite number in an (open or closed) interval."""
    def check(v) -> bool:
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return math.isfinite(v) and above and below
    return check


def one_of(names) -> Key:
    """A string key whose value must be one of `names`."""
    names = tuple(names)
    return Key(STR, lambda v: v in names, f"one of {', '.join(names)}")


def _type_name(types: tuple[type, ...]) -> str:
    return _TYPE_NAMES.get(types, "/".join(t.__name__ for t in types))


def _has_type(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def check_leaf(name: str, value: Any, spec: Key, problems: list[str]) -> None:
    if value is None:
        if not spec.nullable:
            problems.append(f"{name}: must be {_type_name(spec.types)}, got null")
    elif not _has_type(value, spec.types):
        problems.append(f"{name}: must be {_type_name(spec.types)}, got {value!r}")
    elif not spec.check(value):
        problems.append(f"{name}={value!r}: must be {spec.expect}")


def check_node(node: dict, schema: dict, prefix: str, problems: list[str]) -> None:
    """Append one message per problem under `node` (recursing into sections) to `problems`."""
    for key in node:
        if key not in schema:
            close = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            problems.append(f"{prefix}{key}: unknown key{hint}")
    for key, spec in schema.items():
        name = f"{prefix}{key}"
        if key not in node:
            problems.append(f"{name}: missing")
        elif isinstance(spec, dict):
            if isinstance(node[key], dict):
                check_node(node[key], spec, f"{name}.", problems)
            else:
                problems.append(f"{name}: must be a section (a mapping), got {node[key]!r}")
        else:
            check_leaf(name, node[key], spec, problems)
