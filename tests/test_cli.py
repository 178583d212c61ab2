"""The `imgclf` console script (imgclf.cli): subcommands named after the stages and their modules, one-line
errors with exit 2, overrides before or after the subcommand."""

from __future__ import annotations

import errno
import importlib
import subprocess
import sys

import pytest

from conftest import BIN, REPO
from imgclf import cli


@pytest.mark.parametrize("stage", ["fingerprint", "prepare", "train", "evaluate"])
def test_each_stage_command_runs_the_module_of_its_name(stage, monkeypatch):
    """The command really runs: each stage module's main is swapped for a recorder (the stages themselves run
    end to end in test_pipeline_e2e), so the test sees which one was called, with which params."""
    called = []
    for name in ("fingerprint", "prepare", "train", "evaluate"):
        module = importlib.import_module(f"imgclf.{name}")
        assert callable(module.main)
        monkeypatch.setattr(module, "main", lambda params, name=name: called.append((name, params)))
    args = cli.build_parser().parse_args(["--params", str(REPO / "params.yaml"), "-S", "seed=3", stage,
                                          "-S", "train.tf32=true"])
    assert args.command == stage and args.overrides == ["seed=3"] and args.sub_overrides == ["train.tf32=true"]
    args.func(args)
    assert [name for name, _ in called] == [stage]
    params = called[0][1]
    assert params["seed"] == 3 and params["train"]["tf32"] is True  # both places' overrides, validated


# Runs an installed console script as its own process would, and reports at exit whether the garbage
# collector's objects were frozen, i.e. process.leave ran (validate and move-in import nothing through
# imports_first, so only leave freezes here).
AT_EXIT = ("import atexit, gc, runpy, sys; atexit.register(lambda: print('frozen:', gc.get_freeze_count() > 0)); "
           "script = sys.argv.pop(1); sys.argv[0] = script; runpy.run_path(script, run_name='__main__')")


@pytest.mark.parametrize("script, args, code, out", [
    ("imgclf", ["--params", str(REPO / "params.yaml"), "validate"], 0, "OK"),
    ("imgclf", ["--params", str(REPO / "params.yaml"), "-S", "seed=-1", "validate"], 2, ""),
    ("imgclf-team", ["move-in", "--from", "sqlite:////nonexistent/mlflow.db", "--to", "http://127.0.0.1:9"], 2, ""),
])
def test_console_scripts_exit_with_mains_code_and_skip_the_final_garbage_collections(script, args, code, out):
    """The installed scripts run console(): main's exit code, with the objects frozen before Python's exit
    (which would otherwise spend ~2 CPU seconds collecting TensorFlow's and MLflow's objects)."""
    proc = subprocess.run([sys.executable, "-c", AT_EXIT, str(BIN / script), *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "frozen: True" and out in proc.stdout
    assert (proc.stderr.count("error: ") == 1) == (code == 2), proc.stderr  # main's one line, still printed


def test_validate_ok_and_a_bad_value_is_one_line_exit_2(capsys):
    params = str(REPO / "params.yaml")
    assert cli.main(["--params", params, "validate"]) == 0
    assert capsys.readouterr().out.strip() == f"{params}: OK"
    assert cli.main(["--params", params, "-S", "train.keep_prob=0", "validate"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("imgclf validate: error: ") and "train.keep_prob=0: must be in (0, 1]" in err
    assert "\n" not in err


def test_predict_takes_a_tta_choice_and_experiments_its_presets():
    args = cli.build_parser().parse_args(["predict", "a.png", "--tta", "flip", "--model", "m.keras"])
    assert args.tta == "flip" and args.images == ["a.png"]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["predict", "a.png", "--tta", "sideways"])
    args = cli.build_parser().parse_args(["experiments", "--variants", "fast", "--seeds", "1", "2", "--jobs", "2"])
    assert args.variants == ["fast"] and args.seeds == [1, 2] and args.jobs == 2


def test_an_unknown_variant_is_one_line(capsys):
    assert cli.main(["--params", str(REPO / "params.yaml"), "experiments", "--variants", "deep"]) == 2
    assert "unknown variant(s) deep; choose from report_final" in capsys.readouterr().err


def test_an_os_error_is_one_line_naming_the_path_exit_2(tmp_path, capsys):
    assert cli.main(["--params", str(tmp_path), "validate"]) == 2  # a folder where the params file should be
    err = capsys.readouterr().err
    assert err == f"imgclf validate: error: {tmp_path}: Is a directory; check the path and rerun\n"


def test_an_os_error_names_both_paths_of_a_rename_and_the_fix(monkeypatch, capsys):
    def full_disk(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/.x.tmp", None, "/data/x")

    monkeypatch.setattr(cli, "cmd_validate", full_disk)
    assert cli.main(["validate"]) == 2
    err = capsys.readouterr().err
    assert err == ("imgclf validate: error: /data/.x.tmp -> /data/x: No space left on device; "
                   "free disk space and rerun\n")


def test_an_os_error_without_a_path_is_still_one_line(monkeypatch, capsys):
    def refused(args):
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    monkeypatch.setattr(cli, "cmd_validate", refused)
    assert cli.main(["validate"]) == 2
    err = capsys.readouterr().err
    assert err == "imgclf validate: error: ConnectionRefusedError: Connection refused; fix it and rerun\n"
