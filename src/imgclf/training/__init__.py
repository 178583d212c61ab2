"""The train stage's wing: everything `train.py` narrates.

families/          model families, one plug-in module each, registered under the name `model.arch` takes
input_pipeline.py  the tf.data pipeline            augment.py   stateless augmentation per (seed, epoch, image)
optimizers.py      PyTorch-style Nesterov SGD, Muon  callbacks.py the epoch loss sum, dev metrics, stops, lookahead
early_stopping.py  the three rules, one interface   checkpoint.py resumable state after every epoch
distribute.py      tf.distribute strategies and who is the chief
numerics.py        train.numerics (the one owner of the oneDNN switches), the CPU facts they depend on, seeds,
                   op determinism, TF32, mixed precision
eigen_cache.py     portable's pin of Eigen's cache sizes, found in TensorFlow's own ELF symbol table

Imports the shared modules (errors, schema, registry, metrics, tta) and files/ only. tracking/ reads
numerics.py's CPU facts; nothing else outside train.py imports this wing (config.py reads the families' keys).
"""
