"""``lab watch``: record greedy rollouts to MP4/GIF (headless) or show them in a window.

For Mario the video carries a caption bar with the action taken, the value estimate and the
furthest x, so one can see what the agent "thinks" as it plays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

import envs
from envs.video import write_video

CAPTION_HEIGHT = 22


def action_names(env: Any) -> list[str] | None:
    """Button combinations of the action set, when the env's wrappers expose them."""
    try:
        names = env.get_wrapper_attr("action_names")
    except AttributeError:
        return None
    return [str(n) for n in names] if names is not None else None


def caption(frame: np.ndarray, text: str) -> np.ndarray:
    """Returns the frame with a black caption bar below it: (H + 22, W, 3) uint8."""
    height, width = frame.shape[:2]
    canvas = np.zeros((height + CAPTION_HEIGHT, width, 3), dtype=np.uint8)
    canvas[:height] = frame
    cv2.putText(
        canvas, text, (3, height + 15), cv2.FONT_HERSHEY_SIMPLEX, 0.36, (255, 255, 255), 1, cv2.LINE_AA
    )
    return canvas


def watch(
    policy: Any,
    env_name: str,
    out: Path | None,
    episodes: int,
    seed: int,
    human: bool,
    max_steps: int,
    small: bool = False,
) -> dict[str, Any]:
    """Plays ``episodes`` greedy episodes; writes a video to ``out`` unless ``human``.

    ``small`` keeps every other frame at half size (and half the frame rate, so it plays at the
    same speed): a Mario clear then fits a GIF of about 1 MB instead of 5.

    Returns:
        ``{"episodes", "per_episode": [{return, length, x_pos_max, flag_get, game_time}], "video"}``.
    """
    render_mode = "human" if human else "rgb_array"
    env = envs.make(env_name, render_mode=render_mode)
    names = action_names(env)
    fps = float(env.metadata.get("render_fps") or 30)
    frames: list[np.ndarray] = []
    results = []
    try:
        for episode in range(episodes):
            obs, info = env.reset(seed=seed + episode)
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
                if not human:
                    frame = env.render()
                    if frame is not None:
                        label = names[action] if names else str(action)
                        text = f"ep {episode + 1}  {label}  V={float(extras['value'][0]):.2f}"
                        if "x_pos" in info:
                            text += f"  x={int(info['x_pos'])}"
                        frames.append(caption(np.asarray(frame, dtype=np.uint8), text))
                if terminated or truncated:
                    if "episode" in info:  # the game's units, as `lab eval` reports (rewards may be scaled)
                        total = float(np.asarray(info["episode"]["r"]).reshape(-1)[0])
                    break
            result: dict[str, Any] = {"return": total, "length": length}
            if "x_pos" in info:
                result.update(x_pos_max=furthest, flag_get=flag)
                if "time" in info:
                    # The NES clock counts down from 400; report game time used.
                    result["game_time"] = 400 - int(info["time"])
            results.append(result)
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
