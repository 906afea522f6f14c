"""Finds a route through a Mario stage without a trained agent: a small Go-Explore (Ecoffet et al. 2021).

The emulator is deterministic without sticky actions, so an action sequence is a saved state. The
search keeps an archive of cells (Mario's x in 32-pixel columns, his height in 16-pixel rows), each
with the shortest sequence that reached it and the emulator's snapshot at its end; it picks a cell
(the less often picked and the nearer the furthest x, the likelier), loads its snapshot and explores
from there with random held actions, and adds every new cell.
Height in the cell is what finds 1-3's high route: the progress reward alone leads to the low tree
tops and a tree that cannot be climbed from them (``benchmarks/mario_jump_probe.py``).

It writes a route file for ``lab train ... --set route_starts=FILE``: the sequence to the stage's
flag when it found one, else to its furthest cell.

    python -m benchmarks.mario_route_search mario-1-3 --out routes/1-3.json
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path
from typing import Any, NamedTuple

from tqdm.auto import tqdm

import envs
from benchmarks.mario_jump_probe import deterministic_env
from core.files import atomic_write_json
from envs.mario import stage_of

# SIMPLE_MOVEMENT indices the exploration draws from (right-heavy, as a player would).
EXPLORE_ACTIONS = (1, 2, 3, 4, 4, 3, 5, 0, 6)
MAX_HOLD = 8  # agent steps an explored action is held
MAX_MOVES = 8  # held actions per exploration
FRONT = 256  # cells this close to the furthest x are picked four times as often


class Cell(NamedTuple):
    actions: list[int]
    x: int
    # nes-py's snapshot of the emulator after ``actions``: a try starts from it instead of replaying
    # the sequence from the stage's start, which took most of a try's time once routes grew long.
    snapshot: Any


def cell_key(info: dict[str, Any]) -> tuple[int, int]:
    return int(info["x_pos"]) // 32, int(info["y_pos"]) // 16


def make_search_env(preset: str) -> Any:
    """The preset's deterministic env at native resolution, one frame (the search never looks at it)."""
    return deterministic_env(preset, resize=None, frame_stack=1)


def search(preset: str, iterations: int, seed: int) -> tuple[list[int], int, bool]:
    """Returns the best route found (to the flag, else to the furthest cell), its furthest x, cleared?"""
    env, rng = make_search_env(preset), random.Random(seed)
    emulator = env.unwrapped
    env.reset(seed=seed)
    _, _, _, _, info = env.step(0)
    archive = {cell_key(info): Cell([0], int(info["x_pos"]), emulator.dump_state())}
    picked: dict[tuple[int, int], int] = {}
    progress = tqdm(range(iterations), desc=f"route search on {preset}", unit="try", file=sys.stderr)
    for _ in progress:
        keys = list(archive)
        front = max(cell.x for cell in archive.values()) - FRONT
        weights = [1 / math.sqrt(picked.get(k, 0) + 1) * (1 + 3 * (archive[k].x >= front)) for k in keys]
        key = rng.choices(keys, weights)[0]
        picked[key] = picked.get(key, 0) + 1
        actions = list(archive[key].actions)
        env.reset(seed=seed)  # the wrappers' state; the emulator's comes from the snapshot
        emulator.load_state(archive[key].snapshot)
        ended = False
        for _ in range(rng.randint(1, MAX_MOVES)):
            action = rng.choice(EXPLORE_ACTIONS)
            for _ in range(rng.randint(1, MAX_HOLD)):
                _, _, terminated, truncated, info = env.step(action)
                actions.append(action)
                if terminated or truncated:
                    ended = True
                    break
            if ended:
                if info.get("flag_get"):
                    env.close()
                    return actions, int(info["x_pos"]), True
                break
            new = cell_key(info)
            if new not in archive or len(actions) < len(archive[new].actions):
                archive[new] = Cell(list(actions), int(info["x_pos"]), emulator.dump_state())
        progress.set_postfix(cells=len(archive), furthest_x=max(cell.x for cell in archive.values()))
    env.close()
    furthest = max(archive.values(), key=lambda cell: cell.x)
    return furthest.actions, furthest.x, False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", help="a one-stage Mario preset, e.g. mario-1-3")
    parser.add_argument("--out", required=True, help="route file to write (JSON)")
    parser.add_argument("--iterations", type=int, default=5000, help="explorations (5000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        preset = envs.resolve(args.preset)
    except ValueError as error:
        parser.exit(2, f"mario_route_search: {error}\n")
    stage = stage_of(preset.env_id) if preset.kind == "mario" else None
    if stage is None:
        parser.exit(
            2, f"mario_route_search: {args.preset!r} is not a one-stage Mario preset, e.g. mario-1-3\n"
        )
    route, furthest_x, cleared = search(args.preset, args.iterations, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.out), {"actions": preset.action_set, "routes": {stage: route}})
    print(
        f"{stage}: {'cleared' if cleared else 'no clear'}, furthest x {furthest_x}, {len(route)} actions -> {args.out}"
    )


if __name__ == "__main__":
    main()
