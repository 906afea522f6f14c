"""The comparison table of ``lab eval RUN RUN ...`` and ``lab compress --json``: any runs side by side.

Per run: parameters (and how many are not zero), bytes of its weights on disk, batch-1 CPU latency,
the greedy clear rate (return elsewhere) over ``episodes`` episodes with the evaluation protocol's
randomised starts, and the clear rate with sticky actions over ``sticky_episodes`` episodes (Mario).
On a multi-stage preset (World 1) the counts are per stage, each stage played in turn as ``lab eval``
plays them, and every row holds each stage's clear rates beside the overall one.

Latency is measured honestly for a shared machine: one torch thread, inference mode, one real
observation in and one action out through the policy's own ``act`` (conversion and argmax
included), warm-up calls first, and the runs interleaved in short blocks in turn, so that load
from other processes hits every run alike; the table gives the median of all timed calls, the JSON
the 10th and 90th percentiles too. Every run plays the same seeds, so the rates are paired.
Each clear rate comes with its 95% Wilson score interval: 50 episodes leave about +-13 points, so
two runs a few points apart are not told apart by one table.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import safetensors
import safetensors.torch
import torch

import envs
from agents import LoadedAgent, load_agent
from agents.episodes import evaluate_preset, format_rate, preset_stages, rate_interval
from compress.agents import agent_network, model_state
from compress.measure import count_parameters
from core.checkpoint import read_sidecar


class Latency(NamedTuple):
    """Batch-1 latency of one run, milliseconds over ``calls`` timed calls."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    calls: int


@dataclass(frozen=True)
class ComparisonRow:
    """One run in the comparison table.

    Attributes:
        run: The path as given.
        method: ``trained`` for an ordinary run, else the compression: ``distil (nature-tiny)``,
            ``prune 90%``, ``prune channels (nature-half)``, ``int8``.
        algo: ppo or dqn.
        parameters: Weights and biases of the network (int8 ones included).
        nonzero_parameters: Of those, not exactly zero (what a sparse format would store).
        bytes_on_disk: The checkpoint's weights file, when it holds the model only; else the size the
            model's tensors take in safetensors (a training checkpoint also holds optimizer state).
        latency: Batch-1 CPU latency of ``act`` on one thread.
        episodes: Greedy episodes with randomised starts.
        return_mean: Their mean return (game units).
        clear_rate: Their share of flags reached (Mario), else None.
        sticky_episodes: Episodes with sticky actions (Mario; 0 elsewhere).
        sticky_return_mean: Their mean return, or None.
        sticky_clear_rate: Their clear rate, or None.
        stage_clear_rates: On a multi-stage preset, each stage's greedy clear rate (``episodes`` a
            stage); else empty.
        sticky_stage_clear_rates: The same with sticky actions (``sticky_episodes`` a stage).
    """

    run: str
    method: str
    algo: str
    parameters: int
    nonzero_parameters: int
    bytes_on_disk: int
    latency: Latency
    episodes: int
    return_mean: float
    clear_rate: float | None
    sticky_episodes: int
    sticky_return_mean: float | None
    sticky_clear_rate: float | None
    stage_clear_rates: dict[str, float] = field(default_factory=dict)
    sticky_stage_clear_rates: dict[str, float] = field(default_factory=dict)


def stage_rates(summary: dict[str, Any] | None) -> dict[str, float]:
    """Each stage's clear rate in an evaluation summary of a multi-stage preset ({} otherwise)."""
    stages = (summary or {}).get("stages", {})
    return {label: stage["clear_rate"] for label, stage in stages.items()}


class Protocol(NamedTuple):
    """How the table was measured (printed with it and kept in its JSON)."""

    episodes: int
    sticky_episodes: int
    sticky_prob: float
    seed: int
    randomised_start: dict[str, Any]
    actions: str
    latency_calls: int
    threads: int
    stages: tuple[str, ...] = ()  # a multi-stage preset's stages: the episode counts are per stage


def describe_method(meta: dict[str, Any]) -> str:
    """A run's compression in a few words, from its checkpoint meta (``trained`` for none)."""
    record = meta.get("compression")
    if meta.get("quantization") == "int8":
        return "int8"
    if not record:
        return "trained"
    net = meta.get("config", {}).get("net", "?")
    if record["method"] == "prune" and record.get("structured"):
        return f"prune channels ({net})"
    if record["method"] == "prune":
        return f"prune {record.get('sparsity', 0.0):.0%}"
    return f"{record['method']} ({net})"


def weights_bytes(agent: LoadedAgent) -> int:
    """Bytes of the model's weights on disk (see ``ComparisonRow.bytes_on_disk``)."""
    sidecar = read_sidecar(agent.sidecar)
    path = agent.sidecar.with_name(sidecar["weights_file"])
    with safetensors.safe_open(path, "pt") as weights:
        model_only = all(key.startswith("model/") for key in weights.keys())  # noqa: SIM118
    if model_only:
        return path.stat().st_size
    return len(safetensors.torch.save(model_state(agent_network(agent))))


def interleaved_latency(
    calls: dict[str, Callable[[], Any]], total: int = 600, block: int = 20, warmup: int = 30
) -> dict[str, Latency]:
    """Times each function ``total`` times on one torch thread, in blocks of ``block`` taken in turn.

    Interleaving spreads the load of other processes evenly over the functions; the order of the
    functions rotates every round so that none always runs first.
    """
    if total < 1 or block < 1 or warmup < 0:
        raise ValueError(f"total and block must be >= 1 and warmup >= 0, got {total}, {block}, {warmup}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    try:
        with torch.inference_mode():
            for name in names:
                for _ in range(warmup):
                    calls[name]()
            for round_index in range(-(-total // block)):
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    function = calls[name]
                    for _ in range(min(block, total - len(times[name]))):
                        start = time.perf_counter()
                        function()
                        times[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    result = {}
    for name, values in times.items():
        ms = np.asarray(values) * 1e3
        result[name] = Latency(
            statistics.median(ms), float(np.percentile(ms, 10)), float(np.percentile(ms, 90)), len(ms)
        )
    return result


def compare_runs(
    paths: Sequence[str | Path],
    episodes: int = 20,
    sticky_episodes: int = 50,
    sticky_prob: float = 0.25,
    seed: int = 12345,
    latency_calls: int = 600,
    deterministic_start: bool = False,
    stochastic: bool = False,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> tuple[list[ComparisonRow], Protocol]:
    """Measures every run under the same protocol, in one process, and returns the rows in order.

    Args:
        paths: runs, checkpoint folders or checkpoint files (``agents.load_agent``); all of one env.
        episodes: greedy episodes with the preset's randomised starts.
        sticky_episodes: episodes with sticky actions (Mario presets; ignored elsewhere).
        sticky_prob: the sticky actions' probability (ALE v5: 0.25).
        seed: seed of the eval envs (the same for every run).
        latency_calls: timed batch-1 calls per run.
        deterministic_start: no randomised starts (no-ops) in the greedy protocol.
        stochastic: sample actions (see ``lab eval --stochastic``) in both protocols.
        device: where the episodes run (latency is always CPU).
        progress: called with a line of text as each measurement ends.

    Raises:
        ValueError: runs of different envs, or no run.
        CheckpointError: a path that is not a loadable agent.
    """
    if not paths:
        raise ValueError("compare_runs needs at least one run")
    agents = [load_agent(path, device, stochastic, seed) for path in paths]
    env_names = sorted({agent.config.env for agent in agents})
    if len(env_names) > 1:
        raise ValueError(f"the runs play different envs ({', '.join(env_names)}); compare runs of one env")
    env_name = env_names[0]
    mario = envs.resolve(env_name).kind == "mario"
    # Mario's emulator dominates an episode's cost: its envs step in worker processes beside the policy.
    backend = {"backend": "async"} if mario else {}
    greedy_overrides = {} if deterministic_start else envs.eval_overrides(env_name)
    sticky_overrides = {**envs.eval_overrides(env_name), "sticky_prob": sticky_prob}
    say = progress or (lambda _: None)

    # Latency first, on CPU copies, before the episodes warm other caches.
    cpu_agents = agents if device == "cpu" else [load_agent(path, "cpu") for path in paths]
    probe = envs.make(env_name)
    try:
        obs, _ = probe.reset(seed=seed)
    finally:
        probe.close()
    batch = np.asarray(obs)[None]  # (1, *obs_shape)
    starts = np.zeros(1, dtype=bool)
    for agent in cpu_agents:
        agent.policy.reset(1)
    latency = interleaved_latency(
        {str(i): (lambda a=agent: a.policy.act(batch, starts)) for i, agent in enumerate(cpu_agents)},
        total=latency_calls,
    )
    say("latency: " + ", ".join(f"{paths[int(i)]} {value.median_ms:.3f} ms" for i, value in latency.items()))

    rows = []
    for index, (path, agent) in enumerate(zip(paths, agents, strict=True)):
        # Per stage on a multi-stage preset (episodes on each in turn), as `lab eval` plays it.
        greedy = evaluate_preset(agent.policy, env_name, episodes, seed, {**backend, **greedy_overrides})
        sticky = None
        if mario and sticky_episodes > 0:
            sticky = evaluate_preset(
                agent.policy, env_name, sticky_episodes, seed, {**backend, **sticky_overrides}
            )
        counts = count_parameters(agent_network(agent))
        row = ComparisonRow(
            run=str(path),
            method=describe_method(agent.meta),
            algo=agent.meta["algo"],
            parameters=counts.total,
            nonzero_parameters=counts.nonzero,
            bytes_on_disk=weights_bytes(agent),
            latency=latency[str(index)],
            episodes=greedy["episodes"],
            return_mean=greedy["return_mean"],
            clear_rate=greedy.get("clear_rate"),
            sticky_episodes=0 if sticky is None else sticky["episodes"],
            sticky_return_mean=None if sticky is None else sticky["return_mean"],
            sticky_clear_rate=None if sticky is None else sticky.get("clear_rate"),
            stage_clear_rates=stage_rates(greedy),
            sticky_stage_clear_rates=stage_rates(sticky),
        )
        rows.append(row)
        say(format_row(row))
    protocol = Protocol(
        episodes=episodes,
        sticky_episodes=sticky_episodes if mario else 0,
        sticky_prob=sticky_prob,
        seed=seed,
        randomised_start=greedy_overrides,
        actions="sampled" if stochastic else "greedy",
        latency_calls=latency_calls,
        threads=1,
        stages=preset_stages(env_name),
    )
    return rows, protocol


def format_row(row: ComparisonRow) -> str:
    """One run in one line, for progress output."""
    text = (
        f"{row.run}: {row.method}, {row.parameters:,} parameters ({row.nonzero_parameters:,} non-zero), "
        f"{row.bytes_on_disk:,} bytes, {row.latency.median_ms:.3f} ms, return {row.return_mean:.1f}"
    )
    if row.clear_rate is not None:
        text += f", clears {row.clear_rate:.0%} of {row.episodes}"
    if row.sticky_clear_rate is not None:
        text += f", sticky {row.sticky_clear_rate:.0%} of {row.sticky_episodes}"
    if row.stage_clear_rates:
        text += f" (per stage: {per_stage(row)})"
    return text


def per_stage(row: ComparisonRow) -> str:
    """Each stage's clear rates, greedy then sticky: ``1-1 90/84%, 1-2 30/40%, ...``."""
    return ", ".join(
        f"{label} {rate:.0%}" if label not in row.sticky_stage_clear_rates
        else f"{label} {rate:.0%}/{row.sticky_stage_clear_rates[label]:.0%}"
        for label, rate in row.stage_clear_rates.items()
    )  # fmt: skip


def format_comparison(rows: Sequence[ComparisonRow], protocol: Protocol) -> str:
    """The rows as a Markdown table; ratios are against the first row, missing values show as "-"."""
    first = rows[0]
    mario = any(row.clear_rate is not None for row in rows)
    header = ["run", "method", "parameters", "non-zero", "bytes on disk", "latency ms"]
    each = " a stage" if protocol.stages else ""
    if mario:
        header += [
            f"clear rate ({protocol.episodes}{each}), 95% CI",
            f"sticky {protocol.sticky_prob:g} ({protocol.sticky_episodes}{each}), 95% CI",
        ]
        if protocol.stages:
            header.append("per stage: clear / sticky")
    header += [f"return ({protocol.episodes}{each})"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]

    def ratio(value: int, reference: int, fewer: str, more: str) -> str:
        if value == reference or value == 0:
            return ""
        return (
            f" ({reference / value:.1f}x {fewer})"
            if value < reference
            else f" ({value / reference:.1f}x {more})"
        )

    for row in rows:
        cells = [
            row.run,
            row.method,
            f"{row.parameters:,}{ratio(row.parameters, first.parameters, 'fewer', 'more')}",
            f"{row.nonzero_parameters:,}",
            f"{row.bytes_on_disk:,}{ratio(row.bytes_on_disk, first.bytes_on_disk, 'smaller', 'larger')}",
            f"{row.latency.median_ms:.3f}",
        ]
        if mario:
            cells += [
                format_rate(row.clear_rate, row.episodes),
                format_rate(row.sticky_clear_rate, row.sticky_episodes),
            ]
            if protocol.stages:
                cells.append(per_stage(row))
        cells.append(f"{row.return_mean:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_json(rows: Sequence[ComparisonRow], protocol: Protocol) -> dict[str, Any]:
    """The table as JSON: ``{"protocol": {...}, "rows": [{...}, ...]}``."""
    return {
        "protocol": protocol._asdict(),
        "rows": [
            {
                **{k: v for k, v in row.__dict__.items() if k != "latency"},
                "latency_ms": row.latency.median_ms,
                "latency_p10_ms": row.latency.p10_ms,
                "latency_p90_ms": row.latency.p90_ms,
                "latency_calls": row.latency.calls,
                "clear_rate_95ci": rate_interval(row.clear_rate, row.episodes),
                "sticky_clear_rate_95ci": rate_interval(row.sticky_clear_rate, row.sticky_episodes),
            }
            for row in rows
        ],
    }
