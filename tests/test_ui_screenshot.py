"""scripts/ui_screenshot.py: MLflow's UI in headless Chromium over a real store, and its one-line failures."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import ui_screenshot  # noqa: E402

SCRIPT = REPO / "scripts" / "ui_screenshot.py"
CHROMIUM = next(filter(None, map(shutil.which, ui_screenshot.BROWSERS)), None)
# A chart section's header in MLflow 3.17's run page: its name, then its chart count, e.g. "Model metrics (14)".
SECTION = re.compile(r'white-space: pre;">([^<]+)</div><div class="[^"]*"[^>]*>\((\d+)\)</div>')


def shoot(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=900,
                          env=env)


def needs_chromium() -> None:
    if CHROMIUM is None and os.geteuid() != 0:
        pytest.skip("chromium is not installed (apt-get install chromium): nothing to draw with")
    assert CHROMIUM, "chromium is missing: `make system-deps` (root) installs it"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(ui_screenshot.PNG_MAGIC) and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_one_line_failure(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("ui_screenshot: error: ") and all(w in line for w in words), line


@pytest.mark.e2e
def test_a_run_page_opens_on_the_dev_curves_and_the_training_loss(trained, tmp_path):
    """#43: MLflow lists the sections named by key prefixes, by name, above "Model metrics" (the per-class
    `dev_f1_per_class/...` metrics were one); a run's page, drawn in a real browser, must open on the dev curves and
    the training loss, which tracking/keys.py names `dev/...` and `train/...` for that."""
    needs_chromium()
    store = tmp_path / "mlflow.db"
    shutil.copy(trained.repo / "mlflow.db", store)  # the shared run is read only: the server gets a copy
    out, dom = tmp_path / "run.png", tmp_path / "run.html"
    proc = shoot("--store", str(store), "run", trained.run_id, "-o", str(out), "--dom", str(dom))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(f"/runs/{trained.run_id}/model-metrics") and proc.stderr == ""
    assert png_size(out) == (1600, 1000)
    html = dom.read_text()
    sections = SECTION.findall(html)
    assert [name for name, _ in sections] == ["dev", "train", "Model metrics"], sections
    assert sections[:2] == [("dev", "3"), ("train", "3")], sections
    # the charts on the first screen (MLflow draws the others when scrolled to): the two sections', in name order
    charts = re.findall(r'<h4 [^>]*title="([^"]+)"', html)
    assert charts[:6] == ["dev/accuracy", "dev/f1_macro", "dev/loss", "train/accuracy", "train/loss",
                          "train/loss_sum"], charts


@pytest.mark.e2e
def test_an_unknown_run_is_one_line_and_the_old_png_stays(trained, tmp_path):
    needs_chromium()
    store = tmp_path / "mlflow.db"
    shutil.copy(trained.repo / "mlflow.db", store)
    out = tmp_path / "old.png"
    out.write_bytes(b"the old picture")
    assert_one_line_failure(shoot("--store", str(store), "run", "0" * 32, "-o", str(out)), "0" * 32, "404")
    assert out.read_bytes() == b"the old picture"


def test_a_missing_or_wrong_store_is_one_line_before_any_server(tmp_path):
    out = tmp_path / "x.png"
    assert_one_line_failure(shoot("--store", str(tmp_path / "nope.db"), "run", "r1", "-o", str(out)),
                            "nope.db", "not an sqlite file")
    (tmp_path / "notes.db").write_text("SQLite? no")
    assert_one_line_failure(shoot("--store", str(tmp_path / "notes.db"), "compare", "a", "b", "-o", str(out)),
                            "notes.db")
    assert not (tmp_path / "mlflow.db").exists() and not out.exists()  # no empty store made, nothing written


def test_no_chromium_on_the_path_is_one_line(empty_store, tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # an empty folder: no browser in it
    assert_one_line_failure(shoot("--store", str(empty_store), "run", "r1", "-o", str(tmp_path / "x.png"), env=env),
                            "no chromium", "apt-get install chromium")


ARG = st.one_of(st.sampled_from(["--store", "-o", "--tab", "--dom", "--width", "--height", "--wait", "run", "compare",
                                 "page", "overview", "0", "-1", "1e9", "nan", "x.db"]), st.text(max_size=8))


@settings(deadline=None)  # argparse only: a deadline would only time the machine's load
@given(st.lists(ARG, max_size=8))
def test_any_command_line_parses_or_is_refused_by_argparse(argv):
    try:
        args = ui_screenshot.parse(argv)
    except SystemExit as exc:  # argparse: its usage and one error line, exit 2 (or -h's help, exit 0)
        assert exc.code == 2 or exc.code == 0 and any(a.startswith("-h") or a.startswith("--he") for a in argv)
        return
    assert args.page in ("compare", "run", "page") and args.ids
    assert 200 <= args.width <= 8000 and 200 <= args.height <= 8000 and 1 <= args.wait <= 600
