"""Training on one device, every local GPU, or several machines, with TensorFlow's own tf.distribute.

`train.distribute` in params.yaml picks the strategy. `train.batch_size` is the *global* batch:
tf.distribute splits each batch across the replicas and Keras divides the cross-entropy and the
L2 term by the number of replicas before the gradients are summed, so the update equals the
single-device one. Under `multi_worker` every worker runs the same `imgclf train`, but only the
chief writes outputs and logs to MLflow: the others get a NullTracker and write nothing.
"""

from __future__ import annotations

import json
import os

from imgclf.errors import ImgclfError

# The Keras internals patch_keras_for_multi_worker replaces, as Keras 3.15 has them.
KERAS_INTERNALS = ("_symbolic_build", "_maybe_symbolic_build", "train_step")


def make_strategy(name: str):
    """The tf.distribute strategy `train.distribute` names.

    none: TensorFlow's default (one device, a GPU when there is one). mirrored: every local GPU,
    else every logical CPU (one, unless a test splits the CPU). multi_worker: the cluster in
    TF_CONFIG; it must be created before any other TensorFlow op runs, so train() calls this first.
    """
    import tensorflow as tf

    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if name == "multi_worker":
        _check_tf_config()
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ImgclfError(f"train.distribute={name!r}: unknown; use none, mirrored or multi_worker")


def tf_config() -> tuple[dict, dict] | None:
    """(cluster, task) from TF_CONFIG, or None when it is unset or not that shape."""
    try:
        config = json.loads(os.environ.get("TF_CONFIG") or "null")
        return config["cluster"], config["task"]
    except (ValueError, TypeError, KeyError):
        return None


def _check_tf_config() -> None:
    """One clear line instead of TensorFlow's silent fallback to a one-worker 'cluster'."""
    config = tf_config()
    try:
        ok = config is not None and bool(config[0]) and "type" in config[1] and "index" in config[1]
    except TypeError:  # a task that is not a mapping
        ok = False
    if not ok:
        raise ImgclfError(
            "train.distribute=multi_worker needs TF_CONFIG, e.g. "
            '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}, '
            "set differently on each worker; or use train.distribute=none|mirrored"
        )


def chief_by_tf_config() -> bool:
    """Whether TF_CONFIG makes this process the chief, before any strategy exists (the workspace lock is taken
    first): the `chief` task, else worker 0 of a cluster without one; True without a multi-worker TF_CONFIG.
    is_chief(strategy) is TensorFlow's answer to the same question once the strategy runs."""
    config = tf_config()
    if config is None:
        return True
    cluster, task = config
    return task.get("type") == "chief" or ("chief" not in cluster and task.get("index") == 0)


def is_chief(strategy) -> bool:
    """True for the one process that writes outputs: always, except on non-chief multi-workers."""
    return bool(strategy.extended.should_checkpoint)


def check_same_start(strategy, first_epoch: int) -> None:
    """Every worker must start at the same epoch, or the collectives would wait for each other forever.

    A worker that cannot see the chief's checkpoint (no shared folder) would start from epoch 0
    while the chief resumes; this all-reduce turns that hang into one clear error on every worker.
    """
    import tensorflow as tf

    if strategy.num_replicas_in_sync == 1:
        return
    epochs = strategy.gather(strategy.run(lambda: tf.constant([first_epoch])), axis=0).numpy()
    low, high = int(epochs.min()), int(epochs.max())
    if low != high:
        raise ImgclfError(
            f"the workers would start at different epochs ({low} and {high}): models/checkpoint must "
            "be the chief's on every worker (a shared folder); delete it on every worker to start afresh"
        )


def check_keras_internals(model) -> None:
    """One line naming the Keras version when the private methods the multi-worker patch replaces moved."""
    import keras

    missing = [name for name in KERAS_INTERNALS if not callable(getattr(model, name, None))]
    if missing:
        raise ImgclfError(
            f"train.distribute=multi_worker patches Keras internals ({', '.join(missing)}) that Keras "
            f"{keras.__version__} no longer has (written for Keras 3.15); use train.distribute=none or mirrored, "
            "or the Keras version requirements.lock pins"
        )


def patch_keras_for_multi_worker(model, x, y) -> None:
    """Work around Keras 3 failing every fit() under MultiWorkerMirroredStrategy (keras-team/keras#20585).

    Two steps of Keras' TF trainer cannot run under the collective strategy: (1) before building its
    metrics, fit() mean-reduces the first *distributed* batch as one tuple ("Attempt to convert a value
    (PerReplica...)"); (2) each step's scalar logs are mean-reduced along axis 0 ("Invalid reduction
    dimension 0 for input with 0 dimensions"). So: build loss, metrics and optimizer from one local
    batch in the strategy's scope (what step 1 is for) and skip step 1; give the logs one axis. Only
    this model instance is changed; train() calls this under train.distribute=multi_worker only.
    """
    import tensorflow as tf

    check_keras_internals(model)
    with model.distribute_strategy.scope():
        model._symbolic_build(data_batch=(tf.cast(x[:1], tf.float32), tf.constant(y[:1])))
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    keras_train_step = model.train_step
    model.train_step = lambda data: {k: tf.reshape(v, [1]) for k, v in keras_train_step(data).items()}
