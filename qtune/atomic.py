"""Files and folders that appear whole or not at all: written under a hidden name beside their place,
synced to disk, then renamed into it (a rename within one folder is atomic on POSIX file systems).

Every output qtune writes goes through here: the adapter folder, checkpoints, merged models and
exports, the converted embedded model, and small JSON records. A crash, a kill or a full disk
leaves either the old state or the new one, never a half-written file that looks complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def default_mode(directory: bool) -> int:
    """The permissions a plain mkdir / open would give under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _partial_prefix(out: Path) -> str:
    return f".{out.name}.partial-"


def _old_prefix(out: Path) -> str:
    return f".{out.name}.old-"


def _remove(path: Path) -> None:
    """A file or a link (never what a link points to), or a folder and all below it."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _followed(out: Path) -> Path:
    """`out`, or the path a link at `out` points to: an output written through a link lands where the link points
    (on the disk the user chose), and the link stays."""
    return out.resolve() if out.is_symlink() else out


def staging_dir(out: Path) -> Path:
    """A hidden temporary folder beside `out`, with the permissions a plain mkdir would give.

    (mkdtemp makes it private, 0700; renamed into place, that would hide outputs from other users.)
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(out), dir=out.parent))
    tmp.chmod(default_mode(directory=True))
    return tmp


def fsync_file(path: Path) -> None:
    with Path(path).open("rb") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a rename into it) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Every file below `folder`, then the folder itself; each gets the mode a plain open or mkdir would give.

    (Libraries write some files private: safetensors' save_file makes 0600. An adapter, export or merge that
    only its writer can read breaks a serving container running as another user.)"""
    for path in sorted(Path(folder).rglob("*")):
        if path.is_symlink():
            continue
        path.chmod(default_mode(directory=path.is_dir()))
        if path.is_file():
            fsync_file(path)
    fsync_dir(folder)


def replace_folder(src: Path, dest: Path) -> None:
    """Move the complete folder `src` to `dest`, replacing a folder (or a link) there; the previous one is
    deleted only once the new one is in place, and put back if the move fails."""
    old = None
    if os.path.lexists(dest):
        old = dest.parent / f"{_old_prefix(dest)}{os.getpid()}"
        os.replace(dest, old)
    try:
        os.replace(src, dest)
    except BaseException:
        if old is not None and not os.path.lexists(dest):
            os.replace(old, dest)
        raise
    fsync_dir(dest.parent)
    if old is not None:
        _remove(old)


def unwritable(out: Path) -> str | None:
    """Why `out` cannot be written, or None: the nearest existing folder above it is a file, or not writable.
    (Checked before slow work, so that a run does not fail at its end.)"""
    parent = _followed(Path(out)).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None


def remove_leftovers(out: Path) -> list[str]:
    """Clear what a killed write of `out` left beside it: its staging folders and files (`.NAME.partial-*`), and the
    previous version it had moved aside (`.NAME.old-*`), which is put back if `out` itself is gone.

    Only for a caller that knows no other process is writing `out` now (a training run holds an OS lock per
    output folder): a live writer's staging folder looks the same. Returns what was done, one line each.
    """
    out = _followed(Path(out))
    if not out.parent.is_dir():
        return []
    done = []
    for path in sorted(out.parent.iterdir()):
        if path.name.startswith(_old_prefix(out)) and not os.path.lexists(out):
            os.replace(path, out)  # killed between moving the previous version aside and putting the new one in
            done.append(f"put {path} back as {out}")
        elif path.name.startswith((_partial_prefix(out), _old_prefix(out))):
            _remove(path)
            done.append(f"removed {path}")
    return done


@contextmanager
def staged_folder(out: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary folder beside `out`; when the block succeeds, sync it and rename it to `out`.

    Without `replace`, `out` may not exist or must be an empty folder (rename(2) replaces those); with
    it, an existing folder is replaced only after the new one is complete, and kept if anything fails.
    On any error the temporary folder is removed and the error raised as is (an OSError for a full disk).
    A link at `out` is followed: the folder it points to is written, and the link kept.
    """
    out = _followed(Path(out))
    tmp = staging_dir(out)
    try:
        yield tmp
        fsync_tree(tmp)
        if replace:
            replace_folder(tmp, out)
        else:
            os.replace(tmp, out)
            fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


@contextmanager
def staged_file(out: Path) -> Iterator[Path]:
    """Yield a hidden temporary path beside the file `out`; when the block succeeds, sync it and rename it.
    A link at `out` is followed."""
    out = _followed(Path(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=_partial_prefix(out), dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(default_mode(directory=False))  # mkstemp's 0600 (or the writer's own) would stay after the rename
        fsync_file(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a successful rename


def write_text(path: Path, text: str) -> None:
    """Replace the text file `path` atomically (a reader sees the old content or the new, whole)."""
    with staged_file(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")
