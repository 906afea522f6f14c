"""Which way does the discount point at a branch? Discounted returns along a found route and along a
greedy agent's own route, for several ``gamma``.

On 1-3 the agents run along the low tree tops into a dead end (x about 770), while the route that
reaches the flag turns back at x about 740 and climbs to the high ones (``envs/routes/1-3.json``).
This replays the route and one greedy episode of the agent (no sticky actions, no no-ops: the
emulator is then deterministic), with the preset's rewards as training sees them, and prints the
return ``G_t = sum_k gamma^k r_{t+k}`` of each at the route's turn (the step before its deepest walk
back) and of the agent where its x is nearest the route's there. If the agent's return is the larger
under the training's gamma, PPO has no reason to take the turn, whatever its exploration.

    python -m benchmarks.branch_returns runs/mario-world-1-training --preset mario-1-3 \\
        --route envs/routes/1-3.json --gammas 0.9,0.95,0.99 --json benchmarks/results/branch_returns.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from agents.ppo import compute_gae
from benchmarks.mario_jump_probe import AgentEpisode, agent_route, deterministic_env, play
from core.checkpoint import CheckpointError
from core.files import atomic_write_json
from envs.mario import load_stage_route


def discounted_returns(rewards: list[float], gamma: float) -> np.ndarray:
    """``G_t = r_t + gamma * G_{t+1}`` for every step, the episode's end counting as 0 after it: PPO's
    GAE with lambda 1 and every value 0 (one episode as a (T, 1) batch)."""
    column = torch.tensor(rewards, dtype=torch.float64).unsqueeze(1)
    zeros = torch.zeros_like(column)
    return compute_gae(column, zeros, zeros, torch.zeros(1, dtype=torch.float64), gamma, 1.0)[:, 0].numpy()


def replay(preset: str, actions: list[int]) -> AgentEpisode:
    """The route's actions from the stage's start, deterministically."""
    return play(deterministic_env(preset), lambda obs, step: actions[step], len(actions))


def turn_step(xs: list[int]) -> tuple[int, int]:
    """The route's turn: the step that reached the furthest x before its deepest walk back, and how
    many pixels back that walk goes."""
    furthest, furthest_step = -1, 0
    turn, deepest = 0, 0
    for step, x in enumerate(xs):
        if x > furthest:
            furthest, furthest_step = x, step
        elif furthest - x > deepest:
            turn, deepest = furthest_step, furthest - x
    return turn, deepest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run directory (or checkpoint) of the agent")
    parser.add_argument("--preset", default="mario-1-3", help="the stage's preset (default mario-1-3)")
    parser.add_argument("--route", default="envs/routes/1-3.json", help="a route file that reaches the flag")
    parser.add_argument("--gammas", default="0.9,0.95,0.99", help="discounts to compare, separated by commas")
    parser.add_argument(
        "--at",
        type=int,
        default=None,
        help="compare at this route step instead of the turn (e.g. a jump before it)",
    )
    parser.add_argument("--max-steps", type=int, default=3000, help="the greedy episode's step limit")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    try:
        gammas = [float(part) for part in args.gammas.split(",")]
    except ValueError:
        print(f"--gammas must be numbers separated by commas, got {args.gammas!r}", file=sys.stderr)
        return 2
    if not all(0 < gamma <= 1 for gamma in gammas):
        print(f"--gammas must lie in (0, 1], got {args.gammas!r}", file=sys.stderr)
        return 2
    try:
        _, actions = load_stage_route(args.route, args.preset)
        greedy = agent_route(args.run, args.preset, args.max_steps)
    except (ValueError, CheckpointError) as error:
        print(error, file=sys.stderr)
        return 2
    route = replay(args.preset, actions)
    turn, back = turn_step(route.xs)
    if back == 0:
        print("the route never walks back; nothing to compare", file=sys.stderr)
        return 2
    at = turn if args.at is None else args.at
    if not 0 <= at < len(route.xs):
        print(f"--at must be a step of the route, 0 to {len(route.xs) - 1}; got {args.at}", file=sys.stderr)
        return 2
    near = int(np.argmin([abs(x - route.xs[at]) for x in greedy.xs]))
    rows = []
    for gamma in gammas:
        along_route, along_agent = (
            discounted_returns(route.rewards, gamma),
            discounted_returns(greedy.rewards, gamma),
        )
        rows.append({"gamma": gamma, "route_return": round(float(along_route[at]), 2),
                     "agent_return": round(float(along_agent[near]), 2)})  # fmt: skip
    record = {
        "run": args.run, "preset": args.preset, "route": args.route,
        "route_steps": len(route.xs), "route_cleared": route.cleared, "turn_step": turn, "turn_x": route.xs[turn], "turn_back_pixels": back,
        "route_step_compared": at, "route_x_compared": route.xs[at],
        "agent_steps": len(greedy.xs), "agent_cleared": greedy.cleared, "agent_furthest_x": max(greedy.xs),
        "agent_step_compared": near, "agent_x_compared": greedy.xs[near], "returns": rows,
    }  # fmt: skip
    print(
        f"route: {record['route_steps']} steps, cleared {route.cleared}, turns back at step {turn} (x {route.xs[turn]}); "
        f"compared at step {at} (x {route.xs[at]})"
    )
    print(f"agent: {record['agent_steps']} steps, cleared {greedy.cleared}, furthest x {record['agent_furthest_x']}; "
          f"compared at step {near} (x {greedy.xs[near]})")  # fmt: skip
    print(f"{'gamma':>6} {'route G':>9} {'agent G':>9}  the larger")
    for row in rows:
        larger = "route" if row["route_return"] > row["agent_return"] else "agent"
        print(f"{row['gamma']:>6} {row['route_return']:>9.2f} {row['agent_return']:>9.2f}  {larger}")
    if args.json:
        atomic_write_json(args.json, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
