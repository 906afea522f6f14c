"""Does ``lab watch --human`` play at the game's speed? Frames shown against the clock.

Run:  python -m benchmarks.watch_pacing [--run runs/mario-1-1] [--steps 90] [--speeds 1,2,4] [--json out.json]

For each speed it runs ``lab watch RUN --human --episodes 1 --max-steps STEPS --speed X --json`` in a
child process (on ``$DISPLAY``, else on a virtual display of its own, Xvfb) and compares the time
from the first frame drawn to the end of the last one's turn with what the game takes: ``STEPS /
(render_fps * X)`` seconds, where ``render_fps`` is the env's (60 / frame skip for Mario: 15).
``ratio`` is measured over expected: 1.0 is the game's speed, above 1 the agent and the emulator
could not keep up (a busy machine, or a speed beyond what one core computes), and below 1 would be a
pacing bug (frames shown faster than asked).

Only the time between frames counts, so the start-up of the child (loading torch, the checkpoint
and the emulator) does not. The episode should last at least ``STEPS`` steps: the shipped Mario agent
needs 273 to clear 1-1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_RUN = "runs/mario-1-1"
XVFB_SCREEN = "1280x1024x24"
XVFB_START_SECONDS = 20.0


@contextlib.contextmanager
def virtual_display() -> Iterator[str]:
    """Starts Xvfb on a free display number; yields the display's name (``":N"``), stops it after.

    Raises:
        FileNotFoundError: Xvfb is not installed (``apt-get install xvfb``).
        RuntimeError: it did not start.
    """
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        raise FileNotFoundError("Xvfb is not installed (apt-get install xvfb)")
    read_end, write_end = os.pipe()
    # -displayfd: Xvfb picks a free number itself and writes it once it accepts connections.
    # -noreset: by default the server resets whenever its last client leaves, and a client that
    # connects during the reset is dropped before it is answered (its XOpenDisplay returns NULL:
    # xorg/xserver#1102). A window test polls the display with short-lived clients, so without it
    # a child's window sometimes failed to open.
    process = subprocess.Popen(
        [xvfb, "-displayfd", str(write_end), "-noreset", "-screen", "0", XVFB_SCREEN, "-nolisten", "tcp"],
        pass_fds=(write_end,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], XVFB_START_SECONDS)
        number = os.read(read_end, 64).decode().strip() if ready else ""
        if not number.isdigit():
            raise RuntimeError(f"Xvfb did not start within {XVFB_START_SECONDS:.0f} s")
        yield f":{number}"
    finally:
        os.close(read_end)
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def display_env(display: str) -> dict[str, str]:
    """The environment of a child that draws on ``display`` (an inherited SDL driver is dropped)."""
    env = {
        key: value for key, value in os.environ.items() if key not in ("SDL_VIDEODRIVER", "WAYLAND_DISPLAY")
    }
    env["DISPLAY"] = display
    return env


def measure(run: str, steps: int, speed: float, display: str, timeout: float = 600.0) -> dict[str, Any]:
    """Plays one episode of at most ``steps`` steps at ``speed``; returns expected and measured seconds."""
    command = [sys.executable, "-m", "lab.cli", "watch", run, "--human", "--episodes", "1",
               "--max-steps", str(steps), "--speed", str(speed), "--json"]  # fmt: skip
    child = subprocess.run(
        command, env=display_env(display), capture_output=True, text=True, timeout=timeout, check=False
    )
    if child.returncode != 0:
        raise RuntimeError(f"lab watch exited {child.returncode}: {child.stderr.strip()[-500:]}")
    summary = json.loads(child.stdout.strip().splitlines()[-1])
    frames, fps = summary["frames_drawn"], summary["fps"]
    # The last frame stays on screen for one frame's turn, like every other one.
    measured = summary["seconds_shown"] + 1.0 / fps
    expected = frames / fps
    return {
        "speed": speed,
        "frames": frames,
        "steps_played": sum(episode["length"] for episode in summary["per_episode"]),
        "fps": fps,
        "expected_s": expected,
        "measured_s": measured,
        "ratio": measured / expected,
    }


def run(run_dir: str = DEFAULT_RUN, steps: int = 90, speeds: tuple[float, ...] = (1.0,)) -> dict[str, Any]:
    """Measures each speed in turn, on ``$DISPLAY`` or a virtual display started for the purpose."""
    with contextlib.ExitStack() as stack:
        display = os.environ.get("DISPLAY") or stack.enter_context(virtual_display())
        rows = [measure(run_dir, steps, speed, display) for speed in speeds]
    return {"run": run_dir, "steps": steps, "display": display, "results": rows}


def print_report(result: dict[str, Any]) -> None:
    print(f"lab watch --human pacing: {result['run']}, {result['steps']} steps, display {result['display']}")
    print(f"{'speed':>6} {'frames':>7} {'fps':>6} {'expected s':>11} {'measured s':>11} {'ratio':>6}")
    for row in result["results"]:
        print(
            f"{row['speed']:>6g} {row['frames']:>7} {row['fps']:>6.1f} {row['expected_s']:>11.2f} "
            f"{row['measured_s']:>11.2f} {row['ratio']:>6.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default=DEFAULT_RUN, help="run directory or checkpoint to play")
    parser.add_argument("--steps", type=int, default=90, help="steps of the episode (at most)")
    parser.add_argument("--speeds", default="1", help="comma-separated --speed values, e.g. 1,2,4")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the result to FILE")
    args = parser.parse_args(argv)
    try:
        speeds = tuple(float(value) for value in args.speeds.split(","))
    except ValueError:
        parser.error(f"--speeds takes comma-separated numbers, got {args.speeds!r}")
    if args.steps < 2 or any(not speed > 0 for speed in speeds):
        parser.error("--steps must be at least 2 and every speed positive")
    result = run(args.run, args.steps, speeds)
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
