"""Is a Mario agent's dead end a missed jump, or the wrong route? A brute-force probe.

Plays one greedy episode of an agent without sticky actions or no-op starts (the emulator is then
deterministic), then replays its first ``k`` actions for every ``k`` of its route and from there
tries every scripted jump: release A for a step while running, hold right+A+B for 2..12 steps, then
go on with right+B, right or no-op. Prints the furthest x any of them reached. If no jump from
anywhere on the agent's route gets further than the agent, the route itself is the dead end (issue
26: the 1-3 agents run along the low platforms, from which the tall tree at x 783 is out of reach).

    python -m benchmarks.mario_jump_probe runs/ft-1-3 --preset mario-1-3
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

import agents
import envs
from core.checkpoint import CheckpointError

# SIMPLE_MOVEMENT indices: the probe's jumps are built from these.
NOOP, RIGHT, RIGHT_A, RIGHT_B, RIGHT_A_B = 0, 1, 2, 3, 4
HOLDS = (2, 4, 6, 8, 10, 12)
AFTERS = (RIGHT_B, RIGHT, NOOP)


class Jump(NamedTuple):
    furthest_x: int
    takeoff_step: int
    hold_steps: int
    then_action: int


def deterministic_env(preset: str, **overrides: Any) -> Any:
    """The preset's eval env without sticky actions, no-op starts or stall cut-off: the emulator then
    replays an action sequence exactly (``overrides``: other ``envs.make`` options)."""
    return envs.make(
        preset, **{**envs.eval_overrides(preset), "noop_max": 0, "stall_patience": 0, **overrides}
    )


class AgentEpisode(NamedTuple):
    actions: list[int]
    rewards: list[float]  # the preset's (scaled) reward of each step, as training sees it
    xs: list[int]  # x_pos after each step
    cleared: bool


def play(env: Any, choose: Callable[[np.ndarray, int], int], max_steps: int) -> AgentEpisode:
    """One episode from ``env``'s reset (seed 1), ``choose(observation, step)`` giving each action;
    closes ``env``."""
    obs, _ = env.reset(seed=1)
    episode = AgentEpisode([], [], [], False)
    for step in range(max_steps):
        action = choose(obs, step)
        obs, reward, terminated, truncated, info = env.step(action)
        episode.actions.append(action)
        episode.rewards.append(float(reward))
        episode.xs.append(int(info["x_pos"]))
        if terminated or truncated:
            episode = episode._replace(cleared=bool(info.get("flag_get")))
            break
    env.close()
    return episode


def agent_route(run: str, preset: str, max_steps: int) -> AgentEpisode:
    """The greedy agent's actions, rewards and x positions in one deterministic episode."""
    policy = agents.load_agent(run).policy
    policy.reset(1)

    def greedy(obs: np.ndarray, step: int) -> int:
        action, _ = policy.act(obs[None], np.array([step == 0]))
        return int(action[0])

    return play(deterministic_env(preset), greedy, max_steps)


def try_jumps(
    preset: str,
    route: list[int],
    first_takeoff: int,
    holds: tuple[int, ...] = HOLDS,
    afters: tuple[int, ...] = AFTERS,
) -> list[Jump]:
    """Every scripted jump from every step of the route from ``first_takeoff`` on, best first."""
    env = deterministic_env(preset)
    jumps = []
    for takeoff, hold, after in itertools.product(range(first_takeoff, len(route)), holds, afters):
        env.reset(seed=1)
        for action in route[:takeoff]:
            env.step(action)
        furthest = 0
        for action in [RIGHT_B] + [RIGHT_A_B] * hold + [after] * 40:
            _, _, terminated, truncated, info = env.step(action)
            furthest = max(furthest, int(info["x_pos"]))
            if terminated or truncated:
                break
        jumps.append(Jump(furthest, takeoff, hold, after))
    env.close()
    return sorted(jumps, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="the agent's run directory")
    parser.add_argument("--preset", default="mario-1-3", help="a one-stage Mario preset (default mario-1-3)")
    parser.add_argument("--last", type=int, default=45, help="try takeoffs from this many final steps (45)")
    parser.add_argument("--max-steps", type=int, default=3000, help="cut the agent's episode here")
    args = parser.parse_args()
    try:
        actions, _, xs, cleared = agent_route(args.run, args.preset, args.max_steps)
    except (CheckpointError, ValueError) as error:  # no such run, not an agent, unknown preset
        parser.exit(2, f"mario_jump_probe: {error}\n")
    print(f"agent: {len(actions)} steps, furthest x {max(xs)}, {'cleared' if cleared else 'died or stopped'}")
    jumps = try_jumps(args.preset, actions, max(0, len(actions) - args.last))
    print(f"{len(jumps)} scripted jumps; the best five (furthest x, takeoff step, steps of A held, then):")
    for jump in jumps[:5]:
        print(
            f"  {jump.furthest_x:5d}  step {jump.takeoff_step:4d}  hold {jump.hold_steps:2d}  then {jump.then_action}"
        )
    verdict = (
        "no jump gets further: the route is the dead end"
        if jumps[0].furthest_x <= max(xs)
        else "a jump helps"
    )
    print(verdict)


if __name__ == "__main__":
    main()
