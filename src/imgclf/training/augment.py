"""Training-time augmentation inside the tf.data pipeline: random integer translation and flips.

Every random draw is a stateless op keyed by (seed, epoch) and looked up by the image's index in the
training array, so an image gets the same view in a rerun, after a resume and at any batch size.
"alternating" flip (airbench94): a seeded random half of the images is flipped in epoch 1, and every
image's flip is inverted each following epoch, so over any two epochs each image is seen both ways.
"""

from __future__ import annotations

from dataclasses import dataclass

FLIPS = ("none", "random", "alternating")
# Keys of the stateless draws, kept apart from the data order's (seed, epoch).
_OFFSETS, _RANDOM_FLIP, _BASE_FLIP = 1 << 40, 2 << 40, 3 << 40


@dataclass(frozen=True)
class Augment:
    """Translate by up to `translate` pixels (reflect padding) and flip left-right per `flip`."""

    seed: int
    translate: int = 0
    flip: str = "none"

    def _key(self, salt: int, epoch):
        import tensorflow as tf

        return tf.stack([tf.constant(self.seed, tf.int64), tf.cast(epoch, tf.int64) + salt])

    def offsets(self, n: int, epoch):
        """(n, 2) int32 crop offsets in 0..2*translate for every image of the epoch (translate + offset)."""
        import tensorflow as tf

        return tf.random.stateless_uniform([n, 2], seed=self._key(_OFFSETS, epoch), minval=0,
                                           maxval=2 * self.translate + 1, dtype=tf.int32)

    def flips(self, n: int, epoch):
        """(n,) bool: which images are flipped in this epoch (0-based)."""
        import tensorflow as tf

        if self.flip == "random":
            return tf.random.stateless_uniform([n], seed=self._key(_RANDOM_FLIP, epoch)) < 0.5
        base = tf.random.stateless_uniform([n], seed=self._key(_BASE_FLIP, 0)) < 0.5
        if self.flip == "alternating":
            return tf.math.logical_xor(base, tf.math.floormod(tf.cast(epoch, tf.int64), 2) == 1)
        return tf.zeros([n], tf.bool)

    def __call__(self, images, idx, epoch, n: int):
        """The augmented batch: `images` (uint8, B x H x W x C) are rows `idx` of an n-image array."""
        import tensorflow as tf

        pad, h, w = self.translate, tf.shape(images)[1], tf.shape(images)[2]
        offsets = tf.gather(self.offsets(n, epoch), idx)
        flip = tf.gather(self.flips(n, epoch), idx)
        padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
        rows = offsets[:, :1] + tf.range(h)[None]
        cols = offsets[:, 1:] + tf.where(flip[:, None], w - 1 - tf.range(w)[None], tf.range(w)[None])
        shifted = tf.gather(padded, rows, axis=1, batch_dims=1)
        return tf.gather(shifted, cols, axis=2, batch_dims=1)
