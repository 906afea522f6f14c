"""Crash safety: a training process SIGKILLed at random points resumes from its last good checkpoint.

One run directory lives through several kills (a fresh start, then resumes), each at a seeded
random delay after a new checkpoint appeared, so that kills land anywhere: in a rollout, an
update, or a checkpoint write. After every kill the newest checkpoint must load; the final
``lab train --resume DIR --json`` must finish the run, continuing at the checkpoint's step.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agents import engine
from core import runs
from core.checkpoint import list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
NUM_ENVS, NUM_STEPS, TOTAL_STEPS = 2, 128, 20_000
BATCH = NUM_ENVS * NUM_STEPS
FINAL_STEP = TOTAL_STEPS // BATCH * BATCH  # PPO runs whole updates: 78 * 256 = 19968
TRAIN = [
    "train", "cartpole", "--steps", str(TOTAL_STEPS), "--envs", str(NUM_ENVS), "--seed", "1", "--no-progress",
    "--set", "checkpoint_every=1024", "--set", f"num_steps={NUM_STEPS}", "--set", "update_epochs=2",
    "--set", "eval_episodes=2",
]  # fmt: skip
KILLS = 3


def lab(*args: str) -> subprocess.Popen:
    # One torch thread: on a small shared machine extra threads only spin. Own session: the kill
    # reaches the whole process group (there are no env workers with the sync back-end anyway).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lab", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the complete-looking checkpoints (sidecars) now in the run, oldest first."""
    return [int(path.stem.split("_")[1]) for path in list_checkpoints(run_dir / "checkpoints")]


def temp_files(run_dir: Path) -> set[str]:
    directory = run_dir / "checkpoints"
    return (
        {path.name for path in directory.iterdir() if path.name.startswith(".")}
        if directory.is_dir()
        else set()
    )


def wait_for_checkpoint_after(
    process: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120
) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [s for s in checkpoint_steps(run_dir) if s > step]
        if steps:
            return max(steps)
        if process.poll() is not None:
            pytest.fail(f"training exited early ({process.returncode}): {process.stderr.read()[-2000:]}")
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"no checkpoint after step {step} within {timeout} s")


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(tmp_path):
    rng = random.Random(20261129)
    run_dir = tmp_path / "run"
    last_step = 0
    left_by_kills: set[str] = set()
    for trial in range(KILLS):
        process = (
            lab(*TRAIN, "--run-dir", str(run_dir))
            if trial == 0
            else lab("train", "--resume", str(run_dir), "--no-progress")
        )
        seen = wait_for_checkpoint_after(process, run_dir, last_step)
        time.sleep(rng.uniform(0.0, 1.5))
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        process.stdout.close()
        process.stderr.close()
        assert process.returncode == -signal.SIGKILL, f"trial {trial}: the run finished before the kill"

        # The newest good checkpoint loads, and it is at least as new as any complete one seen.
        sidecar, meta = runs.locate_checkpoint(run_dir)
        state, _ = load_checkpoint(sidecar)
        assert meta["algo"] == "ppo" and meta["config"]["env"] == "cartpole"
        step = int(state["global_step"])
        assert step >= seen >= last_step + 1, (trial, step, seen, last_step)
        assert step % BATCH == 0 and int(state["update"]) == step // BATCH
        last_step = step
        # A kill inside a checkpoint write may leave its temp file (a name starting with '.'):
        # never a checkpoint that would be loaded (list_checkpoints ignores them).
        left_by_kills |= temp_files(run_dir)

    process = lab("train", "--resume", str(run_dir), "--no-progress", "--json")
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["steps"] == FINAL_STEP >= last_step
    assert summary["run_dir"] == str(run_dir)
    # The run went on from the checkpoint: one history record per update, none lost or repeated.
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [record["step"] for record in history] == list(range(BATCH, FINAL_STEP + 1, BATCH))
    assert checkpoint_steps(run_dir)[-1] == FINAL_STEP
    # The runs that completed their writes left no temp files behind.
    assert temp_files(run_dir) <= left_by_kills


def test_resume_removes_temp_files_left_by_a_kill_during_a_write(tmp_path, monkeypatch, one_torch_thread):
    from agents import ppo

    monkeypatch.setattr(engine, "plot_learning_curve", lambda *args, **kwargs: None)
    config = ppo.PPOConfig(
        env="cartpole", total_steps=256, num_envs=2, num_steps=64, update_epochs=1, eval_episodes=1,
        checkpoint_every=128, device="cpu",
    )  # fmt: skip
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    runs.write_run_config(run_dir, "algo", "ppo", config)
    ppo.train(config, run_dir, progress=False)
    # What a SIGKILL between mkstemp and os.replace leaves (atomic_write_bytes names it so).
    stale = run_dir / "checkpoints" / ".step_000000000384.safetensors.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    ppo.train(
        ppo.config_from_dict({**config.__dict__, "total_steps": 512}), run_dir, resume=True, progress=False
    )
    assert not stale.exists()
