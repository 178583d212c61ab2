"""The `imgclf` console script: one subcommand per DVC stage, plus predict."""

from __future__ import annotations

import argparse
import os
import sys

# TensorFlow's C++ start-up chatter hides our own messages; users can still set it lower.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _params(args) -> dict:
    """The whole params file, overrides applied, validated before any stage does work."""
    from imgclf.config import load_params

    return load_params(args.params, args.overrides + args.sub_overrides)


def cmd_validate(args) -> None:
    _params(args)
    print(f"{args.params}: OK")


# Imported with the stage's module, in one garbage-collector-off window (process.imports_first): what the stage
# imports first thing anyway. train's module brings Keras and MLflow itself; evaluate imports Keras through
# modelfile.load, after its cheap checks.
STAGE_IMPORTS = {"fingerprint": (), "prepare": (), "train": (), "evaluate": ("imgclf.tracking.tracker",)}


def stage_command(module: str):
    """The command of a DVC stage: validate the whole params file first (a bad value fails in a
    fraction of a second, before TensorFlow is imported), then run `imgclf.<module>.main(params)`."""

    def command(args) -> None:
        from imgclf.process import imports_first
        from imgclf.training.numerics import use_numerics
        from imgclf.workspace import writer

        params = _params(args)
        use_numerics(params["train"]["numerics"], params["train"]["kernels"])  # before the stage imports TensorFlow
        with writer(module):  # one writer per workspace, and its output folders writable, before any work
            imports_first(f"imgclf.{module}", *STAGE_IMPORTS[module]).main(params)

    return command


def cmd_predict(args) -> None:
    from imgclf.serving import predict

    # a logged model brings its run's TTA (None here); a .keras file gets params.yaml's evaluate.tta, and outside a
    # project, where there is no params.yaml to take it from, none
    logged = args.run or (args.model or "").startswith("models:/")
    tta = args.tta or (None if logged else _params(args)["evaluate"]["tta"] if os.path.isfile(args.params) else "none")
    predict.main(args.images, run_id=args.run, model_path=args.model, tta=tta, output=args.output, top_k=args.top_k)


def cmd_rerun(args) -> int:
    from imgclf import rerun

    return rerun.main(args.run_id, restart=True, current_code=args.current_code)


def cmd_promote(args) -> None:
    from imgclf.tracking import promotion

    promotion.main(args.run_id, args.alias, args.name, args.force)


def cmd_experiments(args) -> int:
    from imgclf.experiments import command as experiments
    from imgclf.workspace import writer

    params = _params(args)
    with writer("experiments"):  # two of them would both restart and collect one DVC queue
        return experiments.main(params, args.variants, args.seeds, args.overrides + args.sub_overrides,
                                args.jobs, args.table)


def build_parser() -> argparse.ArgumentParser:
    """Subcommands named after the DVC stages they implement."""
    parser = argparse.ArgumentParser(prog="imgclf", description="Reproducible CIFAR-style image classification.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params value for this command only, e.g. -S train.learning_rate=0.0005")
    # -S is also accepted after the subcommand (`imgclf experiments -S ...`); a separate dest
    # because argparse lets a subparser's default overwrite the main parser's value.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-S", "--set", dest="sub_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params value for this command only")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, parents=[common])
        command.set_defaults(func=func)
        return command

    add("validate", cmd_validate, "check params.yaml and exit")
    for name, text in (("fingerprint", "what the data source holds now -> data/fingerprint.json"),
                       ("prepare", "data source -> data/prepared/ arrays + manifest.json"),
                       ("train", "train the model family params.yaml names -> models/model.keras"),
                       ("evaluate", "F1 and friends -> reports/metrics.json")):
        add(name, stage_command(name), text)  # the DVC stage's name is its module's
    predict = add("predict", cmd_predict, "class and probability per image, printed or written to a CSV")
    predict.add_argument("images", nargs="+", metavar="PATH",
                         help="image files, folders (searched recursively) or glob patterns; any size, converted to "
                              "the net's size, RGB")
    predict.add_argument("--tta", choices=("none", "flip", "flip_translate"),
                         help="test-time augmentation (default: a logged model's own, else params.yaml's "
                              "evaluate.tta)")
    predict.add_argument("-o", "--output", metavar="CSV",
                         help="write path, class, probability, the top-k and any error per image to this CSV")
    predict.add_argument("-k", "--top-k", type=int, default=1, metavar="K", help="also the K most probable classes")
    source = predict.add_mutually_exclusive_group()
    source.add_argument("--run", help="MLflow run id whose logged model to use")
    source.add_argument("--model", help="a saved .keras model (default: models/model.keras), or a registered version "
                                        "models:/NAME@ALIAS or models:/NAME/VERSION")
    rerun = add("rerun", cmd_rerun, "retrain an MLflow run at its commit, on its data, with its params; MATCH (exit 0) "
                                    "or DIFF (exit 1)")
    rerun.add_argument("run_id", help="the MLflow run to reproduce")
    rerun.add_argument("--current-code", action="store_true",
                       help="train with this tree's code instead of the run's commit (data/prepared must be the run's)")
    promote = add("promote", cmd_promote, "point a registry alias (default champion) at an MLflow run's model")
    promote.add_argument("run_id", help="the MLflow run whose model to promote (registered first if need be)")
    promote.add_argument("--alias", default="champion", help="the alias to set (default: champion)")
    promote.add_argument("--name", help="registered model name (default: the run's tracking.register_model, else its "
                                        "experiment's name)")
    promote.add_argument("--force", action="store_true", help="promote even if it scores below the alias's holder")
    exps = add("experiments", cmd_experiments, "the report's variants x seeds via DVC's queue, and a table")
    exps.add_argument("--variants", nargs="+", default=[], metavar="V",
                      help="presets to run (default: the report's six): report_final no_256 no_512 single_fc "
                           "shallow shallow_dropout, and fast, fast_muon")
    exps.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="seeds (default: params.yaml's seed)")
    exps.add_argument("--jobs", type=int, default=1, help="experiments run at once (default: 1)")
    exps.add_argument("--table", action="store_true", help="only rebuild the table from MLflow, no training")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; user errors and OS errors print one line and exit 2, interrupts exit 130."""
    from imgclf.errors import exit_code, install_handlers, raise_if_interrupted

    args = build_parser().parse_args(argv)
    install_handlers()

    def command() -> int:
        code = args.func(args) or 0
        raise_if_interrupted()  # a signal some library swallowed still ends the command as interrupted
        return code

    code = exit_code(f"imgclf {args.command}", command)
    from imgclf.files.atomic import hdf5_broken

    if hdf5_broken[0]:  # a failed HDF5 write crashes the library's clean-up at exit: leave without it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def console() -> int:
    """The `imgclf` console script (pyproject.toml): main(), then a quick exit."""
    from imgclf.process import leave

    return leave(main())


if __name__ == "__main__":
    sys.exit(console())
