"""Checkpoint format: round trips, atomic writes, and refusal of truncated, tampered or foreign files."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from core.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    pack,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unpack,
)
from core.files import atomic_write_bytes, signals_deferred


def test_pack_unpack_round_trip_of_nested_state():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 7, "t": (1, 2.5, "x")}
    skeleton, tensors = pack(state)
    json.dumps(skeleton)  # the skeleton is plain JSON
    restored = unpack(json.loads(json.dumps(skeleton)), tensors)
    assert restored["step"] == 7 and restored["t"] == (1, 2.5, "x")
    assert set(restored["optimizer"]["state"]) == {0, 1}  # int keys survive JSON
    fresh = torch.optim.Adam(model.parameters())
    fresh.load_state_dict(restored["optimizer"])
    for key, value in model.state_dict().items():
        assert torch.equal(restored["model"][key], value)


def test_save_load_and_numpy_arrays(tmp_path):
    state = {"weights": torch.arange(6.0).view(2, 3), "frames": np.arange(10, dtype=np.uint8)}
    save_checkpoint(tmp_path / "ck", state, meta={"algo": "ppo"})
    loaded, meta = load_checkpoint(tmp_path / "ck")
    assert meta == {"algo": "ppo"}
    assert torch.equal(loaded["weights"], state["weights"])
    assert np.array_equal(loaded["frames"], state["frames"]) and loaded["frames"].dtype == np.uint8


def test_truncated_tampered_and_foreign_files_are_refused(tmp_path):
    save_checkpoint(tmp_path / "ck", {"w": torch.ones(100)})
    weights = tmp_path / "ck.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or tampered"):
        load_checkpoint(tmp_path / "ck")
    tampered = bytearray(data)
    tampered[-1] ^= 0xFF
    weights.write_bytes(bytes(tampered))
    with pytest.raises(CheckpointError, match="truncated or tampered"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "foreign.json").write_text(json.dumps({"hello": "world"}))
    with pytest.raises(CheckpointError, match="not an agent-lab checkpoint"):
        load_checkpoint(tmp_path / "foreign.json")
    (tmp_path / "garbage.json").write_bytes(b"\x00\x01{{")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "garbage.json")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing")


def test_latest_checkpoint_skips_a_corrupt_newest_one(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path / f"step_{step:012d}", {"w": torch.full((3,), float(step))})
    (tmp_path / "step_000000000003.safetensors").write_bytes(b"junk")
    newest = latest_checkpoint(tmp_path)
    assert newest is not None and newest.name == "step_000000000002.json"
    prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_000000000003.json",
        "step_000000000003.safetensors",
    ]


def test_atomic_write_leaves_no_temp_file_on_failure(tmp_path):
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old")

    with pytest.raises(TypeError):
        atomic_write_bytes(target, object())  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    generator = np.random.default_rng(3)
    save_checkpoint(tmp_path / "rng", {"rng": rng_state(generator)})
    expected = (torch.rand(3), np.random.rand(3), generator.random(3))
    loaded, _ = load_checkpoint(tmp_path / "rng")
    set_rng_state(loaded["rng"], generator)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert np.array_equal(generator.random(3), expected[2])


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt, as in a terminal, even where the test runner started with it
    ignored (a background job: `make test &`, nohup, some CI runners)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def interrupt_after_first(monkeypatch, module, name: str) -> list[str]:
    """Makes ``module.name`` (os.replace, Path.unlink) send this process a Ctrl-C after its first call."""
    real, calls = getattr(module, name), []

    def first_then_ctrl_c(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(str(args[0]))
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)  # lands between the two files of one checkpoint
        return result

    monkeypatch.setattr(module, name, first_then_ctrl_c)
    return calls


def test_ctrl_c_between_the_two_renames_of_a_checkpoint_waits_until_both_are_in(
    tmp_path, monkeypatch, ctrl_c_raises
):
    calls = interrupt_after_first(monkeypatch, os, "replace")
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "step_000000000001", {"w": torch.ones(2)})
    assert len(calls) == 2  # the sidecar was renamed before the interrupt was raised
    assert load_checkpoint(tmp_path / "step_000000000001")[0]["w"].tolist() == [1.0, 1.0]


def test_ctrl_c_while_pruning_deletes_both_files_of_a_checkpoint_or_neither(
    tmp_path, monkeypatch, ctrl_c_raises
):
    for step in (1, 2):
        save_checkpoint(tmp_path / f"step_{step:012d}", {"step": step})
    interrupt_after_first(monkeypatch, Path, "unlink")
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_000000000002.json",
        "step_000000000002.safetensors",
    ]


def test_deferred_signals_reach_their_own_handler_once_the_block_ends(ctrl_c_raises):
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with signals_deferred():
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
            assert seen == []
            with signals_deferred():  # nested: the outer block delivers
                signal.raise_signal(signal.SIGTERM)
            assert seen == []
        assert seen == [signal.SIGTERM]  # once, however often it came
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGTERM, previous)
