"""How do an agent's greedy episodes end? The flag, a death, a stall (and whether A was held), the clock.

Plays greedy episodes of a run under the evaluation protocol (its preset's 0-30 no-ops and stall
cut-off, sticky actions ``--sticky``), one env at a time, and prints for each how it ended and where,
and for a stall the action it repeated and whether the game read the jump button (A) as held on its
last frame. Super Mario Bros. jumps on a new press of A only: a policy that stands against a step
choosing a jump action holds A and never jumps, and with unchanging frames a greedy policy chooses it
again until the cut-off (the stall that the ``mario-1-1-hud`` preset's corner block is there for).

    python -m benchmarks.greedy_failures runs/mario-world-1-training --stage 1-1 --episodes 20

``--frames DIR`` writes the screen on which each episode that missed the flag ended, as a PNG named by
its stage, seed, outcome and x (``1-4-seed1005-stall-x2270.png``): where a stall stood is easier seen
than read.

``--corner`` (PPO agents without memory, on a preset with the block): does the agent read the block?
Every observation of the episodes is given to the policy twice more, with the block drawn as "A held"
and as "A not held" in all stacked frames, and the probability of the actions that press A is
compared, over all steps and over the last steps of the stalls.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

import agents
import envs
from agents.ppo import action_distribution
from core.checkpoint import CheckpointError
from envs.mario import HELD_JUMP_BLOCK, jump_held, playing_emulator
from explain.render import save_png

# The last agent steps whose actions a stall report counts: the stall cut-off's patience (200).
STALL_WINDOW = 200


# The block's whole pixels once the corner is resized from 240x256 to 84x84 (12 pixels: 4.2 rows, 3.9
# columns, so 4 and 3).
BLOCK_ROWS, BLOCK_COLUMNS = HELD_JUMP_BLOCK * 84 // 240, HELD_JUMP_BLOCK * 84 // 256


class CornerReading(NamedTuple):
    """The policy's probability of pressing A, the block drawn as held and as not held."""

    steps: int
    jump_if_held: float  # mean P(an action with A) with the block white
    jump_if_not_held: float  # ... with the block black
    greedy_changed: float  # share of steps whose greedy action differs between the two


class Episode(NamedTuple):
    outcome: str  # "flag", "death", "stall" (cut for making no progress) or "timeout" (the step limit)
    x_pos: int
    steps: int
    repeated_action: str  # the most frequent action of the last STALL_WINDOW steps
    repeated_share: float
    a_held_at_end: bool


def play(agent: Any, env: Any, seed: int, action_names: list[str], seen: list | None = None) -> Episode:
    """One greedy episode from ``env.reset(seed=seed)``; ``seen`` gets its observations when given."""
    obs, _ = env.reset(seed=seed)
    agent.policy.reset(1)
    first = np.ones(1, dtype=bool)
    actions: list[int] = []
    while True:
        if seen is not None:
            seen.append(obs)
        chosen, _ = agent.policy.act(obs[None], first)
        first[:] = False
        actions.append(int(chosen[0]))
        obs, _, terminated, truncated, info = env.step(actions[-1])
        if terminated or truncated:
            break
    if info.get("flag_get"):
        outcome = "flag"
    elif truncated:
        outcome = "stall" if info.get("stalled") else "timeout"
    else:
        outcome = "death"
    action, count = collections.Counter(actions[-STALL_WINDOW:]).most_common(1)[0]
    held = jump_held(playing_emulator(env))
    window = min(len(actions), STALL_WINDOW)
    return Episode(
        outcome, int(info.get("x_pos", 0)), len(actions), action_names[action], count / window, held
    )


def write_screen(env: Any, path: Path) -> None:
    """Writes the env's current screen (an ``rgb_array`` env's full-resolution frame) as a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(env.render(), path)


@torch.no_grad()
def read_corner(network: torch.nn.Module, observations: np.ndarray, action_names: list[str]) -> CornerReading:
    """:class:`CornerReading` of a PPO network (no memory) over ``observations`` (N, 4, 84, 84) uint8."""
    jumps = torch.tensor(["A" in name.split() for name in action_names])
    probabilities, greedy = [], []
    for shown in (255, 0):
        frames = torch.as_tensor(observations).clone()
        frames[:, :, :BLOCK_ROWS, :BLOCK_COLUMNS] = shown
        logits = torch.cat([network(batch[None], None, torch.ones(1, len(batch), dtype=torch.bool))[0][0]
                            for batch in frames.split(256)])  # fmt: skip
        probabilities.append(action_distribution(logits).probs[:, jumps].sum(dim=1))
        greedy.append(logits.argmax(dim=1))
    return CornerReading(
        len(observations), float(probabilities[0].mean()), float(probabilities[1].mean()),
        float((greedy[0] != greedy[1]).float().mean()),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run directory or checkpoint")
    parser.add_argument("--stage", default=None, help="a multi-stage run's stage to play, e.g. 1-1")
    parser.add_argument("--episodes", type=int, default=20, help="greedy episodes (default 20)")
    parser.add_argument("--sticky", type=float, default=0.25, help="sticky-action probability (default 0.25)")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the first episode (default 1000)")
    parser.add_argument(
        "--corner", action="store_true", help="also measure how the held-jump block sways the policy (PPO)"
    )
    parser.add_argument(
        "--frames",
        type=Path,
        default=None,
        metavar="DIR",
        help="write the last screen of each failure as a PNG",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON summary as the last line")
    args = parser.parse_args(argv)
    if args.episodes < 1 or not 0.0 <= args.sticky < 1.0:
        parser.exit(
            2,
            f"greedy_failures: --episodes must be >= 1 and --sticky in [0, 1), got {args.episodes} and {args.sticky}\n",
        )
    try:
        agent = agents.load_agent(args.run, device="cpu")
    except (CheckpointError, ValueError) as error:  # no such run, not an agent
        parser.exit(2, f"greedy_failures: {error}\n")
    preset = agent.config.env
    spec = envs.resolve(preset)
    if spec.kind != "mario":
        parser.exit(
            2, f"greedy_failures: {args.run} trained {preset!r}; this probe plays Mario presets only\n"
        )
    if args.corner and not (
        spec.env_kwargs.get("show_held_jump") and getattr(agent.config, "memory", None) == "none"
    ):
        parser.exit(
            2, f"greedy_failures: --corner needs a PPO agent without memory on a preset with the held-jump block "
            f"(e.g. mario-1-1-hud); {args.run} trained {preset!r}\n",
        )  # fmt: skip
    stages = {"stages": (args.stage,)} if args.stage else {}
    try:
        render = {"render_mode": "rgb_array"} if args.frames else {}
        env = envs.make(
            preset, **{**envs.eval_overrides(preset), "sticky_prob": args.sticky, **stages, **render}
        )
    except ValueError as error:  # a stage that is not Super Mario Bros.'s
        parser.exit(2, f"greedy_failures: {error}\n")
    action_names = list(env.get_wrapper_attr("action_names"))
    results, seen, stalled = [], [], []
    for episode in range(args.episodes):
        start = len(seen)
        result = play(agent, env, args.seed + episode, action_names, seen if args.corner else None)
        results.append(result)
        if args.corner and result.outcome == "stall":
            stalled.extend(seen[max(start, len(seen) - STALL_WINDOW) :])
        if args.frames and result.outcome != "flag":
            name = f"{args.stage or preset}-seed{args.seed + episode}-{result.outcome}-x{result.x_pos}.png"
            write_screen(env, args.frames / name)
        held = (
            f", A held at the end: {'yes' if result.a_held_at_end else 'no'}"
            if result.outcome == "stall"
            else ""
        )
        print(
            f"episode {episode:3d}: {result.outcome:7s} at x {result.x_pos:5d} after {result.steps:4d} steps; "
            f"last {STALL_WINDOW} steps {result.repeated_share:4.0%} {result.repeated_action!r}{held}",
            flush=True,
        )
    env.close()
    counts = collections.Counter(result.outcome for result in results)
    stalls = [result for result in results if result.outcome == "stall"]
    held_stalls = sum(result.a_held_at_end for result in stalls)
    print(
        f"{args.episodes} episodes: {counts['flag']} flags, {counts['death']} deaths, {counts['timeout']} "
        f"time-outs, {counts['stall']} stalls ({held_stalls} of them with A held)"
    )
    readings = {}
    if args.corner:
        network = agent.policy.agent
        readings = {"all_steps": read_corner(network, np.stack(seen), action_names)}
        if stalled:
            readings["stalls"] = read_corner(network, np.stack(stalled), action_names)
        for name, reading in readings.items():
            print(
                f"block ({name.replace('_', ' ')}, {reading.steps} steps): P(an action with A) "
                f"{reading.jump_if_held:.3f} if shown held, {reading.jump_if_not_held:.3f} if not; "
                f"greedy action changed on {reading.greedy_changed:.1%} of the steps"
            )
    if args.json:
        summary = {
            "run": args.run, "preset": preset, "stage": args.stage, "sticky": args.sticky, "seed": args.seed,
            "episodes": args.episodes, "flags": counts["flag"], "deaths": counts["death"],
            "timeouts": counts["timeout"], "stalls": counts["stall"], "stalls_with_a_held": held_stalls,
            "per_episode": [result._asdict() for result in results],
            "corner": {name: reading._asdict() for name, reading in readings.items()},
        }  # fmt: skip
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
