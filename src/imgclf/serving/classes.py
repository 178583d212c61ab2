"""The class names a loaded model answers with, checked against its outputs: a net with more outputs than names
would fail on its first answer (an IndexError) and one with fewer would answer with wrong names, silently."""

from __future__ import annotations

from imgclf.errors import ImgclfError


def check_outputs(model, classes: list[str], model_name: str, names_from: str) -> list[str]:
    """`classes`, if the net has one output per name; one line naming both counts otherwise."""
    outputs = model.output_shape[-1]
    if outputs != len(classes):
        raise ImgclfError(f"{model_name}: the net has {outputs} outputs but {names_from} names {len(classes)} "
                          "classes: they are from different runs; predict with the model and class names of one "
                          "run (--run RUN_ID, or retrain)")
    return classes
