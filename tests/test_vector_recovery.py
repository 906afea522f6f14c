"""envs/vector.py: a worker that raises, crashes or hangs is restarted; its episodes are dropped.

The failures are injected by a tiny env defined here. Each fails once (a marker file records that
it did, across the restarted processes), or at every life when no marker is given, which the
give-up tests use. It never fails in the test process itself (``safe_pid``), so a bug here cannot
SIGKILL pytest.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest

import envs
from agents import engine
from core import runs
from envs.vector import EnvWorkerError, SubprocVectorEnv, restart_seed

EPISODE_LENGTH = 50
KINDS = {"exception": "raise", "crash": "kill", "hang": "hang"}
HANG_TIMEOUT = 1.5  # seconds: long enough for a loaded 2-core machine, short enough for a test


class FailingEnv(gym.Env):
    """Observation ``[index, t, episode_id]``; fails at step ``fail_at`` of its life.

    Args:
        index: sub-env index, shown in the observation.
        mode: ``none``, ``raise`` (ValueError), ``kill`` (SIGKILL to its own process) or ``hang``.
        fail_at: the step (or, with ``on="reset"``, the reset) of this instance that fails.
        on: ``step`` or ``reset``.
        marker: a file created when failing; while it exists, nothing fails (fail once). None: fail
            in every life of the env.
        safe_pid: never fail in this process (the test process).
    """

    observation_space = gym.spaces.Box(0.0, 1e9, (3,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(
        self,
        index: int = 0,
        mode: str = "none",
        fail_at: int = 5,
        on: str = "step",
        marker: str | None = None,
        safe_pid: int = -1,
    ) -> None:
        self.index, self.mode, self.fail_at, self.on, self.marker, self.safe_pid = (
            index,
            mode,
            fail_at,
            on,
            marker,
            safe_pid,
        )
        self.steps = self.resets = self.t = 0
        self.episode_id = 0

    def _maybe_fail(self, count: int) -> None:
        if self.mode == "none" or count != self.fail_at or os.getpid() == self.safe_pid:
            return
        if self.marker is not None:
            try:  # atomic: of several workers reaching this together, one fails
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        if self.mode == "raise":
            raise ValueError(f"injected failure in sub-env {self.index}")
        if self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.mode == "hang":
            time.sleep(3600)

    def _obs(self) -> np.ndarray:
        return np.array([self.index, self.t, self.episode_id], dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.resets += 1
        if self.on == "reset":
            self._maybe_fail(self.resets)
        self.t = 0
        self.episode_id = int(self.np_random.integers(1, 10**6))  # shows how the env was seeded
        return self._obs(), {}

    def step(self, action: int):
        self.steps += 1
        self.t += 1
        if self.on == "step":
            self._maybe_fail(self.steps)
        return self._obs(), 1.0, self.t >= EPISODE_LENGTH, False, {"t": self.t}


def make_failing(index: int, **kwargs: Any) -> gym.Env:
    return FailingEnv(index=index, **kwargs)


def env_fns(num_envs: int, failing: dict[int, dict[str, Any]]) -> list:
    """One factory per sub-env; ``failing`` maps sub-env indices to their failure options."""
    return [
        partial(make_failing, index, safe_pid=os.getpid(), **failing.get(index, {}))
        for index in range(num_envs)
    ]


_ids = itertools.count()


@pytest.fixture
def register_env():
    """Registers a Gymnasium id for FailingEnv with fixed kwargs (what PPO's make_vec needs)."""
    registered: list[str] = []

    def register(**kwargs: Any) -> str:
        env_id = f"LabFailing{next(_ids)}-v0"
        gym.register(env_id, entry_point=FailingEnv, kwargs={"safe_pid": os.getpid(), **kwargs})
        registered.append(env_id)
        return env_id

    yield register
    for env_id in registered:
        gym.registry.pop(env_id, None)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


# ---------------------------------------------------------------------------------------------
# One failure: restarted, counted, logged; only that worker's episodes are dropped
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_failed_worker_is_restarted_and_its_episodes_dropped(kind, tmp_path, caplog):
    # 4 sub-envs in 2 workers; sub-env 3 fails at its 5th step, which takes sub-env 2 down with it.
    fail = {"mode": KINDS[kind], "fail_at": 5, "marker": str(tmp_path / "failed")}
    vec = SubprocVectorEnv(env_fns(4, {3: fail}), envs_per_worker=2, step_timeout=HANG_TIMEOUT)
    try:
        vec.reset(seed=0)
        old_pid = vec._processes[1].pid
        with caplog.at_level(logging.WARNING, logger="envs.vector"):
            for step in range(1, 5):
                obs, rewards, terminations, truncations, infos = vec.step(np.zeros(4, dtype=np.int64))
                assert "dropped" not in infos and not terminations.any()
                assert (obs[:, 1] == step).all()
            started = time.monotonic()
            obs, rewards, terminations, truncations, infos = vec.step(np.zeros(4, dtype=np.int64))
            took = time.monotonic() - started
        # The affected sub-envs: a fresh episode, reward 0, terminated (never bootstrapped).
        assert infos["dropped"].tolist() == [False, False, True, True]
        assert infos["_dropped"].tolist() == [False, False, True, True]
        assert terminations.tolist() == [False, False, True, True]
        assert not truncations.any()
        assert rewards.tolist() == [1.0, 1.0, 0.0, 0.0]
        assert obs[2:, 1].tolist() == [0, 0]
        for index in (2, 3):
            np.testing.assert_array_equal(infos["final_obs"][index], obs[index])
        # ... and no final_info, so episode statistics do not count the cut-off episode.
        assert "_final_info" not in infos or not infos["_final_info"][2:].any()
        # The other worker's sub-envs go on as if nothing happened.
        assert obs[:2, 1].tolist() == [5, 5]
        assert infos["_final_obs"].tolist() == [False, False, True, True]
        # Counted and logged once.
        assert vec.restarts == 1 and vec.dropped_episodes == 2
        assert vec.failure_counts == {name: int(name == kind) for name in KINDS}
        warnings_logged = [
            r for r in caplog.records if r.levelno == logging.WARNING and kind in r.getMessage()
        ]
        assert len(warnings_logged) == 1
        assert "sub-envs 2..3" in warnings_logged[0].getMessage()
        if kind == "exception":
            assert "injected failure in sub-env 3" in warnings_logged[0].getMessage()
        if kind == "crash":
            assert "SIGKILL" in warnings_logged[0].getMessage()
        if kind == "hang":
            assert took >= HANG_TIMEOUT * 0.9
        # A new process replaced the old one, which is gone.
        assert vec._processes[1].pid != old_pid and not alive(old_pid)
        # The vector env keeps stepping; the restarted sub-envs count their new episode from 0.
        for step in range(1, 6):
            obs, rewards, terminations, truncations, infos = vec.step(np.ones(4, dtype=np.int64))
            assert obs[2:, 1].tolist() == [step, step] and obs[:2, 1].tolist() == [5 + step] * 2
            assert "dropped" not in infos and (rewards == 1.0).all()
        assert vec.restarts == 1
    finally:
        vec.close()


def test_episodes_finish_normally_around_a_restart(tmp_path):
    """Same-step autoreset still reports final_info (with the episode stats) after a restart."""
    fail = {"mode": "raise", "fail_at": 3, "marker": str(tmp_path / "failed")}
    vec = SubprocVectorEnv(
        [partial(lambda f: gym.wrappers.RecordEpisodeStatistics(f()), fn) for fn in env_fns(2, {0: fail})],
        envs_per_worker=1,
    )
    try:
        vec.reset(seed=0)
        ended = []
        for _ in range(EPISODE_LENGTH + 3):
            _, _, terminations, _, infos = vec.step(np.zeros(2, dtype=np.int64))
            if "_final_info" in infos:
                ended += [
                    (int(i), float(infos["final_info"]["episode"]["l"][i]))
                    for i in np.flatnonzero(infos["_final_info"])
                ]
        # Sub-env 1 ends its episode at step 50, sub-env 0 (restarted at step 3) at step 53.
        assert ended == [(1, EPISODE_LENGTH), (0, EPISODE_LENGTH)]
        assert vec.dropped_episodes == 1
    finally:
        vec.close()


def test_a_failure_in_reset_restarts_the_worker(tmp_path):
    fail = {"mode": "raise", "fail_at": 1, "on": "reset", "marker": str(tmp_path / "failed")}
    vec = SubprocVectorEnv(env_fns(3, {1: fail}), envs_per_worker=1)
    try:
        obs, infos = vec.reset(seed=7)
        assert infos["dropped"].tolist() == [False, True, False]
        assert obs[:, 1].tolist() == [0, 0, 0]
        assert vec.failure_counts["exception"] == 1 and vec.dropped_episodes == 0
        obs, *_ = vec.step(np.zeros(3, dtype=np.int64))
        assert obs[:, 1].tolist() == [1, 1, 1]
    finally:
        vec.close()


def test_restarted_envs_are_reseeded_deterministically(tmp_path):
    def run(marker: Path) -> np.ndarray:
        vec = SubprocVectorEnv(
            env_fns(2, {1: {"mode": "kill", "fail_at": 2, "marker": str(marker)}}), envs_per_worker=1
        )
        try:
            first, _ = vec.reset(seed=3)
            vec.step(np.zeros(2, dtype=np.int64))
            obs, *_ = vec.step(np.zeros(2, dtype=np.int64))
            assert vec.restarts == 1
            return np.stack([first, obs])
        finally:
            vec.close()

    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    np.testing.assert_array_equal(a, b)
    # The restarted sub-env starts a new episode with a new seed, not a replay of its first one.
    assert a[1, 1, 2] != a[0, 1, 2]
    assert restart_seed(3, 1, 1) == restart_seed(3, 1, 1)
    assert len({restart_seed(3, 1, n) for n in range(50)}) == 50
    assert len({restart_seed(base, 1, 1) for base in range(50)}) == 50
    assert len({restart_seed(3, index, 1) for index in range(50)}) == 50


# ---------------------------------------------------------------------------------------------
# Repeated failures: a clear error that stops training
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["raise", "kill"])
def test_repeated_failures_raise_a_clear_error(mode):
    # No marker: the env fails at step 2 of every life, i.e. every other vector step.
    vec = SubprocVectorEnv(
        env_fns(2, {0: {"mode": mode, "fail_at": 2}}), envs_per_worker=1, max_restarts=2, restart_window=100
    )
    vec.reset(seed=0)
    with pytest.raises(EnvWorkerError, match=r"env worker failed 3 times within 100 steps") as error:
        for _ in range(20):
            vec.step(np.zeros(2, dtype=np.int64))
    assert isinstance(error.value, RuntimeError)
    assert ("injected failure in sub-env 0" if mode == "raise" else "SIGKILL") in str(error.value)
    assert "\n" not in str(error.value)  # one line, fit for the command line
    assert vec.restarts == 3
    assert all(process is None or not process.is_alive() for process in vec._processes)
    with pytest.raises(RuntimeError, match="closed"):
        vec.step(np.zeros(2, dtype=np.int64))


def test_failures_spread_wider_than_the_window_are_tolerated():
    vec = SubprocVectorEnv(
        env_fns(2, {0: {"mode": "raise", "fail_at": 3}}), envs_per_worker=1, max_restarts=1, restart_window=3
    )
    try:
        vec.reset(seed=0)
        for _ in range(15):  # a failure every 3 steps: one per window
            vec.step(np.zeros(2, dtype=np.int64))
        assert vec.failure_counts["exception"] == 5
    finally:
        vec.close()


def test_max_restarts_zero_raises_at_the_first_failure():
    vec = SubprocVectorEnv(
        env_fns(2, {1: {"mode": "raise", "fail_at": 1}}), envs_per_worker=1, max_restarts=0
    )
    vec.reset(seed=0)
    with pytest.raises(EnvWorkerError, match="injected failure in sub-env 1"):
        vec.step(np.zeros(2, dtype=np.int64))


def test_an_env_that_cannot_be_built_fails_at_construction():
    def broken() -> gym.Env:
        if os.getpid() != parent:
            raise OSError("no emulator here")
        return FailingEnv()

    parent = os.getpid()
    with pytest.raises(EnvWorkerError, match="failed to start.*no emulator here"):
        SubprocVectorEnv([broken, broken], envs_per_worker=1)


def test_call_errors_reach_the_caller_and_the_worker_lives_on():
    vec = SubprocVectorEnv(env_fns(2, {}), envs_per_worker=1)
    try:
        vec.reset(seed=0)
        with pytest.raises(RuntimeError, match="no_such_attribute"):
            vec.get_attr("no_such_attribute")
        assert vec.restarts == 0 and vec.get_attr("index") == (0, 1)
        obs, *_ = vec.step(np.zeros(2, dtype=np.int64))
        assert obs[:, 1].tolist() == [1, 1]
    finally:
        vec.close()


def test_options_are_validated():
    for bad in ({"step_timeout": 0}, {"step_timeout": float("inf")}, {"max_restarts": -1}, {"restart_window": 0},
                {"max_restarts": True}, {"envs_per_worker": 0}):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(bad))):
            SubprocVectorEnv(env_fns(1, {}), **bad)


# ---------------------------------------------------------------------------------------------
# make_vec passes the options through; workers never outlive the main process
# ---------------------------------------------------------------------------------------------


def test_make_vec_passes_the_recovery_options_through(tmp_path, register_env):
    env_id = register_env()
    vec = envs.make_vec(
        env_id,
        2,
        seed=4,
        backend="async",
        envs_per_worker=1,
        step_timeout=HANG_TIMEOUT,
        max_restarts=3,
        restart_window=9,
        index=1,
        mode="hang",
        fail_at=2,
        marker=str(tmp_path / "failed"),
    )
    try:
        assert isinstance(vec, SubprocVectorEnv)
        assert (vec.step_timeout, vec.max_restarts, vec.restart_window, vec._seed) == (HANG_TIMEOUT, 3, 9, 4)
        vec.reset()
        for _ in range(3):
            _, _, terminations, _, infos = vec.step(np.zeros(2, dtype=np.int64))
        assert vec.failure_counts["hang"] == 1 and vec.dropped_episodes == 1
    finally:
        vec.close()
    default = envs.make_vec(env_id, 1, backend="async")
    assert (default.step_timeout, default.max_restarts, default.restart_window) == (60.0, 5, 100)
    default.close()


def test_workers_exit_when_the_main_process_is_killed(tmp_path):
    """A SIGKILLed trainer must not leave its env workers behind (each sees EOF on its pipe)."""
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_vector_recovery import env_fns
        from envs.vector import SubprocVectorEnv
        vec = SubprocVectorEnv(env_fns(3, {{}}), envs_per_worker=1)
        vec.reset(seed=0)
        print(" ".join(str(p.pid) for p in vec._processes), flush=True)
        time.sleep(60)
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent
    )
    try:
        pids = [int(pid) for pid in process.stdout.readline().split()]
        assert len(pids) == 3 and all(alive(pid) for pid in pids)
    finally:
        process.kill()
        process.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids)


@pytest.mark.parametrize("ending", ["never closed", "interrupted while starting"])
def test_the_process_exits_with_an_env_left_open_or_interrupted_at_its_start(ending):
    """Workers ignore SIGTERM, so multiprocessing's exit handler (SIGTERM, then join) alone would wait
    for them forever: a script that never closes its env, or a Ctrl-C or stop while the workers start
    (as when `lab train` is stopped during its first seconds), must still let the process exit."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_vector_recovery import env_fns
        from envs import vector
        if {ending!r} == "never closed":
            vec = vector.SubprocVectorEnv(env_fns(2, {{}}), envs_per_worker=1)
            vec.reset(seed=0)
            print(" ".join(str(p.pid) for p in vec._processes), flush=True)
        else:
            started = []
            real_start = vector.SubprocVectorEnv._start_worker
            def start(self, worker, reset_seeds):
                real_start(self, worker, reset_seeds)
                started.append(self._processes[worker].pid)
            def interrupted(self, worker, deadline):
                raise KeyboardInterrupt
            vector.SubprocVectorEnv._start_worker = start
            vector.SubprocVectorEnv._receive = interrupted
            try:
                vector.SubprocVectorEnv(env_fns(2, {{}}), envs_per_worker=1)
            except KeyboardInterrupt as error:
                kept = error  # a handler may keep it (and with it the half-built env) to the end
                print(" ".join(str(pid) for pid in started), flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr
    pids = [int(pid) for pid in done.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids)


# ---------------------------------------------------------------------------------------------
# Training goes on through the failures (PPO), or stops with a checkpoint when they repeat
# ---------------------------------------------------------------------------------------------


def _ppo_config(env_id: str, total_steps: int) -> Any:
    from agents.ppo import PPOConfig

    return PPOConfig(
        env=env_id,
        total_steps=total_steps,
        num_envs=4,
        num_steps=32,
        update_epochs=1,
        num_minibatches=1,
        env_backend="async",
        eval_episodes=2,
        checkpoint_every=10**6,
        device="cpu",
        seed=0,
    )


def test_ppo_trains_through_a_raise_a_kill_and_a_hang(
    tmp_path, register_env, caplog, monkeypatch, one_torch_thread
):
    from agents import engine, ppo

    # Three failures in one run of 96 steps per sub-env (one worker each): sub-env 0 raises at its
    # step 40, sub-env 1 is killed at 70 (in its 2nd episode), sub-env 3 hangs at 60.
    failures = {0: ("raise", 40), 1: ("kill", 70), 3: ("hang", 60)}
    markers = {index: str(tmp_path / f"failed-{index}") for index in failures}

    def make_failing_vec(name, num_envs, seed=0, backend="sync", **kwargs):
        fns = env_fns(
            num_envs, {i: {"mode": m, "fail_at": at, "marker": markers[i]} for i, (m, at) in failures.items()}
        )
        if backend == "sync":  # the final greedy evaluation: no failures there
            return gym.vector.SyncVectorEnv(
                [lambda: gym.wrappers.RecordEpisodeStatistics(FailingEnv())] * num_envs,
                autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
            )
        wrapped = [partial(lambda f: gym.wrappers.RecordEpisodeStatistics(f()), fn) for fn in fns]
        vec = SubprocVectorEnv(wrapped, envs_per_worker=1, step_timeout=HANG_TIMEOUT, seed=seed)
        created.append(vec)
        return vec

    created: list[SubprocVectorEnv] = []
    env_id = register_env()
    monkeypatch.setattr(envs, "make_vec", make_failing_vec)
    monkeypatch.setattr(engine, "plot_learning_curve", lambda *args, **kwargs: None)  # seconds of matplotlib
    with caplog.at_level(logging.WARNING, logger="envs.vector"):
        summary = ppo.train(_ppo_config(env_id, 4 * 32 * 3), tmp_path / "run", progress=False)
    assert summary["steps"] == 4 * 32 * 3
    vec = created[0]
    assert vec.failure_counts == {"exception": 1, "crash": 1, "hang": 1}
    assert vec.dropped_episodes == 3
    logged = " ".join(r.getMessage() for r in caplog.records if r.name == "envs.vector")
    assert all(kind in logged for kind in ("exception", "crash", "hang"))
    # Dropped episodes are not counted as finished ones: sub-env 0 ends one at step 90 (40 + 50),
    # sub-envs 1, 2 and 3 one each at step 50.
    assert summary["episodes"] == 4


def test_ppo_stops_with_a_checkpoint_when_failures_repeat(tmp_path, register_env, one_torch_thread):
    from agents import ppo

    env_id = register_env(index=0, mode="raise", fail_at=3)  # no marker: fails in every life
    with pytest.raises(engine.TrainingStopped, match="env worker failed 6 times") as error:
        ppo.train(_ppo_config(env_id, 4 * 32 * 4), tmp_path / "run", progress=False)
    assert "checkpoint was saved" in str(error.value)
    sidecar, meta = runs.locate_checkpoint(tmp_path / "run")
    assert meta["algo"] == "ppo"


def test_dqn_trains_through_a_crashed_worker(tmp_path, register_env, caplog, monkeypatch, one_torch_thread):
    """DQN stores ``final_obs`` as the next observation of every finished env: a dropped one has it."""
    from agents import dqn, engine

    monkeypatch.setattr(engine, "plot_learning_curve", lambda *args, **kwargs: None)
    env_id = register_env(mode="kill", fail_at=30, marker=str(tmp_path / "failed"))
    config = dqn.DQNConfig(
        env=env_id, total_steps=200, num_envs=2, env_backend="async", buffer_size=1000, learning_starts=64,
        batch_size=16, eval_episodes=1, checkpoint_every=10**6, device="cpu", seed=0,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="envs.vector"):
        summary = dqn.train(config, tmp_path / "run", progress=False)
    assert summary["steps"] >= 200
    assert any("crash" in record.getMessage() for record in caplog.records if record.name == "envs.vector")


# ---------------------------------------------------------------------------------------------
# step_async / step_wait: the workers step while the caller computes (DQN's overlap)
# ---------------------------------------------------------------------------------------------


def test_step_async_then_wait_equals_step():
    split = SubprocVectorEnv(env_fns(4, {}), envs_per_worker=2)
    plain = SubprocVectorEnv(env_fns(4, {}), envs_per_worker=2)
    try:
        split.reset(seed=3)
        plain.reset(seed=3)
        for step in range(1, EPISODE_LENGTH + 3):  # across an episode end (same-step autoreset)
            actions = np.full(4, step % 2, dtype=np.int64)
            split.step_async(actions)
            got = split.step_wait()
            want = plain.step(actions)
            for got_part, want_part in zip(got[:4], want[:4], strict=True):
                np.testing.assert_array_equal(got_part, want_part)
            assert sorted(got[4]) == sorted(want[4])
    finally:
        split.close()
        plain.close()


def test_step_async_misuse_is_an_error():
    vec = SubprocVectorEnv(env_fns(2, {}), envs_per_worker=1)
    try:
        vec.reset(seed=0)
        with pytest.raises(RuntimeError, match="without step_async"):
            vec.step_wait()
        vec.step_async(np.zeros(2, dtype=np.int64))
        with pytest.raises(RuntimeError, match="twice"):
            vec.step_async(np.zeros(2, dtype=np.int64))
        vec.step_wait()
        with pytest.raises(ValueError, match="actions"):
            vec.step_async(np.zeros(3, dtype=np.int64))
    finally:
        vec.close()


def test_a_worker_crash_during_step_async_is_recovered_in_step_wait(tmp_path):
    fail = {"mode": "kill", "fail_at": 2, "marker": str(tmp_path / "failed")}
    vec = SubprocVectorEnv(env_fns(2, {1: fail}), envs_per_worker=1, step_timeout=HANG_TIMEOUT)
    try:
        vec.reset(seed=0)
        vec.step(np.zeros(2, dtype=np.int64))
        vec.step_async(np.zeros(2, dtype=np.int64))  # sub-env 1 dies while the caller "computes"
        time.sleep(0.2)
        obs, rewards, terminations, _, infos = vec.step_wait()
        assert infos["dropped"].tolist() == [False, True]
        assert terminations.tolist() == [False, True]
        assert obs[1, 1] == 0 and obs[0, 1] == 2
        assert vec.restarts == 1
        obs, *_ = vec.step(np.zeros(2, dtype=np.int64))  # and it goes on
        assert obs[:, 1].tolist() == [3, 1]
    finally:
        vec.close()


def make_slow(index: int, delay: float, parent: int) -> gym.Env:
    """A FailingEnv that takes ``delay`` seconds to build in a worker (an emulator loading its ROM under
    load); the vector env's own copy in process ``parent``, which only reads the spaces, is quick."""
    if os.getpid() != parent:
        time.sleep(delay)
    return FailingEnv(index=index)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_workers_leave_ctrl_c_and_sigterm_to_the_main_process(stop):
    # What Ctrl-C in a terminal and `pkill -f "lab train"` do to the workers: they live on, and the
    # main process alone ends them (it closes them when it stops), so none is taken for a crash.
    vec = SubprocVectorEnv(env_fns(2, {}), envs_per_worker=1)
    try:
        vec.reset(seed=0)
        for process in vec._processes:
            os.kill(process.pid, stop)
        time.sleep(0.5)
        obs, *_ = vec.step(np.zeros(2, dtype=np.int64))
        assert vec.restarts == 0 and obs[:, 1].tolist() == [1, 1]
        assert all(process.is_alive() for process in vec._processes)
    finally:
        vec.close()
    assert all(process is None or not process.is_alive() for process in vec._processes)


def test_a_worker_may_take_a_step_timeout_per_sub_env_to_start():
    # 4 sub-envs of 0.5 s each: 2 s, more than one step_timeout (1.5 s), well under four (6 s).
    vec = SubprocVectorEnv([partial(make_slow, i, 0.5, os.getpid()) for i in range(4)], envs_per_worker=4,
                           step_timeout=HANG_TIMEOUT)  # fmt: skip
    try:
        obs, _ = vec.reset(seed=0)
        assert obs[:, 0].tolist() == [0, 1, 2, 3]
    finally:
        vec.close()
    # A start that never ends still fails, once three timeouts (three sub-envs) have passed.
    started = time.monotonic()
    with pytest.raises(EnvWorkerError, match="failed to start"):
        SubprocVectorEnv(
            [partial(make_slow, i, 3600, os.getpid()) for i in range(3)],
            envs_per_worker=3,
            step_timeout=HANG_TIMEOUT,
        )
    assert 3 * HANG_TIMEOUT * 0.9 <= time.monotonic() - started < 3 * HANG_TIMEOUT + 30


def test_workers_stopped_past_the_timeout_and_continued_are_not_taken_for_hung():
    # What a Ctrl-Z (or SIGSTOP) of the whole process group and a later `fg` look like from the main
    # process: every deadline has passed when the workers run again, and they reply at once.
    vec = SubprocVectorEnv(env_fns(2, {}), envs_per_worker=1, step_timeout=HANG_TIMEOUT)
    try:
        vec.reset(seed=0)
        pids = [process.pid for process in vec._processes]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        resume = threading.Timer(HANG_TIMEOUT + 0.3, lambda: [os.kill(pid, signal.SIGCONT) for pid in pids])
        resume.start()
        obs, *_ = vec.step(np.zeros(2, dtype=np.int64))
        resume.join()
        assert (obs[:, 1] == 1).all() and vec.failure_counts["hang"] == 0
        assert [process.pid for process in vec._processes] == pids  # none restarted
    finally:
        vec.close()
