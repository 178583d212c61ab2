"""The one directory walker: the folder source, the fingerprint and `imgclf predict` list files through it.

Policy (the same for all three, so what prepare reads is what the fingerprint hashes and what predict finds):
- Names starting with "." (dotfiles and dot-folders) are left out.
- Symlinks are followed, to files and to folders. Each real folder (its st_dev, st_ino) is walked once: a link
  back to a folder already walked (a loop such as `a/up -> ..`, or a second link to the same folder) is
  skipped, since its files are listed already. Folders are walked breadth first in name order, so a folder's
  files are listed under its shallowest path (the first by name among equals): a link from one class folder
  to another does not move the other's images into it.
- A broken symlink (its target missing, or a link to itself), a folder that cannot be listed and a special
  file (FIFO, socket, device) are refused in one line naming the path: its content would otherwise vanish
  silently, or a read of it could hang. So is a name that is not UTF-8 (Linux allows any bytes): a class named
  by it could not be written into the manifest, the reports or MLflow.
- The files come sorted by their path relative to the root ("/" separated), whatever the file system's order.
"""

from __future__ import annotations

import collections
import os
import stat
from pathlib import Path
from typing import Collection, Iterator

from imgclf.errors import DataError


def _refuse(path: Path, exc: OSError) -> DataError:
    """One line for a path the OS refuses: a broken symlink, a self-referencing link, permissions."""
    if os.path.islink(path):
        target = os.readlink(path)
        return DataError(f"{path}: unreadable (a broken symlink to {target}: {exc.strerror or exc}); fix or remove it")
    return DataError(f"{path}: unreadable ({exc.strerror or exc}); fix its permissions or remove it")


def _entries(folder: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as listing:
            return sorted((e for e in listing if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        raise _refuse(Path(folder), exc) from None


def check_utf8(path: str) -> None:
    """Refuse a path Python could only decode with surrogate escapes (its bytes are not UTF-8)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise DataError(f"{shown}: its name is not UTF-8 (the \\x bytes shown); rename it in UTF-8") from None


def _mode(entry: os.DirEntry) -> int:
    """The entry's file type, symlinks followed: from the listing itself for plain files and folders (no stat per
    file: 100,000 images list in a fraction of a second), a stat for links and the rest."""
    if not entry.is_symlink():
        if entry.is_file(follow_symlinks=False):
            return stat.S_IFREG
        if entry.is_dir(follow_symlinks=False):
            return stat.S_IFDIR
    try:
        return os.stat(entry.path).st_mode
    except OSError as exc:
        raise _refuse(Path(entry.path), exc) from None


def walk_files(root: str | Path, suffixes: Collection[str] | None = None) -> Iterator[Path]:
    """Every regular file under `root` (as root / relative path), sorted by relative path; with `suffixes`
    (lower case, with the dot: {".png", ".jpg"}) only the files whose suffix, lower-cased, is one of them.
    Raises DataError (one line) for a broken symlink, an unlistable folder or a special file it would yield."""
    root = Path(root)
    found: list[tuple[str, str]] = []  # (relative name, path): strings, a Path each only as it is yielded
    seen: set[tuple[int, int]] = set()
    queue = collections.deque([(str(root), "")])
    while queue:
        folder, rel = queue.popleft()
        try:
            st = os.stat(folder)
        except OSError as exc:
            raise _refuse(Path(folder), exc) from None
        if (st.st_dev, st.st_ino) in seen:
            continue  # a loop or a second path to a folder already walked: its files are listed
        seen.add((st.st_dev, st.st_ino))
        subfolders = []
        for entry in _entries(folder):
            name, mode = f"{rel}{entry.name}", _mode(entry)
            if stat.S_ISDIR(mode):
                check_utf8(entry.path)
                subfolders.append((entry.path, f"{name}/"))
            elif suffixes is None or os.path.splitext(entry.name)[1].lower() in suffixes:
                check_utf8(entry.path)
                if not stat.S_ISREG(mode):
                    raise DataError(f"{entry.path}: not a regular file (a FIFO, socket or device); remove it")
                found.append((name, entry.path))
        queue.extend(subfolders)  # breadth first, in name order: deterministic
    found.sort()
    return (Path(path) for _, path in found)  # walked (and refused) already; the Paths made as they are used


def relative_name(path: Path, root: Path) -> str:
    """A walked file's name relative to the root it was walked from, "/" separated (the sort key above)."""
    return path.relative_to(root).as_posix()
