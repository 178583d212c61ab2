"""The training input pipeline: per-epoch stateless shuffles of the uint8 arrays, batched in tf.data.

A memory-mapped array (what train loads from data/prepared) stays on disk: each batch is gathered from
the map as it is needed. An in-memory array is copied into the graph once, as a constant.
"""

from __future__ import annotations

import contextlib
import math
import mmap

import numpy as np

from imgclf.training.augment import Augment


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    return math.ceil(num_samples / batch_size)


def _gatherer(x: np.ndarray):
    """idx -> the uint8 images x[idx] as a tensor: read from the file for a memory map (one batch in memory,
    not the data set), from a graph constant otherwise (in-memory arrays, e.g. in tests)."""
    import tensorflow as tf

    if not isinstance(x, np.memmap):
        images = tf.constant(x)
        return lambda idx: tf.gather(images, idx)

    def gather(idx):
        batch = tf.numpy_function(lambda rows: x[rows], [idx], tf.uint8, stateful=False)
        return tf.ensure_shape(batch, (None, *x.shape[1:]))

    # Batches take rows from all over the file: the kernel's readahead around each would read (and keep
    # resident in this process) megabytes that no batch asked for.
    with contextlib.suppress(AttributeError, OSError, ValueError):  # not a map of its own, or no madvise here
        x._mmap.madvise(mmap.MADV_RANDOM)
    return gather


def make_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, first_epoch: int, epochs: int,
                 augment: Augment | None = None):
    """Batches for epochs first_epoch..epochs-1, each epoch's order a stateless shuffle of (seed, epoch).

    Deriving the order (and any augmentation) from the epoch number, not from an iterator's hidden
    state, is what lets a resumed run see exactly the batches an uninterrupted run would. Batches are
    gathered from the uint8 arrays inside the tf.data graph, augmented there, and cast to float32; the
    model scales the pixels itself.
    """
    import tensorflow as tf

    gather, labels = _gatherer(x), tf.constant(y)
    indices = tf.range(len(x), dtype=tf.int64)

    def epoch_batches(epoch):
        order = tf.random.experimental.stateless_shuffle(indices, seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size)
        return batches if augment is None else batches.map(lambda idx: (idx, epoch))

    def plain(idx):
        return tf.cast(gather(idx), tf.float32), tf.gather(labels, idx)

    def augmented(idx, epoch):
        return tf.cast(augment(gather(idx), idx, epoch, len(x)), tf.float32), tf.gather(labels, idx)

    ds = tf.data.Dataset.range(first_epoch, epochs).flat_map(epoch_batches)
    ds = ds.map(plain if augment is None else augmented)
    options = tf.data.Options()
    # Multi-worker: each worker takes its share of every global batch (the default first tries to shard
    # by input file, which in-memory arrays do not have). Single-process strategies ignore this.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)
