"""The import graph of src/imgclf, read from the source (AST), and each DVC stage's import closure.

A stage's code is its module (`imgclf <stage>` runs `imgclf.<stage>.main`) and every module of the
package it imports, at any depth, at module level or inside a function. Importing a plug-in package
(data/sources/, training/families/: an `__init__.py` that imports imgclf.plugins) counts as importing every
module in it: its registry loads them all. Importing a module of any other sub-package (a wing: files/,
tracking/, ...) brings that module and the `__init__.py` files above it, not its siblings.

    python scripts/imports.py          # the graph, then each stage's closure against dvc.yaml's deps
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = "imgclf"


def module_file(module: str) -> Path | None:
    """src/imgclf/x.py or src/imgclf/x/__init__.py for 'imgclf.x', else None."""
    base = SRC.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def direct_imports(path: Path) -> set[str]:
    """The package's modules `path` imports (`import imgclf.x`, `from imgclf import x`, `from imgclf.x import y`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name.split(".")[0] == PACKAGE and module_file(name)}
    return found


def plug_in_package(path: Path) -> bool:
    """Whether `path` is the __init__.py of a plug-in package: it makes a registry, which imports its whole folder."""
    return path.name == "__init__.py" and f"{PACKAGE}.plugins" in direct_imports(path)


def expand(module: str) -> set[str]:
    """A module and the packages above it (importing a.b runs a/__init__); a plug-in package brings all its modules."""
    parts = module.split(".")
    found = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    path = module_file(module)
    if path is not None and plug_in_package(path):
        found |= {module_name(p) for p in path.parent.glob("*.py")}
    return found


def closure(module: str) -> set[str]:
    """Every module of the package that running `module` can import."""
    seen: set[str] = set()
    todo = list(expand(module))
    while todo:
        current = todo.pop()
        if current in seen or module_file(current) is None:
            continue
        seen.add(current)
        for imported in direct_imports(module_file(current)):
            todo.extend(expand(imported))
    return seen


def closure_files(module: str) -> set[str]:
    """closure() as repo-relative file paths."""
    return {module_file(m).relative_to(REPO).as_posix() for m in closure(module)}


# params.yaml keys that the config layer (config.py, the CLI's front door) turns into other values before a stage
# runs, with the module that defines how: a stage whose dvc.yaml params list the key depends on that module too.
EXPANDED_BY = {"preset": f"{PACKAGE}.experiments.presets"}


def stage_code(name: str, stage: dict) -> set[str]:
    """The stage's import closure, plus the modules that expand the params it lists."""
    listed = {p if isinstance(p, str) else next(iter(p)) for p in stage.get("params", [])}
    return closure_files(f"{PACKAGE}.{name}").union(
        *(closure_files(module) for key, module in EXPANDED_BY.items() if key in listed))


def covered(path: str, deps: list[str]) -> bool:
    """Whether a dvc.yaml dep is the file or a folder above it."""
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def stage_problems(dvc_yaml: Path = REPO / "dvc.yaml") -> list[str]:
    """Each stage's code missing from its dvc.yaml deps, and each code dep it does not import."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    problems = []
    for name, stage in stages.items():
        deps = [d for d in stage.get("deps", []) if d.startswith(f"src/{PACKAGE}/")]
        code = stage_code(name, stage)
        problems += [f"stage {name}: dvc.yaml misses {path}" for path in sorted(code) if not covered(path, deps)]
        problems += [f"stage {name}: dvc.yaml lists {dep}, which the stage does not import"
                     for dep in deps if not any(covered(path, [dep]) for path in code)]
    return problems


def main() -> int:
    files = sorted((SRC / PACKAGE).rglob("*.py"))
    print("Import graph (module -> the package's modules it imports):")
    for path in files:
        imports = sorted(m.removeprefix(f"{PACKAGE}.") for m in direct_imports(path) - {PACKAGE})
        print(f"  {module_name(path).removeprefix(f'{PACKAGE}.')}: {', '.join(imports) or '-'}")
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]:
        print(f"\nstage {stage}: {', '.join(sorted(closure_files(f'{PACKAGE}.{stage}')))}")
    problems = stage_problems()
    print("\n" + ("\n".join(problems) if problems else "dvc.yaml lists exactly each stage's code"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
