"""Episodes: the statistics of finished episodes, their recent windows, and greedy evaluation.

A vector env with same-step autoreset reports an episode's end in ``infos["final_info"]``;
:func:`finished_episodes` reads it, :class:`EpisodeTracker` keeps the recent ones (overall and per
Mario stage) for the progress bar and TensorBoard, and :func:`evaluate` plays whole episodes with a
trained policy and summarises them (:func:`evaluate_preset`: each stage of a multi-stage preset alike).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, Protocol

import numpy as np

import envs
from envs.mario import stage_label

#: The info keys of a finished episode that its statistics keep (Mario's progress and stage).
EPISODE_INFO_KEYS = ("x_pos_max", "flag_get", "world", "stage", "stalled", "route_start", "retry_start")


def env_stages(infos: dict[str, Any], count: int) -> list[str | None]:
    """The stage of each of ``count`` envs' episodes in progress, from a vector step's (or reset's)
    ``infos`` (after a same-step autoreset: the new episode's); None where the env reports none."""
    if "world" not in infos or "stage" not in infos:
        return [None] * count
    return [stage_label({"world": infos["world"][i], "stage": infos["stage"][i]}) for i in range(count)]


def finished_episodes(infos: dict[str, Any]) -> Iterator[tuple[int, dict[str, float]]]:
    """Yields ``(env_index, stats)`` for every episode that ended at this vector step.

    ``stats`` has ``return`` and ``length`` and, where the env reports them, ``x_pos_max``,
    ``flag_get``, ``world`` and ``stage`` (Mario). Reads Gymnasium's dict-of-arrays ``final_info``
    with its ``_key`` masks.
    """
    final_info = infos.get("final_info")
    if not final_info or "_final_info" not in infos:
        return
    episode = final_info.get("episode")
    if episode is None:
        return
    for index in np.flatnonzero(infos["_final_info"]):
        if "_episode" in final_info and not final_info["_episode"][index]:
            continue
        stats = {"return": float(episode["r"][index]), "length": float(episode["l"][index])}
        for key in EPISODE_INFO_KEYS:
            if key in final_info and final_info.get(f"_{key}", np.ones(index + 1, bool))[index]:
                stats[key] = float(final_info[key][index])
        yield int(index), stats


def _window_mean(episodes: Iterable[dict[str, float]], key: str) -> float:
    """Mean of ``key`` over the episodes that have it; NaN when none has."""
    values = [stats[key] for stats in episodes if key in stats]
    return float(np.mean(values)) if values else math.nan


class EpisodeTracker:
    """Recent-episode windows for the progress bar and TensorBoard ``charts/``: one over all
    episodes, and one per stage for multi-stage Mario presets (so a rare stage keeps its own 100).

    Episodes that started part-way along a route (``route_starts``) or shortly before a recent death
    (``retry_prob``) have windows of their own (``route_starts``, ``retries``): a clear rate of the
    others means clears from the stage's start."""

    def __init__(self, window: int = 100) -> None:
        self.window = window
        self.recent: deque[dict[str, float]] = deque(maxlen=window)
        self.by_stage: dict[str, deque[dict[str, float]]] = {}
        self.route_starts: deque[dict[str, float]] = deque(maxlen=window)
        self.retries: deque[dict[str, float]] = deque(maxlen=window)
        self.count = 0
        self.route_start_count = 0
        self.retry_count = 0

    def add(self, stats: dict[str, float]) -> None:
        self.count += 1
        if stats.get("retry_start"):
            self.retries.append(stats)
            self.retry_count += 1
            return
        if stats.get("route_start"):
            self.route_starts.append(stats)
            self.route_start_count += 1
            return
        self.recent.append(stats)
        label = stage_label(stats)
        if label is not None:
            self.by_stage.setdefault(label, deque(maxlen=self.window)).append(stats)

    def mean(self, key: str, stage: str | None = None) -> float:
        """Mean of ``key`` over the recent episodes (of ``stage`` only, when given)."""
        return _window_mean(self.recent if stage is None else self.by_stage.get(stage, ()), key)

    def route_start_mean(self, key: str) -> float:
        """Mean of ``key`` over the recent episodes that started along a route."""
        return _window_mean(self.route_starts, key)

    def stage_means(self) -> dict[str, dict[str, float]]:
        """``{stage: {"clear_rate", "x_pos_max_mean", "episodes"}}`` when episodes span several stages."""
        if len(self.by_stage) < 2:
            return {}
        return {
            label: {
                "clear_rate": self.mean("flag_get", label),
                "x_pos_max_mean": self.mean("x_pos_max", label),
                "episodes": float(len(self.by_stage[label])),
            }
            for label in sorted(self.by_stage)
        }

    def state(self) -> dict[str, Any]:
        """For checkpoints: the count and the window, so that a resumed run's curves carry on."""
        return {
            "episodes": self.count,
            "route_start_episodes": self.route_start_count,
            "recent_route_starts": list(self.route_starts),
            "retry_episodes": self.retry_count,
            "recent_retries": list(self.retries),
            "recent_episodes": list(self.recent),
            "recent_by_stage": {label: list(window) for label, window in self.by_stage.items()},
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.count = int(state.get("episodes", 0))
        self.route_start_count = int(state.get("route_start_episodes", 0))
        self.route_starts.clear()
        self.route_starts.extend(dict(stats) for stats in state.get("recent_route_starts", []))
        self.retry_count = int(state.get("retry_episodes", 0))
        self.retries.clear()
        self.retries.extend(dict(stats) for stats in state.get("recent_retries", []))
        self.recent.clear()
        self.recent.extend(dict(stats) for stats in state.get("recent_episodes", []))
        self.by_stage = {
            label: deque((dict(stats) for stats in window), maxlen=self.window)
            for label, window in state.get("recent_by_stage", {}).items()
        }


def retry_scalars(episodes: EpisodeTracker) -> dict[str, float]:
    """How the retries of recent deaths went (``retry_prob``): their count, and the clear rate, the
    furthest x and the steps between hand-over and death of the recent ones (NaN before the first)."""
    return {
        "retries/episodes": float(episodes.retry_count),
        "retries/clear_rate": _window_mean(episodes.retries, "flag_get"),
        "retries/x_pos_max": _window_mean(episodes.retries, "x_pos_max"),
        "retries/steps_before_death": _window_mean(episodes.retries, "retry_start"),
    }


def route_start_scalars(episodes: EpisodeTracker) -> dict[str, float]:
    """How the episodes that started along a route went (``route_starts``): their count, and the clear
    rate and furthest x of the recent ones (NaN before the first)."""
    return {
        "route_starts/episodes": float(episodes.route_start_count),
        "route_starts/clear_rate": episodes.route_start_mean("flag_get"),
        "route_starts/x_pos_max": episodes.route_start_mean("x_pos_max"),
    }


#: Backward route starts (``route_start_schedule=backward``) move their window back once the last
#: FRONTIER_EPISODES episodes that started in it cleared the stage at least FRONTIER_CLEAR_RATE of the
#: time. Salimans and Chen (2018) move on at about that success rate: the part behind the window is
#: practised again by every start further back, so it need not be mastered first. The rule is asked
#: after every update, of overlapping windows, so luck passes it far more often than one draw of a
#: window suggests; 50 episodes (10 clears needed) keep a window that rarely clears in place.
FRONTIER_EPISODES = 50
FRONTIER_CLEAR_RATE = 0.2


def first_route_frontiers(lengths: dict[str, int], step: int, start_from: int = 0) -> dict[str, int]:
    """Where the backward schedule starts: ``step`` actions before each route's end (0 at least), or
    at action ``start_from`` when that is earlier (0: not given)."""
    return {
        label: max(0, min(length - step, start_from) if start_from else length - step)
        for label, length in lengths.items()
        if length > 0
    }


def fixed_route_frontiers(lengths: dict[str, int], start_from: int) -> dict[str, int]:
    """Where a fixed window (``route_start_schedule=window``) begins: at action ``start_from``, or one
    action before a shorter route's end."""
    return {label: max(0, min(length - 1, start_from)) for label, length in lengths.items() if length > 0}


def route_windows(
    frontiers: dict[str, int], lengths: dict[str, int], step: int
) -> dict[str, tuple[int, int]]:
    """``{stage: (low, high)}``: the route starts replay ``frontier <= n < frontier + step`` actions
    (never the whole route, whose last action ends the episode at the flag)."""
    return {label: (k, max(k + 1, min(k + step, lengths[label]))) for label, k in frontiers.items()}


def advance_route_frontiers(frontiers: dict[str, int], episodes: EpisodeTracker, step: int) -> dict[str, int]:
    """The frontiers after the recent route-start episodes: a stage's moves ``step`` actions back
    (to 0 at least) once its last :data:`FRONTIER_EPISODES` episodes started in its window cleared
    at least :data:`FRONTIER_CLEAR_RATE` of the time."""
    moved = dict(frontiers)
    for label, k in frontiers.items():
        started_there = [
            stats for stats in episodes.route_starts
            if stage_label(stats) == label and k <= stats["route_start"] < k + step
        ][-FRONTIER_EPISODES:]  # fmt: skip
        enough = k > 0 and len(started_there) == FRONTIER_EPISODES
        if enough and _window_mean(started_there, "flag_get") >= FRONTIER_CLEAR_RATE:
            moved[label] = max(0, k - step)
    return moved


def stage_scalars(episodes: EpisodeTracker) -> dict[str, float]:
    """``stages/<W-S>/clear_rate`` and ``stages/<W-S>/x_pos_max`` for multi-stage runs, else ``{}``."""
    scalars = {}
    for label, means in episodes.stage_means().items():
        scalars[f"stages/{label}/clear_rate"] = means["clear_rate"]
        scalars[f"stages/{label}/x_pos_max"] = means["x_pos_max_mean"]
    return scalars


def adaptive_stage_weights(stage_means: dict[str, dict[str, float]], floor: float = 0.1) -> dict[str, float]:
    """Stage weights for adaptive sampling: ``floor + 1 - clear_rate`` of each stage's recent episodes
    (:meth:`EpisodeTracker.stage_means`), so an unsolved stage is drawn up to 11 times as often as a
    mastered one, which is still played (and not forgotten). A stage without episodes yet weighs as
    an unsolved one."""
    return {
        label: floor + 1.0 - (0.0 if math.isnan(means["clear_rate"]) else means["clear_rate"])
        for label, means in stage_means.items()
    }


class Policy(Protocol):
    """What evaluation and video need from a trained agent."""

    def reset(self, num_envs: int) -> None: ...

    def act(self, obs: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Greedy actions for a batch of observations; ``starts[i]`` marks a new episode in env i."""
        ...


def evaluate(
    policy: Policy,
    make_vec_env: Callable[[int], Any],
    episodes: int,
    seed: int,
    max_envs: int = 8,
) -> dict[str, Any]:
    """Plays ``episodes`` greedy episodes and summarises them.

    Each env gets a fixed quota of episodes, so short episodes are not over-represented.

    Returns:
        ``episodes``, ``return_mean``, ``return_std``, ``length_mean`` and, for Mario,
        ``clear_rate`` and ``x_pos_mean``; plus the per-episode list under ``per_episode``.
    """
    num_envs = max(1, min(max_envs, episodes))
    quota = [episodes // num_envs + (1 if i < episodes % num_envs else 0) for i in range(num_envs)]
    env = make_vec_env(num_envs)
    results: list[dict[str, float]] = []
    try:
        obs, _ = env.reset(seed=seed)
        policy.reset(num_envs)
        starts = np.ones(num_envs, dtype=bool)
        done_count = [0] * num_envs
        while len(results) < episodes:
            actions, _ = policy.act(obs, starts)
            obs, _, terminations, truncations, infos = env.step(actions)
            starts = np.logical_or(terminations, truncations)
            for index, stats in finished_episodes(infos):
                if done_count[index] < quota[index]:
                    done_count[index] += 1
                    results.append(stats)
    finally:
        env.close()
    return summarize_episodes(results)


def evaluate_stages(
    policy: Policy,
    make_vec_env: Callable[[int, str], Any],
    stages: tuple[str, ...],
    episodes: int,
    seed: int,
    only: str | None = None,
) -> dict[str, Any]:
    """Plays ``episodes`` episodes on each stage of a multi-stage preset, one stage at a time, so every
    stage gets the same number (a random draw of stages would give some far fewer).

    Args:
        make_vec_env: ``(num_envs, stage) -> vector env`` playing only that stage.
        only: play this stage alone, with the seeds it gets among all (its rows of the full evaluation).

    Returns:
        The summary of all episodes (:func:`summarize_episodes`), whose ``stages`` holds each stage's.
    """
    results: list[dict[str, float]] = []
    for index, stage in enumerate(stages):
        if only is not None and stage != only:
            continue
        summary = evaluate(
            policy, lambda n, stage=stage: make_vec_env(n, stage), episodes, seed + 1000 * index
        )
        results += summary["per_episode"]
    return summarize_episodes(results)


def preset_stages(env: str) -> tuple[str, ...]:
    """The stages a multi-stage Mario preset draws from, e.g. ("1-1", ..., "1-4"); () for any other env."""
    stages = tuple(envs.resolve(env).env_kwargs.get("stages", ()))
    return stages if len(stages) > 1 else ()


def evaluate_preset(
    policy: Policy, env: str, episodes: int, seed: int, overrides: dict[str, Any], stage: str | None = None
) -> dict[str, Any]:
    """Greedy episodes of ``policy`` on the preset ``env`` with the env options ``overrides`` (the
    eval protocol): ``episodes`` in all, or, on a multi-stage preset, ``episodes`` on each stage in
    turn (:func:`evaluate_stages`), so the per-stage clear rates share one protocol; ``stage``
    alone when given (a multi-stage preset's)."""
    stages = preset_stages(env)
    if stages:
        return evaluate_stages(
            policy,
            lambda n, stage: envs.make_vec(env, n, seed=seed, stages=(stage,), **overrides),
            stages,
            episodes,
            seed,
            only=stage,
        )
    return evaluate(policy, lambda n: envs.make_vec(env, n, seed=seed, **overrides), episodes, seed)


class Demonstrations(NamedTuple):
    """Observations and the actions a route took on them, for behaviour cloning."""

    obs: np.ndarray  # (D, *obs_shape), the env's own dtype (uint8 frame stacks for Mario)
    actions: np.ndarray  # (D,) int64


def route_demonstrations(env: str, routes: dict[str, list[int]], overrides: dict[str, Any]) -> Demonstrations:
    """Replays each route from its stage's start in the preset ``env`` with the env options
    ``overrides`` (the training's action set; no sticky actions or no-ops, so the deterministic
    emulator plays the route as it was found) and records the observation each action was taken on.

    Raises:
        ValueError: a route whose episode ends before its last action without the flag (it was
            found with other env options, or for another stage).
    """
    observations, actions = [], []
    for label, route in routes.items():
        stage = {"stages": (label,)} if preset_stages(env) else {}
        environment = envs.make(env, **stage, **overrides)
        try:
            obs, _ = environment.reset(seed=0)
            for index, action in enumerate(route):
                observations.append(obs)
                actions.append(action)
                obs, _, terminated, truncated, info = environment.step(action)
                if terminated or truncated:
                    if not info.get("flag_get"):
                        raise ValueError(
                            f"the route of {label} loses its episode at action {index + 1} of {len(route)}; "
                            "it does not replay in this env (found with other env options?)"
                        )
                    break
        finally:
            environment.close()
    return Demonstrations(np.stack(observations), np.asarray(actions, dtype=np.int64))


def summarize_episodes(results: list[dict[str, float]]) -> dict[str, Any]:
    returns = np.array([r["return"] for r in results], dtype=np.float64)
    summary: dict[str, Any] = {
        "episodes": len(results),
        "return_mean": float(returns.mean()) if len(results) else math.nan,
        "return_std": float(returns.std()) if len(results) else math.nan,
        "length_mean": float(np.mean([r["length"] for r in results])) if results else math.nan,
    }
    if results and "flag_get" in results[0]:
        summary["clear_rate"] = float(np.mean([r.get("flag_get", 0.0) for r in results]))
        summary["x_pos_mean"] = float(np.mean([r.get("x_pos_max", 0.0) for r in results]))
        summary["stalled"] = int(sum(r.get("stalled", 0.0) for r in results))
    labels = sorted({label for label in map(stage_label, results) if label is not None})
    if len(labels) > 1:
        summary["stages"] = {}
        for label in labels:
            played = [r for r in results if stage_label(r) == label]
            summary["stages"][label] = {
                "episodes": len(played),
                "clear_rate": float(np.mean([r.get("flag_get", 0.0) for r in played])),
                "x_pos_mean": float(np.mean([r.get("x_pos_max", 0.0) for r in played])),
            }
    summary["per_episode"] = results
    return summary


def rate_interval(rate: float | None, episodes: int) -> tuple[float, float] | None:
    """The 95% Wilson score interval of a clear rate measured over ``episodes`` episodes (None when
    there is no rate). Wilson's interval stays inside [0, 1] and keeps its coverage near 0% and 100%,
    where the normal approximation does not."""
    if rate is None or episodes <= 0:
        return None
    from scipy.stats import binomtest

    interval = binomtest(round(rate * episodes), episodes).proportion_ci(0.95, method="wilson")
    return float(interval.low), float(interval.high)


def format_rate(rate: float | None, episodes: int, label: str = "") -> str:
    """``56% (42-69)``: a clear rate and its 95% interval in percent, the interval after ``label``
    (e.g. ``"95% CI "``); ``-`` without a rate."""
    interval = rate_interval(rate, episodes)
    if rate is None or interval is None:
        return "-"
    return f"{rate:.0%} ({label}{interval[0] * 100:.0f}-{interval[1] * 100:.0f})"


def eval_scalars(summary: dict[str, Any]) -> dict[str, float]:
    """``eval/`` TensorBoard scalars of an :func:`evaluate` summary."""
    scalars = {"eval/return_mean": summary["return_mean"], "eval/length_mean": summary["length_mean"]}
    if "clear_rate" in summary:
        scalars["eval/clear_rate"] = summary["clear_rate"]
        scalars["eval/x_pos_mean"] = summary["x_pos_mean"]
    for label, stage in summary.get("stages", {}).items():
        scalars[f"eval/stages/{label}/clear_rate"] = stage["clear_rate"]
        scalars[f"eval/stages/{label}/x_pos_mean"] = stage["x_pos_mean"]
    return scalars
