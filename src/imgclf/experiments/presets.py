"""The presets `imgclf experiments` runs, and params.yaml's `preset` switch names (config.expand_preset): each a
params override, never new code, with the dev macro-F1 the report got for it. Where the report is ambiguous, the
choice is written next to the preset."""

from __future__ import annotations

from dataclasses import dataclass, field


FAST_EPOCHS = 10  # airbench94 trains 9.9 epochs of 50,000 images; these are whole epochs of the train split


FAST_MUON_EPOCHS = 8  # airbench94_muon trains 8


@dataclass(frozen=True)
class Preset:
    """Params overrides (DVC `-S` syntax) and the dev macro-F1 the report got (none for `fast`)."""

    report_f1: tuple[float, ...]
    overrides: dict[str, str] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    # The final net of the report, i.e. params.yaml as it is.
    "report_final": Preset((0.760,)),
    # Without the two 256-filter convs. The block's max-pool stays: the report's code reshapes to a
    # hard-coded 2*2*512, which only fits if the net still pools four times.
    "no_256": Preset((0.715, 0.738), {"model.conv_blocks": "[[64, 64], [128, 128], [], [512, 512, 512]]"}),
    # Without the last 512-filter conv: the report's wording reads as the third 512 layer only.
    "no_512": Preset((0.748,), {"model.conv_blocks": "[[64, 64], [128, 128], [256, 256], [512, 512]]"}),
    # No hidden FC layers: flatten -> softmax layer.
    "single_fc": Preset((0.754,), {"model.dense_units": "[]"}),
    # 5x5 conv 64 -> 3x3 max-pool stride 2 -> 16x16 conv 128 -> 2x2 max-pool -> flatten (8*8*128) -> softmax,
    # 15 epochs. SAME padding everywhere, as the 8*8*128 flatten requires.
    "shallow": Preset((0.506,), {
        "model.conv_blocks": "[[64], [128]]", "model.kernel_size": "[5, 16]", "model.pool_size": "[3, 2]",
        "model.dense_units": "[]", "train.training_epochs": "15",
    }),
    # The same with dropout (rate 1 - keep_prob) after each pool. The report got 0.574 after 15 epochs and
    # 0.617 with a longer run that early-stopped at epoch 22; the preset is the 15-epoch one.
    "shallow_dropout": Preset((0.574, 0.617), {
        "model.conv_blocks": "[[64], [128]]", "model.kernel_size": "[5, 16]", "model.pool_size": "[3, 2]",
        "model.dense_units": "[]", "train.training_epochs": "15", "model.conv_dropout": "true",
    }),
    # Not the report's: the airbench94-style family (families/fast.py) with its batch, length and TTA. A fixed
    # per-step schedule decides the length, so no early stop.
    "fast": Preset((), {
        "model.arch": "fast", "train.batch_size": "1024", "train.training_epochs": str(FAST_EPOCHS),
        "train.early_stopping.monitor": "none", "evaluate.tta": "flip_translate", "train.mixed_precision": "auto",
    }),
    # airbench94_muon's recipe on the same net: Muon on the conv kernels, batch 2000, 8 epochs, no lookahead.
    "fast_muon": Preset((), {
        "model.arch": "fast", "model.fast.optimizer": "muon", "model.fast.lookahead_every": "0",
        "train.batch_size": "2000", "train.training_epochs": str(FAST_MUON_EPOCHS),
        "train.early_stopping.monitor": "none", "evaluate.tta": "flip_translate", "train.mixed_precision": "auto",
    }),
}


REPORT_VARIANTS = tuple(v for v in PRESETS if not v.startswith("fast"))  # what `imgclf experiments` runs by default


# params.yaml's shipped value of every key a preset sets (tests/test_config.py pins them to params.yaml). A key
# still at this value takes the preset's; any other value was set by someone (`dvc exp run -S` writes its values
# into params.yaml, where they cannot be told apart otherwise) and wins over the preset.
SHIPPED: dict[str, object] = {
    "model.arch": "report",
    "model.conv_blocks": [[64, 64], [128, 128], [256, 256], [512, 512, 512]],
    "model.kernel_size": 3,
    "model.pool_size": 2,
    "model.dense_units": [2048, 2048],
    "model.conv_dropout": False,
    "model.fast.optimizer": "nesterov",
    "model.fast.lookahead_every": 5,
    "train.batch_size": 128,
    "train.training_epochs": 50,
    "train.early_stopping.monitor": "loss",
    "train.mixed_precision": "none",
    "evaluate.tta": "none",
    "tracking.variant": None,  # a preset's runs carry its name as their variant, as `imgclf experiments`' do
}
