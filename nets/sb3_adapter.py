"""Makes any ``nets`` encoder a Stable-Baselines3 features extractor (the only file of nets/ that imports SB3).

Usage::

    PPO("CnnPolicy", env, policy_kwargs=dict(
        features_extractor_class=EncoderExtractor,
        features_extractor_kwargs=dict(net="impala"),
    ))

SB3 already turns uint8 image observations into floats in [0, 1] (``normalize_images=True``, its
default) before calling the extractor, so our encoders see floats and pass them through unchanged.
"""

from __future__ import annotations

import gymnasium as gym
import torch
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from nets.registry import build, kind


class EncoderExtractor(BaseFeaturesExtractor):
    """SB3 features extractor wrapping a ``nets`` encoder; ``features_dim == encoder.out_dim``.

    Args:
        observation_space: The env's Box observation space; its shape becomes the net's ``in_shape``
            unless ``in_shape`` is passed explicitly.
        net: A registered image or vector net name ("nature", "impala", "vit", "mlp"), or an already
            built encoder module with an ``out_dim`` attribute.
        **net_kwargs: Further constructor arguments of the named net.

    Raises:
        ValueError: For sequence nets (SB3's PPO has no recurrent state), non-Box spaces, or kwargs
            given together with a built module.
    """

    def __init__(
        self, observation_space: gym.Space, net: str | nn.Module = "nature", **net_kwargs: object
    ) -> None:
        if isinstance(net, nn.Module):
            if net_kwargs:
                raise ValueError(
                    "EncoderExtractor: pass net_kwargs only with a net name, not with a built module"
                )
            encoder, name = net, type(net).__name__
        else:
            if kind(net) == "sequence":
                raise ValueError(
                    f"net '{net}' is a sequence model; SB3 extractors are stateless (use agents.ppo)"
                )
            if not isinstance(observation_space, gym.spaces.Box):
                raise ValueError(f"EncoderExtractor needs a Box observation space, got {observation_space}")
            net_kwargs.setdefault("in_shape", tuple(observation_space.shape))
            encoder, name = build(net, **net_kwargs), net
        if not isinstance(getattr(encoder, "out_dim", None), int):
            raise ValueError(f"encoder {name} has no integer out_dim")
        super().__init__(observation_space, features_dim=encoder.out_dim)
        self.encoder = encoder
        self.net_name = name

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        """(B, *obs_shape) float (already preprocessed by SB3) -> (B, features_dim)."""
        return self.encoder(observations)
