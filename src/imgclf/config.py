"""params.yaml: the one place that loads and validates configuration.

Every key the pipeline reads is declared in SCHEMA with its type and allowed range. Unknown,
missing or invalid keys are all reported together in one line, before any stage does work
(DVC's `-S` refuses unknown keys, but a hand-edited typo or `-S +key=` would otherwise be
silently ignored).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from imgclf.io import ImgclfError

PARAMS_FILE = "params.yaml"
DATASETS = ("digits", "cifar10", "folder", "npz")
MONITORS = ("loss", "val_loss")
PRECISIONS = ("none", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("none", "mirrored", "multi_worker")


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e-4` as a string, DVC's ruamel as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str):
    """Parse params text the way DVC does, so `-S train.learning_rate=1e-4` means a number."""
    return yaml.load(text, Loader=_Loader)


class ConfigError(ImgclfError):
    """params.yaml is missing, unreadable or has invalid values."""


@dataclass(frozen=True)
class Key:
    """One leaf of params.yaml: the types it may take and the range check on its value."""

    types: tuple[type, ...]
    check: Callable[[Any], bool] = lambda v: True
    expect: str = ""  # how the value must look, printed when `check` fails
    nullable: bool = False


def _conv_blocks_ok(value: list) -> bool:
    """Blocks of positive filter counts; an empty block keeps only its pool, but some block must conv."""
    return all(isinstance(b, list) and _dense_ok(b) for b in value) and any(value)


def _per_block_ok(value: int | list) -> bool:
    """One positive size for every block, or a list of one per block (length checked across keys)."""
    return _dense_ok(value) and bool(value) if isinstance(value, list) else value >= 1


def _dense_ok(value: list) -> bool:
    return all(_is_int(x) and x > 0 for x in value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


INT, NUM, STR, LIST, BOOL = (int,), (int, float), (str,), (list,), (bool,)
INT_OR_LIST = (int, list)

SCHEMA: dict[str, Any] = {
    "seed": Key(INT, lambda v: v >= 0, ">= 0"),
    "data": {
        "dataset": Key(STR, lambda v: v in DATASETS, f"one of {', '.join(DATASETS)}"),
        "path": Key(STR, lambda v: bool(v.strip()), "a non-empty path or null", nullable=True),
        "dev_fraction": Key(NUM, lambda v: 0 < v < 1, "in (0, 1)"),
        "max_train_samples": Key(INT, lambda v: v >= 20, ">= 20 or null", nullable=True),
    },
    "model": {
        "input_scale": Key(NUM, lambda v: math.isfinite(v) and v > 0, "> 0"),
        "conv_blocks": Key(LIST, _conv_blocks_ok, "a list of lists of positive ints, at least one non-empty"),
        "kernel_size": Key(INT_OR_LIST, _per_block_ok, ">= 1, or a list of those, one per block"),
        "pool_size": Key(INT_OR_LIST, _per_block_ok, ">= 1, or a list of those, one per block"),
        "conv_dropout": Key(BOOL),
        "dense_units": Key(LIST, _dense_ok, "a list of positive ints (may be empty)"),
    },
    "train": {
        "learning_rate": Key(NUM, lambda v: math.isfinite(v) and v > 0, "> 0"),
        "training_epochs": Key(INT, lambda v: v >= 1, ">= 1"),
        "batch_size": Key(INT, lambda v: v >= 1, ">= 1"),
        "regularization_strength": Key(NUM, lambda v: math.isfinite(v) and v >= 0, ">= 0"),
        "keep_prob": Key(NUM, lambda v: 0 < v <= 1, "in (0, 1]"),
        "early_stopping": {
            "monitor": Key(STR, lambda v: v in MONITORS, f"one of {', '.join(MONITORS)}"),
            "patience": Key(INT, lambda v: v >= 0, ">= 0"),
        },
        "mixed_precision": Key(STR, lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
        "jit_compile": Key(BOOL),
        "distribute": Key(STR, lambda v: v in STRATEGIES, f"one of {', '.join(STRATEGIES)}"),
    },
    "tracking": {
        "experiment": Key(STR, lambda v: bool(v.strip()), "a non-empty name"),
        "register_model": Key(STR, lambda v: bool(v.strip()), "a model name, or null to skip", nullable=True),
        "variant": Key(STR, lambda v: bool(v.strip()), "a label, or null", nullable=True),
    },
}


def _type_name(types: tuple[type, ...]) -> str:
    names = {INT: "an integer", NUM: "a number", STR: "a string", LIST: "a list", BOOL: "true/false",
             INT_OR_LIST: "an integer or a list"}
    return names.get(
        types, "/".join(t.__name__ for t in types)
    )


def _has_type(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def _validate(node: dict, schema: dict, prefix: str, problems: list[str]) -> None:
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
            continue
        value = node[key]
        if isinstance(spec, dict):
            if isinstance(value, dict):
                _validate(value, spec, f"{name}.", problems)
            else:
                problems.append(f"{name}: must be a section (a mapping), got {value!r}")
        elif value is None:
            if not spec.nullable:
                problems.append(f"{name}: must be {_type_name(spec.types)}, got null")
        elif not _has_type(value, spec.types):
            problems.append(f"{name}: must be {_type_name(spec.types)}, got {value!r}")
        elif not spec.check(value):
            problems.append(f"{name}={value!r}: must be {spec.expect}")


def _cross_check(params: dict, problems: list[str]) -> None:
    """Rules spanning keys: per-block lists must have one entry per conv block."""
    model = params["model"]
    for key in ("kernel_size", "pool_size"):
        value = model[key]
        if isinstance(value, list) and len(value) != len(model["conv_blocks"]):
            problems.append(f"model.{key}={value}: needs one entry per block of model.conv_blocks "
                            f"({len(model['conv_blocks'])}), or a single integer")


def validate(params: Any, source: str = PARAMS_FILE) -> dict:
    """Return `params` if it matches SCHEMA, else raise one ConfigError listing every problem."""
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: must be a YAML mapping of sections, got {type(params).__name__}")
    problems: list[str] = []
    _validate(params, SCHEMA, "", problems)
    if not problems:
        _cross_check(params, problems)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems) + f" -- fix {source} and rerun")
    return params


def apply_overrides(params: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings (values parsed as YAML) like DVC's `-S`; validation follows."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.learning_rate=0.0005")
        *sections, leaf = key.split(".")
        node = params
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {section} is not a section")
        try:
            node[leaf] = parse_yaml(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: value is not valid YAML") from None
    return params


def load_params(path: str | Path = PARAMS_FILE, overrides: list[str] = ()) -> dict:
    """Load params.yaml, apply overrides and validate; every stage calls this first."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; run from the project root or pass --params PATH") from None
    try:
        params = parse_yaml(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where else ""
        raise ConfigError(f"{path}: invalid YAML{at}; fix the syntax and rerun") from None
    if overrides and isinstance(params, dict):
        apply_overrides(params, list(overrides))
    return validate(params, str(path))


def flatten(params: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'keep_prob': 0.6}} -> {'train.keep_prob': 0.6}, for logging and overrides."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
