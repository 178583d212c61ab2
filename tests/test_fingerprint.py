"""The fingerprint stage (imgclf.fingerprint): a change of content changes it, a touch does not."""

from __future__ import annotations

import os

from fakes import save_image
from imgclf.fingerprint import fingerprint, main


def folder(tmp_path):
    for cls in ("cat", "dog"):
        for i in range(3):
            save_image(tmp_path / "src/train" / cls / f"{i}.png", color=(i * 40, 0, 0))
    return tmp_path / "src"


def test_content_changes_the_fingerprint_and_a_touch_does_not(tmp_path):
    data = {"dataset": "folder", "path": str(folder(tmp_path))}
    base = fingerprint(data)
    assert (base["files"], base["path"]) == (6, data["path"]) and base["bytes"] > 0
    image = tmp_path / "src/train/cat/0.png"
    os.utime(image, (1, 1))
    assert fingerprint(data) == base  # mtimes are never read
    (tmp_path / "src/train/.DS_Store").write_text("x")  # dotfiles are not images of the source
    assert fingerprint(data) == base
    save_image(tmp_path / "src/train/cat/9.png")
    added = fingerprint(data)
    assert added["files"] == 7 and added["sha256"] != base["sha256"]
    (tmp_path / "src/train/cat/9.png").unlink()
    assert fingerprint(data) == base
    save_image(image, color=(1, 2, 3))
    changed = fingerprint(data)
    assert changed["files"] == 6 and changed["sha256"] != base["sha256"]
    image.rename(tmp_path / "src/train/dog/0b.png")  # same bytes, other class: another data set
    assert fingerprint(data)["sha256"] not in (base["sha256"], changed["sha256"])


def test_a_file_source_a_bundled_one_and_a_missing_path(tmp_path):
    archive = tmp_path / "a.npz"
    archive.write_bytes(b"1234")
    facts = fingerprint({"dataset": "npz", "path": str(archive)})
    assert (facts["files"], facts["bytes"]) == (1, 4)
    assert fingerprint({"dataset": "digits", "path": None}) == {"dataset": "digits", "path": None, "bundled": True}
    gone = tmp_path / "gone"
    assert fingerprint({"dataset": "folder", "path": str(gone)})["missing"] == str(gone)  # prepare names it
    # cifar10 with data.path null reads its default archive: that file is what counts
    assert fingerprint({"dataset": "cifar10", "path": None})["missing"] == "data/raw/cifar-10-python.tar.gz"


def test_main_writes_the_file_prepare_depends_on(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    main({"data": {"dataset": "digits", "path": None}})
    assert (tmp_path / "data/fingerprint.json").read_text().startswith("{")
    assert capsys.readouterr().out == ("Fingerprint of the digits source: bundled, nothing on disk -> "
                                       "data/fingerprint.json\n")
