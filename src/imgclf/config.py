"""params.yaml: the one place that loads and validates configuration, before any stage runs.

Every key the pipeline reads is declared with its type and allowed range: the common keys here, each
data source's and model family's own keys in its plug-in file, which config takes from the registries.
Unknown, missing or invalid keys are all reported together in one line, before any stage does work
(DVC's `-S` refuses unknown keys, but a hand-edited typo or `-S +key=` would otherwise be silently ignored).

This module is the CLI's front door, never imported by a stage: it decides whether a stage runs, not
what it writes (DVC tracks the values themselves as each stage's `params:`).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from imgclf.data import sources
from imgclf.training import families
from imgclf.errors import ImgclfError
from imgclf.experiments.presets import PRESETS, SHIPPED
from imgclf.training.numerics import KERNELS, NUMERICS_ENV
from imgclf.files.paths import PARAMS_FILE
from imgclf.schema import BOOL, INT, NUM, STR, Key, check_node, finite, one_of

MONITORS = ("loss", "val_loss", "none")  # early_stopping.py: the report's rule, Keras' rule, no early stop
PRECISIONS = ("none", "mixed_float16", "mixed_bfloat16", "auto")  # auto: numerics.resolve_precision
STRATEGIES = ("none", "mirrored", "multi_worker")
TTA = ("none", "flip", "flip_translate")  # tta.py


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e-4` as a string, DVC's ruamel as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


# YAML aliases share one node, so a few lines can describe billions of values ("billion laughs"): loading
# is cheap, but validating, logging or dumping such params walks every one. params.yaml has about 100.
MAX_YAML_NODES = 100_000


def parse_yaml(text: str):
    """Parse params text the way DVC does, so `-S train.learning_rate=1e-4` means a number.

    Refuses values that expand (through aliases) to more than MAX_YAML_NODES nodes, or refer to themselves.
    """
    value = yaml.load(text, Loader=_Loader)
    _expanded_size(value, {}, set())
    return value


def _expanded_size(node: Any, sizes: dict[int, int], open_ids: set[int]) -> int:
    """How many nodes `node` has once its aliases are expanded; counted once per shared node (memo by id)."""
    if not isinstance(node, (dict, list)):
        return 1
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_ids:
        raise yaml.YAMLError("an alias refers to the value that contains it (a recursive structure)")
    open_ids.add(id(node))
    children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
    size = 1 + sum(_expanded_size(child, sizes, open_ids) for child in children)
    open_ids.discard(id(node))
    if size > MAX_YAML_NODES:
        raise yaml.YAMLError(f"its aliases expand to more than {MAX_YAML_NODES:,} values (a \"billion laughs\")")
    sizes[id(node)] = size
    return size


class ConfigError(ImgclfError):
    """params.yaml is missing, unreadable or has invalid values."""


BASE_SCHEMA: dict[str, Any] = {
    # NumPy's and scikit-learn's generators take 0 <= seed < 2**32; a larger one used to pass here and
    # surface in prepare as a misleading "cannot stratify"
    "seed": Key(INT, lambda v: 0 <= v < 2**32, ">= 0 and < 2**32 (NumPy's seed range)"),
    "preset": Key(STR, lambda v: v in PRESETS, f"one of {', '.join(PRESETS)}, or null", nullable=True),
    "data": {
        "path": Key(STR, lambda v: bool(v.strip()), "a non-empty path or null", nullable=True),
        "dev_fraction": Key(NUM, finite(0, 1), "in (0, 1)"),
        "max_train_samples": Key(INT, lambda v: v >= 20, ">= 20 or null", nullable=True),
        "image_size": Key(INT, lambda v: 8 <= v <= 1024, "in 8..1024"),
        "workers": Key(INT, lambda v: v >= 1, ">= 1, or null for every core", nullable=True),
    },
    "model": {},
    "train": {
        "training_epochs": Key(INT, lambda v: v >= 1, ">= 1"),
        "batch_size": Key(INT, lambda v: v >= 1, ">= 1"),
        "early_stopping": {
            "monitor": one_of(MONITORS),
            "patience": Key(INT, lambda v: v >= 0, ">= 0"),
        },
        "mixed_precision": one_of(PRECISIONS),
        "jit_compile": Key(BOOL),
        "distribute": one_of(STRATEGIES),
        "tf32": Key(BOOL),
        "numerics": one_of(tuple(NUMERICS_ENV)),
        "kernels": one_of(KERNELS),
        "stop_on_collapse": Key(BOOL),
    },
    "evaluate": {
        "tta": one_of(TTA),
    },
    "tracking": {
        "experiment": Key(STR, lambda v: bool(v.strip()), "a non-empty name"),
        "register_model": Key(STR, lambda v: bool(v.strip()), "a model name, or null to skip", nullable=True),
        "variant": Key(STR, lambda v: bool(v.strip()), "a label, or null", nullable=True),
        "system_metrics": Key(BOOL),
    },
}


def _merge(into: dict, keys: dict) -> None:
    for name, spec in keys.items():
        if isinstance(spec, dict) and isinstance(into.get(name), dict):
            _merge(into[name], spec)
        else:
            into[name] = spec


def schema() -> dict[str, Any]:
    """BASE_SCHEMA plus the registered names and every plug-in's own keys."""
    full = copy.deepcopy(BASE_SCHEMA)
    full["data"]["dataset"] = one_of(sources.REGISTRY.names())
    full["model"]["arch"] = one_of(families.REGISTRY.names())
    for _, family in families.REGISTRY.items():
        _merge(full, family.params)
    return full


def _cross_check(params: dict, problems: list[str]) -> None:
    """Rules spanning keys, from the chosen source and every model family."""
    problems += sources.REGISTRY.get(params["data"]["dataset"]).check(params["data"])
    for _, family in families.REGISTRY.items():
        problems += family.check(params)


def validate(params: Any, source: str = PARAMS_FILE) -> dict:
    """Return `params` if it matches the schema, else raise one ConfigError listing every problem."""
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: must be a YAML mapping of sections, got {type(params).__name__}")
    problems: list[str] = []
    check_node(params, schema(), "", problems)
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


_ABSENT = object()


def _value(params: dict, key: str):
    """The value at a dotted key, or _ABSENT."""
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def expand_preset(params: dict, explicit: list[str] = ()) -> dict:
    """Apply the preset params.yaml's `preset` names (experiments/presets.py) to every key it sets, except those set
    explicitly: given as `explicit` overrides (KEY=VALUE, imgclf's -S), or holding a value other than the shipped
    one in params.yaml (`dvc exp run -S` writes its values there). An unknown name is left for validate to name."""
    name = params.get("preset")
    if not isinstance(name, str) or name not in PRESETS:
        return params
    given = [item.partition("=")[0] for item in explicit]
    sets = {"tracking.variant": name, **PRESETS[name].overrides}
    return apply_overrides(params, [
        f"{key}={value}" for key, value in sets.items()
        if not any(key == g or key.startswith(g + ".") for g in given) and _value(params, key) == SHIPPED[key]])


def load_params(path: str | Path = PARAMS_FILE, overrides: list[str] = ()) -> dict:
    """Load params.yaml, apply overrides, expand the preset and validate; the CLI calls this before every stage."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; run from the project root or pass --params PATH") from None
    try:
        params = parse_yaml(text)
    except yaml.YAMLError as exc:
        if type(exc) is yaml.YAMLError:  # raised by parse_yaml's size check, not a syntax error
            raise ConfigError(f"{path}: {exc}; remove the aliases (*name) and write the values out") from None
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where else ""
        raise ConfigError(f"{path}: invalid YAML{at}; fix the syntax and rerun") from None
    if isinstance(params, dict):
        expand_preset(apply_overrides(params, list(overrides)), list(overrides))
    return validate(params, str(path))
