"""Where an epoch's time goes outside the training steps, per part, for the fast presets; and whether the input
pipeline keeps up with the steps.

Each configuration runs the pipeline's own imgclf.train.train() in a fresh process (private MLflow store) on the
first --images lossless CIFAR-10 training images (prepared by benchmarks/time_to_accuracy.py) and the full
5,000-image dev split, so the dev pass costs what it costs in a real run. Every callback's on_epoch_end is
timed (DevMetrics = the dev pass, EpochCheckpoint = the checkpoint write, the MLflow epoch logger, ...), the
steps by the epoch timer; the first epoch (tracing) is left out; medians over the other epochs. The share is
projected onto a full epoch: parts / (steps x 45,000 / images + parts).

Input pipeline: the same tf.data pipeline (make_dataset with the family's augmentation) is drained alone for
an epoch; its images/s against the training steps' images/s says how much of a step's time it would need if it
did not overlap (it runs ahead on tf.data's threads, prefetched).

    python benchmarks/epoch_overheads.py [--images 6000] [--epochs 3] [--only fast_muon fast_muon-bf16]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from common import PREPARED_PNG, REPO, measure_child, png_subset_args, verdict

TRAIN_IMAGES = 45_000
TARGET = 0.05  # outside-steps time as a share of the epoch (#35)
CONFIGS = {
    "fast": ("fast", {"train.mixed_precision": "none"}),
    "fast_muon": ("fast_muon", {"train.mixed_precision": "none"}),
    "fast_muon-bf16": ("fast_muon", {"train.mixed_precision": "mixed_bfloat16"}),
}


def timed_callbacks(parts: dict[str, list[float]]) -> None:
    """Make keras.Model.fit time each of its callbacks' on_epoch_end into parts[class name]."""
    import keras

    original = keras.Model.fit

    def fit(self, *args, callbacks=(), **kwargs):
        for callback in callbacks:
            def timed(epoch, logs=None, end=callback.on_epoch_end, name=type(callback).__name__):
                start = time.perf_counter()
                end(epoch, logs)
                parts.setdefault(name, []).append(time.perf_counter() - start)
            callback.on_epoch_end = timed
        return original(self, *args, callbacks=callbacks, **kwargs)

    keras.Model.fit = fit


def pipeline_rate(params: dict, x, y) -> float:
    """Images/s of the training input pipeline alone, drained for one epoch after a warm-up batch."""
    from imgclf.training import families
    from imgclf.training.input_pipeline import make_dataset

    cfg = params["train"]
    augment = families.REGISTRY.get(params["model"]["arch"]).augment(params)
    batches = iter(make_dataset(x, y, cfg["batch_size"], params["seed"], 0, 2, augment))
    next(batches)
    start, seen = time.perf_counter(), 0
    while seen < len(x):
        seen += int(next(batches)[0].shape[0])
    return seen / (time.perf_counter() - start)


def child(config: str, images: int, epochs: int) -> dict:
    """One train() of `config` on the first `images` training images: per-epoch part times (the first epoch's
    dropped), the steps' images/s and the input pipeline's."""
    import os

    import imgclf.train as train_module
    from imgclf.config import load_params
    from imgclf.experiments.presets import PRESETS
    from imgclf.files.prepared_reader import load_prepared

    preset, own = CONFIGS[config]
    sets = PRESETS[preset].overrides | own | {"train.training_epochs": epochs}
    params = load_params(REPO / "params.yaml", [f"{k}={v}" for k, v in sets.items()])
    splits, manifest = load_prepared(PREPARED_PNG)
    splits["train"] = (splits["train"][0][:images], splits["train"][1][:images])
    train_module.load_prepared = lambda _folder: (splits, manifest)
    parts: dict[str, list[float]] = {}
    timed_callbacks(parts)
    with tempfile.TemporaryDirectory(prefix="imgclf-overheads-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        os.chdir(tmp)  # MLflow puts a sqlite store's artifacts under ./mlruns: here, not in the caller's folder
        out = Path(tmp)
        summary = train_module.train(params, PREPARED_PNG, out / "model.keras", out, out / "checkpoint")
        from mlflow.tracking import MlflowClient

        steps = [m.value for m in sorted(MlflowClient().get_metric_history(summary["mlflow_run_id"], "epoch_seconds"),
                                         key=lambda m: m.step)]
    parts.pop("EpochTimer")  # it records the steps' time (above), its own is nil
    return {"config": config, "images": images, "precision": params["train"]["mixed_precision"], "steps": steps,
            "parts": parts, "outside_total_s": summary["train_seconds"] - sum(steps),
            "pipeline_images_per_s": pipeline_rate(params, *splits["train"])}


def report(r: dict) -> None:
    """One configuration: each part's median seconds per epoch (the first epoch's dropped) and their projected
    share of a full epoch."""
    step_rate = r["images"] / statistics.median(r["steps"][1:])
    full_steps = TRAIN_IMAGES / step_rate
    per_epoch = {name: statistics.median(times[1:]) for name, times in r["parts"].items()}
    parts = sum(per_epoch.values())
    share = parts / (full_steps + parts)
    print(f"\n{r['config']} ({r['precision']}): steps {step_rate:.1f} images/s -> {full_steps:.0f} s per "
          f"45,000-image epoch; input pipeline alone {r['pipeline_images_per_s']:.0f} images/s "
          f"({step_rate / r['pipeline_images_per_s']:.0%} of a step's time if it did not overlap)")
    for name, seconds in sorted(per_epoch.items(), key=lambda kv: -kv[1]):
        print(f"  {name:22} {seconds:7.3f} s per epoch")
    once = r["outside_total_s"] - sum(sum(times) for times in r["parts"].values())
    print(f"  outside steps per epoch: {parts:.2f} s = {share:.1%} of a full epoch, "
          f"{verdict(share, TARGET, higher_is_better=False)}; first epoch {r['steps'][0]:.0f} s (tracing); "
          f"once per run (build, whitening, MLflow run): {once:.0f} s")


def main() -> None:
    args = png_subset_args(__doc__, list(CONFIGS), 6000, child=child)
    if args is None:
        return
    for config in args.only:
        report(measure_child(__file__, [config, str(args.images), str(args.epochs)]))


if __name__ == "__main__":
    main()
