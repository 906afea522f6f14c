"""``lab watch``: record greedy rollouts to MP4/GIF, or show them live in a window (``--human``).

Frames carry a caption bar with the action taken, the value estimate (V for PPO, the greedy Q for
DQN) and, in Mario, the x position, so one can see what the agent "thinks" as it plays.

Both ways go through one path for every env family: the env renders ``rgb_array`` frames, one per
agent step. A video plays them at ``env.metadata["render_fps"]`` (60 / frame skip for Mario); the
window (:class:`lab.viewer.Viewer`) shows them at that rate times ``--speed``, so ``--speed 1`` is
the game's own speed. ``--follow`` keeps playing and, between episodes, swaps in the newest
checkpoint of a run that is still training.
"""

from __future__ import annotations

import argparse
import enum
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

import envs
from agents.episodes import preset_stages
from envs.mario import stage_label
from envs.video import write_video
from lab.errors import UsageError
from lab.viewer import CAPTION_HEIGHT, Viewer, add_caption, require_display

__all__ = ["CAPTION_HEIGHT", "Follower", "caption", "check_options", "watch", "watch_human", "watch_live"]

NO_DISPLAY_SUGGESTION = "record a video instead: lab watch RUN --out FILE.mp4"
# How often --follow looks for a run's first checkpoint while there is none yet.
FOLLOW_POLL_SECONDS = 1.0

# A frame sink: takes an RGB frame and its caption; returns False to stop playing.
FrameSink = Callable[[np.ndarray, str], bool]


def caption(frame: np.ndarray, text: str) -> np.ndarray:
    """Returns the frame with a black caption bar below it: (H + 22, W, 3) uint8."""
    return add_caption(frame, text)


def action_names(env: Any) -> list[str] | None:
    """The actions' names: Mario's button combinations, MiniGrid's moves; ``None`` when unnamed."""
    try:
        names = env.get_wrapper_attr("action_names")
    except AttributeError:
        actions = getattr(env.unwrapped, "actions", None)  # MiniGrid: an IntEnum of the moves
        if isinstance(actions, type) and issubclass(actions, enum.Enum):
            return [member.name for member in sorted(actions, key=lambda member: member.value)]
        return None
    return [str(n) for n in names] if names is not None else None


def watch_options(
    env_name: str, stage: str | None = None, deterministic_start: bool = False
) -> dict[str, Any]:
    """The env options a watch plays with: ``lab eval``'s (in Mario 0-30 random no-ops drawn from the
    episode's seed, and the stall cut-off) unless ``deterministic_start``, and only ``stage`` of a
    multi-stage preset when given (:func:`stage_options`)."""
    overrides = {} if deterministic_start else envs.eval_overrides(env_name)
    return {**overrides, **stage_options(env_name, stage)}


def stage_options(env_name: str, stage: str | None, command: str = "lab watch") -> dict[str, Any]:
    """The env options that play only ``stage`` of a multi-stage preset ({} for None).

    Raises:
        UsageError: ``stage`` on a single-stage env, or not one of the preset's stages (the message
            begins with ``command``).
    """
    if stage is None:
        return {}
    stages = preset_stages(env_name)
    if not stages:
        raise UsageError(
            f"{command}: --stage picks a stage of a multi-stage preset; {env_name} has one stage"
        )
    if stage not in stages:
        raise UsageError(
            f"{command}: --stage {stage} is not a stage of {env_name}; choose from: {', '.join(stages)}"
        )
    return {"stages": (stage,)}


def value_label(policy: Any) -> str:
    """``"Q"`` for a Q-network policy (its value is the greedy action's Q), else ``"V"``."""
    return "Q" if hasattr(policy, "q_network") else "V"


def play_episode(
    policy: Any, env: Any, seed: int, max_steps: int, number: int, sink: FrameSink | None
) -> dict[str, Any] | None:
    """Plays one episode greedily (or as the policy samples), one frame per step into ``sink``.

    Args:
        number: the episode's number (from 1), for the caption.
        sink: receives each step's rendered frame and caption; ``None`` renders nothing.

    Returns:
        ``{return, length[, stage, stalled, x_pos_max, flag_get, game_time]}``, or ``None`` when ``sink`` stopped
        the episode before it ended.
    """
    names = action_names(env)
    label = value_label(policy)
    obs, info = env.reset(seed=seed)
    policy.reset(1)
    starts = np.ones(1, dtype=bool)
    total, length, furthest, flag = 0.0, 0, 0, False
    for _ in range(max_steps):
        actions, extras = policy.act(obs[None], starts)
        action = int(actions[0])
        obs, reward, terminated, truncated, info = env.step(action)
        starts[:] = False
        total += float(reward)
        length += 1
        furthest = max(furthest, int(info.get("x_pos", 0)))
        flag = flag or bool(info.get("flag_get", False))
        if sink is not None:
            frame = env.render()
            if frame is not None:
                text = f"ep {number}  {names[action] if names else action}  {label}={float(extras['value'][0]):.2f}"
                if "x_pos" in info:
                    text += f"  x={int(info['x_pos'])}"
                if not sink(np.asarray(frame, dtype=np.uint8), text):
                    return None
        if terminated or truncated:
            if "episode" in info:  # the game's units, as `lab eval` reports (rewards may be scaled)
                total = float(np.asarray(info["episode"]["r"]).reshape(-1)[0])
            break
    result: dict[str, Any] = {"return": total, "length": length}
    if (stage := stage_label(info)) is not None:
        result["stage"] = stage
    if info.get("stalled"):
        result["stalled"] = True
    if "x_pos" in info:
        result.update(x_pos_max=furthest, flag_get=flag)
        if "time" in info:
            # The NES clock counts down from 400; report game time used.
            result["game_time"] = 400 - int(info["time"])
    return result


def watch(
    policy: Any,
    env_name: str,
    out: Path | None,
    episodes: int,
    seed: int,
    human: bool,
    max_steps: int,
    small: bool = False,
    stage: str | None = None,
    deterministic_start: bool = False,
) -> dict[str, Any]:
    """Plays ``episodes`` greedy episodes; writes a video to ``out`` unless ``human`` (a window).
    The env starts as in ``lab eval`` unless ``deterministic_start``, and ``stage`` plays only that
    stage of a multi-stage preset (:func:`watch_options`); episode k is seeded ``seed + k``.

    ``small`` keeps every other frame at half size (and half the frame rate, so it plays at the
    same speed): a Mario clear then fits a GIF of about 1 MB instead of 5.

    Returns:
        ``{"episodes", "per_episode": [{return, length, x_pos_max, flag_get, game_time}], "video",
        "fps", "frames"}``.
    """
    if human:
        require_display(NO_DISPLAY_SUGGESTION)
        return watch_live(
            policy, env_name, episodes, seed, max_steps, stage=stage, deterministic_start=deterministic_start
        )
    env = envs.make(env_name, render_mode="rgb_array", **watch_options(env_name, stage, deterministic_start))
    fps = float(env.metadata.get("render_fps") or 30)
    frames: list[np.ndarray] = []

    def record(frame: np.ndarray, text: str) -> bool:
        frames.append(caption(frame, text))
        return True

    results = []
    try:
        for episode in range(episodes):
            results.append(play_episode(policy, env, seed + episode, max_steps, episode + 1, record))
    finally:
        env.close()
    video = None
    if out is not None and frames:
        if small:
            frames = [
                cv2.resize(frame, (frame.shape[1] // 2, frame.shape[0] // 2), interpolation=cv2.INTER_AREA)
                for frame in frames[::2]
            ]
            fps /= 2
        out.parent.mkdir(parents=True, exist_ok=True)
        video = str(write_video(frames, out, fps=fps))
    return {
        "episodes": len(results),
        "per_episode": results,
        "video": video,
        "fps": fps,
        "frames": len(frames),
    }


# ---------------------------------------------------------------------------------------------
# Live viewing: --human, --speed, --scale, --follow
# ---------------------------------------------------------------------------------------------


class Follower:
    """Finds checkpoints of a run newer than the one playing, for ``--follow``.

    Args:
        run: a run directory, its ``checkpoints/`` folder or a checkpoint file in it (then the
            newer checkpoints of that folder are followed). It may not exist yet: a run about to
            start writes it.
        device, stochastic, seed: as for :func:`agents.load_agent`.
    """

    def __init__(self, run: str | Path, device: str = "cpu", stochastic: bool = False, seed: int = 0):
        from core.runs import CHECKPOINTS

        path = Path(run)
        if path.name == CHECKPOINTS or path.suffix in (".json", ".safetensors"):
            self.folder = path if path.name == CHECKPOINTS else path.parent
        else:
            self.folder = path / CHECKPOINTS
        self.device, self.stochastic, self.seed = device, stochastic, seed
        self.current: Path | None = None  # the sidecar of the checkpoint playing

    def playing(self, sidecar: Path) -> None:
        """Records that ``sidecar`` is playing (a checkpoint loaded by the caller)."""
        self.current = Path(sidecar)

    def newer(self) -> Any | None:
        """The newest loadable checkpoint, as a ``LoadedAgent``, when newer than the one playing.

        A checkpoint being written, or one pruned while it is read, is skipped until the next look.
        """
        from agents import load_agent
        from core.checkpoint import CheckpointError, list_checkpoints

        sidecars = list_checkpoints(self.folder)
        # Names sort by step (step_<12 digits>), so a name after the current one is a newer save.
        if not sidecars or (self.current is not None and sidecars[-1].name <= self.current.name):
            return None
        try:
            agent = load_agent(self.folder, self.device, self.stochastic, self.seed)
        except (CheckpointError, OSError):
            return None
        if self.current is not None and agent.sidecar.name <= self.current.name:
            return None
        self.current = agent.sidecar
        return agent

    def wait_for_first(self, say: Callable[[str], None]) -> Any:
        """Waits (Ctrl-C stops it) until the run has a loadable checkpoint; returns it loaded."""
        said = False
        while True:
            agent = self.newer()
            if agent is not None:
                return agent
            if not said:
                say(f"waiting for a first checkpoint in {self.folder} (Ctrl-C to stop)")
                said = True
            time.sleep(FOLLOW_POLL_SECONDS)


def check_options(args: argparse.Namespace) -> None:
    """Refuses option combinations of ``lab watch`` that mean nothing (one line, exit 2)."""
    live = [
        name
        for name, given in (
            ("--speed", args.speed is not None),
            ("--scale", args.scale is not None),
            ("--follow", args.follow),
        )
        if given
    ]
    if live and not args.human:
        raise UsageError(f"lab watch: {', '.join(live)} apply to the window; add --human")
    if args.human:
        files = [name for name, given in (("--out", args.out is not None), ("--small", args.small)) if given]
        if files:
            raise UsageError(
                f"lab watch: {' and '.join(files)} write a file, --human opens a window; choose one"
            )


def watch_live(
    policy: Any,
    env_name: str,
    episodes: int | None,
    seed: int,
    max_steps: int,
    speed: float = 1.0,
    scale: int | None = None,
    title: str | None = None,
    follower: Follower | None = None,
    on_episode: Callable[[dict[str, Any]], None] | None = None,
    on_reload: Callable[[Any], None] | None = None,
    stage: str | None = None,
    deterministic_start: bool = False,
) -> dict[str, Any]:
    """Plays episodes in a window at ``speed`` times the game's speed, until done or closed.

    Args:
        policy: the agent's policy (``agents.episodes.Policy``).
        episodes: how many to play; ``None`` plays until the window is closed (or Ctrl-C).
        speed: 1 is the game's own speed (``env.metadata["render_fps"]`` frames a second).
        scale: the window's enlargement; ``None`` fits the screen.
        follower: swaps in newer checkpoints of the run between episodes.
        on_episode: called with each finished episode's result (which holds ``"episode"``, its number,
            and with a follower, ``"checkpoint"``).
        on_reload: called with each newer ``LoadedAgent`` the follower swapped in.
        stage, deterministic_start: the env's options, as for :func:`watch`.

    Returns:
        ``{"episodes", "per_episode", "frames_drawn", "seconds_shown", "fps", "speed", "scale",
        "closed", "checkpoints"}``: ``closed`` says the window was closed before the end.
    """
    if not speed > 0 or math.isinf(speed):
        raise ValueError(f"speed must be a positive number, got {speed!r}")
    env = envs.make(env_name, render_mode="rgb_array", **watch_options(env_name, stage, deterministic_start))
    game_fps = float(env.metadata.get("render_fps") or 30)
    results: list[dict[str, Any]] = []
    checkpoints = [follower.current.name] if follower is not None and follower.current is not None else []
    try:
        with Viewer(title or f"lab watch: {env_name}", game_fps * speed, scale) as viewer:
            number = 0
            while episodes is None or number < episodes:
                if follower is not None:
                    agent = follower.newer()
                    if agent is not None:
                        policy = agent.policy
                        checkpoints.append(agent.sidecar.name)
                        if on_reload is not None:
                            on_reload(agent)
                number += 1
                result = play_episode(policy, env, seed + number - 1, max_steps, number, viewer.show)
                if result is None:
                    break
                result["episode"] = number
                if follower is not None and follower.current is not None:
                    result["checkpoint"] = follower.current.name
                results.append(result)
                if on_episode is not None:
                    on_episode(result)
            closed = viewer.closed
            frames_drawn, seconds_shown, used_scale = viewer.frames_drawn, viewer.seconds_shown, viewer.scale
    finally:
        env.close()
    return {
        "episodes": len(results),
        "per_episode": results,
        "frames_drawn": frames_drawn,
        "seconds_shown": seconds_shown,
        "fps": game_fps * speed,
        "speed": speed,
        "scale": used_scale,
        "closed": closed,
        "checkpoints": checkpoints,
    }


def watch_human(
    args: argparse.Namespace, describe_episode: Callable[[dict[str, Any]], str]
) -> dict[str, Any]:
    """``lab watch RUN --human [--speed X] [--scale N] [--follow]``: the window, from the command line.

    The display is checked before anything loads, so a machine without one answers at once.

    Args:
        args: the parsed ``lab watch`` arguments.
        describe_episode: an episode's result in words (``lab.play.describe_episode``), printed as
            each episode ends.
    """
    from agents import load_agent

    require_display(NO_DISPLAY_SUGGESTION)
    import torch

    # One observation at a time gains nothing from more threads, and on a busy machine extra threads
    # wait on each other long enough to make the agent miss the game's frame rate.
    torch.set_num_threads(1)
    quiet = args.json

    def say(text: str) -> None:
        if not quiet:
            print(text, flush=True)

    def trained(agent: Any) -> str:
        steps = getattr(agent.policy, "trained_steps", None)
        return f"{agent.sidecar.name} ({int(steps):,} agent steps)" if steps else agent.sidecar.name

    follower = None
    if args.follow:
        follower = Follower(args.run, args.device, args.stochastic, args.seed)
        if Path(args.run).suffix in (".json", ".safetensors"):
            agent = load_agent(args.run, args.device, args.stochastic, args.seed)
            follower.playing(agent.sidecar)
        else:
            agent = follower.wait_for_first(say)
        say(f"following {follower.folder}: playing {trained(agent)}; newer checkpoints load between episodes")
    else:
        agent = load_agent(args.run, args.device, args.stochastic, args.seed)
    stage_options(agent.config.env, args.stage)  # a bad --stage says so before the window opens
    episodes = args.episodes if args.episodes is not None else (None if args.follow else 1)

    def report(episode: dict[str, Any]) -> None:
        source = f" ({episode['checkpoint']})" if "checkpoint" in episode else ""
        say(f"episode {episode['episode']}{source}: {describe_episode(episode)}")

    summary = watch_live(
        agent.policy,
        agent.config.env,
        episodes,
        args.seed,
        args.max_steps,
        speed=args.speed if args.speed is not None else 1.0,
        scale=args.scale,
        title=f"lab watch: {agent.config.env} ({agent.run_dir})",
        follower=follower,
        on_episode=report,
        on_reload=lambda newer: say(f"loaded {trained(newer)}"),
        stage=args.stage,
        deterministic_start=args.deterministic_start,
    )
    if summary["closed"]:
        say(f"window closed after {summary['episodes']} finished episode(s)")
    return {"run": args.run, "env": agent.config.env, **summary}
