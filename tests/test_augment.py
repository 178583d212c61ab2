"""Training augmentation (imgclf.training.augment, in imgclf.training.input_pipeline's pipeline): stateless per (seed, epoch, index)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from imgclf.training.augment import Augment
from imgclf.training.input_pipeline import make_dataset

N = 40
IMAGES = np.random.default_rng(0).integers(0, 256, (N, 8, 8, 3), dtype=np.uint8)


def views(aug: Augment, epoch: int, idx=None) -> np.ndarray:
    idx = np.arange(N) if idx is None else np.asarray(idx)
    return aug(tf.constant(IMAGES[idx]), tf.constant(idx, tf.int64), tf.constant(epoch, tf.int64), N).numpy()


def test_alternating_flip_shows_every_image_both_ways_over_two_epochs():
    aug = Augment(seed=5, flip="alternating")
    first, second = aug.flips(N, 0).numpy(), aug.flips(N, 1).numpy()
    assert np.all(first != second) and 0 < first.sum() < N  # a random part, then its complement
    assert np.array_equal(aug.flips(N, 2).numpy(), first) and np.array_equal(aug.flips(N, 7).numpy(), second)
    mirrored = IMAGES[:, :, ::-1]
    for epoch, flips in ((0, first), (1, second)):
        np.testing.assert_array_equal(views(aug, epoch), np.where(flips[:, None, None, None], mirrored, IMAGES))


def test_the_same_seed_and_epoch_give_the_same_views_whatever_the_batch():
    aug = Augment(seed=5, translate=2, flip="random")
    whole = views(aug, 3)
    order = np.random.default_rng(1).permutation(N)
    np.testing.assert_array_equal(views(aug, 3, order[:7]), whole[order[:7]])  # keyed by index, not position
    np.testing.assert_array_equal(views(Augment(seed=5, translate=2, flip="random"), 3), whole)
    assert not np.array_equal(views(aug, 4), whole) and not np.array_equal(views(Augment(6, 2, "random"), 3), whole)


def test_translation_is_an_integer_shift_with_reflect_padding():
    aug = Augment(seed=1, translate=2)
    offsets, out = aug.offsets(N, 0).numpy(), views(aug, 0)
    assert offsets.min() >= 0 and offsets.max() <= 4 and len(np.unique(offsets)) == 5
    padded = np.pad(IMAGES, [(0, 0), (2, 2), (2, 2), (0, 0)], mode="reflect")
    for i, (dy, dx) in enumerate(offsets):
        np.testing.assert_array_equal(out[i], padded[i, dy:dy + 8, dx:dx + 8])


def test_no_augmentation_is_the_identity():
    np.testing.assert_array_equal(views(Augment(seed=1), 0), IMAGES)


@pytest.mark.parametrize("batch", [7, 16])
def test_the_pipeline_augments_by_index_and_resumes_exactly(batch):
    aug = Augment(seed=3, translate=1, flip="alternating")
    labels = np.arange(N) % 4

    def epochs(first):
        return [(x.numpy(), y.numpy()) for x, y in make_dataset(IMAGES, labels, batch, 9, first, 3, aug)]

    full, resumed = epochs(0), epochs(1)
    per_epoch = -(-N // batch)
    assert len(full) == 3 * per_epoch
    for (x, y), (rx, ry) in zip(full[per_epoch:], resumed):  # epochs 1 and 2, started afresh at epoch 1
        np.testing.assert_array_equal(x, rx)
        np.testing.assert_array_equal(y, ry)
    x, _ = full[0]
    assert x.dtype == np.float32 and x.shape[1:] == (8, 8, 3)


@pytest.mark.parametrize("augmented", [False, True])
def test_a_memory_map_gives_the_batches_of_the_in_memory_array_without_a_graph_copy(tmp_path, augmented):
    np.save(tmp_path / "x.npy", IMAGES)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    labels = np.arange(N) % 4
    aug = Augment(seed=3, translate=1, flip="alternating") if augmented else None

    def batches(x):
        return [(b.numpy(), y.numpy()) for b, y in make_dataset(x, labels, 7, 9, 0, 2, aug)]

    in_memory, from_map = batches(IMAGES), batches(mapped)
    assert len(from_map) == len(in_memory) == 2 * -(-N // 7)
    for (x, y), (mx, my) in zip(in_memory, from_map):
        np.testing.assert_array_equal(mx, x)
        np.testing.assert_array_equal(my, y)
    # the map is read batch by batch: its pixels are not in the dataset's graph, as the in-memory array's are
    pixels = IMAGES.tobytes()[:256]
    assert pixels not in make_dataset(mapped, labels, 7, 9, 0, 1, aug)._as_serialized_graph().numpy()
    assert pixels in make_dataset(IMAGES, labels, 7, 9, 0, 1, aug)._as_serialized_graph().numpy()


def test_the_training_map_is_read_row_by_row_without_readahead(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((300, 32, 32, 3), np.uint8))
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")

    def advice() -> list[str]:
        """The VmFlags of this process's map of x.npy (`rr`: MADV_RANDOM, no readahead)."""
        lines = open("/proc/self/smaps").read().splitlines()
        start = next(i for i, line in enumerate(lines) if line.endswith(str(tmp_path / "x.npy")))
        return next(line for line in lines[start + 1:] if line.startswith("VmFlags")).split()[1:]

    assert "rr" not in advice()
    make_dataset(mapped, np.arange(300) % 4, 32, 9, 0, 1)
    assert "rr" in advice()
