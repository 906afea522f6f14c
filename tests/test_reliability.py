"""Reliability gaps of issue 7: read-only run directories, a full disk during a checkpoint write,
bit-exact resume of supervised runs, persistent NaNs in DQN, env-worker failures on TensorBoard.

Commands run in-process through ``lab.cli.main(argv)``. A read-only directory is made with chmod,
except as root, whom chmod does not stop: there the calls that create, rename or delete files in it
fail with EACCES as they would on a read-only directory. A full disk is an fsync that fails with
ENOSPC (the data already sits, partly written, in the temp file), for the files chosen by the test.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import pytest
import torch

from agents import dqn, engine, ppo
from core import files, runs
from core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from core.files import StorageError
from lab import cli, errors, listing
from tasks import loop
from tasks.loop import EPOCH_PREFIX

sys.path.insert(0, str(Path(__file__).parent))
from test_vector_recovery import FailingEnv  # noqa: E402

TINY_PPO = [
    "--set", "num_envs=2", "--set", "num_steps=64", "--set", "update_epochs=1", "--set", "num_minibatches=1",
    "--set", "eval_episodes=1", "--set", "checkpoint_every=128", "--device", "cpu", "--no-progress",
]  # fmt: skip
TINY_DQN = [
    "--algo", "dqn", "--set", "hidden=(32,32)", "--set", "buffer_size=1000", "--set", "learning_starts=100",
    "--set", "batch_size=32", "--set", "train_frequency=4", "--set", "eval_every=0", "--set", "eval_episodes=1",
    "--set", "checkpoint_every=200", "--set", "log_every=100", "--device", "cpu", "--no-progress",
]  # fmt: skip
# digits with the MLP, shift augmentation on (its generator is checkpointed too) and the default cosine
# schedule with warm-up (the scheduler state too): a few seconds per run.
DIGITS = [
    "--set", "net=mlp", "--set", "hidden=(32,)", "--set", "shift=1", "--set", "batch_size=128",
    "--set", "test_fraction=0.5", "--device", "cpu", "--no-progress",
]  # fmt: skip


@pytest.fixture(autouse=True)
def checkpoint_every_epoch(monkeypatch):
    """Epochs of a few milliseconds would otherwise share one checkpoint (tasks.loop.CHECKPOINT_SECONDS)."""
    monkeypatch.setattr(loop, "CHECKPOINT_SECONDS", 0.0)


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """The learning-curve PNG of agent runs costs seconds of matplotlib and is not under test here."""
    monkeypatch.setattr(engine, "plot_learning_curve", lambda *args, **kwargs: None)


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """``main(argv)`` -> (exit status, stdout, stderr); the SystemExit of an interrupt counts too."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_exit_2(code: int, err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}: {err!r}"
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (hidden ones included) with its bytes."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def assert_no_debris(directory: Path) -> None:
    """No temp file anywhere, and no weights file without the sidecar that vouches for it."""
    files = [p for p in directory.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".tmp") or ".tmp." in p.name], files
    for weights in (p for p in files if p.suffix == ".safetensors"):
        assert weights.with_suffix(".json").is_file(), f"orphan {weights}"


# ---------------------------------------------------------------------------------------------
# Fault injection: read-only directories and a full disk
# ---------------------------------------------------------------------------------------------


def a_ppo_run(run_dir: Path) -> None:
    """A small but real PPO run directory with one checkpoint, made without training."""
    config = ppo.PPOConfig(env="cartpole", num_envs=2, num_steps=64, total_steps=256, device="cpu")
    run_dir.mkdir()
    runs.write_run_config(run_dir, "algo", "ppo", config)
    agent = ppo.ActorCritic(config, (4,), 2)
    meta = {"algo": "ppo", "config": dataclasses.asdict(config), "obs_shape": [4], "num_actions": 2}
    state = {"model": agent.state_dict(), "global_step": 128, "update": 1, "episodes": 0, "history": []}
    engine.save_training_checkpoint(run_dir, 128, state, meta, keep=2)


# ---------------------------------------------------------------------------------------------
# 1. A read-only run directory: one line, exit 2, nothing written, nothing lost
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpoints_only", [False, True])
def test_resume_of_a_read_only_run_changes_nothing(tmp_path, read_only, capsys, checkpoints_only):
    run_dir = tmp_path / "run"
    a_ppo_run(run_dir)
    before = snapshot(run_dir)
    read_only(run_dir / "checkpoints" if checkpoints_only else run_dir)
    code, _, err = run_main(["train", "--resume", run_dir, "--steps", "512", "--no-progress"], capsys)
    assert_one_line_exit_2(code, err, "checkpoints" if checkpoints_only else str(run_dir), "read-only")
    assert snapshot(run_dir) == before  # config.json was not rewritten, no event file was started
    assert engine.load_training_checkpoint(run_dir)[0]["global_step"] == 128


def test_fit_into_and_resume_of_a_read_only_run_dir(tmp_path, read_only, capsys):
    run_dir = tmp_path / "xor"
    code, _, err = run_main(["fit", "xor", "--run-dir", run_dir, "--epochs", "3", "--no-progress"], capsys)
    assert code == 0, err
    before = snapshot(run_dir)
    read_only(run_dir)
    code, _, err = run_main(["fit", "--resume", run_dir, "--epochs", "6", "--no-progress"], capsys)
    assert_one_line_exit_2(code, err, str(run_dir), "read-only")
    assert snapshot(run_dir) == before
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    read_only(fresh)
    code, _, err = run_main(["fit", "xor", "--run-dir", fresh, "--epochs", "3", "--no-progress"], capsys)
    assert_one_line_exit_2(code, err, str(fresh), "read-only")
    assert snapshot(fresh) == {}


# ---------------------------------------------------------------------------------------------
# 2. A full disk during a checkpoint write
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("failing_file", [".safetensors", ".json"])
def test_a_full_disk_replaces_no_checkpoint_and_leaves_no_temp_file(tmp_path, full_disk, failing_file):
    good = save_checkpoint(tmp_path / "step_000000000001", {"w": torch.ones(1000)}, meta={"n": 1})
    before = snapshot(tmp_path)
    # The weights or the sidecar does not fit: neither file is replaced, also when the same stem is
    # saved again (a save at the end of a run that has just saved at the same step).
    full_disk(lambda path: path.endswith(".tmp") and failing_file in path)
    for stem in ("step_000000000001", "step_000000000002"):
        with pytest.raises(StorageError) as error:
            save_checkpoint(tmp_path / stem, {"w": torch.zeros(1000)}, meta={"n": 2})
        assert error.value.errno == errno.ENOSPC and isinstance(error.value, OSError)
        assert str(error.value) == (
            f"cannot write {tmp_path / stem}{failing_file}: no space left on device (the disk is full)"
        )
    assert snapshot(tmp_path) == before
    assert latest_checkpoint(tmp_path) == good
    assert torch.equal(load_checkpoint(good)[0]["w"], torch.ones(1000))


def test_fit_stops_cleanly_when_the_disk_fills_up(tmp_path, full_disk, capsys):
    run_dir = tmp_path / "xor"
    full_disk(lambda path: f"{EPOCH_PREFIX}000004." in path)
    code, _, err = run_main(["fit", "xor", "--run-dir", run_dir, "--epochs", "8", "--no-progress"], capsys)
    assert_one_line_exit_2(code, err, "no space left on device", "after epoch 3", "lab fit --resume")
    assert_no_debris(run_dir)
    state, _ = load_checkpoint(latest_checkpoint(run_dir / "checkpoints", prefix=EPOCH_PREFIX))
    assert state["epoch"] == 3
    full_disk(None)
    code, out, err = run_main(["fit", "--resume", run_dir, "--no-progress", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["epochs"] == 8


# ---------------------------------------------------------------------------------------------
# 3. Supervised runs resume bit-exactly on the CPU
# ---------------------------------------------------------------------------------------------


def interrupt_at_step(monkeypatch, step: int) -> None:
    """Ctrl-C in the middle of the optimizer step number ``step`` (1-based) of the next run."""
    real_step = torch.optim.AdamW.step
    calls = itertools.count(1)

    def step_or_interrupt(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        if next(calls) == step:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_or_interrupt)


def final_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The final weights and metrics.json of a ``lab fit`` run, less what depends on the clock."""
    state, _ = load_checkpoint(run_dir / "checkpoints" / "final.json")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("seconds", "run_dir"):
        metrics.pop(key)
    return state["model"], metrics


def assert_same_run(a: Path, b: Path) -> None:
    weights_a, metrics_a = final_state(a)
    weights_b, metrics_b = final_state(b)
    assert weights_a.keys() == weights_b.keys()
    for key, value in weights_a.items():
        assert torch.equal(value, weights_b[key]), key
    assert metrics_a == metrics_b  # per-epoch history included: losses and accuracies, bit for bit


def test_fit_resumed_after_an_interrupt_equals_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    code, _, err = run_main(["fit", "digits", "--run-dir", straight, "--epochs", "4", *DIGITS], capsys)
    assert code == 0, err
    steps_per_epoch = load_checkpoint(straight / "checkpoints" / "final.json")[0]["step"] // 4

    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 2 * steps_per_epoch + 3)  # in the middle of epoch 3
        code, _, err = run_main(["fit", "digits", "--run-dir", interrupted, "--epochs", "4", *DIGITS], capsys)
    assert code == errors.EXIT_INTERRUPTED, err
    assert "after epoch 2" in err and f"lab fit --resume {interrupted}" in err
    assert not (interrupted / "metrics.json").exists()

    code, out, err = run_main(["fit", "--resume", interrupted, "--no-progress", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["epochs"] == 4
    assert_same_run(straight, interrupted)


def test_ctrl_c_after_the_last_epoch_waits_for_the_finished_runs_files(tmp_path, monkeypatch, capsys):
    """A Ctrl-C while the learning curve is drawn (matplotlib's first import turns one into an
    ImportError) stops the run only after its final checkpoint, picture and metrics are written."""
    real_plot = loop.plot_learning_curve

    def plot_after_ctrl_c(*args: Any, **kwargs: Any) -> Any:
        signal.raise_signal(signal.SIGINT)
        return real_plot(*args, **kwargs)

    monkeypatch.setattr(loop, "plot_learning_curve", plot_after_ctrl_c)
    run_dir = tmp_path / "run"
    code, _, err = run_main(["fit", "xor", "--run-dir", run_dir, "--epochs", "3", "--no-progress"], capsys)
    assert code == errors.EXIT_INTERRUPTED, err
    assert f"after epoch 3 is kept. Resume with: lab fit --resume {run_dir}" in err, err
    assert (run_dir / "learning_curve.png").stat().st_size > 0
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 3
    assert load_checkpoint(run_dir / "checkpoints" / "final.json")[0]["epoch"] == 3


def test_fit_resume_can_raise_the_epochs(tmp_path, capsys):
    """With a constant learning rate, 3 epochs and then 3 more are the same as 6 in one go."""
    straight, extended = tmp_path / "straight", tmp_path / "extended"
    for run_dir, epochs in ((straight, 6), (extended, 3)):
        code, _, err = run_main(
            ["fit", "xor", "--run-dir", run_dir, "--epochs", epochs, "--no-progress"], capsys
        )
        assert code == 0, err
    code, _, err = run_main(["fit", "--resume", extended, "--epochs", "6", "--no-progress"], capsys)
    assert code == 0, err
    assert_same_run(straight, extended)
    assert json.loads((extended / "config.json").read_text())["config"]["epochs"] == 6


def test_fit_resume_refuses_what_it_cannot_continue(tmp_path, capsys):
    run_dir = tmp_path / "xor"
    assert run_main(["fit", "xor", "--run-dir", run_dir, "--epochs", "3", "--no-progress"], capsys)[0] == 0
    before = snapshot(run_dir)
    ppo_run = tmp_path / "ppo-run"
    a_ppo_run(ppo_run)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["fit", "--resume", tmp_path / "missing"], ["missing", "no config.json"]),
        (["fit", "--resume", empty], ["no config.json"]),
        (["fit", "--resume", ppo_run], ["not a `lab fit` run"]),
        (["fit", "digits", "--resume", run_dir], ["'xor'", "'digits'"]),
        (["fit", "--resume", run_dir, "--set", "lr=0.1"], ["--set", "--epochs"]),
        (["fit", "--resume", run_dir, "--net", "mlp"], ["--net"]),
        (["fit", "--resume", run_dir, "--epochs", "2"], ["trained 3 epochs", "at least 3"]),
        (["fit", "xor", "--run-dir", run_dir], ["already holds a run", "lab fit --resume"]),
        (["fit"], ["give a task", "--resume"]),
        (["fit", "--resume", run_dir, "--run-dir", tmp_path / "elsewhere"], ["drop --run-dir"]),
    ]
    for argv, needles in cases:
        code, _, err = run_main([*argv, "--no-progress"], capsys)
        assert_one_line_exit_2(code, err, *needles)
    assert snapshot(run_dir) == before
    # Without its epoch checkpoints (a run of an older lab), there is nothing to resume from.
    for path in (run_dir / "checkpoints").glob(f"{EPOCH_PREFIX}*"):
        path.unlink()
    code, _, err = run_main(["fit", "--resume", run_dir, "--no-progress"], capsys)
    assert_one_line_exit_2(code, err, "no epoch checkpoint")


# ---------------------------------------------------------------------------------------------
# 4. DQN: persistent non-finite losses stop training and keep the last good checkpoint
# ---------------------------------------------------------------------------------------------

TINY_DQN_CONFIG = dict(
    device="cpu", hidden=(32, 32), num_envs=2, buffer_size=2_000, batch_size=32, learning_starts=100,
    train_frequency=4, target_network_frequency=50, log_every=100, eval_every=0, eval_episodes=1,
    checkpoint_every=200,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 5. Env-worker failures appear on TensorBoard
# ---------------------------------------------------------------------------------------------

_env_ids = itertools.count()


@pytest.fixture
def failing_env_id(tmp_path) -> Iterator[str]:
    """A Gymnasium id whose sub-envs raise once (the first to reach its step 20) in a worker."""
    env_id = f"LabReliabilityFailing{next(_env_ids)}-v0"
    kwargs = {"mode": "raise", "fail_at": 20, "marker": str(tmp_path / "failed"), "safe_pid": os.getpid()}
    gym.register(env_id, entry_point=FailingEnv, kwargs=kwargs)
    yield env_id
    gym.registry.pop(env_id, None)


def scalars(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    assert tag in events.Tags()["scalars"], events.Tags()["scalars"]
    return [event.value for event in events.Scalars(tag)]


@pytest.mark.parametrize("algo", ["ppo", "dqn"])
def test_worker_failures_are_counted_on_tensorboard(algo, tmp_path, failing_env_id):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shared = dict(env=failing_env_id, num_envs=2, env_backend="async", total_steps=128, eval_episodes=1)
    if algo == "ppo":
        config = ppo.PPOConfig(**shared, num_steps=32, update_epochs=1, num_minibatches=1, device="cpu")
        ppo.train(config, run_dir, progress=False)
    else:
        config = dqn.DQNConfig(
            **shared, hidden=(16,), buffer_size=500, learning_starts=32, batch_size=16, log_every=32,
            eval_every=0, device="cpu",
        )  # fmt: skip
        dqn.train(config, run_dir, progress=False)
    # One sub-env raised at its step 20 (vector step 20, agent step 40): logged from then on.
    assert scalars(run_dir, "charts/worker_restarts")[-1] == 1
    assert scalars(run_dir, "charts/dropped_episodes")[-1] == 1
    assert scalars(run_dir, "charts/worker_failures_exception")[-1] == 1
    assert scalars(run_dir, "charts/worker_failures_crash")[-1] == 0


def test_in_process_vector_envs_log_no_worker_counts():
    vec = gym.vector.SyncVectorEnv([FailingEnv])
    try:
        assert engine.worker_counts([vec]) == {}
    finally:
        vec.close()


def test_worker_counts_of_several_vector_envs_add_up():
    """PPO's env groups: one SubprocVectorEnv per group, one set of counts in the log."""
    from types import SimpleNamespace

    def counts(restarts, dropped, exceptions, crashes):
        failures = {"exception": exceptions, "crash": crashes, "hang": 0}
        return SimpleNamespace(restarts=restarts, dropped_episodes=dropped, failure_counts=failures)

    assert engine.worker_counts([counts(1, 2, 1, 0), counts(2, 3, 0, 2)]) == {
        "worker_restarts": 3.0,
        "dropped_episodes": 5.0,
        "worker_failures_exception": 1.0,
        "worker_failures_crash": 2.0,
        "worker_failures_hang": 0.0,
    }


def test_storage_errors_are_one_line_oserrors(tmp_path, monkeypatch, capsys):
    """Unit check of the error type the command line maps to exit 2."""
    error = StorageError(tmp_path / "x", OSError(errno.EROFS, os.strerror(errno.EROFS)))
    assert isinstance(error, OSError) and error.errno == errno.EROFS
    assert str(error) == f"cannot write {tmp_path / 'x'}: read-only file system"
    assert files.is_storage_error(PermissionError(errno.EACCES, "denied"))
    assert not files.is_storage_error(FileNotFoundError(errno.ENOENT, "missing"))

    # An OSError of a full disk from anywhere (not the atomic writer) is still one line, exit 2.
    def list_on_a_full_disk(args: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "f"))

    monkeypatch.setattr(listing, "cmd_list", list_on_a_full_disk)
    code, _, err = run_main(["list"], capsys)
    assert_one_line_exit_2(code, err, f"lab: cannot write {tmp_path / 'f'}: no space left on device")


def test_the_next_checkpoint_removes_weights_left_without_their_sidecar(tmp_path):
    # A SIGKILL between a checkpoint's two renames leaves its weights alone; the run's next save
    # clears them (the loader already skips them: no sidecar vouches for them).
    checkpoints = tmp_path / "checkpoints"
    save_checkpoint(checkpoints / "step_000000000064", {"step": 64})
    (checkpoints / "step_000000000128.json").unlink(missing_ok=True)
    (checkpoints / "step_000000000128.safetensors").write_bytes(b"half a save")
    engine.save_training_checkpoint(tmp_path, 192, {"step": 192}, {}, keep=3)
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "step_000000000064.json", "step_000000000064.safetensors",
        "step_000000000192.json", "step_000000000192.safetensors",
    ]  # fmt: skip
    assert_no_debris(tmp_path)
