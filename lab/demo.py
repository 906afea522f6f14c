"""``lab demo``: the flagship demo on the shipped defaults.

With the shipped World-1 network (runs/mario-world-1-distilled/) it plays 1-1 to 1-4 in sequence,
greedily on the CPU, into one video with the stage named on screen. Without it, the shipped 1-1 agent
(runs/mario-1-1/) plays World 1-1, writes the video under runs/, and prints the outcome. While no
finished agent ships, the agent still in training (runs/mario-1-1-inprogress/) plays instead, and
says so. Without either (a checkout that ships no agent) it falls back to the supervised
playground: a spiral classified by the MLP, with its decision-boundary plot.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

WORLD_RUN = Path("runs/mario-world-1-distilled")
SHIPPED_RUN = Path("runs/mario-1-1")
IN_PROGRESS_RUN = Path("runs/mario-1-1-inprogress")


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    """``lab demo``: the shipped agent plays; see :func:`demo`."""
    return demo()


def demo() -> dict[str, Any]:
    if (WORLD_RUN / "checkpoints").is_dir():
        return world_demo(WORLD_RUN)
    if (SHIPPED_RUN / "checkpoints").is_dir():
        return mario_demo(SHIPPED_RUN)
    if (IN_PROGRESS_RUN / "checkpoints").is_dir():
        print(f"No finished Mario agent ships yet: playing the one still in training ({IN_PROGRESS_RUN}).")
        return mario_demo(IN_PROGRESS_RUN)
    return playground_demo()


def mario_demo(run_dir: Path) -> dict[str, Any]:
    from agents import load_agent
    from lab.play import describe_episode
    from lab.watch import watch

    started = time.time()
    policy, config = load_agent(run_dir, "cpu")[:2]
    out = Path("runs") / "demo" / "mario-1-1.mp4"
    summary = watch(policy, config.env, out, episodes=1, seed=0, human=False, max_steps=4000)
    episode = summary["per_episode"][0]
    steps = policy.trained_steps
    trained = f", {int(steps):,} agent steps of training" if steps else ""
    print(f"Mario World 1-1, PPO agent ({run_dir}{trained}): {describe_episode(episode)}")
    print(
        f"video: {summary['video']} ({summary['frames']} frames at {summary['fps']:.0f} fps), {time.time() - started:.0f} s"
    )
    return summary


def world_demo(run_dir: Path, out: Path = Path("runs/demo/mario-world-1.mp4")) -> dict[str, Any]:
    """Plays each stage of the run's multi-stage preset once, in order, into one video."""
    import envs
    from agents import load_agent
    from envs.registry import WORLD_1_STAGES
    from envs.video import write_video
    from lab.play import describe_episode
    from lab.watch import caption, play_episode

    started = time.time()
    agent = load_agent(run_dir, "cpu")
    stages = envs.resolve(agent.config.env).env_kwargs.get("stages", WORLD_1_STAGES)
    frames: list[Any] = []
    episodes, fps = [], 15.0
    for number, stage in enumerate(stages, start=1):
        env = envs.make(agent.config.env, render_mode="rgb_array", stages=(stage,), stall_patience=200)
        fps = float(env.metadata.get("render_fps") or fps)
        try:
            episode = play_episode(
                agent.policy, env, seed=0, max_steps=4000, number=number,
                sink=lambda frame, text, stage=stage: frames.append(caption(frame, f"World {stage}  {text}")) or True,
            )  # fmt: skip
        finally:
            env.close()
        episodes.append({"stage": stage, **episode})
        print(f"World {describe_episode(episodes[-1])}")  # "World 1-2: return ..."
    out.parent.mkdir(parents=True, exist_ok=True)
    video = str(write_video(frames, out, fps=fps))
    cleared = sum(bool(episode.get("flag_get")) for episode in episodes)
    print(
        f"{cleared} of {len(stages)} stages cleared; video: {video} ({len(frames)} frames), {time.time() - started:.0f} s"
    )
    return {"episodes": len(episodes), "per_episode": episodes, "video": video, "frames": len(frames)}


def playground_demo() -> dict[str, Any]:
    import tasks
    from core.runs import new_run_dir

    print("No shipped Mario agent in runs/mario-1-1 yet: running the spiral playground instead.")
    spec = tasks.get("playground")
    run_dir = new_run_dir("runs", "demo-playground")
    metrics = spec.run(spec.config_class(), run_dir, progress=True)
    pngs = sorted(str(p) for p in run_dir.glob("*.png"))
    print(json.dumps({k: metrics[k] for k in ("task", "net", "test_accuracy", "seconds") if k in metrics}))
    print("plots: " + ", ".join(pngs))
    return metrics
