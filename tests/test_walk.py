"""The one directory walker (imgclf.files.walk) and its symlink policy, as the folder source and the fingerprint
see it: symlinked folders followed, each real folder once, loops and broken links handled the same way."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes import save_image
from imgclf.data.sources.folder import load_folder
from imgclf.errors import DataError
from imgclf.fingerprint import fingerprint, source_files
from imgclf.files.walk import relative_name, walk_files


def names(root: Path, **kwargs) -> list[str]:
    return [relative_name(p, root) for p in walk_files(root, **kwargs)]


def image_folder(tmp_path: Path) -> Path:
    for cls in ("cat", "dog"):
        for i in range(2):
            save_image(tmp_path / "src/train" / cls / f"{i}.png", color=(i * 40, 0, 0))
    return tmp_path / "src"


def test_sorted_by_relative_path_dotfiles_left_out_and_suffix_filter(tmp_path):
    for name in ("b/x.png", "a.txt", "a/z.PNG", "a/.hidden.png", ".git/y.png", "a-b.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert names(tmp_path) == ["a-b.png", "a.txt", "a/z.PNG", "b/x.png"]
    assert names(tmp_path, suffixes={".png"}) == ["a-b.png", "a/z.PNG", "b/x.png"]


def test_the_folder_source_reads_a_symlinked_subfolder(tmp_path):
    root = image_folder(tmp_path)
    save_image(tmp_path / "elsewhere/extra.png")
    (root / "train/cat/more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    source = load_folder(root)
    assert [relative_name(p, root) for p in source.x.files] == [
        "train/cat/0.png", "train/cat/1.png", "train/cat/more/extra.png", "train/dog/0.png", "train/dog/1.png"]
    # the fingerprint hashes exactly the files prepare reads
    assert [name for name, _ in source_files(root)] == [relative_name(p, root) for p in source.x.files]


def test_a_symlink_loop_is_walked_once_by_the_fingerprint_and_the_folder_source(tmp_path):
    root = image_folder(tmp_path)
    (root / "train/cat/up").symlink_to(root / "train", target_is_directory=True)
    (root / "train/dog/self").symlink_to(root / "train/dog", target_is_directory=True)
    listed = [name for name, _ in source_files(root)]
    assert listed == ["train/cat/0.png", "train/cat/1.png", "train/dog/0.png", "train/dog/1.png"]
    assert fingerprint({"dataset": "folder", "path": str(root)})["files"] == 4
    assert len(load_folder(root).x.files) == 4


def test_a_link_from_one_class_folder_to_another_leaves_each_image_in_its_own_class(tmp_path):
    root = image_folder(tmp_path)
    (root / "train/cat/also").symlink_to(root / "train/dog", target_is_directory=True)
    source = load_folder(root)
    assert [(relative_name(p, root), source.classes[c]) for p, c in zip(source.x.files, source.y)] == [
        ("train/cat/0.png", "cat"), ("train/cat/1.png", "cat"), ("train/dog/0.png", "dog"), ("train/dog/1.png", "dog")]


def test_a_second_link_to_a_walked_folder_is_listed_once_under_the_first_path(tmp_path):
    save_image(tmp_path / "real/one.png")
    (tmp_path / "real/zlink").symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "alink").symlink_to(tmp_path / "real", target_is_directory=True)
    assert names(tmp_path) == ["alink/one.png"]


@pytest.mark.parametrize("kind", ["dangling", "self"])
def test_a_broken_link_is_refused_in_one_line(tmp_path, kind):
    save_image(tmp_path / "a/ok.png")
    bad = tmp_path / "a/bad"
    bad.symlink_to(bad if kind == "self" else tmp_path / "gone")
    with pytest.raises(DataError, match=f"^{bad}: unreadable \\(a broken symlink to .*\\); fix or remove it$"):
        list(walk_files(tmp_path))
    with pytest.raises(DataError, match=f"^{bad}: unreadable"):
        fingerprint({"dataset": "folder", "path": str(tmp_path)})


def test_a_fifo_is_refused_not_read(tmp_path):
    save_image(tmp_path / "train/cat/ok.png")
    os.mkfifo(tmp_path / "train/cat/pipe.png")
    with pytest.raises(DataError, match="pipe.png: not a regular file"):
        list(walk_files(tmp_path))
    with pytest.raises(DataError, match="pipe.png: not a regular file"):
        fingerprint({"dataset": "folder", "path": str(tmp_path)})
    assert names(tmp_path, suffixes={".jpg"}) == []  # filtered out before it is looked at


# A random tree: folders, files and symlinks (to any folder, file or nowhere-yet), each by index into the tree.
TREE = st.lists(st.tuples(st.sampled_from(["dir", "file", "link"]), st.integers(0, 30), st.integers(0, 30)),
                min_size=1, max_size=25)


def build(root: Path, steps) -> None:
    folders, made = [root], []
    for i, (kind, parent, target) in enumerate(steps):
        where = folders[parent % len(folders)] / f"n{i}"
        if kind == "dir":
            where.mkdir()
            folders.append(where)
        elif kind == "file":
            where.write_bytes(b"x")
            made.append(where)
        else:
            candidates = folders + made
            where.symlink_to(candidates[target % len(candidates)])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=TREE)
def test_any_tree_of_links_ends_sorted_deterministic_each_real_folder_once(tmp_path_factory, steps):
    root = tmp_path_factory.mktemp("tree")
    build(root, steps)
    first = names(root)
    assert first == sorted(first) and first == names(root)
    real = [(os.path.realpath(os.path.dirname(root / n)), os.path.basename(n)) for n in first]
    assert len(real) == len(set(real))  # no real folder walked twice
    # every real file in the tree (reached without links) is listed, under some path
    plain = {os.path.realpath(Path(d, f)) for d, _, fs in os.walk(root) for f in fs if not Path(d, f).is_symlink()}
    assert plain <= {os.path.realpath(root / n) for n in first}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(min_size=1, max_size=12).filter(lambda b: b"/" not in b and b"\0" not in b
                                                     and not b.startswith(b".")),
       as_folder=st.booleans())
def test_a_name_that_is_not_utf8_is_refused_in_one_line_by_every_walker_user(tmp_path, raw, as_folder):
    """Linux names are bytes: one that is not UTF-8 (Python holds it with surrogate escapes) could not be written
    into the manifest, a report or MLflow, so the walker names it instead of a traceback further on."""
    from imgclf.serving.predict import expand

    root = tmp_path / f"t{len(list(tmp_path.iterdir()))}"
    folder = os.path.join(os.fsencode(root), b"train", raw if as_folder else b"cat")
    os.makedirs(folder)
    name = os.path.join(folder, b"0.png" if as_folder else raw + b".png")
    save_image(Path(os.fsdecode(name)), color=(1, 2, 3))
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        walked = (folder if as_folder else name).decode("utf-8", "backslashreplace")  # the first such name
        given = name.decode("utf-8", "backslashreplace")
        for call, culprit in ((lambda: names(root), walked), (lambda: load_folder(root, 8), walked),
                              (lambda: source_files(root), walked), (lambda: expand([str(root)]), walked),
                              (lambda: expand([os.fsdecode(name)]), given)):
            with pytest.raises(DataError) as err:
                call()
            assert str(err.value) == f"{culprit}: its name is not UTF-8 (the \\x bytes shown); rename it in UTF-8"
    else:
        assert names(root) == [os.fsdecode(name)[len(str(root)) + 1:]]
