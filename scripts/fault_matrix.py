"""The fault x stage table of docs/reliability.md (issue 22): every fault, in every stage where it can happen.

    sudo .venv/bin/python scripts/fault_matrix.py [--only WORD ...]   # root: tmpfs mounts; ~15 min on 2 cores

Not part of the test suite (tests/test_faults.py runs one case per fault class). Each case runs in a fresh
git+DVC copy of the repo with tiny settings whose training lasts a few seconds per epoch, and gives one row:
the fault, the stage, the exit code, the line printed, whether the earlier outputs kept their sha256, the state
of the MLflow run, and what the rerun after the fault is gone reached: `ref` when `dvc repro` ends with the same
weights sha256 as an uninterrupted run. Real imgclf, DVC, MLflow and TensorFlow; the servers that hang or fail
are the stdlib doubles of tests/test_faults.py in front of a real `mlflow server`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import TINY, MlflowServer, copy_repo, pipeline_env, write_params  # noqa: E402
from test_faults import (BILLION_LAUGHS, HOLD_DVC, STORES, FlakyProxy, hung_server, png_bomb,  # noqa: E402
                         small_disk)

# Slow enough (a few seconds per epoch) to strike during training; 6 epochs, no early stop before them.
SETTINGS = TINY | {"data.max_train_samples": "1500", "train.training_epochs": "6",
                   "train.early_stopping.patience": "50"}
OUTPUTS = ("data/prepared", "models/model.keras", "reports")
WORK = Path(tempfile.mkdtemp(prefix="imgclf-faults-"))


def sh(cmd: list[str], repo: Path, env: dict | None = None, timeout: float = 900) -> tuple[int, str, str, float]:
    """(exit code, stdout, stderr, seconds) of a command in `repo`; 124 when it ran past `timeout`."""
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=repo, env=env or pipeline_env(), capture_output=True, text=True,
                              timeout=timeout)
        return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started
    except subprocess.TimeoutExpired as exc:
        return 124, str(exc.stdout or ""), str(exc.stderr or ""), time.monotonic() - started


def line_of(stderr: str) -> str:
    """The `imgclf ...: error:` line (or DVC's ERROR line), '' when there is none; 'TRACEBACK' flags one."""
    lines = [ln for ln in stderr.splitlines() if ": error: " in ln or ln.startswith("ERROR")]
    return ("TRACEBACK! " if "Traceback" in stderr else "") + (lines[-1] if lines else "")


def digests(repo: Path, paths=OUTPUTS) -> dict[str, str]:
    """sha256 of every file under `paths` (temp leftovers `.*.tmp*` included: they count as damage)."""
    found = {}
    for name in paths:
        root = repo / name
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
        for path in files:
            found[str(path.relative_to(repo))] = hashlib.sha256(path.read_bytes()).hexdigest()
    for leftover in repo.glob("**/.*.tmp*"):
        if leftover.name != ".imgclf.lock.tmp" and ".dvc" not in leftover.parts:
            found[str(leftover.relative_to(repo))] = "LEFTOVER"
    return found


def run_state(uri: str, experiment: str = "imgclf") -> str:
    """Status of the experiment's latest run, with its failure_reason tag's presence; '-' without runs."""
    from mlflow.tracking import MlflowClient

    with contextlib.suppress(Exception):
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"]) if exp else []
        if runs:
            run = runs[0]
            return run.info.status + (" +reason" if "failure_reason" in run.data.tags else "")
        return "-"
    return "unreadable"


def sqlite_uri(repo: Path) -> str:
    return f"sqlite:///{repo / 'mlflow.db'}"


def weights(repo: Path) -> str:
    with contextlib.suppress(OSError, ValueError, KeyError):
        return json.loads((repo / "reports/train.json").read_text())["weights_sha256"]
    return "none"


def repro(repo: Path, env: dict | None = None) -> str:
    """`dvc repro` now that the fault is gone: `ref` when it reaches the uninterrupted weights, else why not."""
    code, _, err, _ = sh(["dvc", "repro"], repo, env)
    if code:
        return f"exit {code}: {line_of(err)[:80]}"
    return "ref" if weights(repo) == REF["weights"] else f"DIFFERENT {weights(repo)[:8]}"


REF: dict[str, str] = {}
BASE = WORK / "base"


def prepare_base() -> None:
    """A committed copy with SETTINGS whose prepare stage is done, and the uninterrupted run's weights hash."""
    BASE.mkdir()
    copy_repo(BASE)
    write_params(BASE, SETTINGS)
    sh(["git", "commit", "-qam", "fault matrix settings"], BASE)
    assert sh(["dvc", "repro", "prepare"], BASE)[0] == 0
    reference = fresh("reference")
    assert sh(["dvc", "repro"], reference)[0] == 0, "the uninterrupted run failed"
    REF["weights"] = weights(reference)
    print(f"uninterrupted run: weights {REF['weights'][:16]}", flush=True)


def fresh(name: str) -> Path:
    """A copy of the base (prepare done, no MLflow store yet)."""
    repo = WORK / name
    shutil.copytree(BASE, repo, symlinks=True)
    return repo


def row(fault: str, stage: str, result: tuple, intact: bool | None, state: str, rerun: str, note: str = "") -> dict:
    code, _, err, seconds = result
    return {"fault": fault, "stage": stage, "exit": code, "seconds": round(seconds, 1), "line": line_of(err),
            "intact": {True: "yes", False: "NO", None: "-"}[intact], "mlflow": state, "rerun": rerun, "note": note}


def fill(folder: Path) -> Path:
    """Fill the file system of `folder` up with one file; delete it to free the space again."""
    filler = folder / "filler.bin"
    with contextlib.suppress(OSError), open(filler, "wb") as fh:  # its close fails on the full disk too
        while True:
            fh.write(b"\0" * (1 << 16))
            fh.flush()
    return filler


@contextlib.contextmanager
def full_disk_at(repo: Path, name: str, size: str = "16m", when: Callable[[], bool] | None = None):
    """`repo/name` moved onto a small tmpfs (its files copied over), filled up at once or once `when()`."""
    folder, saved = repo / name, repo / f"{name}.saved"
    if folder.exists():
        folder.rename(saved)
    with small_disk(folder, size):
        if saved.exists():
            shutil.copytree(saved, folder, dirs_exist_ok=True, symlinks=True)
        done = threading.Event()

        def filler():
            while when and not when() and not done.is_set():
                time.sleep(0.01)
            fill(folder)

        thread = threading.Thread(target=filler, daemon=True)
        thread.start()
        yield
        done.set()
        thread.join(timeout=60)
        (folder / "filler.bin").unlink(missing_ok=True)  # the space is freed now
        keep = repo / f"{name}.after"
        shutil.copytree(folder, keep, dirs_exist_ok=True, symlinks=True)
    shutil.rmtree(folder, ignore_errors=True)
    keep.rename(folder)
    shutil.rmtree(saved, ignore_errors=True)


# -- the cases: each returns one row ---------------------------------------------------------------------------

def full_disk_prepare() -> dict:
    repo = fresh("enospc-prepare")
    before = digests(repo)
    with full_disk_at(repo, "data", "16m"):
        result = sh(["imgclf", "-S", "seed=7", "prepare"], repo)
        intact = digests(repo) == before
    return row("disk full", "prepare", result, intact, "-", repro(repo))


def full_disk_train(where: str, when_checkpointed: bool) -> dict:
    repo = fresh(f"enospc-train-{where.replace('/', '-')}")
    state = repo / "models/checkpoint/state.json"
    when = (lambda: state.exists()) if when_checkpointed else None
    with full_disk_at(repo, where, "64m", when):
        result = sh(["imgclf", "train"], repo)
        intact = not (repo / "models/model.keras").exists()  # no model that looks finished
    return row("disk full", f"train ({where})", result, intact, run_state(sqlite_uri(repo)), repro(repo))


def full_disk_evaluate() -> dict:
    repo = fresh("enospc-evaluate")
    sh(["dvc", "repro"], repo)
    before = digests(repo)
    with full_disk_at(repo, "reports"):
        result = sh(["imgclf", "evaluate"], repo)
        intact = {k: v for k, v in digests(repo).items() if "filler" not in k} == before
    return row("disk full", "evaluate", result, intact, run_state(sqlite_uri(repo)), repro(repo))


def corrupt_store(kind: str) -> dict:
    repo = fresh(f"store-{kind.replace(' ', '-')}")
    sh(["dvc", "repro"], repo)  # a real store with one run, then damaged
    spoil, _ = STORES[kind]
    spoil(repo / "mlflow.db")
    before = digests(repo, (*OUTPUTS, "mlflow.db"))
    result = sh(["imgclf", "train"], repo)
    intact = digests(repo, (*OUTPUTS, "mlflow.db")) == before
    (repo / "mlflow.db").rename(repo / "mlflow.db.bad")  # what the line says to do
    (repo / "models/model.keras").unlink()  # make train run again
    return row(f"store: {kind}", "train", result, intact, "-", repro(repo))


def locked_store() -> dict:
    repo = fresh("store-locked")
    sh(["dvc", "repro"], repo)
    holder = subprocess.Popen([sys.executable, "-c", "import sqlite3, time\n"
                               "db = sqlite3.connect('mlflow.db', isolation_level=None)\n"
                               "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(90)"],
                              cwd=repo, stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()
    before = digests(repo, (*OUTPUTS, "mlflow.db"))
    result = sh(["imgclf", "evaluate"], repo)
    holder.kill()
    intact = digests(repo, (*OUTPUTS, "mlflow.db")) == before
    return row("store locked > wait", "evaluate", result, intact, run_state(sqlite_uri(repo)), "-")


def hung_at_start() -> dict:
    repo = fresh("hung-start")
    with hung_server() as uri:
        result = sh(["imgclf", "train"], repo, pipeline_env(MLFLOW_TRACKING_URI=uri))
    return row("server hangs (from the start)", "train", result, not (repo / "models/model.keras").exists(), "-",
               repro(repo))


def through_proxy(name: str, server: MlflowServer, fail_first: int, hang: bool) -> tuple[Path, tuple, str]:
    repo = fresh(name)
    proxy = FlakyProxy(server.uri, fail_first, hang)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    experiment = f"matrix-{name}-{time.time_ns()}"
    try:
        result = sh(["imgclf", "-S", f"tracking.experiment={experiment}", "train"], repo,
                    pipeline_env(MLFLOW_TRACKING_URI=proxy.uri))
    finally:
        proxy.shutdown()
    return repo, result, experiment


def hung_mid_run(server: MlflowServer) -> dict:
    repo, result, experiment = through_proxy("hung-mid", server, 0, True)
    no_model, state = not (repo / "models/model.keras").exists(), run_state(server.uri, experiment)
    env = pipeline_env(MLFLOW_TRACKING_URI=server.uri)
    rerun = sh(["imgclf", "-S", f"tracking.experiment={experiment}", "train"], repo, env)
    same = "ref" if not rerun[0] and weights(repo) == REF["weights"] else f"exit {rerun[0]}"
    return row("server hangs (mid-run)", "train", result, no_model, state, same,
               f"rerun into the same run: {run_state(server.uri, experiment)}")


def flaky(server: MlflowServer) -> dict:
    from mlflow.tracking import MlflowClient

    from imgclf.metrics import EPOCH_METRICS
    from imgclf.tracking.keys import metric_key

    repo, result, experiment = through_proxy("flaky", server, 3, False)
    client = MlflowClient(server.uri)
    run = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])[0]
    steps = {k: sorted(m.step for m in client.get_metric_history(run.info.run_id, k))
             for k in map(metric_key, EPOCH_METRICS) if k in run.data.metrics}
    once = all(s == list(range(1, int(run.data.metrics["epochs_run"]) + 1)) for s in steps.values())
    return row("server 503 x3 + reset", "train", result, None, run.info.status,
               "ref" if weights(repo) == REF["weights"] else "DIFFERENT",
               f"{len(steps)} epoch metrics, each epoch exactly once: {once}")


def started(cmd: list[str], repo: Path, ready: Callable[[], bool]) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=repo, env=pipeline_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    while not ready() and proc.poll() is None:
        time.sleep(0.05)
    return proc


def second_writer(first_cmd: list[str], second_cmd: list[str], stage: str) -> dict:
    repo = fresh("two-" + "-".join(first_cmd[:2] + second_cmd[:2]))
    first = started(first_cmd, repo, lambda: (repo / "models/checkpoint/state.json").exists())
    result = sh(second_cmd, repo)
    first.communicate(timeout=900)
    rerun = "first: ref" if not first.returncode and weights(repo) == REF["weights"] else f"first: {first.returncode}"
    return row(f"{' '.join(second_cmd[:2])} during {' '.join(first_cmd[:2])}", stage, result, None,
               run_state(sqlite_uri(repo)), rerun)


def stale_lock() -> dict:
    repo = fresh("stale-lock")
    first = started(["imgclf", "train"], repo, lambda: (repo / "models/checkpoint/state.json").exists())
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    code, out, err, seconds = sh(["dvc", "repro"], repo)
    note = "noted: " + next((ln for ln in out.splitlines() if "Cleared the lock" in ln), "NOT NOTED")[:60]
    return row("stale lock after kill -9", "train", (code, out, err, seconds), None, run_state(sqlite_uri(repo)),
               "ref" if not code and weights(repo) == REF["weights"] else f"exit {code}", note)


def dvc_lock_held() -> dict:
    repo = fresh("dvc-lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_DVC + "    print('held', flush=True)\n"
                               "    import time; time.sleep(60)\n"], cwd=repo, stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()
    result = sh(["imgclf", "train"], repo)
    holder.kill()
    return row("imgclf train while DVC holds its lock", "train", result, None, "-", repro(repo))


def permission(stage: str, folder: str, cmd: list[str]) -> dict:
    repo = fresh(f"perm-{stage}")
    if stage == "evaluate":
        sh(["dvc", "repro"], repo)
    target = repo / folder
    target.mkdir(parents=True, exist_ok=True)
    before = digests(repo)
    target.chmod(0o555 if stage != "prepare" else 0)
    as_user = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []
    result = sh([*as_user, *cmd], repo)
    target.chmod(0o755)
    return row(f"{folder} {'unreadable' if stage == 'prepare' else 'read-only'}", stage, result,
               digests(repo) == before, run_state(sqlite_uri(repo)), repro(repo) if stage != "prepare" else "-")


def yaml_bomb(command: list[str]) -> dict:
    repo = fresh(f"yaml-bomb-{command[0]}")
    text = (repo / "params.yaml").read_text().replace("dense_units: [32]", "dense_units: *l8")
    (repo / "params.yaml").write_text(BILLION_LAUGHS + text)
    result = sh(command, repo, timeout=120)
    return row("YAML billion laughs", " ".join(command[:2]), result, None, "-", "-")


def decompression_bomb() -> dict:
    from PIL import Image

    repo, data = fresh("png-bomb"), WORK / "png-bomb-images"
    for label in ("cat", "dog"):
        (data / "train" / label).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (40, 40), (i * 20, 0, 0)).save(data / "train" / label / f"{i}.png")
    png_bomb(data / "train/dog/bomb.png", 12_000, 12_000)
    before = digests(repo)
    result = sh(["imgclf", "-S", "data.dataset=folder", "-S", f"data.path={data}", "prepare"], repo)
    return row("decompression bomb (144 Mpx PNG)", "prepare", result, digests(repo) == before, "-", "-")


def kill_9_prepare(delay: float) -> dict:
    """kill -9 `delay` s after prepare began writing its temp folder (all of digits: ~5 MB of arrays)."""
    repo = fresh(f"kill-prepare-{delay}")
    writing = lambda: any((repo / "data").glob(".prepared.*.tmp"))  # noqa: E731
    proc = started(["imgclf", "-S", "data.max_train_samples=null", "prepare"], repo, writing)
    time.sleep(delay)
    proc.kill()
    proc.wait()
    leftovers = sorted(p.name for p in (repo / "data").glob(".*.tmp"))
    result = (proc.returncode, "", "", delay)
    rerun = repro(repo)
    left = sorted(p.name for p in (repo / "data").glob(".*.tmp"))
    return row("kill -9", f"prepare (+{delay} s into writing)", result, None, "-", rerun,
               f"left by the kill: {', '.join(leftovers) or 'nothing'}; after: {', '.join(left) or 'nothing'}")


def kill_9_experiments() -> dict:
    repo = fresh("kill-experiments")
    cmd = ["imgclf", "experiments", "-S", "train.training_epochs=2", "--variants", "shallow", "--seeds", "1", "2"]
    runs = repo / ".dvc/tmp/exps/run"
    first = started(cmd, repo, lambda: any(runs.glob("*/*.json")))
    first.kill()  # kill -9 of imgclf experiments alone: DVC's queue workers go on
    first.wait()
    result = sh(cmd, repo)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sqlite_uri(repo))
    exp = client.get_experiment_by_name("imgclf")
    seeds = [r.data.params.get("seed") for r in client.search_runs([exp.experiment_id])] if exp else []
    counts = {seed: seeds.count(seed) for seed in ("1", "2")}
    adopted = "adopted" if "watching them instead of queueing them again" in result[1] else "NOT adopted"
    return row("kill -9", "imgclf experiments", result, None, f"runs per seed {counts}",
               "each once" if counts == {"1": 1, "2": 1} else "NOT once", adopted)


def cases(server: MlflowServer) -> list[tuple[str, Callable[[], dict]]]:
    stages = (("prepare", "images", ["imgclf", "-S", "data.dataset=folder", "-S", "data.path=images", "prepare"]),
              ("train", "models", ["imgclf", "train"]), ("evaluate", "reports", ["imgclf", "evaluate"]))
    return [
        ("enospc prepare", full_disk_prepare),
        ("enospc checkpoint", lambda: full_disk_train("models", True)),
        ("enospc reports", lambda: full_disk_train("reports", False)),
        ("enospc mlruns", lambda: full_disk_train("mlruns", False)),
        ("enospc evaluate", full_disk_evaluate),
        *((f"store {kind}", lambda kind=kind: corrupt_store(kind)) for kind in STORES),
        ("store locked", locked_store),
        ("server hung start", hung_at_start),
        ("server hung mid", lambda: hung_mid_run(server)),
        ("server flaky", lambda: flaky(server)),
        ("two train", lambda: second_writer(["imgclf", "train"], ["imgclf", "train"], "train")),
        ("two repro", lambda: second_writer(["dvc", "repro"], ["dvc", "repro"], "all")),
        ("train during repro", lambda: second_writer(["dvc", "repro"], ["imgclf", "train"], "train")),
        ("dvc lock", dvc_lock_held),
        ("stale lock", stale_lock),
        *((f"permission {stage}", lambda s=stage, f=folder, c=cmd: permission(s, f, c))
          for stage, folder, cmd in stages),
        ("yaml bomb validate", lambda: yaml_bomb(["imgclf", "validate"])),
        ("yaml bomb repro", lambda: yaml_bomb(["dvc", "repro"])),
        ("decompression bomb", decompression_bomb),
        *((f"kill prepare {d}", lambda d=d: kill_9_prepare(d)) for d in (0.0, 0.02, 0.1)),
        ("kill experiments", kill_9_experiments),
    ]


def markdown(rows: list[dict]) -> str:
    keys = ["fault", "stage", "exit", "seconds", "line", "intact", "mlflow", "rerun", "note"]
    cells = [[str(r[k]).replace("|", "\\|") for k in keys] for r in rows]
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] + ["| " + " | ".join(c) + " |"
                                                                                   for c in cells])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=[], help="run only the cases whose name contains a WORD")
    args = parser.parse_args()
    os.environ.update(pipeline_env())
    prepare_base()
    server = MlflowServer(WORK / "server")
    rows = []
    try:
        for name, case in cases(server):
            if args.only and not any(word in name for word in args.only):
                continue
            try:
                rows.append(case())
            except Exception as exc:  # a broken case is a row too, not the end of the table
                rows.append({"fault": name, "stage": "?", "exit": "?", "seconds": 0, "line": f"CASE FAILED: {exc}",
                             "intact": "?", "mlflow": "?", "rerun": "?", "note": ""})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.kill()
    print(markdown(rows))
    print(f"(work folder: {WORK})")


if __name__ == "__main__":
    main()
