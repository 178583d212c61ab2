"""What keeps a fast_muon training step from the CPU's peak: the step against its convolutions alone.

In a fresh process per precision (float32, mixed_bfloat16): the real fast_muon net (imgclf.train.build_compiled,
the preset's params) trains --steps steps of a 2,000-image batch held in memory (no tf.data, no augmentation),
after two untimed warm-up steps; then every conv layer of that net is run alone, with its own input shape, dtype
and kernel, forward and backward (input and kernel gradients) in one tf.function, as often. The convolutions'
FLOPs are 6 x their multiply-adds, like the steps' (benchmarks/time_to_accuracy.py). So:
- convs alone, GFLOP/s and % of peak: how fast oneDNN's kernels run these shapes here (the limit for this net);
- the step's time outside its convolutions: BatchNorm, GELU, pooling, casts, the loss and the optimizer (Muon's
  Newton-Schulz included), which do few FLOPs and do not get faster in bfloat16.

    python benchmarks/step_breakdown.py [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import REPO, cpu_header, measure_child
from peak import clock_ghz, peak_gflops

BATCH = 2000


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls, after two untimed ones (tracing, oneDNN's kernel choice)."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def conv_pass(layer, dtype: str):
    """One forward and backward pass (input and kernel gradients) of `layer`'s convolution alone on a random
    batch of its input shape. Input, kernel and upstream gradient are variables and the output is returned:
    with constants TensorFlow's graph optimizer folds the kernel gradient away and prunes the forward pass."""
    import tensorflow as tf

    h, w, c = layer.input.shape[1:]
    oh, ow, oc = layer.output.shape[1:]
    x = tf.Variable(tf.random.normal((BATCH, h, w, c), dtype=dtype))
    upstream = tf.Variable(tf.random.normal((BATCH, oh, ow, oc), dtype=dtype))
    kernel = tf.Variable(tf.cast(layer.kernel, dtype))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            y = tf.nn.conv2d(x, kernel, 1, layer.padding.upper())
        dx, dk = tape.gradient(y, [x, kernel], output_gradients=upstream)
        return tf.reduce_sum(y), tf.reduce_sum(dx), tf.reduce_sum(dk)

    return lambda: [float(v) for v in step()]


def child(precision: str, steps: int) -> dict:
    import keras
    import numpy as np

    from imgclf.config import load_params
    from imgclf.experiments.presets import PRESETS
    from imgclf.train import build_compiled
    from imgclf.training.distribute import make_strategy
    from imgclf.training.numerics import seed_everything

    sets = PRESETS["fast_muon"].overrides | {"train.mixed_precision": precision}
    params = load_params(REPO / "params.yaml", [f"{k}={v}" for k, v in sets.items()])
    seed_everything(params["seed"])
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, BATCH)
    model = build_compiled(params, 10, make_strategy("none"), x)
    xf = x.astype(np.float32)
    step_s = timed(lambda: model.train_on_batch(xf, y), steps)
    # the frozen whitening conv (0.2 % of the multiply-adds) has no backward pass to time
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D) and layer.kernel.trainable]
    per_conv = {}
    for layer in convs:
        dtype = layer.compute_dtype
        seconds = timed(conv_pass(layer, dtype), steps)
        oh, ow, oc = layer.output.shape[1:]
        macs = oh * ow * oc * int(np.prod(layer.kernel.shape[:3]))
        per_conv[layer.name] = {"seconds": seconds, "gflop": 6 * macs * BATCH / 1e9, "dtype": dtype}
    return {"precision": precision, "step_s": step_s, "convs": per_conv}


def report(results: list[dict], ghz: float) -> None:
    print(f"\nfast_muon, batch {BATCH}, medians (GFLOP = 6 x multiply-adds)")
    print("| precision | step | convs alone (share of step) | outside the convs | convs GFLOP/s (% of peak) "
          "| step GFLOP/s (% of peak) |\n|---|---|---|---|---|---|")
    for r in results:
        conv_s = sum(c["seconds"] for c in r["convs"].values())
        gflop = sum(c["gflop"] for c in r["convs"].values())
        peak = peak_gflops(r["precision"], ghz)
        print(f"| {r['precision']} | {r['step_s']:.2f} s | {conv_s:.2f} s ({conv_s / r['step_s']:.0%}) "
              f"| {r['step_s'] - conv_s:.2f} s | {gflop / conv_s:.0f} ({gflop / conv_s / peak:.0%}) "
              f"| {gflop / r['step_s']:.0f} ({gflop / r['step_s'] / peak:.0%}) |")
    for r in results:
        print(f"\n{r['precision']} per conv: " + ", ".join(
            f"{name} {c['seconds'] * 1000:.0f} ms ({c['gflop'] / c['seconds']:.0f} GFLOP/s, {c['dtype']})"
            for name, c in r["convs"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", nargs=2, metavar=("PRECISION", "STEPS"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    ghz = clock_ghz()
    print(f"{cpu_header()}, clock {ghz:.2f} GHz", flush=True)
    report([measure_child(__file__, [p, str(args.steps)]) for p in ("none", "mixed_bfloat16")], ghz)


if __name__ == "__main__":
    main()
