"""Finds a route through a Mario stage without a trained agent: a small Go-Explore (Ecoffet et al. 2021).

The emulator is deterministic without sticky actions, so an action sequence is a saved state. The
search keeps an archive of cells (Mario's x in 32-pixel columns, his height in 16-pixel rows), each
with the shortest sequence that reached it and the emulator's snapshot at its end; it picks a cell
(the less often picked and the nearer the furthest x, the likelier), loads its snapshot and explores
from there with random held actions, and adds every new cell.
Height in the cell is what finds 1-3's high route: the progress reward alone leads to the low tree
tops and a tree that cannot be climbed from them (``benchmarks/mario_jump_probe.py``).

It writes a route file for ``lab train ... --set route_starts=FILE`` (or ``imitate=FILE``): the
sequence to the stage's flag when it found one, else to its furthest cell. A found route keeps the
search's detours (random held actions, steps back); ``--shorten`` cuts every stretch of it whose
removal still gets there (:func:`shorten`), for a route found now or one read with ``--route``:

    python -m benchmarks.mario_route_search mario-1-3 --out routes/1-3.json
    python -m benchmarks.mario_route_search mario-1-1 --route envs/routes/1-1.json --shorten --out 1-1-short.json
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
from envs.mario import load_route_file, stage_of

# SIMPLE_MOVEMENT indices the exploration draws from (right-heavy, as a player would).
EXPLORE_ACTIONS = (1, 2, 3, 4, 4, 3, 5, 0, 6)
MAX_HOLD = 8  # agent steps an explored action is held
MAX_MOVES = 8  # held actions per exploration
FRONT = 256  # cells this close to the furthest x are picked four times as often
SHORTEN_WINDOWS = (64, 32, 16, 8, 4, 2, 1)  # actions the shortening tries to cut at once, longest first


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


class Goal(NamedTuple):
    """Where a route ends: the flag, or alive at x of at least ``x``."""

    flag: bool
    x: int


class RouteEnd(NamedTuple):
    """Where a replayed route ends: after how many of its actions, at which x, with the flag or not."""

    taken: int
    x: int
    flag: bool
    lost: bool  # the episode ended without the flag


def play_route(env: Any, snapshot: Any, actions: list[int]) -> RouteEnd:
    """Plays ``actions`` from the emulator's ``snapshot`` until they run out or the episode ends."""
    env.reset(seed=0)  # the wrappers' state; the emulator's comes from the snapshot
    env.unwrapped.load_state(snapshot)
    x = 0
    for taken, action in enumerate(actions, start=1):
        _, _, terminated, truncated, info = env.step(action)
        x = int(info["x_pos"])
        if terminated or truncated:
            flag = bool(info.get("flag_get"))
            return RouteEnd(taken, x, flag, lost=not flag)
    return RouteEnd(len(actions), x, flag=False, lost=False)


def reached_after(env: Any, snapshot: Any, actions: list[int], goal: Goal) -> int | None:
    """Plays ``actions`` from the emulator's ``snapshot``: how many of them it takes to reach ``goal``,
    or None when they lose the episode or end short of it."""
    env.reset(seed=0)  # the wrappers' state; the emulator's comes from the snapshot
    env.unwrapped.load_state(snapshot)
    for taken, action in enumerate(actions, start=1):
        _, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            return taken if goal.flag and info.get("flag_get") else None
        if not goal.flag and int(info["x_pos"]) >= goal.x:
            return taken
    return None


def shorten(preset: str, route: list[int]) -> list[int]:
    """Cuts the detours from ``route``: for each window of :data:`SHORTEN_WINDOWS` actions, longest
    first, it slides along the route (by half a window) and drops the window wherever the rest of
    the route, played on from the state before it, still gets where the route got (the flag, or as
    far right, alive). The emulator is deterministic, so one replay decides each cut; a cut that
    changes an enemy's timing into a death is refused by that replay.

    Raises:
        ValueError: the route loses its episode before its end.
    """
    env = make_search_env(preset)
    emulator = env.unwrapped
    env.reset(seed=0)
    start = emulator.dump_state()
    end = play_route(env, start, route)
    if end.lost:
        env.close()
        raise ValueError(f"the route loses its episode at action {end.taken} of {len(route)}")
    route, goal = route[: end.taken], Goal(flag=end.flag, x=end.x)
    progress = tqdm(SHORTEN_WINDOWS, desc=f"shortening a {preset} route", unit="window", file=sys.stderr)
    for window in progress:
        position, snapshot = 0, start
        while position + window <= len(route):
            taken = reached_after(env, snapshot, route[position + window :], goal)
            if taken is not None:
                route = route[:position] + route[position + window :][:taken]
                progress.set_postfix(actions=len(route))
                continue
            stride = max(1, window // 2)
            env.reset(seed=0)
            emulator.load_state(snapshot)
            for action in route[position : position + stride]:
                env.step(action)
            snapshot, position = emulator.dump_state(), position + stride
    env.close()
    return route


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", help="a one-stage Mario preset, e.g. mario-1-3")
    parser.add_argument("--out", required=True, help="route file to write (JSON)")
    parser.add_argument("--iterations", type=int, default=5000, help="explorations (5000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--route", help="shorten this route file's route of the stage instead of searching")
    parser.add_argument("--shorten", action="store_true", help="cut the route's detours (shorten())")
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
    if args.route and not args.shorten:
        parser.exit(2, "mario_route_search: --route is read only to be shortened: add --shorten\n")
    if args.route:
        try:
            routes = load_route_file(args.route, preset.action_set, option="--route")
        except ValueError as error:
            parser.exit(2, f"mario_route_search: {error}\n")
        if stage not in routes:
            parser.exit(
                2, f"mario_route_search: {args.route} has no route of {stage} (it has {', '.join(routes)})\n"
            )
        route = routes[stage]
    else:
        route, _, _ = search(args.preset, args.iterations, args.seed)
    found = len(route)
    if args.shorten:
        try:
            route = shorten(args.preset, route)
        except ValueError as error:
            parser.exit(2, f"mario_route_search: {args.route or 'the found route'}: {error}\n")
    env = make_search_env(args.preset)
    env.reset(seed=0)
    end = play_route(env, env.unwrapped.dump_state(), route)
    env.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.out), {"actions": preset.action_set, "routes": {stage: route}})
    shortened = f" (shortened from {found})" if args.shorten else ""
    outcome = "cleared" if end.flag else "no clear"
    print(f"{stage}: {outcome}, furthest x {end.x}, {len(route)} actions{shortened} -> {args.out}")


if __name__ == "__main__":
    main()
