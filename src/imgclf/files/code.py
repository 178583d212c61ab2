"""The train stage's code: which files it is (dvc.yaml's train deps under src/imgclf), their digest, and
whether git holds them as committed.

A run's weights follow from its params, its data and this code (with the pinned library versions of
requirements.lock). The digest is part of a checkpoint's fingerprint and a run's `code_digest` tag, which
`imgclf rerun` compares against the tree it retrains in.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import yaml

PACKAGE = Path(__file__).resolve().parents[1]  # src/imgclf: this module is in its files/ wing
DVC_YAML = PACKAGE.parents[1] / "dvc.yaml"  # beside src/ in the repository the package is installed from
LOCKFILE = "requirements.lock"              # the exact library versions the weights depend on too


def code_deps(dvc_yaml: Path = DVC_YAML) -> list[str]:
    """dvc.yaml's train deps under src/imgclf (files or plug-in folders), as dvc.yaml names them; without a
    dvc.yaml, the whole package."""
    if not dvc_yaml.is_file():
        return ["src/imgclf"]
    deps = yaml.safe_load(dvc_yaml.read_text())["stages"]["train"]["deps"]
    return [dep for dep in deps if Path(dep).is_relative_to("src/imgclf")]


def code_digest(package: Path = PACKAGE, dvc_yaml: Path = DVC_YAML) -> str:
    """sha256 of the train stage's code: every file code_deps() lists (of a folder, every module in it, so a
    new family counts). Names are taken relative to the package, so a copy of the same code gives the same digest."""
    roots = [package / Path(dep).relative_to("src/imgclf") for dep in code_deps(dvc_yaml)]
    files = {f for root in roots for f in _modules(root)}
    digest = hashlib.sha256()
    for name, path in sorted((f.relative_to(package).as_posix(), f) for f in files):
        digest.update(f"{name}\0".encode() + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _modules(path: Path) -> list[Path]:
    """A listed file, or every module under a listed folder (nothing for a path that is not there)."""
    return list(path.rglob("*.py")) if path.is_dir() else [path] if path.is_file() else []


def uncommitted(root: Path, dvc_yaml: Path = DVC_YAML) -> list[str]:
    """The train stage's code files and the lockfile that differ from git's HEAD in the tree at `root`, new
    untracked modules included (a new family file is code); params.yaml and dvc.lock are not code.
    Raises OSError or CalledProcessError outside a git repository."""
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", *code_deps(dvc_yaml),
                          LOCKFILE], cwd=root, capture_output=True, text=True, check=True).stdout
    return sorted({line[3:] for line in out.splitlines() if line[3:].endswith((".py", LOCKFILE))})
