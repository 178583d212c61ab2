"""`imgclf predict` (imgclf.serving.predict): any image file, converted like the folder source, at the net's size;
globs and folders without duplicates, rows streamed, special and oversize files refused before they are read."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import sys
import tracemalloc

import keras
import numpy as np
import pytest

from fakes import save_image
from imgclf.data.policy import MAX_FILE_BYTES
from imgclf.errors import ImgclfError
from imgclf.files import modelfile
from imgclf.serving import predict
from imgclf.tta import softmax


def saved_model(path, size: int):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((size, size, 3))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(inputs)))
    modelfile.save(model, path)
    return model


@pytest.mark.parametrize("tta", ["none", "flip_translate"])
def test_predict_prints_class_and_probability_at_the_nets_size(tmp_path, monkeypatch, capsys, tta):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/manifest.json").write_text(json.dumps({"classes": ["cat", "dog", "owl"]}))
    model = saved_model(tmp_path / "m.keras", size=24)
    images = [save_image(tmp_path / "a.png", size=(64, 48)), save_image(tmp_path / "b.jpg", mode="L")]
    assert predict.main([str(p) for p in images], model_path=str(tmp_path / "m.keras"), tta=tta) == (2, 0, "")
    rows = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [row[0] for row in rows] == [str(p) for p in images]
    from imgclf.data.images import load_image
    from imgclf.tta import predict_logits

    logits = predict_logits(model, np.stack([load_image(p, 24) for p in images]), tta)
    probs = softmax(logits.astype(np.float64))
    assert [r[1] for r in rows] == [["cat", "dog", "owl"][i] for i in probs.argmax(1)]
    assert [float(r[2]) for r in rows] == pytest.approx(probs.max(1).tolist(), abs=1e-4)


def test_a_missing_model_is_one_line(tmp_path):
    with pytest.raises(ImgclfError, match="no model there; run `make run`"):
        predict.load_local_model(tmp_path / "nope.keras")


def test_softmax_is_stable():
    probs = softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]))
    np.testing.assert_allclose(probs, [[1.0, 0.0], [0.5, 0.5]])


def test_a_corrupt_model_is_one_line_naming_it_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/manifest.json").write_text(json.dumps({"classes": ["cat", "dog", "owl"]}))
    path = tmp_path / "m.keras"
    saved_model(path, size=8)
    data = path.read_bytes()
    path.write_bytes(data[:50] + bytes(b ^ 0xFF for b in data[50:60]) + data[60:])  # config.json's CRC fails
    with pytest.raises(ImgclfError,
                       match=f"{path}: corrupt Keras model file \\(BadZipFile: .*rerun the train stage"):
        predict.main([str(save_image(tmp_path / "a.png"))], model_path=str(path))


def test_folders_and_globs_stream_to_a_csv_with_the_top_k_and_a_row_per_bad_image(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/manifest.json").write_text(json.dumps({"classes": ["cat", "dog", "owl"]}))
    model = saved_model(tmp_path / "m.keras", size=16)
    good = [save_image(tmp_path / "pics/a.png"), save_image(tmp_path / "pics/deeper/b.jpg"),
            save_image(tmp_path / "other/c.png")]
    (tmp_path / "pics/broken.png").write_bytes(b"not a png")
    (tmp_path / "pics/.hidden.png").write_bytes(b"skipped")  # dotfiles are left out, as the folder source does
    monkeypatch.setattr(predict, "BATCH", 2)  # several batches, one of them holding the broken image
    with pytest.raises(ImgclfError) as err:
        predict.main(["pics", "other/*.png", "gone.png"], model_path="m.keras", output="out/preds.csv", top_k=2)
    assert str(err.value).startswith("2 of 5 images could not be predicted (first: pics/broken.png: ")
    assert str(err.value).endswith("; their rows in out/preds.csv say why; the others were predicted")
    rows = list(csv.DictReader((tmp_path / "out/preds.csv").open()))
    assert [r["path"] for r in rows] == ["pics/a.png", "pics/broken.png", "pics/deeper/b.jpg", "other/c.png",
                                         "gone.png"]
    assert list(rows[0]) == ["path", "class", "probability", "top1_class", "top1_probability", "top2_class",
                             "top2_probability", "error"]
    from imgclf.data.images import load_image
    from imgclf.tta import predict_logits

    probs = softmax(predict_logits(model, np.stack([load_image(p, 16) for p in good])).astype(np.float64))
    for row, p in zip([rows[0], rows[2], rows[3]], probs):
        order = np.argsort(-p)
        assert (row["class"], row["top2_class"]) == (["cat", "dog", "owl"][order[0]], ["cat", "dog", "owl"][order[1]])
        assert float(row["probability"]) == pytest.approx(p[order[0]], abs=1e-6) and row["error"] == ""
        assert row["top1_class"] == row["class"] and row["top1_probability"] == row["probability"]
    assert rows[1]["class"] == "" and "unreadable or truncated image" in rows[1]["error"]
    assert rows[4]["error"].startswith("gone.png: ")


def test_without_output_each_image_is_a_line_and_a_bad_one_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/manifest.json").write_text(json.dumps({"classes": ["cat", "dog", "owl"]}))
    saved_model(tmp_path / "m.keras", size=8)
    save_image(tmp_path / "a.png")
    with pytest.raises(ImgclfError, match="^1 of 2 images could not be predicted .*see their lines above"):
        predict.main(["a.png", "nope.png"], model_path="m.keras", top_k=3)
    first, second = capsys.readouterr().out.splitlines()
    path, name, prob, top = first.split("\t")
    assert (path, top.split(",")[0]) == ("a.png", f"{name}:{prob}") and len(top.split(",")) == 3
    assert second.startswith("nope.png\terror\tnope.png: ")


def project(tmp_path, monkeypatch, classes=("cat", "dog", "owl"), size: int = 8):
    """tmp_path as a project after training: its manifest's class names and a model m.keras (3 outputs)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/prepared").mkdir(parents=True, exist_ok=True)
    (tmp_path / "data/prepared/manifest.json").write_text(json.dumps({"classes": list(classes)}))
    return saved_model(tmp_path / "m.keras", size=size)


def test_a_glob_lists_each_image_once_and_only_images_while_named_files_are_taken_as_given(tmp_path, monkeypatch,
                                                                                             capsys):
    project(tmp_path, monkeypatch)
    for name in ("pics/a.png", "pics/deeper/b.jpg", "pics/deeper/c.GIF"):
        save_image(tmp_path / name)
    (tmp_path / "pics/notes.txt").write_text("not an image")
    (tmp_path / "pics/deeper/.d.png").write_bytes(b"a dotfile: left out")
    (tmp_path / "pics/deeper/loop").symlink_to(tmp_path / "pics")  # `pics/**` matches it: its files are listed
    assert predict.expand(["pics/**", "pics/*.png", "./pics/a.png", "pics"]) == [
        "pics/a.png", "pics/deeper/b.jpg", "pics/deeper/c.GIF"]
    assert predict.main(["pics/**"], model_path="m.keras") == (3, 0, "")
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == [
        "pics/a.png", "pics/deeper/b.jpg", "pics/deeper/c.GIF"]
    with pytest.raises(ImgclfError, match="^1 of 1 images could not be predicted .first: pics/notes.txt: unreadable"):
        predict.main(["pics/notes.txt"], model_path="m.keras")  # named: as given, and its row says why


def test_an_output_that_cannot_be_written_is_one_line_before_any_image_is_read(tmp_path, monkeypatch):
    project(tmp_path, monkeypatch)
    (tmp_path / "out").mkdir()
    (tmp_path / "file").write_text("")
    read = []
    monkeypatch.setattr(predict, "load_image", lambda *args: read.append(args))  # records; never reached
    for output, line in (("out", "out: a folder; name the CSV file to write (e.g. out/predictions.csv)"),
                         ("file/x.csv", "file/x.csv: cannot be written")):
        with pytest.raises(ImgclfError) as err:
            predict.main([str(save_image(tmp_path / "a.png"))], model_path="gone.keras", output=output)
        assert str(err.value).startswith(line) and "\n" not in str(err.value)
    assert read == []


def rows_of(n: int):
    for i in range(n):
        yield predict.Prediction(f"images/{i:06d}.png", "dog", 0.5, [("dog", 0.5), ("cat", 0.3), ("owl", 0.2)])


def test_rows_are_streamed_so_memory_stays_bounded_for_100000_images(tmp_path):
    tracemalloc.start()
    try:
        predict.write_csv(rows_of(100_000), tmp_path / "p.csv", 3, 100_000)
        _, csv_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            predict.print_rows(rows_of(100_000), 3)
        _, print_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(1 for _ in open(tmp_path / "p.csv")) == 100_001
    assert csv_peak < 4 << 20 and print_peak < 4 << 20, (csv_peak, print_peak)  # kept rows: ~40 MB


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_line_reaches_the_terminal_while_the_csv_is_written(tmp_path, monkeypatch):
    project(tmp_path, monkeypatch)
    images = [str(save_image(tmp_path / f"{i}.png")) for i in range(3)]
    monkeypatch.setattr(sys, "stderr", Terminal())
    predict.main(images, model_path="m.keras", output="p.csv")
    assert sys.stderr.getvalue() == "\rpredicted 3/3 images\n"


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (not hang) if the block takes longer: a blocked open() or read() is interrupted by the alarm."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_fifos_devices_and_oversize_files_are_refused_before_they_are_read(tmp_path, monkeypatch):
    project(tmp_path, monkeypatch)
    os.mkfifo(tmp_path / "pipe.png")  # reading it would wait for a writer forever
    with open(tmp_path / "huge.png", "wb") as fh:
        fh.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk used, yet a whole read would take 160 MB
    good = str(save_image(tmp_path / "a.png"))
    with deadline(30), pytest.raises(ImgclfError, match="^3 of 4 images could not be predicted"):
        predict.main([good, "pipe.png", "/dev/zero", "huge.png"], model_path="m.keras", output="p.csv")
    rows = {row["path"]: row["error"] for row in csv.DictReader(open("p.csv"))}
    assert rows == {good: "", "pipe.png": "pipe.png: not a regular file (a FIFO, socket or device); name an image file",
                    "/dev/zero": "/dev/zero: not a regular file (a FIFO, socket or device); name an image file",
                    "huge.png": f"huge.png: {MAX_FILE_BYTES + 1:,} bytes, more than the {MAX_FILE_BYTES:,} an image "
                                "file may have; downscale it or remove it"}


@pytest.mark.parametrize("names", [("cat", "dog", "owl", "emu"), ("cat", "dog")])
def test_a_model_whose_outputs_do_not_match_the_class_names_is_one_line(tmp_path, monkeypatch, names):
    project(tmp_path, monkeypatch, classes=names)
    with pytest.raises(ImgclfError) as err:
        predict.main([str(save_image(tmp_path / "a.png"))], model_path="m.keras")
    assert str(err.value) == (f"m.keras: the net has 3 outputs but data/prepared/manifest.json names {len(names)} "
                              "classes: they are from different runs; predict with the model and class names of one "
                              "run (--run RUN_ID, or retrain)")
