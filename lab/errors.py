"""How ``lab`` fails: one line on stderr and an exit status by one rule, and nothing lost.

The rule (ARCHITECTURE.md): exit 2 for what the user must fix (bad input, a run directory that
cannot be written, a full disk), exit 1 for a run that failed on its own (NaNs that do not heal,
env workers that keep crashing), 130 for an interrupted run (Ctrl-C or SIGTERM). Every stop keeps
the last good checkpoint, and the message says how to resume.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from core.files import StorageError, check_writable, is_storage_error

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a process that SIGPIPE ended


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def fail(message: str) -> int:
    """Prints ``message`` on one line to stderr; returns the usage exit status."""
    print(one_line(message), file=sys.stderr)
    return EXIT_USAGE


def reader_gone() -> int:
    """The reader of stdout went away (``lab ... | head``): not an error to report. Later writes go to
    /dev/null, so Python's flush at exit does not raise again (the recipe of Python's signal docs)."""
    with contextlib.suppress(OSError, ValueError):  # ValueError: a stdout without a file descriptor
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


def require_writable(*directories: Path) -> None:
    """Refuses a run directory that cannot be written before anything is written to it."""
    for directory in directories:
        try:
            check_writable(directory)
        except StorageError as error:
            raise UsageError(f"lab: {error}; nothing was changed") from None


def storage_error_in(error: BaseException) -> OSError | None:
    """The full-disk or read-only OSError that ``error`` is or was caused by, if any."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if is_storage_error(cause):
            return cause  # type: ignore[return-value]
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def storage_message(error: OSError) -> str:
    """``cannot write PATH: <reason in words>`` for any OSError of a full disk or read-only directory."""
    if isinstance(error, StorageError) or not error.filename:
        return str(error)
    return str(StorageError(error.filename, error))


def storage_remedy(error: OSError) -> str:
    return (
        "free some disk space"
        if error.errno in (errno.ENOSPC, errno.EDQUOT)
        else "make the run directory writable"
    )


def raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def stoppable_run(kept: Callable[[], str]) -> Iterator[None]:
    """Runs a training command so that every way of stopping it ends the same way.

    SIGTERM (a scheduler's or ``timeout``'s stop) and SIGINT, even where the shell had it ignored,
    become a Ctrl-C; a Ctrl-C prints what was kept and exits 130; a full disk or read-only run
    directory becomes a one-line UsageError (exit 2) saying what was kept and how to go on.

    Args:
        kept: returns what the run keeps, in words, with the command that continues it.
    """
    previous_handler = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    # A shell script's `lab train ... &` starts with SIGINT ignored, and Python then raises no
    # KeyboardInterrupt: `kill -INT` would do nothing. A run stops on SIGINT wherever it started.
    previous_int_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    except KeyboardInterrupt:
        print(f"\ninterrupted; {kept()}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except (RuntimeError, OSError) as error:
        storage = storage_error_in(error)
        if storage is None:
            raise
        raise UsageError(
            f"lab: {storage_message(storage)}; training stopped, {kept()} ({storage_remedy(storage)} first)"
        ) from None
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        signal.signal(signal.SIGINT, previous_int_handler)
