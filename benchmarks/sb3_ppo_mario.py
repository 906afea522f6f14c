"""Stable-Baselines3 PPO on our Mario env stack, for a fixed wall-clock budget: the side-by-side
baseline for ``lab train mario-1-1`` (same envs, rollout and batch sizes, Nature CNN).

    python -m benchmarks.sb3_ppo_mario --seconds 90 --envs 16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import time

from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.vec_env import SubprocVecEnv, VecMonitor

import envs


class StopAfter(BaseCallback):
    """Stops learning after ``seconds`` and records steps/s from the first rollout on."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.start = 0.0

    def _on_training_start(self) -> None:
        self.start = time.time()

    def _on_step(self) -> bool:
        return time.time() - self.start < self.seconds


def make_env(seed: int):
    def thunk():
        env = envs.make("mario-1-1")
        env.reset(seed=seed)
        return env

    return thunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--envs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=256, help="n_steps per env per rollout")
    parser.add_argument("--batch", type=int, default=512, help="minibatch size")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    vec_env = VecMonitor(SubprocVecEnv([make_env(i) for i in range(args.envs)]))
    model = PPO(
        "CnnPolicy", vec_env, n_steps=args.steps, batch_size=args.batch, n_epochs=4, learning_rate=2.5e-4,
        gamma=0.9, gae_lambda=0.95, clip_range=0.2, ent_coef=0.01, device=args.device, verbose=0,
    )  # fmt: skip
    model.set_logger(Logger(folder=None, output_formats=[]))  # SB3's default leaves an empty /tmp/SB3-<date>
    callback = StopAfter(args.seconds)
    model.learn(total_timesteps=10**9, callback=callback)
    elapsed = time.time() - callback.start
    vec_env.close()
    print(json.dumps({"system": "sb3-ppo", "envs": args.envs, "steps": model.num_timesteps,
                      "seconds": round(elapsed, 1), "sps": round(model.num_timesteps / elapsed, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
