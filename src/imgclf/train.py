"""The `train` stage: fit the report's CNN on the prepared arrays, save model, history and plots."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io as _io
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from imgclf import checkpoint, distribute, tracking
from imgclf.callbacks import EPOCH_METRICS
from imgclf.data import PREPARED_DIR, load_prepared
from imgclf.io import atomic_write, write_json

MODEL_PATH = "models/model.keras"
REPORTS_DIR = "reports"
HISTORY_COLUMNS = ("epoch", *EPOCH_METRICS)


def seed_everything(seed: int, jit_compile: bool = False) -> None:
    """Seed Python, NumPy and TF from params.yaml (never the clock); make TF ops deterministic unless XLA.

    Keras silently turns XLA off while op determinism is on (not every XLA kernel is deterministic),
    so train.jit_compile=true has to trade bit-identical reruns for its speed.
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if not jit_compile:
        tf.config.experimental.enable_op_determinism()


@contextlib.contextmanager
def precision_policy(name: str):
    """Layers built inside get Keras' `mixed_float16`/`mixed_bfloat16` policy (`none`: float32).

    The global policy is restored afterwards: each layer keeps its own policy, and nothing built
    later (the inference copy, other tests) should inherit it by accident.
    """
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32" if name == "none" else name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def build_compiled(params: dict, num_classes: int, strategy):
    """The report's net, built and compiled in the strategy's scope (mirrored variables, one per replica)
    under train.mixed_precision, with XLA when train.jit_compile (Keras wraps Adam in a LossScaleOptimizer
    for mixed_float16 by itself)."""
    from imgclf.model import build_model, compile_model

    cfg = params["train"]
    with strategy.scope(), precision_policy(cfg["mixed_precision"]):
        model = build_model(params["model"], cfg, num_classes)
        compile_model(model, cfg["learning_rate"], cfg["jit_compile"])
    return model


def device_name() -> str:
    """'GPU: <name>' when TensorFlow sees a GPU (it then trains there), else 'CPU: <processor>'."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"GPU: {details.get('device_name', gpus[0].name)} (x{len(gpus)})"
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    return math.ceil(num_samples / batch_size)


def make_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, first_epoch: int, epochs: int):
    """Batches for epochs first_epoch..epochs-1, each epoch's order a stateless shuffle of (seed, epoch).

    Deriving the order from the epoch number (not from an iterator's hidden state) is what lets a
    resumed run see exactly the batches an uninterrupted run would. Batches are gathered from the
    uint8 arrays inside the tf.data graph and cast to float32 there; the model's Rescaling scales.
    """
    import tensorflow as tf

    images, labels = tf.constant(x), tf.constant(y)
    indices = tf.range(len(x), dtype=tf.int64)

    def epoch_batches(epoch):
        order = tf.random.experimental.stateless_shuffle(indices, seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

    ds = tf.data.Dataset.range(first_epoch, epochs).flat_map(epoch_batches)
    ds = ds.map(lambda idx: (tf.cast(tf.gather(images, idx), tf.float32), tf.gather(labels, idx)))
    options = tf.data.Options()
    # Multi-worker: each worker takes its share of every global batch (the default first tries to shard
    # by input file, which in-memory arrays do not have). Single-process strategies ignore this.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def progress_verbosity() -> int:
    """Keras' live progress bar with ETA on a terminal; one line per epoch under CI or in logs."""
    return 2 if os.environ.get("CI") or not sys.stdout.isatty() else 1


def inference_copy(model):
    """The trained net without optimizer state (a third of the size): all evaluate, predict and MLflow need."""
    import keras

    copy = keras.Model.from_config(model.get_config())  # clone_model would copy the compile state too
    copy.set_weights(model.get_weights())
    return copy


def weights_sha256(model) -> str:
    """sha256 over every weight array in order: equal hashes mean bit-identical models."""
    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w))
    return digest.hexdigest()


def write_history(history: list[dict], reports_dir: Path) -> Path:
    """reports/history.csv (one row per epoch, a DVC plot) and reports/loss.png."""
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    path = atomic_write(reports_dir / "history.csv", lambda tmp: tmp.write_text(buf.getvalue()))
    plot_loss(history, reports_dir / "loss.png")
    return path


def plot_loss(history: list[dict], path: Path) -> None:
    """Train and dev loss per epoch as a PNG (DVC's HTML plots need a CDN; this works offline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [row["loss"] for row in history], marker="o", label="train loss (mean)")
    ax.plot(epochs, [row["dev_loss"] for row in history], marker="o", label="dev loss")
    ax.set(xlabel="epoch", ylabel="loss (cross-entropy + L2)", title="Loss per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)


def fit(model, splits: dict, params: dict, run, resume: dict | None, ckpt_dir: Path,
        fingerprint: str, write: bool = True) -> tuple[list[dict], dict]:
    """model.fit with the report's loss sum and early stop, dev metrics, a checkpoint per epoch.

    write=False (non-chief workers) skips the checkpoint files; every worker still runs every callback,
    because the dev predictions and metric reads are collectives all workers must join.
    """
    from imgclf.callbacks import DevMetrics, EarlyStopLogger, EpochLossSum, EpochTimer, StopOnNonFiniteLoss

    cfg, seed = params["train"], params["seed"]
    (x_train, y_train), (x_dev, y_dev) = splits["train"], splits["dev"]
    early = EarlyStopLogger(cfg["early_stopping"]["monitor"], cfg["early_stopping"]["patience"])
    first_epoch, done = (resume["epoch"], resume["history"]) if resume else (0, [])
    if resume:
        early.set_state(resume["early_stopping"], checkpoint.load_best_weights(resume, ckpt_dir))
        if resume["early_stopping"]["stopped_epoch"]:
            first_epoch = cfg["training_epochs"]  # it had stopped early: nothing left to train
    saver = checkpoint.EpochCheckpoint(ckpt_dir, fingerprint, done, early, run.run_id, write=write)
    callbacks = [
        EpochTimer(),
        StopOnNonFiniteLoss(),
        EpochLossSum(len(x_train), cfg["batch_size"]),
        DevMetrics(x_dev, y_dev, model.output_shape[-1], cfg["batch_size"]),
        early,
        saver,  # before the MLflow logger: a resumed run re-logs any epoch the logger missed
        run.epoch_callback(),
    ]
    if first_epoch < cfg["training_epochs"]:
        distribute.patch_keras_for_multi_worker(model, x_train, y_train)
        model.fit(
            make_dataset(x_train, y_train, cfg["batch_size"], seed, first_epoch, cfg["training_epochs"]),
            epochs=cfg["training_epochs"],
            initial_epoch=first_epoch,
            steps_per_epoch=steps_per_epoch(len(x_train), cfg["batch_size"]),
            shuffle=False,  # the dataset shuffles itself, per epoch, from the seed
            callbacks=callbacks,
            verbose=progress_verbosity(),
        )
    return saver.history, early.summary()


def _resume(model, strategy, ckpt_dir: Path, fingerprint: str, chief: bool) -> dict | None:
    """The checkpoint of this very configuration, restored into the model, or None to start afresh.

    Non-chief workers read the chief's checkpoint (when the folder is shared) but never delete one.
    """
    resume = checkpoint.load(ckpt_dir, fingerprint, clear_stale=chief)
    if resume:
        with strategy.scope():  # restoring builds the optimizer's variables: they must be mirrored too
            checkpoint.restore(model, resume, ckpt_dir)
        print(f"Resuming after epoch {resume['epoch']} from {ckpt_dir}")
    distribute.check_same_start(strategy, resume["epoch"] if resume else 0)
    return resume


def train(params: dict, prepared_dir: str | Path = PREPARED_DIR, model_path: str | Path = MODEL_PATH,
          reports_dir: str | Path = REPORTS_DIR, ckpt_dir: str | Path = checkpoint.CHECKPOINT_DIR,
          tags: dict | None = None) -> dict:
    """Seed, load data, build the net (or resume it), fit under an MLflow run, save model and reports.

    Under train.distribute=multi_worker every worker calls this; only the chief writes files or logs.
    """
    start = time.perf_counter()
    reports_dir, ckpt_dir, cfg = Path(reports_dir), Path(ckpt_dir), params["train"]
    # 1. The strategy first (multi-worker collectives must be set up before any other TF op), then fail
    #    fast on an unreachable tracking server, before any expensive work. Only the chief tracks.
    strategy = distribute.make_strategy(cfg["distribute"])
    chief = distribute.is_chief(strategy)
    tracker = tracking.Tracker.connect(params["tracking"]) if chief else distribute.NullTracker()
    # 2. Seed everything from params.yaml and load the prepared arrays.
    seed_everything(params["seed"], cfg["jit_compile"])
    splits, manifest = load_prepared(prepared_dir)
    # 3. Build the report's net; continue from a checkpoint of this very configuration if one exists.
    model = build_compiled(params, len(manifest["classes"]), strategy)
    fingerprint = checkpoint.fingerprint(params, manifest["digest"])
    resume = _resume(model, strategy, ckpt_dir, fingerprint, chief)
    device = device_name()
    print(f"Training on {device} ({strategy.num_replicas_in_sync} replica(s)): {model.count_params():,} "
          f"parameters, {len(splits['train'][0])} train / {len(splits['dev'][0])} dev images")
    # 4. Fit inside one MLflow run (the same run when resuming); a crash or Ctrl-C ends it FAILED / KILLED.
    resume_run = resume["mlflow_run_id"] if resume else None
    tags = {**(tags or {}), "replicas": str(strategy.num_replicas_in_sync),
            "op_determinism": str(not cfg["jit_compile"]).lower()}
    with tracker.training_run(params, manifest, model, device, resume_run, tags) as run:
        if resume:
            run.log_missing_epochs(resume["history"])
        history, early = fit(model, splits, params, run, resume, ckpt_dir, fingerprint, write=chief)
        # 5. Log the end of training, then save everything atomically: a killed process or a failed
        #    upload never leaves a model on disk that looks finished. Only the chief writes files; the
        #    other workers trained the same weights.
        trained = inference_copy(model)
        if chief:
            write_history(history, reports_dir)
        summary = {
            **early,
            "epochs_run": len(history),
            "weights_sha256": weights_sha256(model),
            "num_params": model.count_params(),
            "device": device,
            "train_seconds": round(time.perf_counter() - start, 2),
            "data_digest": manifest["digest"],
            "mlflow_run_id": run.run_id,
        }
        run.log_training_end(summary, trained, reports_dir)
        if chief:
            atomic_write(model_path, lambda tmp: trained.save(tmp))
    if chief:
        write_json(reports_dir / "train.json", summary)
        checkpoint.clear(ckpt_dir)
    return summary


def main(params: dict) -> dict:
    """Entry point of `imgclf train` (the DVC train stage)."""
    summary = train(params)
    stop = f"early-stopped at epoch {summary['stopped_epoch']}" if summary["early_stopped"] else "ran every epoch"
    run_id = summary["mlflow_run_id"]
    outputs = f"model -> {MODEL_PATH}; MLflow run {run_id}" if run_id else "not the chief worker: wrote nothing"
    print(f"Trained {summary['epochs_run']} epochs ({stop}, best epoch {summary['best_epoch']}) in "
          f"{summary['train_seconds']:.0f} s; {outputs}")
    return summary
