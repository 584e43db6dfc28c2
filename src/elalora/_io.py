"""Atomic file and directory writes, output locks, and JSON files (the only file-writing helpers of
the package, and its one JSON reader).

Every directory is written into a temporary sibling and swapped into place, every file via a
temporary sibling and ``os.replace``, so an interrupted save leaves the previous contents intact;
a swap interrupted between its two renames is undone on the next use
(:func:`recover_interrupted_swap`). :func:`keep_user_files_directory` writes an adapter into a
folder that holds other files without touching them. :func:`output_lock` keeps two live jobs from
writing the same output.

Imports: the standard library and :mod:`elalora.errors`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import OutputLockedError, OutputPathError

__all__ = ["atomic_directory", "atomic_write_bytes", "read_json", "write_json", "json_default",
           "recover_interrupted_swap",
           "keep_user_files_directory", "output_lock"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_mode(path: Path, *, is_dir: bool) -> int:
    """Mode for a file or folder that replaces ``path``: the old one's if there was one, else the
    default that ``umask`` gives (``mkdtemp``/``mkstemp`` create 0700/0600, which would lock the
    group out of a shared run folder)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return (0o777 if is_dir else 0o666) & ~_umask()


def _stamp() -> str:
    # sortable in time, unique across processes: the newest leftover of an interrupted swap wins
    return f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _old_siblings(path: Path) -> list[Path]:
    if not path.parent.is_dir():
        return []
    pre = f".{path.name}.old-"
    return sorted((p for p in path.parent.iterdir() if p.name.startswith(pre) and p.is_dir()), key=lambda p: p.name)


def recover_interrupted_swap(path: str | os.PathLike) -> Path | None:
    """Undo a directory swap that was interrupted between its two renames.

    :func:`atomic_directory` replaces ``NAME`` by renaming it to a hidden ``.NAME.old-<stamp>``
    sibling and then renaming the new folder to ``NAME``. A crash between the two leaves no
    ``NAME``, only the hidden copy of the previous contents. When ``path`` is missing and such a
    copy exists, the newest one is renamed back to ``path`` (a warning says so). Returns ``path``
    when something was restored, else ``None``.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        return None
    olds = _old_siblings(path)
    if not olds:
        return None
    os.replace(olds[-1], path)
    warnings.warn(f"{path} was missing after an interrupted save; restored its previous contents from "
                  f"{olds[-1].name}", RuntimeWarning, stacklevel=2)
    return path


def _fsync_tree(root: Path) -> None:
    for d, _, files in os.walk(root):
        for f in files:
            fp = Path(d) / f
            if fp.is_file() and not fp.is_symlink():
                with open(fp, "rb+") as fh:
                    os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``path``, on error it is removed.

    ``path`` must be a directory or absent: an existing file is never replaced (``OutputPathError``).
    A symbolic link to a directory is followed, so the swap happens where the link points and the
    link stays. A swap that a crash interrupted earlier is first undone
    (:func:`recover_interrupted_swap`). The new folder gets the old one's permissions (or the
    ``umask`` default), not ``mkdtemp``'s 0700.
    """
    path = Path(path)
    if path.is_symlink() and path.resolve().is_dir():
        path = path.resolve()
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{path} is an existing file; refusing to replace it with a directory. "
                              "Choose a directory path")
    recover_interrupted_swap(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _new_mode(path, is_dir=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        os.chmod(tmp, mode)
        yield tmp
        _fsync_tree(tmp)  # flush file contents (sub-folders too) before the swap
        if path.exists():
            old = path.parent / f".{path.name}.old-{_stamp()}"
            os.replace(path, old)
            os.replace(tmp, path)
            for o in _old_siblings(path):  # this one and any left by an earlier interrupted clean-up
                shutil.rmtree(o, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def keep_user_files_directory(path: str | os.PathLike, own: Sequence[str]) -> Iterator[Path]:
    """Where :func:`save_adapter` / :func:`export_peft` write: a temporary folder whose files end
    up in ``path``.

    * ``path`` absent, empty, or holding only files named in ``own``: the whole folder is swapped
      atomically (:func:`atomic_directory`).
    * ``path`` holding anything else (a user's notes, a model's weights, ...): those entries are left
      exactly as they are; each of our files is replaced atomically, in the order of ``own``
      (weights first, the config that makes the folder an adapter last).
    * ``path`` an existing file: ``OutputPathError``.
    """
    path = Path(path)
    if path.is_symlink() and path.resolve().is_dir():
        path = path.resolve()
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{path} is an existing file; refusing to replace it with an adapter directory. "
                              "Choose a directory path")
    recover_interrupted_swap(path)
    foreign = [e.name for e in path.iterdir() if e.name not in own] if path.is_dir() else []
    if not foreign:
        with atomic_directory(path) as tmp:
            yield tmp
        return
    tmp = Path(tempfile.mkdtemp(prefix=".elalora-save.tmp-", dir=path))
    try:
        yield tmp
        names = [n for n in own if (tmp / n).exists()] + sorted(p.name for p in tmp.iterdir() if p.name not in own)
        for n in names:
            with open(tmp / n, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp / n, _new_mode(path / n, is_dir=False))
            os.replace(tmp / n, path / n)
        os.rmdir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file via a temporary sibling and ``os.replace`` (keeping the old file's mode)."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{path} is a directory; refusing to replace it with a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _new_mode(path, is_dir=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on the output ``path`` for the duration of a job.

    The lock is ``fcntl.flock`` on a hidden sibling ``.NAME.lock`` (holding the owner's pid and host
    for the message). The kernel releases a flock when its process dies, so a lock left by a
    killed process never blocks: the next job takes it over. A second live job gets
    ``OutputLockedError`` at once instead of silently replacing the first one's output.
    """
    import fcntl
    import socket

    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise OutputLockedError(
                f"{path} is being written by another elalora process ({holder}); wait for it to finish "
                "or choose another output directory") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and flock: retry
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def json_default(o: Any):
    """``json.dumps`` fallback: numpy scalars, paths, sets and tuples; anything else as ``str``."""
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON (plus a newline) to ``path``, atomically (:func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=json_default) + "\n").encode())


def read_json(path: str | os.PathLike, *, error: type[Exception] = ValueError) -> Any:
    """The JSON value in ``path`` (the one JSON reader of the package). An unreadable file or invalid JSON
    raises ``error`` (an :class:`~elalora.errors.ElaLoRAError` subclass at the callers) with a one-line
    message naming the file; what the value must hold is checked by :mod:`elalora.validation`."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{str(path)!r} is not valid JSON ({' '.join(str(e).split())}); the file is corrupt") from None
    except OSError as e:
        raise error(f"cannot read {str(path)!r}: {e.strerror or e}") from None
