"""agents.engine: process-wide settings the agents apply (malloc thresholds)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agents import dqn
from core import compute

ROOT = Path(__file__).resolve().parents[1]

# Prints how many bytes of a 16 MiB malloc glibc served from a fresh mapping (mallinfo2's hblkhd):
# the whole block with glibc's defaults in a fresh process, none once freed memory is kept in the heap.
MAPPED_BYTES_OF_A_16_MIB_BLOCK = """
import ctypes, sys
from core import compute
if sys.argv[1] == "keep":
    assert compute.keep_freed_memory()
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.mallinfo2.restype = Mallinfo2
before = libc.mallinfo2().hblkhd
block = libc.malloc(16 << 20)
print(libc.mallinfo2().hblkhd - before)
libc.free(ctypes.c_void_p(block))
"""


def _has_glibc_mallinfo2() -> bool:
    libc = compute.glibc()
    return libc is not None and hasattr(libc, "mallinfo2")  # glibc >= 2.33


@pytest.mark.skipif(not _has_glibc_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_keep_freed_memory_serves_mid_size_blocks_from_the_heap() -> None:
    def mapped_bytes(mode: str) -> int:
        run = subprocess.run(
            [sys.executable, "-c", MAPPED_BYTES_OF_A_16_MIB_BLOCK, mode],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        return int(run.stdout.strip())

    # With glibc's defaults the block is a fresh mapping, unmapped again on free (page faults at every
    # reuse); with keep_freed_memory it comes from the heap, which keeps it when freed.
    assert mapped_bytes("default") >= 16 << 20
    assert mapped_bytes("keep") == 0


@pytest.mark.parametrize("keep", [True, False])
def test_dqn_applies_keep_freed_memory_as_configured(tmp_path, monkeypatch, keep: bool) -> None:
    calls = []
    monkeypatch.setattr(dqn, "keep_freed_memory", lambda: calls.append(1) or True)
    config = dqn.DQNConfig(
        env="cartpole", device="cpu", hidden=(16,), total_steps=64, buffer_size=64, batch_size=8,
        learning_starts=32, eval_episodes=1, keep_freed_memory=keep,
    )  # fmt: skip
    dqn.train(config, tmp_path / "run", progress=False)
    assert len(calls) == (1 if keep else 0)
