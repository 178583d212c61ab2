"""The package's layout (docs/extending.md#layout): a top of stages and commands, wings below, imports only down."""

from __future__ import annotations

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import imports  # noqa: E402  (scripts/imports.py: the AST import graph)

SHARED = {"errors", "process", "schema", "plugins", "metrics", "tta"}
# What each wing (and each shared module) may import, by top-level name under imgclf.
ALLOWED = {
    **{name: set() for name in SHARED - {"plugins"}},
    "plugins": {"errors"},
    "files": SHARED,
    "data": SHARED | {"files"},
    "training": SHARED | {"files"},
    "tracking": SHARED | {"files", "training"},
    "experiments": SHARED | {"files", "tracking"},
    "team": SHARED | {"files", "tracking"},
    "serving": SHARED | {"files", "data", "tracking"},
    "evaluation": SHARED | {"files"},
}
STAGES = {"fingerprint", "prepare", "train", "evaluate", "rerun", "workspace"}


def edges() -> set[tuple[str, str]]:
    """(importing module, imported module) for every import inside the package, dotted names without `imgclf.`."""
    found = set()
    for path in (REPO / "src" / "imgclf").rglob("*.py"):
        me = imports.module_name(path)
        found |= {(me.removeprefix("imgclf."), m.removeprefix("imgclf.")) for m in imports.direct_imports(path)
                  if m not in ("imgclf", me)}
    return found


def test_the_top_holds_the_stages_commands_and_the_shared_modules_only():
    top = {p.stem for p in (REPO / "src" / "imgclf").glob("*.py")}
    assert top <= SHARED | STAGES | {"__init__", "cli", "config"} and len(top) <= 15


def test_wings_import_only_down_and_stages_never_another_stage():
    wrong = []
    for importer, imported in edges():
        source, target = importer.split(".")[0], imported.split(".")[0]
        if source == target:
            continue
        if source in ALLOWED and target not in ALLOWED[source]:
            wrong.append(f"{importer} -> {imported}")
        if source in STAGES and target in STAGES | {"cli"} or source in STAGES - {"rerun"} and target == "config":
            wrong.append(f"{importer} -> {imported}")
    assert wrong == []


def test_tracking_reads_only_the_cpu_facts_of_training():
    assert {b for a, b in edges() if a.startswith("tracking.") and b.startswith("training")} <= {
        "training", "training.numerics"}
