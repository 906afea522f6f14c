"""Output heads on top of an encoder: classifier, Q-values (optionally dueling), actor-critic.

Initialisation follows CleanRL: orthogonal weights, gain sqrt(2) for hidden layers, 0.01 for the
policy logits (a near-uniform first policy), 1.0 for values and Q-values. All heads accept any
leading dims: (*, in_dim) -> (*, ...).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nets.layers import layer_init, make_activation


def _stream(in_dim: int, out_dim: int, hidden: int | None, out_gain: float, activation: str) -> nn.Sequential:
    """[Linear(in, hidden) -> act ->] Linear(., out)."""
    if hidden is None:
        return nn.Sequential(layer_init(nn.Linear(in_dim, out_dim), gain=out_gain))
    return nn.Sequential(
        layer_init(nn.Linear(in_dim, hidden), gain=math.sqrt(2)),
        make_activation(activation),
        layer_init(nn.Linear(hidden, out_dim), gain=out_gain),
    )


class LinearClassifier(nn.Module):
    """One Linear layer from features to class logits.

    Args:
        in_dim: Width of the features.
        num_classes: Number of classes.
    """

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = layer_init(nn.Linear(in_dim, num_classes), gain=1.0)
        self.out_dim = num_classes

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(*, in_dim) -> logits (*, num_classes)."""
        return self.linear(features)


class QHead(nn.Module):
    """Q-values for DQN, optionally dueling (Wang et al. 2016): Q = V + A - mean(A).

    Args:
        in_dim: Width of the features.
        num_actions: Number of discrete actions.
        hidden: Width of a ReLU hidden layer (one per stream when dueling); None for a single Linear.
        dueling: Separate value and advantage streams.
    """

    def __init__(
        self, in_dim: int, num_actions: int, hidden: int | None = 512, dueling: bool = False
    ) -> None:
        super().__init__()
        self.dueling = dueling
        self.advantage = _stream(in_dim, num_actions, hidden, 1.0, "relu")  # plain Q-values when not dueling
        self.value = _stream(in_dim, 1, hidden, 1.0, "relu") if dueling else None
        self.out_dim = num_actions

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(*, in_dim) -> Q-values (*, num_actions)."""
        if self.value is None:
            return self.advantage(features)
        advantage = self.advantage(features)  # (*, A)
        # Subtracting the mean makes V and A identifiable: the mean advantage is zero.
        return self.value(features) + advantage - advantage.mean(dim=-1, keepdim=True)


class ActorCriticHead(nn.Module):
    """Policy logits and state value from shared features (PPO).

    Args:
        in_dim: Width of the features.
        num_actions: Number of discrete actions.
        hidden: Width of a hidden layer in each of the actor and critic; None for single Linears.
        activation: Activation of those hidden layers.
    """

    def __init__(
        self, in_dim: int, num_actions: int, hidden: int | None = None, activation: str = "relu"
    ) -> None:
        super().__init__()
        self.actor = _stream(in_dim, num_actions, hidden, 0.01, activation)
        self.critic = _stream(in_dim, 1, hidden, 1.0, activation)
        self.out_dim = num_actions

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(*, in_dim) -> (logits (*, num_actions), value (*,))."""
        return self.actor(features), self.critic(features).squeeze(-1)
