"""Shared pytest set-up: one torch thread, headless rendering."""

import os

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("MPLBACKEND", "Agg")

import errno  # noqa: E402
import stat  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: the small nets of the tests run 10-30x slower with two on a busy 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Every test starts with one torch thread and leaves it so, whatever the code under test set."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# Fault injection shared by the reliability and engine tests: read-only directories, a full disk
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def read_only(monkeypatch) -> Iterator[Callable[[Path], None]]:
    """``read_only(directory)`` makes ``directory`` and the directories under it read-only."""
    locked: list[Path] = []
    if os.geteuid() != 0:

        def lock(directory: Path) -> None:
            for path in [directory, *(p for p in directory.rglob("*") if p.is_dir())]:
                path.chmod(0o555)
                locked.append(path)

        yield lock
        for path in locked:
            path.chmod(0o755)
        return

    def inside(path: Any) -> bool:
        path = Path(os.fsdecode(path)).absolute()
        return any(path == d or d in path.parents for d in locked)

    def deny(path: Any) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

    real_mkstemp, real_replace, real_rename = tempfile.mkstemp, os.replace, os.rename
    real_mkdir, real_unlink = os.mkdir, os.unlink

    def mkstemp(*args: Any, dir: Any = None, **kwargs: Any) -> Any:
        if dir is not None and inside(dir):
            deny(Path(dir) / "tmpfile")
        return real_mkstemp(*args, dir=dir, **kwargs)

    def moving(real: Callable) -> Callable:
        def move(src: Any, dst: Any, **kwargs: Any) -> None:
            if inside(Path(os.fsdecode(src)).parent) or inside(Path(os.fsdecode(dst)).parent):
                deny(dst)
            real(src, dst, **kwargs)

        return move

    def in_parent(real: Callable) -> Callable:
        def call(path: Any, *args: Any, **kwargs: Any) -> Any:
            if inside(Path(os.fsdecode(path)).parent):
                deny(path)
            return real(path, *args, **kwargs)

        return call

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "replace", moving(real_replace))
    monkeypatch.setattr(os, "rename", moving(real_rename))
    monkeypatch.setattr(os, "mkdir", in_parent(real_mkdir))
    monkeypatch.setattr(os, "unlink", in_parent(real_unlink))
    yield lambda directory: locked.append(Path(directory).absolute())


@pytest.fixture
def full_disk(monkeypatch) -> Callable[[Callable[[str], bool] | None], None]:
    """``full_disk(when)``: from now on fsync of a regular file whose path ``when(path)`` accepts fails
    with ENOSPC; ``full_disk(None)`` frees the disk again."""
    real_fsync = os.fsync
    state: dict[str, Any] = {"when": None}

    def fsync(fd: int) -> None:
        when = state["when"]
        regular_file = stat.S_ISREG(os.fstat(fd).st_mode)  # directories are fsynced too
        if when is not None and regular_file and when(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return lambda when: state.update(when=when)
