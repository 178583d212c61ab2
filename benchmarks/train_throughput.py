"""Training throughput (images/s) of our input pipeline against a bare model.fit and the report's loop.

Three ways to train the same compiled net (imgclf.train.build_compiled, op determinism on, as in
`imgclf train`) on the same digits images, each in a fresh process:
  ours    imgclf.training.input_pipeline.make_dataset (uint8 arrays, per-epoch stateless shuffle, in-graph gather and
          float cast, prefetch) + model.fit
  bare    model.fit on in-memory float32 arrays (Keras' own array pipeline): the framework's speed
  report  the report's loop: every batch built in Python ([data[i] for i in idx]), the whole one-hot
          label matrix re-evaluated per batch, then one train_on_batch
The first epoch (tracing, warm-up) is not timed. Medians over --repeats runs; runs are interleaved so
that load from other processes hits every variant alike.

Usage: python benchmarks/train_throughput.py [--repeats 5] [--images 384] [--epochs 3]
       [--conv-blocks '[[64, 64], ...]' --dense-units '[2048, 2048]']   (default: the report's net)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from common import REPO, epoch_timer, measure_child, verdict

VARIANTS = ("ours", "bare", "report")
TARGETS = {"bare": 0.95, "report": 2.0}  # ours / variant


def fit_ours(model, x, y, params: dict, epochs: int, timer) -> None:
    """What `imgclf train` runs (less the dev-metric and checkpoint callbacks)."""
    from imgclf.training.input_pipeline import make_dataset, steps_per_epoch

    batch = params["train"]["batch_size"]
    model.fit(make_dataset(x, y, batch, params["seed"], 0, epochs), epochs=epochs,
              steps_per_epoch=steps_per_epoch(len(x), batch), shuffle=False, callbacks=[timer], verbose=0)


def fit_bare(model, x, y, params: dict, epochs: int, timer) -> None:
    """Keras' own pipeline over float32 arrays already in memory (the cast is done before timing starts)."""
    model.fit(x.astype(np.float32), y, batch_size=params["train"]["batch_size"], epochs=epochs, shuffle=True,
              callbacks=[timer], verbose=0)


def fit_report(model, x, y, params: dict, epochs: int, timer) -> None:
    """The report's TF1 loop, step for step, on the same net (one-hot labels need categorical cross-entropy)."""
    import keras
    import tensorflow as tf

    model.compile(optimizer=keras.optimizers.Adam(params["train"]["learning_rate"]),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")], jit_compile=False)
    batch, data, labels, rng = params["train"]["batch_size"], list(x), y, np.random.default_rng(params["seed"])
    building = []  # seconds per timed epoch spent building batches in Python
    for epoch in range(epochs):
        timer.on_epoch_begin(epoch)
        building.append(0.0)
        order = rng.permutation(len(data))
        for start in range(0, len(data), batch):
            begin = time.perf_counter()
            idx = order[start:start + batch]
            one_hot = tf.one_hot(labels, 10).numpy()  # the report's sess.run(one_hot) over every label, per batch
            batch_x = np.array([data[i] for i in idx], dtype=np.float32)
            batch_y = np.array([one_hot[i] for i in idx])
            building[-1] += time.perf_counter() - begin
            model.train_on_batch(batch_x, batch_y)
        timer.on_epoch_end(epoch)
    return {"building_s": sum(building[1:])}


def child(variant: str, images: int, epochs: int, model_overrides: list[str]) -> None:
    """One measurement; prints images/s over the epochs after the first."""
    from imgclf.config import load_params
    from imgclf.data.sources.digits import load_digits_source
    from imgclf.training.distribute import make_strategy
    from imgclf.training.numerics import seed_everything
    from imgclf.train import build_compiled

    params = load_params(REPO / "params.yaml", model_overrides)
    seed_everything(params["seed"])
    source = load_digits_source()
    x, y = source.x[:images], source.y[:images]
    model = build_compiled(params, 10, make_strategy(params["train"]["distribute"]), x)
    times: list[float] = []
    fit = {"ours": fit_ours, "bare": fit_bare, "report": fit_report}[variant]
    extra = fit(model, x, y, params, epochs, epoch_timer(times)) or {}
    input_share = extra.get("building_s", 0.0) / sum(times[1:])
    print(json.dumps({"images_per_s": len(x) * (epochs - 1) / sum(times[1:]), "params": model.count_params(),
                      "input_share": input_share}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--epochs", type=int, default=3, help="including the untimed first epoch")
    parser.add_argument("--conv-blocks", help="model.conv_blocks, e.g. '[[32], [64]]' (default: params.yaml)")
    parser.add_argument("--dense-units", help="model.dense_units, e.g. '[128]' (default: params.yaml)")
    parser.add_argument("--child", choices=VARIANTS)
    args = parser.parse_args()
    model = {"conv_blocks": args.conv_blocks, "dense_units": args.dense_units}
    if args.child:
        child(args.child, args.images, args.epochs, [f"model.{k}={v}" for k, v in model.items() if v])
        return
    child_args = ["--images", str(args.images), "--epochs", str(args.epochs)]
    child_args += [arg for k, v in model.items() if v for arg in (f"--{k.replace('_', '-')}", v)]
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    shares = []
    for i in range(args.repeats):
        for variant in VARIANTS:
            result = measure_child(__file__, [variant, *child_args])
            rates[variant].append(result["images_per_s"])
            print(f"run {i + 1} {variant:6}: {result['images_per_s']:7.1f} images/s", flush=True)
        shares.append(result["input_share"])  # the report loop runs last
    medians = {v: statistics.median(r) for v, r in rates.items()}
    print(f"\n{result['params']:,}-parameter net, {args.images} digits, params.yaml's batch size, {args.epochs - 1} timed epochs, "
          f"{args.repeats} runs each (medians)")
    for variant in VARIANTS:
        print(f"{variant:6} {medians[variant]:7.1f} images/s")
    for variant, target in TARGETS.items():
        ratio = medians["ours"] / medians[variant]
        print(f"ours / {variant:6} = {ratio:.2f}x   {verdict(ratio, target)}")
    share = statistics.median(shares)
    print(f"the report loop spends {share:.1%} of its time building batches in Python: removing that input cost "
          f"entirely can make training at most {1 / (1 - share):.2f}x faster on this net and machine")


if __name__ == "__main__":
    main()
