"""The `train` stage: fit the model family `model.arch` names on the prepared arrays; save model and reports."""

from __future__ import annotations

import csv
import functools
import io
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from imgclf.files import modelfile
from imgclf.tracking import tracker as tracking
from imgclf.training import checkpoint, distribute, early_stopping, families
from imgclf.training.callbacks import (CollapseDetector, DevMetrics, EpochLossSum, EpochTimer, ProgressReport,
                                       StopOnNonFiniteLoss, StopOnSignal)
from imgclf.training.input_pipeline import make_dataset, steps_per_epoch
from imgclf.errors import deferred_interrupts, raise_if_interrupted
from imgclf.files.atomic import atomic_write, write_json
from imgclf.metrics import HISTORY_COLUMNS
from imgclf.training.numerics import (bf16_native, chosen_kernels, pin_kernels, precision_policy, resolve_precision,
                                      seed_everything, use_numerics)
from imgclf.files.paths import (CHECKPOINT_DIR, HISTORY_CSV, LOSS_PNG, MODEL_PATH, PREPARED_DIR, REPORTS_DIR, RUN_INFO,
                          TRAIN_SUMMARY)
from imgclf.files.prepared_reader import load_prepared
from imgclf.serving.pyfunc import log_served_model


def build_compiled(params: dict, num_classes: int, strategy, x_train: np.ndarray):
    """The family's net, built and compiled in the strategy's scope (mirrored variables, one per replica)
    under train.mixed_precision (Keras wraps the optimizer in a LossScaleOptimizer for mixed_float16)."""
    cfg = params["train"]
    family = families.REGISTRY.get(params["model"]["arch"])
    with strategy.scope(), precision_policy(cfg["mixed_precision"]):
        model = family.build(params, num_classes, x_train)
        family.compile(model, params, steps_per_epoch(len(x_train), cfg["batch_size"]))
    modelfile.check_round_trip(model)  # a layer that would not load back fails now, not after training
    return model


def for_this_machine(params: dict) -> tuple[dict, dict[str, str]]:
    """params with train.kernels and train.mixed_precision resolved for this machine (numerics.chosen_kernels,
    resolve_precision), plus whether bfloat16 matmuls run on bfloat16 hardware here (what a family's own `auto`
    dtypes follow), and the choices as the run's tags. The resolved params build the net and key the
    checkpoint, so a checkpoint written in bfloat16 or on other kernels is never resumed with these."""
    import tensorflow as tf

    cfg, gpu = params["train"], bool(tf.config.list_physical_devices("GPU"))
    path, why = chosen_kernels(cfg["numerics"], cfg["kernels"])
    print(f"Kernels: {path} ({why})")
    policy, why = resolve_precision(cfg["mixed_precision"], path, gpu)
    if cfg["mixed_precision"] == "auto":
        print(f"Precision: {'float32' if policy == 'none' else policy} ({why})")
    resolved = {**cfg, "kernels": path, "mixed_precision": policy, "bf16_native": bf16_native(path, gpu)}
    return {**params, "train": resolved}, {"kernels": path, "mixed_precision": policy}


def device_name() -> str:
    """'GPU: <name>' when TensorFlow sees a GPU (it then trains there), else 'CPU: <processor>'."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"GPU: {details.get('device_name', gpus[0].name)} (x{len(gpus)})"
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def on_terminal() -> bool:
    """A live progress bar on a terminal; plain lines under CI or in logs."""
    return not os.environ.get("CI") and sys.stdout.isatty()


def inference_copy(model):
    """The trained net without optimizer state (a third of the size): all evaluate, predict and MLflow need."""
    import keras

    copy = keras.Model.from_config(model.get_config())  # clone_model would copy the compile state too
    copy.set_weights(model.get_weights())
    return copy


def write_history(history: list[dict], reports_dir: Path) -> Path:
    """reports/history.csv (one row per epoch, a DVC plot; no wall times) and reports/loss.png."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    path = atomic_write(reports_dir / HISTORY_CSV, lambda tmp: tmp.write_text(buf.getvalue()))
    plot_loss(history, reports_dir / LOSS_PNG)
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
    ax.set(xlabel="epoch", ylabel="loss", title="Loss per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)


def stop_reason(early: early_stopping.EarlyStop, collapse: CollapseDetector, stop_on_collapse: bool) -> str:
    """Why training ended: `collapsed`, `early_stopping` or `training_epochs` (it ran them all)."""
    if collapse.collapsed_epoch and stop_on_collapse:
        return "collapsed"
    return "early_stopping" if early.stopped_epoch else "training_epochs"


def fit(model, splits: dict, params: dict, run, resume: dict | None, ckpt_dir: Path,
        fingerprint: str, write: bool = True) -> tuple[list[dict], dict]:
    """model.fit with the summed loss, dev metrics, the stops, the family's callbacks, a checkpoint per epoch.

    write=False (non-chief workers) skips the checkpoint files; every worker still runs every callback,
    because the dev predictions and metric reads are collectives all workers must join.
    """
    cfg, seed = params["train"], params["seed"]
    family = families.REGISTRY.get(params["model"]["arch"])
    (x_train, y_train), (x_dev, y_dev) = splits["train"], splits["dev"]
    steps = steps_per_epoch(len(x_train), cfg["batch_size"])
    early = early_stopping.make(cfg["early_stopping"]["monitor"], cfg["early_stopping"]["patience"])
    collapse = CollapseDetector(model.output_shape[-1], cfg["stop_on_collapse"], y_dev)
    extra = family.callbacks(params, steps)
    stateful = [early, collapse, *(c for c in extra if hasattr(c, "state_name"))]
    first_epoch, done = (resume["epoch"], resume["history"]) if resume else (0, [])
    if resume:
        checkpoint.restore_callbacks(stateful, resume)
        if early.stopped_epoch or (collapse.collapsed_epoch and cfg["stop_on_collapse"]):
            first_epoch = cfg["training_epochs"]  # it had stopped: nothing left to train
    saver = checkpoint.EpochCheckpoint(ckpt_dir, fingerprint, done, stateful, run.run_id, write=write)
    callbacks = [EpochTimer(), StopOnSignal(), StopOnNonFiniteLoss(), EpochLossSum(len(x_train), cfg["batch_size"]),
                 *extra, DevMetrics(x_dev, y_dev, model.output_shape[-1], cfg["batch_size"]), early, collapse,
                 ProgressReport(cfg["training_epochs"], steps, on_terminal()),
                 saver,  # before the MLflow logger: a resumed run re-logs any epoch the logger missed
                 run.epoch_callback()]
    if first_epoch < cfg["training_epochs"]:
        if cfg["distribute"] == "multi_worker":
            distribute.patch_keras_for_multi_worker(model, x_train, y_train)
        dataset = make_dataset(x_train, y_train, cfg["batch_size"], seed, first_epoch, cfg["training_epochs"],
                               family.augment(params))
        model.fit(dataset, epochs=cfg["training_epochs"], initial_epoch=first_epoch, steps_per_epoch=steps,
                  shuffle=False,  # the dataset shuffles itself, per epoch, from the seed
                  callbacks=callbacks, verbose=0)  # ProgressReport says what a person reads
    else:  # killed after its last epoch: end as fit() ended (monitor=val_loss puts the best weights back)
        for callback in callbacks:
            callback.set_model(model)
            callback.on_train_end()
    summary = {**early.summary(), **collapse.summary(), "stop_reason": stop_reason(early, collapse,
                                                                                    cfg["stop_on_collapse"])}
    return saver.history, summary


def _resume(model, strategy, ckpt_dir: Path, fingerprint: str, chief: bool) -> dict | None:
    """The checkpoint of this very configuration, restored into the model, or None to start afresh.

    Non-chief workers read the chief's checkpoint (when the folder is shared) but never delete one.
    """
    resume = checkpoint.load(ckpt_dir, fingerprint, clear_stale=chief)
    if resume:
        with strategy.scope():  # restoring builds the optimizer's variables: they must be mirrored too
            resume = checkpoint.restore(model, resume, ckpt_dir, clear_unusable=chief)
    if resume:
        print(f"Resuming after epoch {resume['epoch']} from {ckpt_dir}")
    distribute.check_same_start(strategy, resume["epoch"] if resume else 0)
    return resume


def _save(trained, history: list[dict], summary: dict, run_info: dict, run, paths: dict, chief: bool,
          log_model) -> None:
    """Log the end of training, then write every output atomically: a killed process or a failed upload
    never leaves a model on disk that looks finished. Only the chief writes files.

    A signal that arrives during the writes is only recorded (training defers signals), so it is checked
    for once they are done: the model, train.json and run.json are removed again and the run ends KILLED;
    so are they after a failed write (the run ends FAILED)."""
    if chief:
        write_history(history, paths["reports"])
    run.log_training_end(summary | run_info, trained, paths["reports"], log_model)
    raise_if_interrupted()  # a signal during the upload: no model that looks finished
    if not chief:
        return
    outputs = (paths["model"], paths["reports"] / TRAIN_SUMMARY, paths["reports"] / RUN_INFO)
    try:
        modelfile.save(trained, outputs[0])
        write_json(outputs[1], summary)
        write_json(outputs[2], run_info)
        raise_if_interrupted()
    except BaseException:
        for path in outputs:
            path.unlink(missing_ok=True)
        raise


def train(params: dict, prepared_dir: str | Path = PREPARED_DIR, model_path: str | Path = MODEL_PATH,
          reports_dir: str | Path = REPORTS_DIR, ckpt_dir: str | Path = CHECKPOINT_DIR,
          tags: dict | None = None) -> dict:
    """Seed, load data, build the net (or resume it), fit under an MLflow run, save model and reports.

    Under train.distribute=multi_worker every worker calls this; only the chief writes files or logs.
    """
    start = time.perf_counter()
    paths, ckpt_dir, cfg = {"model": Path(model_path), "reports": Path(reports_dir)}, Path(ckpt_dir), params["train"]
    use_numerics(cfg["numerics"], cfg["kernels"])  # refuses if TensorFlow started with other kernels than asked for
    # 1. The strategy first (multi-worker collectives must be set up before any other TF op), then fail
    #    fast on an unreachable tracking server, before any expensive work. Only the chief tracks.
    strategy = distribute.make_strategy(cfg["distribute"])
    chief = distribute.is_chief(strategy)
    tracker = tracking.Tracker.connect(params["tracking"]) if chief else tracking.NullTracker()
    # 2. Seed everything from params.yaml, fix the numerics (op determinism, TF32) and load the arrays.
    seed_everything(params["seed"], cfg["jit_compile"], cfg["tf32"])
    pinned = pin_kernels(cfg["numerics"])  # portable: Eigen's cache sizes, before any training op
    splits, manifest = load_prepared(prepared_dir)
    # 3. Build the family's net; continue from a checkpoint of this very configuration if one exists.
    resolved, machine = for_this_machine(params)
    model = build_compiled(resolved, len(manifest["classes"]), strategy, splits["train"][0])
    fingerprint = checkpoint.fingerprint({**resolved, "train": {**resolved["train"], **pinned}}, manifest["digest"])
    resume = _resume(model, strategy, ckpt_dir, fingerprint, chief)
    device = device_name()
    print(f"Training {params['model']['arch']} on {device} ({strategy.num_replicas_in_sync} replica(s)): "
          f"{model.count_params():,} parameters, {len(splits['train'][0])} train / {len(splits['dev'][0])} dev images")
    # 4. Fit inside one MLflow run (the same run when resuming); a crash ends it FAILED, a signal KILLED.
    #    Signals are only recorded while it runs and raised at the next batch, in our own code.
    tags = {**(tags or {}), "replicas": str(strategy.num_replicas_in_sync),
            "op_determinism": str(not cfg["jit_compile"]).lower(), "tf32": str(cfg["tf32"]).lower(),
            "numerics": cfg["numerics"], **machine, **pinned}
    with tracker.training_run(params, manifest, model, device, resume and resume["mlflow_run_id"], tags) as run, \
            deferred_interrupts():
        if resume:
            run.log_missing_epochs(resume["history"])
        history, stops = fit(model, splits, params, run, resume, ckpt_dir, fingerprint, write=chief)
        # 5. Save: model, history, summary (git-tracked, the same bytes on every rerun) and the run's id and
        #    wall time (reports/run.json, untracked).
        summary = {**stops, "epochs_run": len(history), "weights_sha256": modelfile.weights_sha256(model),
                   "num_params": model.count_params(), "device": device, "data_digest": manifest["digest"]}
        run_info = {"mlflow_run_id": run.run_id, "train_seconds": round(time.perf_counter() - start, 2),
                    "weights_sha256": summary["weights_sha256"]}
        served = functools.partial(log_served_model, classes=manifest["classes"], tta=params["evaluate"]["tta"])
        _save(inference_copy(model), history, summary, run_info, run, paths, chief, served)
    if chief:
        checkpoint.clear(ckpt_dir)
    return summary | run_info


def main(params: dict) -> dict:
    """Entry point of `imgclf train` (the DVC train stage)."""
    summary = train(params)
    stop = {"early_stopping": f"early-stopped at epoch {summary['stopped_epoch']}",
            "collapsed": f"stopped at epoch {summary['collapsed_epoch']}: collapsed to one class",
            "training_epochs": "ran every epoch"}[summary["stop_reason"]]
    run_id = summary["mlflow_run_id"]
    outputs = f"model -> {MODEL_PATH}; MLflow run {run_id}" if run_id else "not the chief worker: wrote nothing"
    print(f"Trained {summary['epochs_run']} epochs ({stop}, best epoch {summary['best_epoch']}) in "
          f"{summary['train_seconds']:.0f} s; {outputs}")
    return summary
