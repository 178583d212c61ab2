"""evaluate.write_predictions: the actual,predicted CSV behind DVC's confusion-matrix plot reads back as the class
names, whatever they hold, and keeps its bytes for ordinary names (the default run's is tracked by dvc.lock)."""

from __future__ import annotations

import csv
import hashlib
import io
import tempfile
from pathlib import Path

import numpy as np
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO
from imgclf import evaluate
from imgclf.files.paths import DEV_PREDICTIONS, REPORTS_DIR

# What breaks a CSV row (line ends, quotes, commas), blanks, NUL, and any other character UTF-8 can encode (a lone
# surrogate, from an undecodable folder name, is not a name the file can hold: the data source should refuse it).
NAMES = st.text(st.sampled_from(['\r', '\n', '"', ',', ' ', "'", '\t', '\x00', 'é', '猫'])
                | st.characters(codec="utf-8"), max_size=8)


def written(classes: list[str], actual: list[int], predicted: list[int]) -> bytes:
    """The file write_predictions writes for these images (one-hot logits: each image's predicted class wins)."""
    logits = np.zeros((len(actual), len(classes)))
    logits[np.arange(len(actual)), predicted] = 1.0
    with tempfile.TemporaryDirectory() as tmp:
        evaluate.write_predictions(np.array(actual, int), logits, classes, Path(tmp) / "p.csv")
        return (Path(tmp) / "p.csv").read_bytes()


def images(classes: list[str], data) -> tuple[list[int], list[int]]:
    pick = st.lists(st.integers(0, len(classes) - 1), max_size=12)
    actual = data.draw(pick)
    return actual, data.draw(st.lists(st.integers(0, len(classes) - 1), min_size=len(actual), max_size=len(actual)))


@settings(deadline=None, max_examples=300)  # pure and quick: a deadline would only time the machine's load
@given(st.lists(NAMES, min_size=1, max_size=5, unique=True), st.data())
def test_the_predictions_read_back_as_exactly_the_class_names_whatever_they_hold(classes, data):
    actual, predicted = images(classes, data)
    rows = list(csv.reader(io.StringIO(written(classes, actual, predicted).decode("utf-8"), newline="")))
    assert rows == [["actual", "predicted"]] + [[classes[a], classes[p]] for a, p in zip(actual, predicted)]


def previous_bytes(classes: list[str], actual: list[int], predicted: list[int]) -> bytes:
    """What write_predictions wrote before it quoted names holding "\\r": the bytes it must keep for the others."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([("actual", "predicted")] + [
        (classes[a], classes[p]) for a, p in zip(actual, predicted)])
    return buf.getvalue().encode("utf-8")


@settings(deadline=None)
@given(st.lists(NAMES.filter(lambda name: "\r" not in name), min_size=1, max_size=5, unique=True), st.data())
def test_names_without_a_carriage_return_give_the_bytes_they_always_did(classes, data):
    actual, predicted = images(classes, data)
    assert written(classes, actual, predicted) == previous_bytes(classes, actual, predicted)


def test_the_default_runs_committed_predictions_are_written_byte_for_byte_as_dvc_lock_records_them():
    committed = (REPO / REPORTS_DIR / DEV_PREDICTIONS).read_bytes()
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    (recorded,) = [out["md5"] for out in lock["stages"]["evaluate"]["outs"] if out["path"] == str(
        Path(REPORTS_DIR) / DEV_PREDICTIONS)]
    assert hashlib.md5(committed).hexdigest() == recorded
    header, *rows = csv.reader(io.StringIO(committed.decode("utf-8"), newline=""))
    classes = sorted({name for row in rows for name in row})
    index = {name: i for i, name in enumerate(classes)}
    rewritten = written(classes, [index[a] for a, _ in rows], [index[p] for _, p in rows])
    assert header == ["actual", "predicted"] and len(rows) > 100 and hashlib.md5(rewritten).hexdigest() == recorded
