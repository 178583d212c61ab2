"""Cost of determinism: training images/s of the report's net with TF op determinism on vs off.

Op determinism cannot be switched off again inside a process, so each measurement is a fresh
subprocess; on/off runs alternate to spread machine drift evenly. Prints every run, the medians
and the ratio. Usage: python benchmarks/determinism.py [--repeats 3] [--images 512] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from common import REPO, epoch_timer


def child(deterministic: bool, images: int, epochs: int) -> None:
    """One measurement: seeded fit on digits; images/s over the epochs after the first (warm-up)."""
    import keras
    import tensorflow as tf
    import yaml

    from imgclf.training.input_pipeline import make_dataset, steps_per_epoch
    from imgclf.training.families.report import build_model, compile_model
    from imgclf.data.sources.digits import load_digits_source

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    keras.utils.set_random_seed(params["seed"])
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    source = load_digits_source()
    x, y = source.x[:images], source.y[:images]
    model = compile_model(build_model(params["model"], params["train"], 10), params["train"]["learning_rate"])
    batch = params["train"]["batch_size"]
    times: list[float] = []
    model.fit(make_dataset(x, y, batch, params["seed"], 0, epochs), epochs=epochs,
              steps_per_epoch=steps_per_epoch(len(x), batch), callbacks=[epoch_timer(times)], verbose=0)
    print(json.dumps({"images_per_s": len(x) * (epochs - 1) / sum(times[1:])}))


def measure(deterministic: bool, images: int, epochs: int) -> float:
    cmd = [sys.executable, __file__, "--child", "on" if deterministic else "off",
           "--images", str(images), "--epochs", str(epochs)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--child", choices=["on", "off"])
    args = parser.parse_args()
    if args.child:
        child(args.child == "on", args.images, args.epochs)
        return
    runs: dict[str, list[float]] = {"off": [], "on": []}
    for i in range(args.repeats):
        for mode in ("off", "on"):
            rate = measure(mode == "on", args.images, args.epochs)
            runs[mode].append(rate)
            print(f"run {i + 1} op determinism {mode:3}: {rate:7.1f} images/s", flush=True)
    off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
    print(f"\nreport net, {args.images} digits, batch 128, {args.epochs - 1} timed epochs, {args.repeats} runs each")
    print(f"median images/s  determinism off: {off:.1f}   on: {on:.1f}   on/off ratio: {on / off:.3f}")


if __name__ == "__main__":
    main()
