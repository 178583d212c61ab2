"""Bad input, end to end: one row per bad params value or data source, through the real CLI and DVC.

The session's good tiny run (conftest.trained), committed (the `cache: false` reports live in git), is copied
once per module (per xdist worker). Every row then breaks params.yaml or points `data` at a bad source, in that
same copy, and asserts: exit code 2,
exactly one message line naming the culprit (file or key) and the fix, and that the good outputs survive:
byte for byte when nothing deleted them (`imgclf validate`, which `make run` runs before `dvc repro`), or,
where DVC deleted a stage's outputs before running it, absent and then restored byte for byte by
`dvc checkout`. Rows fail in `validate` or `prepare`, which never import TensorFlow, so they are cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from conftest import copy_trained, error_line, pipeline_env, reaped, run, write_params
from fakes import Evil, cifar_batch, make_folder, make_npz, md5, save_image, snapshot, write_cifar
from imgclf.data.sources.cifar10 import CIFAR10_MD5, CIFAR10_MD5_ENV

pytestmark = pytest.mark.e2e

OUTPUTS = ("data/prepared", "models", "reports")
PREPARE_FAILED = "ERROR: failed to reproduce 'prepare': failed to run: imgclf prepare, exited with 2"
FIX_PARAMS = "fix params.yaml and rerun"


@dataclass
class Workspace:
    """The module's repo copy after its good run: the good params.yaml text and every output file's bytes."""

    repo: Path
    params: str
    outputs: dict[str, bytes] = field(default_factory=dict)

    def current(self) -> dict[str, bytes]:
        """Every output file now (a missing output simply has no entries)."""
        return {f"{top}/{name}": data for top in OUTPUTS for name, data in snapshot(self.repo / top).items()}

    def without(self, *prefixes: str) -> dict[str, bytes]:
        """The good outputs minus those under `prefixes` (the ones DVC deletes before running a stage)."""
        return {k: v for k, v in self.outputs.items() if not k.startswith(prefixes)}


@pytest.fixture(scope="module")
def good(tmp_path_factory, trained) -> Workspace:
    """A copy of the session's good tiny run (conftest.trained), committed like a user would."""
    with reaped(copy_trained(trained, tmp_path_factory.mktemp("bad-input") / "repo")) as repo:
        workspace = Workspace(repo, (repo / "params.yaml").read_text())
        workspace.outputs = workspace.current()
        assert {"data/prepared/manifest.json", "models/model.keras", "reports/metrics.json"} <= set(workspace.outputs)
        yield workspace


@pytest.fixture
def ws(good: Workspace) -> Workspace:
    """The good workspace; afterwards params.yaml and the outputs are put back even when a row failed midway."""
    yield good
    (good.repo / "params.yaml").write_text(good.params)
    if good.current() != good.outputs:
        run(["dvc", "checkout", "--force"], good.repo)
        run(["git", "checkout", "--", "reports", "data/fingerprint.json"], good.repo)


# --- params.yaml ------------------------------------------------------------------------------------


def setting(changes: dict[str, str]) -> Callable[[Path], None]:
    """An edit writing `-S`-style changes into params.yaml without validating them."""
    return lambda repo: write_params(repo, changes, check=False)


PARAMS_ROWS = [  # id, edit of the repo, fragments the message must hold (culprits), the fix
    ("wrong-type", setting({"train.batch_size": "'128'"}), ["train.batch_size: must be an integer, got '128'"]),
    ("keep_prob-0", setting({"train.keep_prob": "0"}), ["train.keep_prob=0: must be in (0, 1]"]),
    ("keep_prob-above-1", setting({"train.keep_prob": "1.5"}), ["train.keep_prob=1.5: must be in (0, 1]"]),
    ("learning_rate-0", setting({"train.learning_rate": "0"}), ["train.learning_rate=0: must be > 0"]),
    ("learning_rate-negative", setting({"train.learning_rate": "-1e-3"}),
     ["train.learning_rate=-0.001: must be > 0"]),
    ("batch_size-0", setting({"train.batch_size": "0"}), ["train.batch_size=0: must be >= 1"]),
    ("epochs-0", setting({"train.training_epochs": "0"}), ["train.training_epochs=0: must be >= 1"]),
    ("patience-negative", setting({"train.early_stopping.patience": "-1"}),
     ["train.early_stopping.patience=-1: must be >= 0"]),
    ("dev_fraction-0", setting({"data.dev_fraction": "0"}), ["data.dev_fraction=0: must be in (0, 1)"]),
    ("dev_fraction-1", setting({"data.dev_fraction": "1"}), ["data.dev_fraction=1: must be in (0, 1)"]),
    ("conv_blocks-empty", setting({"model.conv_blocks": "[]"}), ["model.conv_blocks=[]: must be a list of lists of positive ints, at least one non-empty"]),
    ("filters-0", setting({"model.conv_blocks": "[[8, 0]]"}), ["model.conv_blocks=[[8, 0]]: must be"]),
    ("unknown-key", setting({"epochs": "3"}), ["epochs: unknown key"]),
    ("misspelled-section", setting({"trian.learning_rate": "0.1"}), ["trian: unknown key (did you mean train?)"]),
    ("misspelled-at-depth-3", setting({"train.early_stopping.patiance": "5"}),
     ["train.early_stopping.patiance: unknown key (did you mean train.early_stopping.patience?)"]),
    ("all-problems-at-once", setting({"seed": "-1", "train.keep_prob": "0", "data.sead": "1"}),
     ["data.sead: unknown key", "seed=-1: must be >= 0", "train.keep_prob=0: must be in (0, 1]"]),
    ("fast-widths-empty", setting({"model.arch": "fast", "model.fast.widths": "[]"}),
     ["model.fast.widths=[]: must be a non-empty list of positive ints"]),
    ("fast-flip-unknown", setting({"model.arch": "fast", "model.fast.flip": "sideways"}),
     ["model.fast.flip='sideways': must be one of none, random, alternating"]),
]
SPECIAL_PARAMS_ROWS = [  # id, edit, culprits, fix
    ("missing-file", lambda repo: (repo / "params.yaml").unlink(), ["params.yaml: not found"],
     "run from the project root or pass --params PATH"),
    ("invalid-yaml", lambda repo: (repo / "params.yaml").write_text("seed: 51\ntrain: [unclosed\n"),
     ["params.yaml: invalid YAML at line 3"], "fix the syntax and rerun"),
]


@pytest.mark.parametrize(
    ("edit", "culprits", "fix"),
    [pytest.param(edit, culprits, FIX_PARAMS, id=name) for name, edit, culprits in PARAMS_ROWS]
    + [pytest.param(*row[1:], id=row[0]) for row in SPECIAL_PARAMS_ROWS],
)
def test_bad_params_fail_validate_in_one_line_and_touch_nothing(ws, edit, culprits, fix):
    edit(ws.repo)
    proc = run(["imgclf", "validate"], ws.repo, check=False)
    line = error_line(proc.stderr, "validate")
    assert proc.returncode == 2 and proc.stderr.strip() == line
    assert all(culprit in line for culprit in culprits) and line.endswith(fix), line
    assert ws.current() == ws.outputs


def test_every_stage_validates_the_whole_params_file_first(ws):
    write_params(ws.repo, {"train.keep_prob": "0"}, check=False)  # a train value fails prepare and evaluate too
    for stage in ("prepare", "train", "evaluate"):
        proc = run(["imgclf", stage], ws.repo, check=False)
        # One line and nothing else: not even TensorFlow's start-up chatter, it was never imported.
        assert proc.returncode == 2 and proc.stdout == "", stage
        assert proc.stderr.strip() == error_line(proc.stderr, stage) and "train.keep_prob=0" in proc.stderr
    assert ws.current() == ws.outputs


def test_dvc_repro_without_validate_deletes_then_checkout_restores(ws):
    """Bypassing `make run`'s validate step, DVC deletes train's outputs before the stage refuses the value;
    `dvc checkout` brings the cached ones back, git the `cache: false` reports."""
    write_params(ws.repo, {"train.keep_prob": "0"}, check=False)
    fingerprint = ws.repo / "data/fingerprint.json"
    proc = run(["dvc", "repro"], ws.repo, check=False)
    # The first stage, fingerprint, validates the whole file and refuses: DVC had deleted only its own output.
    assert "train.keep_prob=0" in error_line(proc.stderr, "fingerprint")
    assert "imgclf fingerprint, exited with 2" in proc.stderr and not fingerprint.exists()
    assert ws.current() == ws.outputs
    run(["git", "checkout", "--", "data/fingerprint.json"], ws.repo)
    assert fingerprint.is_file()
    # Past it (train run on its own through DVC), DVC deletes train's outputs before the stage refuses the value.
    proc = run(["dvc", "repro", "--single-item", "train"], ws.repo, check=False)
    assert "train.keep_prob=0" in error_line(proc.stderr, "train") and "imgclf train, exited with 2" in proc.stderr
    deleted = ("models/model.keras", "reports/loss.png", "reports/train.json", "reports/history.csv")
    assert ws.current() == ws.without(*deleted)
    run(["dvc", "checkout"], ws.repo)
    assert ws.current() == ws.without("reports/train.json", "reports/history.csv")
    run(["git", "checkout", "--", "reports"], ws.repo)
    assert ws.current() == ws.outputs


# --- data ---------------------------------------------------------------------------------------------


@dataclass
class BadData:
    """A bad data source: the `data` params pointing at it and what the one error line must say."""

    dataset: str
    path: Path | None
    culprit: str
    fix: str
    env: dict[str, str] = field(default_factory=dict)


def cifar_row(culprit: str, fix: str = "re-download the archive", damage=None, **members):
    """A fake CIFAR archive with `members` replaced (and its bytes passed through `damage`). Its md5 is
    accepted through IMGCLF_CIFAR10_MD5 so the check under test is reached; `culprit` may use {archive}."""

    def build(tmp: Path) -> BadData:
        archive = write_cifar(tmp / "cifar.tar.gz", **members)
        if damage:
            archive.write_bytes(damage(archive.read_bytes()))
        return BadData("cifar10", archive, culprit.format(archive=archive), fix, {CIFAR10_MD5_ENV: md5(archive)})

    return build


def folder_row(culprit: str, fix: str, damage: Callable[[Path], object]):
    """A 3-class image folder, then `damage(root)`; `culprit` may use {root}."""

    def build(tmp: Path) -> BadData:
        root = make_folder(tmp / "images")
        damage(root)
        return BadData("folder", root, culprit.format(root=root), fix)

    return build


def truncate(path: Path) -> None:
    """Cut a file to its first half."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def npz_missing(tmp: Path) -> BadData:
    """data.path names a .npz that does not exist."""
    path = tmp / "missing.npz"
    return BadData("npz", path, f"{path}: not found", "set data.path to a .npz file (dataset: npz)")


def cifar_md5_mismatch(tmp: Path) -> BadData:
    """A well-formed archive that is not the official one: the md5 check (not overridden here) refuses it."""
    archive = write_cifar(tmp / "cifar-10-python.tar.gz")
    return BadData("cifar10", archive, f"{archive}: md5 {md5(archive)} != expected {CIFAR10_MD5}",
                   "re-download cifar-10-python.tar.gz or point data.path at a good copy")


def npz_row(culprit: str, fix: str, **arrays):
    """A .npz of 40 images in 4 classes with `arrays` replaced; `culprit` may use {path}."""

    def build(tmp: Path) -> BadData:
        path = make_npz(tmp / "data.npz", **arrays)
        return BadData("npz", path, culprit.format(path=path), fix)

    return build


BATCH = "{archive}: cifar-10-batches-py"
UINT8_ROWS = "data must be uint8 of shape (N, 3072)"
NOT_GZIP = "{archive}: truncated or not a gzip tar archive"
REFETCH = "re-download it or point data.path at a good copy"
UNREADABLE = "{root}/train/%s: unreadable or truncated image"
DATA_ROWS = [  # id, builder
    ("missing-path", npz_missing),
    ("path-null", lambda tmp: BadData("folder", None, "data.path is null",
                                      "set data.path to a folder with train/<class>/ images")),
    ("truncated-archive", cifar_row(NOT_GZIP, REFETCH, damage=lambda b: b[: len(b) // 2])),
    ("non-gzip-archive", cifar_row(NOT_GZIP, REFETCH, damage=lambda b: b"not a gzip file " * 64)),
    ("md5-mismatch", cifar_md5_mismatch),
    ("cifar-wrong-keys", cifar_row(f"{BATCH}/data_batch_4: not a CIFAR batch (needs keys b'data' and b'labels')",
                                   data_batch_4={b"labels": [1]})),
    ("cifar-wrong-shape", cifar_row(f"{BATCH}/data_batch_2: {UINT8_ROWS}, got uint8 (20, 1024)",
                                    data_batch_2={**cifar_batch(), b"data": np.zeros((20, 1024), np.uint8)})),
    ("cifar-wrong-dtype", cifar_row(f"{BATCH}/data_batch_3: {UINT8_ROWS}, got float32 (20, 3072)",
                                    data_batch_3={**cifar_batch(), b"data": np.zeros((20, 3072), np.float32)})),
    ("cifar-labels-out-of-range", cifar_row(f"{BATCH}/test_batch: label 10 out of range for 10 classes",
                                            "labels must be 0..9", test_batch=cifar_batch(labels=[10] * 20))),
    ("cifar-malicious-pickle", cifar_row(f"{BATCH}/data_batch_1: refused to load global posix.system",
                                         "use the official cifar-10-python.tar.gz",
                                         data_batch_1={b"data": Evil("touch pwned"), b"labels": [0]})),
    ("npz-labels-out-of-range", npz_row("{path}: y_train: label 3 out of range for 2 classes", "labels must be 0..1",
                                        class_names=np.array(["a", "b"]))),
    ("npz-length-mismatch", npz_row("{path}: x_train has 40 images but y_train has 39 labels",
                                    "save arrays of equal length", y_train=np.arange(39) % 4)),
    ("empty-class-folder", folder_row("{root}/train/zebra: empty class folder", "add images to it or remove it",
                                      lambda root: (root / "train/zebra").mkdir())),
    ("non-image-file", folder_row("{root}/train/dog/notes.txt: not an image", "remove it",
                                  lambda root: (root / "train/dog/notes.txt").write_text("hi"))),
    ("corrupt-png", folder_row(UNREADABLE % "frog/0003.png", "re-export or remove it",
                               lambda root: (root / "train/frog/0003.png").write_bytes(b"\x89PNG\r\n\x1a\n" * 9))),
    ("truncated-png", folder_row(UNREADABLE % "frog/0003.png", "re-export or remove it",
                                 lambda root: truncate(root / "train/frog/0003.png"))),
    ("corrupt-jpeg", folder_row(UNREADABLE % "cat/0004.jpg", "re-export or remove it",
                                lambda root: (root / "train/cat/0004.jpg").write_bytes(b"\xff\xd8\xff\xe0" * 9))),
    ("truncated-jpeg", folder_row(UNREADABLE % "cat/0004.jpg", "re-export or remove it",
                                  lambda root: truncate(root / "train/cat/0004.jpg"))),
]


@pytest.mark.parametrize("build", [pytest.param(build, id=name) for name, build in DATA_ROWS])
def test_bad_data_fails_prepare_in_one_line_and_checkout_restores(ws, tmp_path, build):
    bad = build(tmp_path)
    write_params(ws.repo, {"data.dataset": bad.dataset, "data.path": str(bad.path) if bad.path else "null"})
    proc = run(["dvc", "repro"], ws.repo, pipeline_env(**bad.env), check=False)
    line = error_line(proc.stderr, "prepare")
    # Nothing else on stderr but DVC's own summary, which carries the stage's exit code.
    assert [text for text in proc.stderr.splitlines() if text.strip()] == [line, PREPARE_FAILED]
    assert bad.culprit in line and bad.fix in line, line
    # DVC deleted prepare's output before running it; nothing else changed and nothing half-written appeared.
    assert ws.current() == ws.without("data/prepared")
    assert sorted(p.name for p in (ws.repo / "data").iterdir()) == [".gitignore", "fingerprint.json", "raw"]
    assert not (ws.repo / "pwned").exists()  # the malicious pickle's payload never ran
    run(["dvc", "checkout"], ws.repo)
    assert ws.current() == ws.outputs


def test_grayscale_and_rgba_images_are_converted_not_refused(ws, tmp_path):
    root = tmp_path / "images"
    sources = {mode: [save_image(root / "train" / mode / f"{i}.png", mode=mode) for i in range(10)]
               for mode in ("L", "RGBA")}
    write_params(ws.repo, {"data.dataset": "folder", "data.path": str(root)})
    run(["imgclf", "prepare"], ws.repo)
    x = np.concatenate([np.load(ws.repo / f"data/prepared/x_{s}.npy") for s in ("train", "dev")])
    y = np.concatenate([np.load(ws.repo / f"data/prepared/y_{s}.npy") for s in ("train", "dev")])
    assert x.shape == (20, 32, 32, 3) and x.dtype == np.uint8 and sorted(np.bincount(y)) == [10, 10]
    for label, mode in enumerate(("L", "RGBA")):  # classes sort by folder name: L, RGBA
        expected = {np.asarray(Image.open(path).convert("RGB")).tobytes() for path in sources[mode]}
        assert {image.tobytes() for image in x[y == label]} == expected
    assert np.array_equal(x[y == 0][..., 0], x[y == 0][..., 2])  # gray replicated into all three channels
    # The cache does not hold these new arrays, so DVC wants --force to replace them with the good ones.
    run(["dvc", "checkout", "--force"], ws.repo)
    assert ws.current() == ws.outputs
