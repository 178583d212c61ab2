"""`imgclf rerun RUN_ID`: retrain a logged run from its own code, data, params and seed, and check the weights
match, bit for bit.

By default at the run's commit: files/at_commit.py makes a temporary worktree of it (code checked, data placed);
here a child process runs that commit's `imgclf train` in it, logging into a new MLflow run of the original's
experiment, ended KILLED or FAILED here when the child could not end it. `--current-code` trains with this
tree's code instead, in this process."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from imgclf.config import parse_yaml, validate
from imgclf.errors import ImgclfError
from imgclf.process import imports_first, signals_held
from imgclf.training.numerics import ONEDNN_SWITCHES
from imgclf.files.paths import PARAMS_FILE, PREPARED_DIR
from imgclf.files.prepared_reader import load_prepared

# Tags whose difference explains a DIFF: see tracking.context's lineage_tags and environment_tags, and
# training.numerics.cpu_facts.
ENV_TAGS = ("git_commit", "code_digest", "python_version", "tensorflow_version", "keras_version", "numpy_version",
            "platform", "device", "numerics", "kernels", "mixed_precision", "cpu_model", "cpu_isa",
            *(s.lower() for s in ONEDNN_SWITCHES), "cpu_count", "tf_intra_op_threads", "tf_inter_op_threads", "eigen_cache_sizes")


def fill_later_keys(logged, defaults: dict, prefix: str = "") -> list[str]:
    """Add to `logged` (in place) the keys of `defaults` it lacks, at any depth; return them, dotted."""
    if not isinstance(logged, dict):
        return []  # validation names the problem
    filled = []
    for key, value in defaults.items():
        if key not in logged:
            logged[key] = copy.deepcopy(value)
            filled.append(f"{prefix}{key}")
        elif isinstance(value, dict):
            filled += fill_later_keys(logged[key], value, f"{prefix}{key}.")
    return filled


def repo_params(path: Path) -> dict:
    """This repo's params.yaml as written (its values are what a key added since a run defaults to), or {}."""
    try:
        params = parse_yaml(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return params if isinstance(params, dict) else {}


def logged_run(client, run_id: str):
    """The MLflow run and the params.yaml text it logged; a bad id or an unfinished run is a one-line error."""
    import mlflow

    from imgclf.tracking.failures import TrackingError, run_failure

    try:
        run = client.get_run(run_id)
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/{PARAMS_FILE}")
    except mlflow.exceptions.MlflowException as exc:
        raise run_failure(run_id, exc, "check the id in `mlflow ui`") from None
    for tag in ("weights_sha256", "data_digest"):
        if tag not in run.data.tags:
            raise TrackingError(f"MLflow run {run_id} has no {tag} tag: it did not finish training; pick another run")
    return run, text


def fetch_run(client, run_id: str, defaults: Path = Path(PARAMS_FILE)):
    """The MLflow run and the params.yaml it logged, validated for this tree's code.

    A run logged before a params key existed gets that key's value from `defaults` (this repo's params.yaml),
    and one line says which: the logged artifact cannot be edited, and the schema requires every key.
    """
    run, text = logged_run(client, run_id)
    params = parse_yaml(text)
    filled = fill_later_keys(params, repo_params(defaults))
    if filled:
        print(f"{PARAMS_FILE} of run {run_id} predates {', '.join(filled)}: using their values in {defaults}")
    return run, validate(params, f"{PARAMS_FILE} of run {run_id}")


def check_same_data(run, prepared_dir: str | Path) -> None:
    """Refuse unless the prepared data is byte-for-byte what the run trained on."""
    _, manifest = load_prepared(prepared_dir)
    expected = run.data.tags["data_digest"]
    if manifest["digest"] != expected:
        raise ImgclfError(
            f"{prepared_dir} (sha256 {manifest['digest'][:12]}) is not the data run {run.info.run_id} trained on "
            f"(sha256 {expected[:12]}); prepare that run's data first (its params.yaml is in its artifacts)"
        )


def loss_history(client, run_id: str) -> dict[int, float]:
    from imgclf.tracking.keys import metric_history

    return {m.step: m.value for m in metric_history(client, run_id, "loss")}


def first_difference(old: dict[int, float], new: dict[int, float]) -> int | None:
    """The first epoch whose loss differs (or exists in only one run), else None."""
    for epoch in sorted(set(old) | set(new)):
        if old.get(epoch) != new.get(epoch):
            return epoch
    return None


def compare(client, original, new_run_id: str) -> tuple[bool, list[str]]:
    """MATCH when weight hashes are equal; the lines explaining a DIFF otherwise."""
    new = client.get_run(new_run_id)
    old_hash, new_hash = original.data.tags["weights_sha256"], new.data.tags["weights_sha256"]
    if old_hash == new_hash:
        return True, [f"MATCH: weights sha256 {new_hash} (run {new_run_id})"]
    lines = [f"DIFF: weights sha256 {new_hash} (run {new_run_id}) != {old_hash} (run {original.info.run_id})"]
    epoch = first_difference(loss_history(client, original.info.run_id), loss_history(client, new_run_id))
    lines.append(f"  first epoch whose loss differs: {epoch}" if epoch else "  per-epoch losses are identical")
    for tag in ENV_TAGS:
        before, now = original.data.tags.get(tag), new.data.tags.get(tag)
        if before != now:
            lines.append(f"  environment differs: {tag}: {before} -> {now}")
    if len(lines) == 2:
        lines.append("  environment facts are the same")
    return False, lines


def main(run_id: str, prepared_dir: str | Path = PREPARED_DIR, restart: bool = False,
         current_code: bool = False) -> int:
    """Retrain RUN_ID as a new run tagged rerun_of and compare the weights; 0 on MATCH, 1 on DIFF.

    By default at the run's own commit (rerun_at_commit: its code, data and params, in a temporary worktree);
    `current_code` trains with this tree's code instead, in this process."""
    from mlflow.tracking import MlflowClient

    from imgclf.tracking.store import configure

    uri, _ = configure()
    client = MlflowClient()
    if current_code:
        original, params = fetch_run(client, run_id)
        new_run_id = rerun_here(original, params, Path(prepared_dir), restart)
    else:
        from imgclf.files.paths import repo_root

        original, text = logged_run(client, run_id)  # the text as logged: the keys of that commit's schema
        new_run_id = rerun_at_commit(client, original, text, uri, repo_root(), Path(prepared_dir))
    match, lines = compare(client, original, new_run_id)
    if not match:  # on another kind of machine: did the result reproduce, where the bits cannot?
        from imgclf.tracking.verdict import across_machines

        lines += across_machines(client, original, new_run_id)
    client.set_tag(new_run_id, "reproduced", str(match).lower())
    print("\n".join(lines))
    return 0 if match else 1


def rerun_here(original, params: dict, prepared_dir: Path, restart: bool) -> str:
    """Train the run's params with this tree's code, in this process; the new run's id.

    The run's train.numerics is known only once MLflow is read. TensorFlow is imported after that, so its
    environment is set in time and a bad id or other data fails in seconds; should TensorFlow be loaded
    already (a caller imported it), `restart` (the CLI) starts the command again with that environment."""
    from imgclf.training.numerics import restart_with_numerics, use_numerics

    (restart_with_numerics if restart else use_numerics)(params["train"]["numerics"], params["train"]["kernels"])
    check_same_data(original, prepared_dir)
    train = imports_first("imgclf.train").train  # TensorFlow, in the run's numerics mode
    with tempfile.TemporaryDirectory(prefix="imgclf-rerun-") as tmp:
        summary = train(params, prepared_dir, Path(tmp) / "model.keras", Path(tmp), Path(tmp) / "checkpoint",
                        tags={"rerun_of": original.info.run_id})
    return summary["mlflow_run_id"]


def reproducible_commit(run) -> str:
    """The commit to retrain `run` at; refused in one line when its code was not committed."""
    from imgclf.files.at_commit import CURRENT_CODE

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


def rerun_at_commit(client, original, params_text: str, tracking_uri: str, root: Path, prepared_dir: Path) -> str:
    """Retrain `original` at its commit with its data and params into a new run tagged rerun_of; its id.
    `tracking_uri` must be absolute (store.tracking_uri makes it so): the child runs in another folder."""
    from imgclf.files.at_commit import check_code, lock_differences, place_data, worktree
    from imgclf.files.code import LOCKFILE

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
        with signals_held():
            if proc.poll() is None:
                _stop(proc)


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


def _end_if_running(client, run_id: str, status: str) -> None:
    """End the rerun's MLflow run with `status` unless the training process ended it already."""
    with signals_held():
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status)
