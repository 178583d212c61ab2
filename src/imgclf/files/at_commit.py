"""A run's commit as files: a temporary `git worktree` at the commit, its submodules initialised, the train stage's
code there checked against the run's `code_digest`, and the run's prepared data placed in it.

The working tree is never touched. data/prepared in the worktree is the workspace's when that holds the run's
data digest, else restored from the DVC cache. The worktree goes on every exit path: signals are held while it
is removed, so a Ctrl-C cannot leave half of it. What trains there, and the MLflow run it logs into, is
`imgclf rerun`'s (rerun.py).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

from imgclf.errors import ImgclfError
from imgclf.process import signals_held
from imgclf.files.atomic import read_json
from imgclf.files.code import LOCKFILE, code_digest
from imgclf.files.paths import MANIFEST, PREPARED_DIR

CURRENT_CODE = "`imgclf rerun --current-code {run_id}` retrains it with this tree's code instead"
COMMIT_ID = re.compile(r"[0-9a-f]{40}")  # what a run's git_commit tag must be before git sees it


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


@contextlib.contextmanager
def worktree(root: Path, commit: str, run_id: str) -> Iterator[Path]:
    """A temporary git worktree of `root`'s repository at `commit` (40 hex digits), its submodules initialised;
    removed (and pruned) on every exit path."""
    if not COMMIT_ID.fullmatch(commit):  # a tag such as `--lock` would reach git as an option
        raise ImgclfError(f"MLflow run {run_id}'s git_commit tag {commit!r} is not a commit id (40 hex digits); "
                          f"{CURRENT_CODE.format(run_id=run_id)}")
    tmp = Path(tempfile.mkdtemp(prefix="imgclf-rerun-"))
    tree = tmp / "tree"
    try:
        added = _git(root, "worktree", "add", "--detach", "--quiet", "--end-of-options", str(tree), commit)
        if added.returncode:
            raise ImgclfError(f"commit {commit[:12]} of MLflow run {run_id} is not in the repository at {root} "
                              f"({_last_line(added)}); `git fetch` it, or rerun from a clone that has it")
        if (tree / ".gitmodules").is_file():
            modules = _git(tree, "submodule", "update", "--init", "--recursive", "--quiet")
            if modules.returncode:
                raise ImgclfError(f"the submodules of commit {commit[:12]} cannot be checked out in the rerun's "
                                  f"worktree ({_last_line(modules)}); make their URLs in .gitmodules reachable")
        yield tree
    finally:
        with signals_held():
            _git(root, "worktree", "remove", "--force", str(tree))
            shutil.rmtree(tmp, ignore_errors=True)
            _git(root, "worktree", "prune")


def _last_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    return lines[-1] if lines else "git failed"


def check_code(tree: Path, run) -> None:
    """The train stage's code in `tree` must be what the run hashed (its code_digest tag, when it has one)."""
    expected, actual = run.data.tags.get("code_digest"), code_digest(tree / "src/imgclf", tree / "dvc.yaml")
    commit = run.data.tags["git_commit"][:12]
    if expected is None:
        print(f"MLflow run {run.info.run_id} predates code_digest tags: training with the code of its commit "
              f"{commit}, which cannot be checked against the run")
    elif expected != actual:
        raise ImgclfError(f"the train stage's code at commit {commit} (sha256 {actual[:12]}) is not the code MLflow "
                          f"run {run.info.run_id} trained with ({expected[:12]}): it cannot be reproduced exactly; "
                          f"{CURRENT_CODE.format(run_id=run.info.run_id)}")


def lock_differences(lockfile: Path) -> list[str]:
    """`name locked X, installed Y` for each `name==X` pin of the lockfile that this environment does not have."""
    differ = []
    for line in lockfile.read_text().splitlines() if lockfile.is_file() else []:
        name, sep, locked = line.split("#")[0].strip().partition("==")
        if not sep:
            continue
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "none"
        if installed != locked:
            differ.append(f"{name} locked {locked}, installed {installed}")
    return differ


def _cached_prepared(root: Path, digest: str) -> tuple[Path, list[dict]] | None:
    """(the DVC cache folder, the file list) of a data/prepared in `root`'s DVC cache whose manifest has `digest`."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        cache = Path(repo.cache.local.path)
    for listing in sorted(cache.glob("*/*.dir")):
        entries = json.loads(listing.read_text())
        manifest = next((e for e in entries if e.get("relpath") == MANIFEST), None)
        path = manifest and cache / manifest["md5"][:2] / manifest["md5"][2:]
        if path and path.is_file() and json.loads(path.read_text()).get("digest") == digest:
            return cache, entries
    return None


def place_data(root: Path, tree: Path, digest: str, prepared_dir: Path) -> str:
    """Put the run's prepared data at tree/data/prepared; say where it came from."""
    target = tree / PREPARED_DIR
    target.parent.mkdir(parents=True, exist_ok=True)
    manifest = prepared_dir / MANIFEST
    if manifest.is_file() and read_json(manifest, "data manifest").get("digest") == digest:
        target.symlink_to(prepared_dir.resolve(), target_is_directory=True)  # read only: train verifies every array
        return str(prepared_dir)
    found = _cached_prepared(root, digest)
    if found is None:
        raise ImgclfError(f"the data the run trained on (digest {digest[:12]}) is neither in {prepared_dir} nor in the "
                          f"DVC cache; `dvc pull` it, or prepare it with the run's params.yaml (in its artifacts)")
    cache, entries = found
    for entry in entries:
        (target / entry["relpath"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cache / entry["md5"][:2] / entry["md5"][2:], target / entry["relpath"])
    return "the DVC cache"
