"""Environment factories and presets: Super Mario Bros, classic control, memory gridworlds.

    import envs
    env = envs.make("mario-1-1")                      # (4, 84, 84) uint8, 7 actions
    vec = envs.make_vec("mario-1-1", 8, seed=0, backend="async")
    envs.names(); envs.get_preset("cartpole").ppo; envs.resolve("LunarLander-v3")
    envs.video.write_video(frames, "rollout.mp4", fps=15)

Vector envs use Gymnasium's same-step autoreset: see :func:`envs.make_vec`.
"""

from envs import video
from envs.factory import default_wrappers, eval_overrides, make, make_vec
from envs.registry import Preset, get_preset, names, resolve

__all__ = [
    "Preset",
    "default_wrappers",
    "eval_overrides",
    "get_preset",
    "make",
    "make_vec",
    "names",
    "resolve",
    "video",
]
