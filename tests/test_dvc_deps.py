"""dvc.yaml's code deps are right by construction: each stage lists exactly its import closure in src/imgclf."""

from __future__ import annotations

import importlib.util
import sys

import yaml

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import imports  # noqa: E402  (scripts/imports.py: the AST import graph)


def test_every_stage_lists_exactly_the_code_it_imports():
    assert imports.stage_problems() == []


def test_a_missing_module_is_named_with_its_stage(tmp_path):
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    dvc["stages"]["evaluate"]["deps"].remove("src/imgclf/tta.py")
    dvc["stages"]["prepare"]["deps"].append("src/imgclf/tracking/tracker.py")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    assert imports.stage_problems(tmp_path / "dvc.yaml") == [
        "stage prepare: dvc.yaml lists src/imgclf/tracking/tracker.py, which the stage does not import",
        "stage evaluate: dvc.yaml misses src/imgclf/tta.py",
    ]


def test_the_closure_follows_imports_at_any_depth_and_whole_plug_in_folders():
    train = imports.closure_files("imgclf.train")
    assert "src/imgclf/training/optimizers.py" in train  # imported inside a function of families/fast.py
    assert {"src/imgclf/training/families/report.py", "src/imgclf/training/families/fast.py"} <= train
    prepare = imports.closure_files("imgclf.prepare")
    assert {f"src/imgclf/data/sources/{s}.py" for s in ("digits", "cifar10", "folder", "npz")} <= prepare
    assert not any("families" in p or "tracking" in p for p in prepare)
    assert not any("/sources/" in p for p in train | imports.closure_files("imgclf.evaluate"))


def test_no_stage_imports_another_stage_or_the_front_door():
    for stage in ("fingerprint", "prepare", "train", "evaluate"):
        others = {f"src/imgclf/{s}.py" for s in ("fingerprint", "prepare", "train", "evaluate", "cli", "config")
                  if s != stage}
        assert not imports.closure_files(f"imgclf.{stage}") & others, stage


def test_imgclf_is_a_regular_package_that_every_stage_lists():
    # an implicit namespace package would merge any other `imgclf` folder on sys.path into ours
    assert importlib.util.find_spec("imgclf").origin == str(REPO / "src/imgclf/__init__.py")
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert all("src/imgclf/__init__.py" in stage["deps"] for stage in stages.values())


def test_train_depends_on_the_pinned_versions_its_weights_depend_on():
    # not code of the package, so outside the import closure: stage_problems ignores it, this test requires it
    assert (REPO / "requirements.lock").is_file()
    assert "requirements.lock" in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["deps"]
