"""The train stage's wing: model families (`families/`, one plug-in module each), the input pipeline, augmentation,
optimizers, callbacks, early stopping, checkpoints, distribution, and numerics (seeds, precision, the oneDNN
switches and the CPU facts they depend on). Imports errors, schema, registry, metrics, tta and files/."""
