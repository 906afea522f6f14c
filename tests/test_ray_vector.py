"""envs/ray_vector.py: the Ray back-end steps, autoresets and recovers like the subprocess back-end.

One local Ray serves the whole file (``ray_session``): starting it takes seconds. The failures are
injected by a tiny env defined here, as in tests/test_vector_recovery.py: it fails once (a marker
file records that it did, across restarted actors), or in every life without a marker, and never
in the test process itself (``safe_pid``). This module is pickled by value, so that the actors,
which cannot import test files, can build its envs.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from functools import partial
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import ray

from envs import ray_vector
from envs.factory import _make_seeded
from envs.ray_vector import RayVectorEnv, ensure_ray
from envs.vector import EnvWorkerError, SubprocVectorEnv

EPISODE_LENGTH = 50
HANG_TIMEOUT = 1.5  # seconds: long enough for a loaded 2-core machine, short enough for a test


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    """One local Ray for every test here, shut down at the end if this module started it."""
    started = not ray.is_initialized()
    module = sys.modules[__name__]
    ray.cloudpickle.register_pickle_by_value(module)
    ensure_ray(None)
    yield
    ray.cloudpickle.unregister_pickle_by_value(module)
    if started:
        ray.shutdown()


class FailingEnv(gym.Env):
    """Observation ``[index, t, episode_id]``; fails at step ``fail_at`` of its life.

    ``mode``: ``none``, ``raise`` (ValueError), ``kill`` (SIGKILL to its own process) or ``hang``.
    """

    observation_space = gym.spaces.Box(0.0, 1e9, (3,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(
        self,
        index: int = 0,
        mode: str = "none",
        fail_at: int = 5,
        marker: str | None = None,
        safe_pid: int = -1,
    ) -> None:
        self.index, self.mode, self.fail_at, self.marker, self.safe_pid = (
            index,
            mode,
            fail_at,
            marker,
            safe_pid,
        )
        self.steps = self.t = self.episode_id = 0

    def _maybe_fail(self) -> None:
        if self.mode == "none" or self.steps != self.fail_at or os.getpid() == self.safe_pid:
            return
        if self.marker is not None:
            try:  # atomic: of several actors reaching this together, one fails
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
        self.t = 0
        self.episode_id = int(self.np_random.integers(1, 10**6))  # shows how the env was seeded
        return self._obs(), {}

    def step(self, action: int):
        self.steps += 1
        self.t += 1
        self._maybe_fail()
        return self._obs(), 1.0, self.t >= EPISODE_LENGTH, False, {"t": self.t}


def make_failing(index: int, **kwargs: Any) -> gym.Env:
    return FailingEnv(index=index, **kwargs)


def failing_fns(num_envs: int, failing: dict[int, dict[str, Any]]) -> list:
    """One factory per sub-env; ``failing`` maps sub-env indices to their failure options."""
    return [
        partial(make_failing, index, safe_pid=os.getpid(), **failing.get(index, {}))
        for index in range(num_envs)
    ]


def seeded_fns(name: str, num_envs: int, seed: int) -> list:
    """The env_fns that ``envs.make_vec`` builds (what the factory patch passes to RayVectorEnv)."""
    return [partial(_make_seeded, name, seed + index, {}) for index in range(num_envs)]


def assert_infos_equal(got: dict[str, Any], want: dict[str, Any], path: str = "infos") -> None:
    """Same keys, dtypes, shapes and values, recursively (object arrays element by element)."""
    assert set(got) == set(want), f"{path}: {sorted(got)} != {sorted(want)}"
    for key, value in want.items():
        if isinstance(value, dict):
            assert_infos_equal(got[key], value, f"{path}[{key!r}]")
            continue
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, f"{path}[{key!r}]"
        if path.endswith("['episode']") and key == "t":
            continue  # RecordEpisodeStatistics' wall-clock episode time
        if value.dtype == object:
            for a, b in zip(got[key], value, strict=True):
                assert (a is None and b is None) or np.array_equal(a, b), f"{path}[{key!r}]"
        else:
            np.testing.assert_array_equal(got[key], value, err_msg=f"{path}[{key!r}]")


def run_both(name: str, num_envs: int, envs_per_worker: int, steps: int, seed: int = 7) -> int:
    """Steps the subprocess and the Ray back-end side by side; every result must be identical.

    Returns the number of episodes that ended (and were autoreset) on the way.
    """
    subproc = SubprocVectorEnv(seeded_fns(name, num_envs, seed), envs_per_worker=envs_per_worker, seed=seed)
    remote = RayVectorEnv(seeded_fns(name, num_envs, seed), envs_per_worker=envs_per_worker, seed=seed)
    try:
        assert remote.single_observation_space == subproc.single_observation_space
        assert remote.single_action_space == subproc.single_action_space
        want_obs, want_info = subproc.reset(seed=seed)
        got_obs, got_info = remote.reset(seed=seed)
        np.testing.assert_array_equal(got_obs, want_obs)
        assert_infos_equal(got_info, want_info)
        rng = np.random.default_rng(7)  # the fixed action sequence
        ended = 0
        for step in range(1, steps):
            actions = rng.integers(0, subproc.single_action_space.n, num_envs)
            want = subproc.step(actions)
            got = remote.step(actions)
            for part, (a, b) in enumerate(zip(got[:4], want[:4], strict=True)):
                np.testing.assert_array_equal(a, b, err_msg=f"step {step}, result {part}")
            assert got[0].dtype == want[0].dtype
            assert_infos_equal(got[4], want[4], f"step {step} infos")
            ended += int((want[2] | want[3]).sum())
        return ended
    finally:
        subproc.close()
        remote.close()


# ---------------------------------------------------------------------------------------------
# The same observations, rewards, flags and infos as the subprocess back-end
# ---------------------------------------------------------------------------------------------


# (4, 4, 2): observations in chunks of 2 rows, as a Mario actor of 4 envs sends 3 + 1 (each chunk
# travels inline in Ray's reply).
@pytest.mark.parametrize(
    ("num_envs", "envs_per_worker", "chunk_rows"), [(2, 1, None), (3, 2, None), (4, 4, 2)]
)
def test_cartpole_matches_the_subprocess_back_end(num_envs, envs_per_worker, chunk_rows, monkeypatch):
    if chunk_rows is not None:
        monkeypatch.setattr(ray_vector, "_INLINE_LIMIT", ray_vector._INLINE_MARGIN + chunk_rows * 4 * 4)
    ended = run_both("cartpole", num_envs, envs_per_worker, steps=200)
    assert ended >= num_envs  # random CartPole episodes last ~20 steps: autoresets were compared


# (4, 4): one actor, whose observations come back in two chunks (3 + 1 rows). Slow: 800 Mario steps
# in one process per back-end.
@pytest.mark.parametrize(
    ("num_envs", "envs_per_worker"),
    [(2, 1), pytest.param(3, 2, marks=pytest.mark.slow), pytest.param(4, 4, marks=pytest.mark.slow)],
)
def test_mario_matches_the_subprocess_back_end(num_envs, envs_per_worker):
    run_both("mario-1-1", num_envs, envs_per_worker, steps=200)


def test_same_step_autoreset_info_layout():
    vec = RayVectorEnv(failing_fns(3, {}), envs_per_worker=2)
    try:
        assert vec.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP
        obs, infos = vec.reset(seed=0)
        assert obs.shape == (3, 3) and obs.dtype == np.float32 and infos == {}
        for _ in range(EPISODE_LENGTH - 1):
            obs, rewards, terminations, truncations, infos = vec.step(np.zeros(3, dtype=np.int64))
            assert "final_obs" not in infos and not terminations.any()
        first_ids = obs[:, 2].copy()
        obs, rewards, terminations, truncations, infos = vec.step(np.zeros(3, dtype=np.int64))
        assert terminations.all() and not truncations.any() and (rewards == 1.0).all()
        # obs is already the next episode's first observation; final_obs holds the last one.
        assert obs[:, 1].tolist() == [0, 0, 0] and not np.array_equal(obs[:, 2], first_ids)
        assert infos["_final_obs"].all() and infos["final_obs"].dtype == object
        for index in range(3):
            np.testing.assert_array_equal(
                infos["final_obs"][index], [index, EPISODE_LENGTH, first_ids[index]]
            )
            assert infos["final_obs"][index].flags.writeable
        assert infos["_final_info"].all()
        assert infos["final_info"]["t"].tolist() == [EPISODE_LENGTH] * 3
        assert infos["final_info"]["_t"].all()
        obs, *_ = vec.step(np.zeros(3, dtype=np.int64))
        assert obs[:, 1].tolist() == [1, 1, 1]
    finally:
        vec.close()


def test_step_async_call_and_copy():
    vec = RayVectorEnv(failing_fns(3, {}), envs_per_worker=2, copy=False)
    try:
        first, _ = vec.reset(seed=0)
        with pytest.raises(RuntimeError, match="without step_async"):
            vec.step_wait()
        vec.step_async(np.zeros(3, dtype=np.int64))
        with pytest.raises(RuntimeError, match="twice"):
            vec.step_async(np.zeros(3, dtype=np.int64))
        obs, *_ = vec.step_wait()
        assert obs is first and obs[:, 1].tolist() == [1, 1, 1]  # copy=False: one array, rewritten
        with pytest.raises(ValueError, match="actions"):
            vec.step_async(np.zeros(2, dtype=np.int64))
        assert vec.get_attr("index") == (0, 1, 2)
        vec.set_attr("mode", "none")
        with pytest.raises(RuntimeError, match="no_such_attribute"):
            vec.get_attr("no_such_attribute")
        assert vec.restarts == 0  # a caller's error, not a broken env
        assert len(set(vec.actor_pids())) == 2 and os.getpid() not in vec.actor_pids()
    finally:
        vec.close()
    vec.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        vec.step(np.zeros(3, dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# Failures: the actor is replaced, its episodes dropped and counted; too many raise
# ---------------------------------------------------------------------------------------------


def wait_until_dead(actor, timeout: float) -> None:
    """Return once calls to ``actor`` fail with RayActorError; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(actor.pid.remote(), timeout=timeout)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    pytest.fail(f"the killed actor still answered after {timeout} s")


def test_a_killed_actor_is_restarted_and_its_episodes_dropped(caplog):
    vec = RayVectorEnv(failing_fns(4, {}), envs_per_worker=2, step_timeout=30)
    try:
        vec.reset(seed=0)
        for _ in range(3):
            vec.step(np.zeros(4, dtype=np.int64))
        killed = vec._actors[1]
        ray.kill(killed)
        # ray.kill only sends the kill, and a call sent just after it can still be served: poll
        # until the actor is gone, so the next step surely finds it dead.
        wait_until_dead(killed, timeout=30)
        with caplog.at_level(logging.WARNING, logger="envs.ray_vector"):
            obs, rewards, terminations, truncations, infos = vec.step(np.zeros(4, dtype=np.int64))
        # Sub-envs 2 and 3 (the killed actor's): a fresh episode, reward 0, terminated.
        assert infos["dropped"].tolist() == [False, False, True, True]
        assert infos["_dropped"].tolist() == [False, False, True, True]
        assert terminations.tolist() == [False, False, True, True] and not truncations.any()
        assert rewards.tolist() == [1.0, 1.0, 0.0, 0.0]
        assert obs[:, 1].tolist() == [4, 4, 0, 0]
        for index in (2, 3):
            np.testing.assert_array_equal(infos["final_obs"][index], obs[index])
        assert "_final_info" not in infos  # the cut-off episodes never count as finished ones
        assert vec.restarts == 1 and vec.dropped_episodes == 2
        assert vec.failure_counts == {"exception": 0, "crash": 1, "hang": 0}
        assert vec._actors[1] is not killed
        messages = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
        assert len(messages) == 1 and "crash: sub-envs 2..3" in messages[0] and "ray.kill" in messages[0]
        for step in range(1, 4):  # it goes on; the restarted sub-envs count their new episode from 0
            obs, rewards, *_, infos = vec.step(np.ones(4, dtype=np.int64))
            assert obs[:, 1].tolist() == [4 + step, 4 + step, step, step] and "dropped" not in infos
    finally:
        vec.close()


@pytest.mark.parametrize(("kind", "mode"), [("exception", "raise"), ("crash", "kill"), ("hang", "hang")])
def test_each_failure_kind_is_recovered(kind, mode, tmp_path):
    fail = {"mode": mode, "fail_at": 2, "marker": str(tmp_path / "failed")}
    vec = RayVectorEnv(failing_fns(2, {1: fail}), envs_per_worker=1, step_timeout=HANG_TIMEOUT, seed=3)
    try:
        vec.reset()
        vec.step(np.zeros(2, dtype=np.int64))
        started = time.monotonic()
        obs, rewards, terminations, _, infos = vec.step(np.zeros(2, dtype=np.int64))
        assert infos["dropped"].tolist() == [False, True] and terminations.tolist() == [False, True]
        assert obs[:, 1].tolist() == [2, 0] and rewards.tolist() == [1.0, 0.0]
        assert vec.failure_counts == {name: int(name == kind) for name in ("exception", "crash", "hang")}
        if kind == "hang":
            assert time.monotonic() - started >= HANG_TIMEOUT * 0.9
        obs, *_ = vec.step(np.zeros(2, dtype=np.int64))
        assert obs[:, 1].tolist() == [3, 1] and vec.restarts == 1
    finally:
        vec.close()


def test_repeated_failures_raise_a_clear_error():
    # No marker: sub-env 0 fails at step 2 of every life, i.e. every other vector step.
    vec = RayVectorEnv(
        failing_fns(2, {0: {"mode": "raise", "fail_at": 2}}),
        envs_per_worker=1,
        max_restarts=2,
        restart_window=100,
    )
    vec.reset(seed=0)
    with pytest.raises(EnvWorkerError, match=r"env worker failed 3 times within 100 steps") as error:
        for _ in range(20):
            vec.step(np.zeros(2, dtype=np.int64))
    assert "injected failure in sub-env 0" in str(error.value) and "\n" not in str(error.value)
    assert vec.restarts == 3 and vec.failure_counts["exception"] == 3
    with pytest.raises(RuntimeError, match="closed"):
        vec.step(np.zeros(2, dtype=np.int64))


def test_an_env_that_cannot_be_built_fails_at_construction():
    def broken() -> gym.Env:
        if os.getpid() != parent:
            raise OSError("no emulator here")
        return FailingEnv()

    parent = os.getpid()
    with pytest.raises(EnvWorkerError, match="failed to start.*no emulator here"):
        RayVectorEnv([broken, broken], envs_per_worker=2)


# ---------------------------------------------------------------------------------------------
# Ray start-up and options
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("ray://127.0.0.1:1", "refused"),  # nothing listens on port 1
        # TEST-NET-2, never routed: no answer, no route, or (behind a proxy) no Ray server answers.
        ("198.51.100.1:6379", ""),
        ("not-an-address", "expected ray://host:port"),
    ],
)
def test_an_unreachable_cluster_is_a_one_line_value_error(address, reason):
    started = time.monotonic()
    with pytest.raises(ValueError, match=f"^cannot reach the Ray cluster at {address}: .*{reason}") as error:
        ensure_ray(address, timeout=1.0)
    assert time.monotonic() - started < 5 and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="cannot reach the Ray cluster"):
        RayVectorEnv(failing_fns(1, {}), address=address)


def test_a_reachable_cluster_is_probed_and_reused():
    gcs = ray.get_runtime_context().gcs_address  # the running local Ray's head (host:port)
    ensure_ray(gcs, timeout=5.0)
    ensure_ray("local")
    assert ray.is_initialized() and ray.get_runtime_context().gcs_address == gcs


def test_another_process_steps_envs_on_the_cluster_by_its_address():
    """A second driver joins this module's Ray by address, as a trainer joins a cluster."""
    gcs = ray.get_runtime_context().gcs_address
    script = textwrap.dedent(
        f"""
        from functools import partial
        import numpy as np
        from envs.factory import _make_seeded
        from envs.ray_vector import RayVectorEnv
        vec = RayVectorEnv([partial(_make_seeded, "cartpole", i, {{}}) for i in range(2)], address={gcs!r})
        obs, _ = vec.reset(seed=0)
        obs, *_ = vec.step(np.zeros(2, dtype=np.int64))
        print(obs.shape, len(vec._actors))
        vec.close()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "(2, 4) 2"


def test_options_are_validated():
    for bad in ({"step_timeout": 0}, {"step_timeout": float("inf")}, {"max_restarts": -1}, {"restart_window": 0},
                {"max_restarts": True}, {"envs_per_worker": 0}, {"seed": 1.5}, {"start_timeout": -1}):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(bad))):
            RayVectorEnv(failing_fns(1, {}), **bad)


def test_default_envs_per_worker_gives_one_actor_per_cluster_cpu():
    cpus = int(ray.cluster_resources()["CPU"])
    vec = RayVectorEnv(failing_fns(2 * cpus, {}))
    try:
        assert vec.envs_per_worker == 2 and len(vec._actors) == cpus
        assert vec.reset(seed=0)[0].shape == (2 * cpus, 3)
    finally:
        vec.close()
