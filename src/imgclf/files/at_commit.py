"""A run retrained with its own code: a temporary `git worktree` at the run's commit, with the run's data and params.

The working tree is never touched. The run's commit is checked out into a temporary worktree; the code the
train stage hashes there must have the run's `code_digest`; its data/prepared is the workspace's when that
holds the run's data digest, else restored from the DVC cache; its params.yaml is the text the run logged.
Then `imgclf train` of *that* code trains there, logging into a new MLflow run of the original's experiment.
The worktree goes on every exit path: signals are held while it is removed, so a Ctrl-C cannot leave half of it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from imgclf.errors import ImgclfError
from imgclf.files.atomic import read_json
from imgclf.files.code import LOCKFILE, code_digest
from imgclf.files.paths import MANIFEST, PARAMS_FILE, PREPARED_DIR

CURRENT_CODE = "`imgclf rerun --current-code {run_id}` retrains it with this tree's code instead"


def reproducible_commit(run) -> str:
    """The commit to retrain `run` at; refused in one line when its code was not committed."""
    tags, run_id = run.data.tags, run.info.run_id
    commit = tags.get("git_commit", "unknown")
    if commit == "unknown":
        raise ImgclfError(f"MLflow run {run_id} records no git commit (trained outside git), so its code cannot be "
                          f"restored; {CURRENT_CODE.format(run_id=run_id)}")
    # Before code_digest was tagged, git_dirty counted any tracked change (dvc.lock, which DVC rewrites, too):
    # such a run is retrained at its commit unchecked, and check_code says so.
    if tags.get("git_dirty") == "True" and "code_digest" in tags:
        files = tags.get("git_dirty_files", "code not in its commit")
        raise ImgclfError(f"MLflow run {run_id} trained on uncommitted code ({files}): it cannot be reproduced "
                          f"exactly; {CURRENT_CODE.format(run_id=run_id)}")
    return commit


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (then they arrive as usual)."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def worktree(root: Path, commit: str, run_id: str) -> Iterator[Path]:
    """A temporary git worktree of `root`'s repository at `commit`, removed (and pruned) on every exit path."""
    tmp = Path(tempfile.mkdtemp(prefix="imgclf-rerun-"))
    tree = tmp / "tree"
    try:
        added = _git(root, "worktree", "add", "--detach", "--quiet", str(tree), commit)
        if added.returncode:
            raise ImgclfError(f"commit {commit[:12]} of MLflow run {run_id} is not in the repository at {root} "
                              f"({added.stderr.strip().splitlines()[-1] if added.stderr.strip() else 'git failed'}); "
                              "`git fetch` it, or rerun from a clone that has it")
        yield tree
    finally:
        with _signals_held():
            _git(root, "worktree", "remove", "--force", str(tree))
            shutil.rmtree(tmp, ignore_errors=True)
            _git(root, "worktree", "prune")


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


def _stop(proc: subprocess.Popen) -> None:
    """End the child: a Ctrl-C reached it too (one process group), so it gets time to end its MLflow run KILLED;
    then it is asked (SIGTERM), then killed."""
    for sig, wait in ((None, 10), (signal.SIGTERM, 30), (signal.SIGKILL, None)):
        if sig is not None:
            proc.send_signal(sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def train_in(tree: Path, params_text: str, tracking_uri: str, new_run_id: str) -> int:
    """`imgclf train` of the tree's own code in the tree, logging into MLflow run `new_run_id`; its exit code."""
    (tree / PARAMS_FILE).write_text(params_text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}  # not a DVC stage: the tree's own git
    env |= {"PYTHONPATH": os.pathsep.join(filter(None, [str(tree / "src"), env.get("PYTHONPATH")])),
            "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_RUN_ID": new_run_id}
    proc = subprocess.Popen([sys.executable, "-m", "imgclf.cli", "train"], cwd=tree, env=env)
    try:
        return proc.wait()
    finally:
        with _signals_held():
            if proc.poll() is None:
                _stop(proc)


def rerun(client, original, params_text: str, tracking_uri: str, root: Path, prepared_dir: Path) -> str:
    """Retrain `original` at its commit with its data and params into a new run tagged rerun_of; its id."""
    run_id, tags = original.info.run_id, original.data.tags
    commit = reproducible_commit(original)
    with worktree(root, commit, run_id) as tree:
        check_code(tree, original)
        differ = lock_differences(tree / LOCKFILE)
        if differ:
            print(f"{LOCKFILE} at {commit[:12]} differs from the installed packages ({'; '.join(differ)}): the "
                  "weights may differ; `make setup` at that commit installs its versions")
        source = place_data(root, tree, tags["data_digest"], prepared_dir)
        print(f"Retraining MLflow run {run_id} at commit {commit[:12]} (code sha256 {tags.get('code_digest', '?')[:12]}) "
              f"on its data from {source}, in a temporary worktree")
        new = client.create_run(original.info.experiment_id, run_name=f"{original.info.run_name}-rerun",
                                tags={"rerun_of": run_id})
        try:
            code = train_in(tree, params_text, tracking_uri, new.info.run_id)
        except BaseException:  # Ctrl-C: the child ends the run KILLED, unless it had not opened it yet
            _end_if_running(client, new.info.run_id, "KILLED")
            raise
        if code:
            _end_if_running(client, new.info.run_id, "KILLED" if code == 130 else "FAILED")
            raise ImgclfError(f"training MLflow run {run_id}'s code at commit {commit[:12]} failed (exit {code}; its "
                              "output is above)")
    return new.info.run_id


def _end_if_running(client, run_id: str, status: str) -> None:
    """End the rerun's MLflow run with `status` unless the training process ended it already."""
    with _signals_held():
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status)
