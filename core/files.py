"""Files of a run, written so that a crash or a full disk never leaves a corrupt one behind.

Every writer goes through a fsynced temporary file that is ``os.replace``-d into place, so a reader
sees the old file or the new one, never half of one. A read-only directory or a full disk raises
:class:`StorageError` (an OSError with a one-line message) after the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# What the user can do something about, in words; other errors keep the system's own text.
_STORAGE_REASONS = {
    errno.ENOSPC: "no space left on device (the disk is full)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied (the directory is read-only)",
    errno.EPERM: "operation not permitted (the directory is read-only)",
}
STORAGE_ERRNOS = frozenset(_STORAGE_REASONS)


class StorageError(OSError):
    """A file of a run could not be written: read-only directory, full disk, missing permission.

    Raised by the atomic writers after they removed their temporary file, so nothing was replaced
    and nothing partial is left. ``str()`` is one line fit for the command line; ``errno``,
    ``strerror`` and ``filename`` are those of an OSError, so ``except OSError`` still catches it.
    """

    def __init__(self, path: str | os.PathLike, cause: OSError) -> None:
        reason = _STORAGE_REASONS.get(cause.errno or 0) or cause.strerror or str(cause)
        super().__init__(cause.errno, reason, str(path))

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def is_storage_error(error: BaseException) -> bool:
    """True for the OSErrors that mean "this run cannot write here": disk full, read-only, no permission."""
    return isinstance(error, StorageError) or (isinstance(error, OSError) and error.errno in STORAGE_ERRNOS)


# ---------------------------------------------------------------------------------------------
# Atomic file writes
# ---------------------------------------------------------------------------------------------


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that a crash leaves either the old file or the new one.

    Raises:
        StorageError: when the directory is read-only or the disk is full; the old file (if any) is
            untouched and no partial file is left.
    """
    atomic_write_files([(Path(path), data)])


def atomic_write_files(files: Sequence[tuple[Path, bytes]]) -> None:
    """Writes several files, each atomically: every one to a fsynced temp file first, then renames.

    A disk that fills up while writing any of them leaves every target as it was: the renames only
    start once all the data is safely on disk. The renames run in the order given (a checkpoint
    renames its weights before the sidecar that vouches for them).

    Raises:
        StorageError: read-only directory, full disk, missing permission; no temp file is left.
    """
    written: list[tuple[str, Path]] = []
    try:
        for path, data in files:
            written.append((_write_temp(path, data), path))
        # A Ctrl-C between two renames would leave the weights without the sidecar that vouches for them.
        with signals_deferred():
            for index, (tmp_name, path) in enumerate(written):
                try:
                    os.replace(tmp_name, path)
                except OSError as error:
                    raise StorageError(path, error) from error
                written[index] = ("", path)  # renamed: nothing left to clean up
    except BaseException:
        # Never leave a half-written temp file behind (disk full, read-only dir, Ctrl-C).
        for tmp_name, _ in written:
            if tmp_name:
                Path(tmp_name).unlink(missing_ok=True)
        raise
    for directory in {path.parent for _, path in written}:
        _fsync_dir(directory)


_DEFERRABLE_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_deferring = False


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Holds Ctrl-C and SIGTERM back until the block ends, then delivers them to their own handlers.

    For the few steps that must happen together or not at all (the renames of a checkpoint's two
    files, the deletion of both files of an old one). Python runs signal handlers in the main thread
    only, so in any other thread nothing can interrupt the block and this does nothing; nested
    blocks defer to the outermost one.
    """
    global _deferring
    if _deferring or threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in _DEFERRABLE_SIGNALS}
    previous = {signum: handler for signum, handler in previous.items() if handler is not None}
    _deferring = True
    try:
        for signum in previous:
            signal.signal(signum, lambda signum, frame: received.append(signum))
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _deferring = False
        for signum in dict.fromkeys(received):  # each once, in the order they came
            signal.raise_signal(signum)


def _write_temp(path: Path, data: bytes) -> str:
    """Writes ``data`` to a new fsynced temp file next to ``path``; returns its name.

    The name is ``.<path.name>.<random>.tmp``: hidden, and never taken for a checkpoint.
    """
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise StorageError(path, error) from error
    try:
        with os.fdopen(fd, "wb") as tmp_file:
            tmp_file.write(data)
            tmp_file.flush()
            os.fsync(tmp_file.fileno())
    except BaseException as error:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise StorageError(path, error) from error
        raise
    return tmp_name


def check_writable(directory: str | os.PathLike) -> None:
    """Creates ``directory`` if needed and proves that files can be written in it.

    Called before a run starts or resumes, so that a read-only run directory is reported at once,
    before anything (a config, an event file) is half written. Root passes permission checks, so
    the probe writes a real (empty, hidden) file rather than asking ``os.access``.

    Raises:
        StorageError: the directory cannot be created or written.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StorageError(directory, error) from error
    try:
        tmp_name = _write_temp(directory / ".write-test", b"")
    except StorageError as error:
        raise StorageError(directory, error) from error
    Path(tmp_name).unlink(missing_ok=True)


def remove_stale_temps(directory: str | os.PathLike) -> None:
    """Deletes the temp files a process killed mid-write left in ``directory`` (a run has one writer)."""
    directory = Path(directory)
    for stale in directory.glob(".*.tmp") if directory.is_dir() else []:
        stale.unlink(missing_ok=True)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented JSON, atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, json_bytes(obj))


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


def _fsync_dir(directory: Path) -> None:
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def jsonable(value: Any) -> Any:
    """``value`` made fit for JSON, recursively: tuples to lists, numpy and torch scalars to Python
    numbers, NaN and infinities to null (JSON has no such numbers), keys to strings."""
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    if isinstance(value, np.generic) or (
        hasattr(value, "item") and hasattr(value, "ndim") and value.ndim == 0
    ):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_figure(fig: Any, path: Path, dpi: int = 100) -> Path:
    """Saves a matplotlib figure to ``path`` through a temp file: a full disk leaves the old picture
    (or none), never half a PNG. Closes the figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path
