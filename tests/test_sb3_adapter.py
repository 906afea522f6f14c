"""nets.sb3_adapter: our encoders as Stable-Baselines3 features extractors, trained by SB3's PPO."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.logger import Logger

import nets
from nets.sb3_adapter import EncoderExtractor

torch.set_num_threads(1)


class BrightSideEnv(gym.Env):
    """Tiny image task: a (1, 16, 16) uint8 frame with one bright half; reward 1 for naming that half."""

    observation_space = gym.spaces.Box(0, 255, (1, 16, 16), np.uint8)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.steps = 0
        return self._observe(), {}

    def step(self, action: int):
        reward = float(action == self.side)
        self.steps += 1
        return self._observe(), reward, False, self.steps >= 16, {}

    def _observe(self) -> np.ndarray:
        self.side = int(self.np_random.integers(2))
        frame = self.np_random.integers(0, 60, (1, 16, 16), dtype=np.uint8)
        frame[:, :, self.side * 8 : self.side * 8 + 8] += 180
        return frame


def parameters(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def train_and_check(env: gym.Env, policy: str, net: str, encoder_cls: type[torch.nn.Module]) -> None:
    model = PPO(
        policy,
        env,
        policy_kwargs=dict(
            features_extractor_class=EncoderExtractor, features_extractor_kwargs=dict(net=net)
        ),
        n_steps=64,
        batch_size=32,
        n_epochs=2,
        seed=0,
        device="cpu",
    )
    extractor = model.policy.features_extractor
    assert isinstance(extractor, EncoderExtractor)
    assert isinstance(extractor.encoder, encoder_cls)
    assert extractor.features_dim == extractor.encoder.out_dim
    before = parameters(extractor.encoder)
    model.set_logger(Logger(folder=None, output_formats=[]))  # SB3's default leaves an empty /tmp/SB3-<date>
    model.learn(256)
    after = parameters(model.policy.features_extractor.encoder)
    assert all(not torch.equal(b, a) for b, a in zip(before, after, strict=True)), "encoder was not trained"


def test_ppo_trains_our_cnn_on_uint8_images() -> None:
    train_and_check(BrightSideEnv(), "CnnPolicy", "nature", nets.NatureCNN)


def test_ppo_trains_our_mlp_on_cartpole() -> None:
    train_and_check(gym.make("CartPole-v1"), "MlpPolicy", "mlp", nets.MLP)


def test_extractor_options_and_errors() -> None:
    space = BrightSideEnv.observation_space
    extractor = EncoderExtractor(space, net="impala", out_dim=32)
    assert extractor.features_dim == 32 and extractor.encoder.in_shape == (1, 16, 16)
    obs = torch.rand(3, 1, 16, 16)
    torch.testing.assert_close(extractor(obs), extractor.encoder(obs))
    built = nets.ViTEncoder((1, 16, 16), dim=32, heads=2)
    assert EncoderExtractor(space, net=built).encoder is built
    with pytest.raises(ValueError, match="sequence model"):
        EncoderExtractor(space, net="lstm", in_dim=4)
    with pytest.raises(ValueError, match="unknown net 'resnet'"):
        EncoderExtractor(space, net="resnet")
    with pytest.raises(ValueError, match="only with a net name"):
        EncoderExtractor(space, net=built, out_dim=3)
