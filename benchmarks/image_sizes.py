"""What `data.image_size` costs the fast family: training images/s and the time of a 10,000-image epoch at
each size, on this CPU, for the docs' recommended sizes (docs/experiments.md).

Each size runs in a fresh process: the `fast` preset's net and optimizer (imgclf.train.build_compiled, the kernel
path and precision `imgclf train` would choose here) train on random images of that size held in memory, a
batch of BATCH_PIXELS / size² images (the preset's 1,024 at 32 px; fewer at larger sizes, as memory requires),
--steps timed steps after two untimed ones (tracing). Content does not change a convolution's time, so random
pixels time what a folder of photos resized to that size would; the input pipeline (decode, augmentation) is
not included. Medians; peak RSS from the child.

    python benchmarks/image_sizes.py [--sizes 32 64 96 128 224] [--steps 3] [--cpu avx2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import CPU_PATHS, REPO, cpu_header, measure_child, own_peak_rss

BATCH_PIXELS = 1024 * 32 * 32  # the fast preset's batch of CIFAR-sized images
EPOCH_IMAGES = 10_000


def child(size: int, steps: int) -> dict:
    from imgclf.config import load_params
    from imgclf.experiments.presets import PRESETS
    from imgclf.training.numerics import use_numerics

    batch = max(8, BATCH_PIXELS // size ** 2)
    # a folder of photos (never read: the images are generated) is what takes any data.image_size
    sets = PRESETS["fast"].overrides | {"data.dataset": "folder", "data.path": "photos", "data.image_size": size,
                                        "train.batch_size": batch}
    params = load_params(REPO / "params.yaml", [f"{k}={v}" for k, v in sets.items()])
    use_numerics(params["train"]["numerics"], params["train"]["kernels"])  # before TensorFlow, as `imgclf train`
    import numpy as np

    from imgclf.train import build_compiled, for_this_machine
    from imgclf.training.distribute import make_strategy
    from imgclf.training.numerics import seed_everything

    seed_everything(params["seed"])
    params, machine = for_this_machine(params)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, 10, batch)
    model = build_compiled(params, 10, make_strategy("none"), x)
    xf = x.astype(np.float32)
    model.train_on_batch(xf, y), model.train_on_batch(xf, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(xf, y)
        times.append(time.perf_counter() - start)
    step = statistics.median(times)
    return {"size": size, "batch": batch, "step_s": step, "images_per_s": batch / step,
            "peak_rss_gib": own_peak_rss() / 2 ** 30, "path": f"{machine['kernels']} kernels, {machine['mixed_precision']}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 96, 128, 224])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cpu", choices=sorted(CPU_PATHS), default="this", help="whose code path (common.CPU_PATHS)")
    parser.add_argument("--child", nargs=2, type=int, metavar=("SIZE", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    print(cpu_header(args.cpu), flush=True)
    print(f"\nfast preset, medians of {args.steps} steps\n| data.image_size | batch | path | images/s "
          f"| {EPOCH_IMAGES:,}-image epoch | peak RSS |\n|---|---|---|---|---|---|")
    for size in args.sizes:
        r = measure_child(__file__, [str(size), str(args.steps)], args.cpu)
        print(f"| {size} | {r['batch']} | {r['path']} | {r['images_per_s']:.1f} "
              f"| {EPOCH_IMAGES / r['images_per_s'] / 60:.1f} min | {r['peak_rss_gib']:.1f} GiB |", flush=True)


if __name__ == "__main__":
    main()
