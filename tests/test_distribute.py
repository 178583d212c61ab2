"""tf.distribute: mirrored replicas match one device; multi-worker trains in lockstep and only the chief writes.

Each strategy needs a fresh TensorFlow (logical devices and collectives are fixed at start-up), so the
training runs in child processes; this pytest process only prepares data and reads the results.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, TINY, free_port, pipeline_env, run, set_args
from imgclf.config import load_params
from imgclf.prepare import prepare

# One worker runs the module: both tests read the one module-scoped training of one and two replicas.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("distribute")]

# keep_prob 1: dropout masks are drawn per replica, so with dropout no two layouts see the same masks.
SETTINGS = TINY | {"train.keep_prob": "1.0"}
COMPARED = ("loss", "loss_sum", "accuracy", "dev_loss", "dev_accuracy")


def settings(**extra: str) -> list[str]:
    return [f"{key}={value}" for key, value in (SETTINGS | extra).items()]


def history(reports: Path) -> list[dict]:
    return [{k: float(row[k]) for k in COMPARED} for row in csv.DictReader((reports / "history.csv").open())]


def assert_same_training(got: list[dict], expected: list[dict]) -> None:
    """Same epochs, same losses and metrics up to float32 summation-order noise."""
    assert len(got) == len(expected) == int(SETTINGS["train.training_epochs"])
    for row, ref in zip(got, expected):
        assert row == pytest.approx(ref, rel=1e-4, abs=1e-6)


def train_one_and_two_replicas(prepared: str, out: str) -> None:
    """Child process: split the CPU into 2 logical devices, then train on one device and mirrored on both."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from imgclf.train import train

    for name in ("none", "mirrored"):
        params = load_params(REPO / "params.yaml", settings(**{"train.distribute": name}))
        folder = Path(out, name)
        train(params, prepared, folder / "model.keras", folder, folder / "checkpoint")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """TINY's prepared digits, shared by every test here."""
    folder = tmp_path_factory.mktemp("distribute") / "data" / "prepared"
    prepare(load_params(REPO / "params.yaml", settings()), folder)
    return folder


@pytest.fixture(scope="module")
def one_and_two_replicas(prepared, tmp_path_factory) -> dict:
    """Histories and MLflow runs of the same training on one device and mirrored over two."""
    out = tmp_path_factory.mktemp("mirrored")
    code = f"import test_distribute as t; t.train_one_and_two_replicas({str(prepared)!r}, {str(out)!r})"
    env = pipeline_env(MLFLOW_TRACKING_URI=f"sqlite:///{out / 'mlflow.db'}", PYTHONPATH=str(REPO / "tests"))
    run([sys.executable, "-c", code], out, env)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("imgclf").experiment_id])
    replicas = {r.data.params["train.distribute"]: r.data.tags["replicas"] for r in runs}
    return {"replicas": replicas, **{name: history(out / name) for name in ("none", "mirrored")}}


def test_mirrored_over_two_devices_matches_one_device(one_and_two_replicas):
    assert one_and_two_replicas["replicas"] == {"none": "1", "mirrored": "2"}
    # Epoch 2 starts from weights updated by epoch 1: a wrongly scaled cross-entropy or L2 gradient shows here.
    assert_same_training(one_and_two_replicas["mirrored"], one_and_two_replicas["none"])


def mapped_files(pid: int) -> set[str]:
    """The files process `pid` has memory-mapped now (none once it is gone)."""
    try:
        return {line.split(maxsplit=5)[5] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
                if len(line.split(maxsplit=5)) == 6}
    except OSError:
        return set()


def run_workers(commands: list[list[str]], dirs: list[Path], envs: list[dict], timeout: float = 240,
                mapped: list[set] | None = None) -> list[str]:
    """Start every worker, wait for all; if one fails, stop the rest (they would wait for it forever).
    `mapped` collects, per worker, every file it was seen to have memory-mapped."""
    procs = [subprocess.Popen(cmd, cwd=d, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd, d, e in zip(commands, dirs, envs)]
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.returncode not in (None, 0) for p in procs):
                break
            for seen, p in zip(mapped or [], procs):
                seen |= mapped_files(p.pid)
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outputs = [p.communicate()[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outputs)):
        if p.returncode != 0:
            pytest.fail(f"worker {i} exited {p.returncode}\n{out[-4000:]}")
    return outputs


def files_in(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_multi_worker_trains_like_one_device_and_only_the_chief_writes(prepared, one_and_two_replicas, tmp_path):
    cluster = {"worker": [f"127.0.0.1:{free_port()}" for _ in range(2)]}
    dirs, envs = [tmp_path / "chief", tmp_path / "worker"], []
    for index, folder in enumerate(dirs):
        shutil.copytree(prepared, folder / "data" / "prepared")
        shutil.copy2(REPO / "params.yaml", folder / "params.yaml")
        envs.append(pipeline_env(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})))
    before = files_in(dirs[1])
    cmd = ["imgclf", *set_args(SETTINGS | {"train.distribute": "multi_worker"}), "train"]
    mapped = [set(), set()]
    chief_out, worker_out = run_workers([cmd, cmd], dirs, envs, mapped=mapped)
    for folder, seen in zip(dirs, mapped):  # each worker reads the prepared arrays through a map, not a copy
        assert {str((folder / "data/prepared" / f"{x}_{split}.npy").resolve()) for x in "xy" for split in ("train", "dev")} <= seen

    # Worker 0 is the chief: model, reports and one MLflow run, trained as on one device.
    chief = dirs[0]
    for name in ("models/model.keras", "reports/train.json", "reports/history.csv", "reports/loss.png"):
        assert (chief / name).is_file(), chief_out
    assert_same_training(history(chief / "reports"), one_and_two_replicas["none"])
    client = MlflowClient(f"sqlite:///{chief / 'mlflow.db'}")
    (only_run,) = client.search_runs([client.get_experiment_by_name("imgclf").experiment_id])
    assert only_run.info.status == "FINISHED" and only_run.data.tags["replicas"] == "2"
    assert json.loads((chief / "reports/run.json").read_text())["mlflow_run_id"] == only_run.info.run_id
    # Worker 1 ran every step with it and wrote nothing at all: no model, reports, checkpoint or MLflow store.
    assert "not the chief worker: wrote nothing" in worker_out
    assert files_in(dirs[1]) == before
