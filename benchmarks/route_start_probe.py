"""Where along a found route does an agent take over? Episodes started at single steps of the route.

Each episode replays the route's first ``K`` actions (deterministically: sticky actions off, as the
training's route starts do), then plays on with sticky actions and the agent's sampled actions
(``--greedy``: its greedy ones), and counts the episodes whose furthest x passes ``--past`` (by
default: that reach the flag). Run over several ``K`` it shows the last route step from which the
agent gets through and the first from which it does not: on 1-3 the agents pass the low route's dead
end (x 783) from route step 80 on, but not from 75, the jump up to the higher tree tops (issue 26).

``--route-actions`` plays the route's own remaining actions instead of an agent, open loop, with the
same sticky actions: whether the route itself holds up from ``K`` when the controls are sticky, i.e.
whether a failure there is the policy's or the stage's.

    python -m benchmarks.route_start_probe runs/mario-1-3-backward-training --at 70,75,80 --past 790
    python -m benchmarks.route_start_probe --route-actions --at 65,70,75 --past 790 --episodes 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

import agents
import envs
from agents.episodes import Policy
from core.checkpoint import CheckpointError
from core.files import atomic_write_json
from envs.mario import load_stage_route


class StartResult(NamedTuple):
    route_step: int
    route_x: int  # where the replayed prefix left Mario
    passed: int  # episodes whose furthest x reached ``past`` (or that cleared the stage)
    episodes: int
    furthest_xs: list[int]  # each episode's furthest x, sorted


def route_start_env(preset: str, stage: str, route: list[int], step: int, sticky: float) -> object:
    """The preset's env whose every episode starts after exactly ``step`` actions of the route (the
    training's :class:`envs.mario.RouteStarts`, window ``[step, step + 1)``), no no-op starts."""
    return envs.make(
        preset,
        sticky_prob=sticky,
        noop_max=0,
        route_starts={stage: route},
        route_start_prob=1.0,
        route_start_windows={stage: (step, step + 1)},
    )


def probe_start(
    env: object,
    route: list[int],
    step: int,
    episodes: int,
    horizon: int,
    past: int | None,
    policy: Policy | None,
) -> StartResult:
    """Plays ``episodes`` episodes (seeds 0..episodes-1) from route step ``step`` for at most
    ``horizon`` steps each: the policy's actions, or with ``policy`` None the route's own."""
    furthest_xs, passed, route_x = [], 0, 0
    for seed in range(episodes):
        obs, info = env.reset(seed=seed)
        route_x = int(info["x_pos"])
        furthest, cleared = route_x, False
        if policy is not None:
            policy.reset(1)
        for t in range(horizon):
            if policy is None:
                if step + t >= len(route):
                    break
                action = route[step + t]
            else:
                chosen, _ = policy.act(obs[None], np.array([t == 0]))
                action = int(chosen[0])
            obs, _, terminated, truncated, info = env.step(action)
            furthest = max(furthest, int(info["x_pos"]))
            if terminated or truncated:
                cleared = bool(info.get("flag_get"))
                break
        furthest_xs.append(furthest)
        passed += cleared if past is None else furthest >= past
    return StartResult(step, route_x, passed, episodes, sorted(furthest_xs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", help="a run directory (or checkpoint) of the agent")
    parser.add_argument("--route-actions", action="store_true", help="play the route's own actions, no agent")
    parser.add_argument("--preset", default="mario-1-3", help="the stage's preset (default mario-1-3)")
    parser.add_argument("--route", default="envs/routes/1-3.json", help="a route file of that stage")
    parser.add_argument("--at", default="70,75,80", help="route steps to start at, separated by commas")
    parser.add_argument("--episodes", type=int, default=6, help="episodes per start (default 6)")
    parser.add_argument(
        "--past", type=int, default=None, help="count episodes passing this x (default: clears)"
    )
    parser.add_argument("--horizon", type=int, default=400, help="steps per episode at most (default 400)")
    parser.add_argument("--sticky", type=float, default=0.25, help="sticky-action probability (default 0.25)")
    parser.add_argument(
        "--greedy", action="store_true", help="the agent's greedy actions instead of sampled ones"
    )
    parser.add_argument("--seed", type=int, default=0, help="the sampled actions' seed")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    if (args.run is None) == (not args.route_actions):
        print("give an agent's run directory or --route-actions (one of the two)", file=sys.stderr)
        return 2
    try:
        steps = [int(part) for part in args.at.split(",")]
    except ValueError:
        print(f"--at must be route steps separated by commas, got {args.at!r}", file=sys.stderr)
        return 2
    if args.episodes < 1 or args.horizon < 1:
        print(
            f"--episodes and --horizon must be at least 1, got {args.episodes} and {args.horizon}",
            file=sys.stderr,
        )
        return 2
    try:
        stage, route = load_stage_route(args.route, args.preset)
        if not all(0 <= step < len(route) for step in steps):
            print(f"--at must be route steps 0 to {len(route) - 1}, got {args.at!r}", file=sys.stderr)
            return 2
        policy = None
        if args.run is not None:
            policy = agents.load_agent(args.run, stochastic=not args.greedy, seed=args.seed).policy
        results = []
        for step in steps:
            env = route_start_env(args.preset, stage, route, step, args.sticky)
            results.append(probe_start(env, route, step, args.episodes, args.horizon, args.past, policy))
            env.close()
    except (ValueError, CheckpointError) as error:
        print(error, file=sys.stderr)
        return 2
    who = (
        "the route's own actions"
        if policy is None
        else f"{args.run} ({'greedy' if args.greedy else 'sampled'})"
    )
    goal = "clear" if args.past is None else f"pass x {args.past}"
    print(f"{who} from route steps of {args.route}, sticky {args.sticky}: episodes that {goal}")
    for result in results:
        print(
            f"  step {result.route_step:4d} (x {result.route_x:5d}): {result.passed}/{result.episodes}"
            f"   furthest x {result.furthest_xs}"
        )
    if args.json:
        record = {
            "run": args.run, "route_actions": args.route_actions, "preset": args.preset, "route": args.route,
            "sticky": args.sticky, "greedy": args.greedy, "past": args.past, "horizon": args.horizon,
            "starts": [result._asdict() for result in results],
        }  # fmt: skip
        atomic_write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
