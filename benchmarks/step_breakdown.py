"""What keeps a fast_muon training step from the CPU's peak: the step against its convolutions alone.

In a fresh process per precision (float32, mixed_bfloat16): the real fast_muon net (imgclf.train.build_compiled,
the preset's params) trains --steps steps of a 2,000-image batch held in memory (no tf.data, no augmentation),
after two untimed warm-up steps; then every conv layer of that net is run alone, with its own input shape, dtype
and kernel, forward and backward (input and kernel gradients) in one tf.function, as often. The convolutions'
FLOPs are 6 x their multiply-adds, like the steps' (benchmarks/time_to_accuracy.py). So:
- convs alone, GFLOP/s and % of peak: how fast oneDNN's kernels run these shapes here (the limit for this net);
- the step's time outside its convolutions: BatchNorm, GELU, pooling, casts, the loss and the optimizer (Muon's
  Newton-Schulz included), which do few FLOPs and do not get faster in bfloat16.

--cpu avx2 runs both children on an AVX2-only CPU's code path (common.CPU_PATHS), float32 (no bf16 there): the
path the pipeline chooses there (train.kernels=auto: oneDNN's ops, Muon's Newton-Schulz in float32) against
the one that ran before it did (TensorFlow's default there, Eigen's kernels, and airbench's bfloat16
Newton-Schulz, emulated). Each row names the path it ran.

    python benchmarks/step_breakdown.py [--steps 5] [--cpu avx2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import CPU_PATHS, REPO, cpu_header, measure_child, verdict
from peak import clock_ghz, peak_gflops

BATCH = 2000
# --cpu -> the children: (label, train.mixed_precision, train.kernels, model.fast.muon.ns_dtype)
ROWS = {"this": [("float32", "none", "auto", "auto"), ("mixed_bfloat16", "mixed_bfloat16", "auto", "auto")],
        "avx2": [("float32, before #42", "none", "eigen", "bfloat16"), ("float32", "none", "auto", "auto")]}


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


def child(precision: str, steps: int, kernels: str, ns_dtype: str) -> dict:
    from imgclf.config import load_params
    from imgclf.experiments.presets import PRESETS
    from imgclf.training.numerics import use_numerics

    sets = PRESETS["fast_muon"].overrides | {"train.mixed_precision": precision, "train.kernels": kernels,
                                             "model.fast.muon.ns_dtype": ns_dtype}
    params = load_params(REPO / "params.yaml", [f"{k}={v}" for k, v in sets.items()])
    use_numerics(params["train"]["numerics"], kernels)  # before TensorFlow loads, as `imgclf train`

    import keras
    import numpy as np

    from imgclf.train import build_compiled, for_this_machine
    from imgclf.training.distribute import make_strategy
    from imgclf.training.numerics import seed_everything

    seed_everything(params["seed"])
    params, machine = for_this_machine(params)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, BATCH)
    model = build_compiled(params, 10, make_strategy("none"), x)
    path = f"{machine['kernels']} kernels, Newton-Schulz in {model.optimizer.ns_dtype}"
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
    return {"precision": precision, "step_s": step_s, "convs": per_conv, "path": path}


def report(results: list[dict], labels: list[str], ghz: float) -> None:
    print(f"\nfast_muon, batch {BATCH}, medians (GFLOP = 6 x multiply-adds)")
    print("| precision | path | step | convs alone (share of step) | outside the convs | convs GFLOP/s (% of peak) "
          "| step GFLOP/s (% of peak) |\n|---|---|---|---|---|---|---|")
    for label, r in zip(labels, results):
        conv_s = sum(c["seconds"] for c in r["convs"].values())
        gflop = sum(c["gflop"] for c in r["convs"].values())
        peak = peak_gflops(r["precision"], ghz)
        print(f"| {label} | {r['path']} | {r['step_s']:.2f} s | {conv_s:.2f} s ({conv_s / r['step_s']:.0%}) "
              f"| {r['step_s'] - conv_s:.2f} s | {gflop / conv_s:.0f} ({gflop / conv_s / peak:.0%}) "
              f"| {gflop / r['step_s']:.0f} ({gflop / r['step_s'] / peak:.0%}) |")
    last, gflop = results[-1], sum(c["gflop"] for c in results[-1]["convs"].values())
    share = gflop / last["step_s"] / peak_gflops(last["precision"], ghz)
    print(f"\n{labels[-1]}: step at {share:.0%} of the {last['precision']} peak {verdict(share, 0.7)}; step time "
          f"{last['step_s'] / results[0]['step_s']:.2f}x {labels[0]}'s")
    for label, r in zip(labels, results):
        print(f"\n{label} per conv: " + ", ".join(
            f"{name} {c['seconds'] * 1000:.0f} ms ({c['gflop'] / c['seconds']:.0f} GFLOP/s, {c['dtype']})"
            for name, c in r["convs"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--cpu", choices=sorted(CPU_PATHS), default="this", help="whose code path (common.CPU_PATHS)")
    parser.add_argument("--child", nargs=4, metavar=("PRECISION", "STEPS", "KERNELS", "NS_DTYPE"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.child[2], args.child[3])))
        return
    ghz = clock_ghz()
    print(f"{cpu_header(args.cpu)}, clock {ghz:.2f} GHz", flush=True)
    rows = ROWS[args.cpu]
    results = [measure_child(__file__, [p, str(args.steps), k, ns], args.cpu) for _, p, k, ns in rows]
    report(results, [label for label, *_ in rows], ghz)


if __name__ == "__main__":
    main()
