"""What each speed lever gives the fast family on this CPU: training images/s of the `fast` and `fast_muon`
presets and of fast_muon with one lever changed (batch 1024 instead of 2000, mixed_bfloat16, XLA), and
whether XLA keeps reruns bit-identical.

Throughput: each configuration trains the real net (imgclf.train.build_compiled, the family's augmentation,
imgclf.training.input_pipeline.make_dataset, op determinism as `imgclf train` sets it) on the first --images training images
of the lossless CIFAR-10 PNGs (prepared by benchmarks/time_to_accuracy.py), in a fresh process; the first
epoch (tracing) is not timed. Configurations are interleaved and repeated, so load from other processes hits
each alike; medians. The projected training time is the preset's epochs x 45,000 images / images/s: the time
in training steps, without the per-epoch dev pass and checkpoint (time_to_accuracy prints those).

XLA determinism (--xla-reruns): two fresh processes train fast_muon with train.jit_compile=true for two epochs
on the same images; equal weight hashes mean XLA reruns are bit-identical here.

    python benchmarks/fast_levers.py [--images 8000] [--repeats 2] [--xla-reruns] [--only fast_muon ...]
"""

from __future__ import annotations

import statistics

from common import PREPARED_PNG, REPO, epoch_timer, measure_child, png_subset_args, verdict

TRAIN_IMAGES = 45_000
# name -> (preset, overrides on top of it)
F32 = {"train.mixed_precision": "none"}  # the presets' own `auto` would pick by CPU
CONFIGS = {
    "fast": ("fast", F32),
    "fast_muon": ("fast_muon", F32),
    "fast_muon batch 1024": ("fast_muon", F32 | {"train.batch_size": 1024}),
    "fast_muon bf16": ("fast_muon", {"train.mixed_precision": "mixed_bfloat16"}),
    "fast_muon XLA": ("fast_muon", F32 | {"train.jit_compile": "true"}),
}


def load_params(config: str, extra: dict) -> dict:
    """params.yaml with the configuration's preset, its own overrides and `extra`."""
    from imgclf.config import load_params as load
    from imgclf.experiments.presets import PRESETS

    preset, own = CONFIGS[config]
    sets = PRESETS[preset].overrides | own | extra
    return load(REPO / "params.yaml", [f"{k}={v}" for k, v in sets.items()])


def child(config: str, images: int, epochs: int) -> dict:
    """Train `config` for `epochs` on the first `images` training images; images/s after the first epoch and
    the weights' sha256."""
    from imgclf.files.modelfile import weights_sha256
    from imgclf.files.prepared_reader import load_prepared
    from imgclf.train import build_compiled
    from imgclf.training.distribute import make_strategy
    from imgclf.training.families import REGISTRY
    from imgclf.training.input_pipeline import make_dataset, steps_per_epoch
    from imgclf.training.numerics import seed_everything

    params = load_params(config, {"train.training_epochs": epochs})
    cfg = params["train"]
    seed_everything(params["seed"], cfg["jit_compile"], cfg["tf32"])
    splits, manifest = load_prepared(PREPARED_PNG)
    x, y = splits["train"][0][:images], splits["train"][1][:images]
    model = build_compiled(params, len(manifest["classes"]), make_strategy("none"), x)
    times: list[float] = []
    dataset = make_dataset(x, y, cfg["batch_size"], params["seed"], 0, epochs,
                           REGISTRY.get("fast").augment(params))
    model.fit(dataset, epochs=epochs, steps_per_epoch=steps_per_epoch(len(x), cfg["batch_size"]), shuffle=False,
              callbacks=[epoch_timer(times)], verbose=0)
    return {"images_per_s": len(x) * (epochs - 1) / sum(times[1:]), "weights_sha256": weights_sha256(model)}


def throughput(images: int, repeats: int, epochs: int, configs: list[str]) -> None:
    """Interleaved runs of each configuration (`fast` first: the others are compared with it); the table of
    medians and projected training times."""
    from imgclf.experiments.presets import PRESETS

    rates: dict[str, list[float]] = {c: [] for c in ["fast", *(c for c in configs if c != "fast")]}
    for i in range(repeats):
        for config in rates:
            result = measure_child(__file__, [config, str(images), str(epochs)])
            rates[config].append(result["images_per_s"])
            print(f"run {i + 1} {config:22}: {result['images_per_s']:6.1f} images/s", flush=True)
    print(f"\n{images} lossless CIFAR-10 training images, {epochs - 1} timed epochs, {repeats} runs each (medians)")
    print("| configuration | images/s | epochs | projected time in training steps | vs fast |\n|---|---|---|---|---|")
    fast_seconds = None
    for config in rates:
        preset = CONFIGS[config][0]
        median = statistics.median(rates[config])
        epochs_run = int(PRESETS[preset].overrides["train.training_epochs"])
        seconds = epochs_run * TRAIN_IMAGES / median
        fast_seconds = fast_seconds or seconds
        ratio = seconds / fast_seconds
        print(f"| {config} | {median:.1f} | {epochs_run} | {seconds / 60:.1f} min | {ratio:.2f} "
              f"{verdict(ratio, 0.6, higher_is_better=False) if config != 'fast' else ''} |")


def xla_reruns(images: int) -> None:
    """Two fresh XLA runs of fast_muon: bit-identical weights or not."""
    hashes = [measure_child(__file__, ["fast_muon XLA", str(images), "2"])["weights_sha256"] for _ in range(2)]
    same = hashes[0] == hashes[1]
    print(f"\nXLA (train.jit_compile=true), two fresh processes, 2 epochs on {images} images: weights "
          f"{hashes[0][:12]} and {hashes[1][:12]}: {'bit-identical' if same else 'DIFFERENT'}")


def main() -> None:
    def options(parser):
        parser.add_argument("--repeats", type=int, default=2)
        parser.add_argument("--xla-reruns", action="store_true", help="also check XLA reruns for bit-identity")

    # fast always runs too: the ratios are against it
    args = png_subset_args(__doc__, list(CONFIGS), 8000, options, child)
    if args is None:
        return
    throughput(args.images, args.repeats, args.epochs, args.only)
    if args.xla_reruns:
        xla_reruns(args.images)


if __name__ == "__main__":
    main()
