"""Trained agents as ``lab compress`` handles them: a batch function to label frames, a network to
train, a run directory to write.

An agent's network (PPO's ``ActorCritic``, DQN's ``QNetwork``) becomes ``PolicyNet``: one call maps a
batch of observations to the action logits and a value. A DQN's Q-values serve as its logits, and
the teacher's targets are softmax(Q / tau) (Rusu et al. 2016). What a compressed run writes is the
algorithm's own checkpoint format (``agents.engine.save_training_checkpoint``): ``config.json`` with
the algorithm and its config, and a checkpoint whose meta holds the usual ``algo``, ``config``,
``obs_shape`` and ``num_actions`` plus a ``compression`` record (and ``quantization: "int8"`` for
int8 weights), so that ``agents.load_agent`` and every command load it like a trained run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from agents import ALGOS, LoadedAgent, load_agent
from agents.engine import save_training_checkpoint
from core.checkpoint import CheckpointError
from core.config import apply_overrides, validate
from core.files import jsonable
from core.runs import write_run_config

#: Temperature tau of softmax(Q / tau) for DQN teachers (Rusu et al. 2016 found 0.01 best).
DQN_TEMPERATURE = 0.01


class PolicyNet(nn.Module):
    """An agent's network as a batch function: obs (B, *obs_shape) -> (logits (B, A), values (B,)).

    PPO: the actor's logits and the critic's values. DQN: the Q-values as logits and max_a Q as the
    value. The wrapped network is ``self.net``; its state dict is the agent's checkpoint ``model``.

    Args:
        net: PPO's ActorCritic (feed-forward) or DQN's QNetwork.
        algo: ``"ppo"`` or ``"dqn"``.
        detach_value: PPO with a shared encoder: the critic reads the features without passing
            gradients back, so that a value loss trains the critic's head and leaves the encoder
            (small in a student) to the policy.
    """

    def __init__(self, net: nn.Module, algo: str, detach_value: bool = False) -> None:
        super().__init__()
        if algo not in ALGOS:
            raise ValueError(f"unknown algorithm {algo!r}; valid: {', '.join(ALGOS)}")
        self.net = net
        self.algo = algo
        self.detach_value = detach_value

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.algo == "dqn":
            q_values = self.net(obs)  # (B, A)
            return q_values, q_values.max(dim=-1).values
        net = self.net
        if self.detach_value and net.critic_encoder is None and net.memory is None:
            features = net.encoder(obs)  # (B, F)
            return net.head.actor(features), net.head.critic(features.detach()).squeeze(-1)
        starts = torch.zeros(1, len(obs), dtype=torch.bool, device=obs.device)
        logits, values, _ = net(obs.unsqueeze(0), None, starts)  # time-major (1, B, ...)
        return logits[0], values[0]


class Teacher(NamedTuple):
    """A loaded agent to compress, with its network as a ``PolicyNet`` (eval mode, no gradients)."""

    agent: LoadedAgent
    net: PolicyNet

    @property
    def algo(self) -> str:
        return self.agent.meta["algo"]

    @property
    def obs_shape(self) -> tuple[int, ...]:
        return tuple(self.agent.meta["obs_shape"])

    @property
    def num_actions(self) -> int:
        return int(self.agent.meta["num_actions"])

    @torch.no_grad()
    def label(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Distillation targets on obs (B, *obs_shape): (logits (B, A) fp32, values (B,) fp32 or None).

        DQN teachers give log softmax(Q / tau) as logits and no values (their students are Q-networks
        without a critic).
        """
        logits, values = self.net(obs)
        if self.algo == "dqn":
            return torch.log_softmax(logits.float() / DQN_TEMPERATURE, dim=-1), None
        return logits.float(), values.float()


def agent_network(agent: LoadedAgent) -> nn.Module:
    """The torch module of a loaded agent's policy: PPO's ActorCritic or DQN's QNetwork."""
    policy = agent.policy
    return policy.agent if hasattr(policy, "agent") else policy.q_network


def load_teacher(path: str | Path) -> Teacher:
    """Loads a trained agent to compress, on the CPU.

    Raises:
        CheckpointError: nothing loadable at ``path`` or not an agent (exit 2 on the command line).
        ValueError: an agent ``lab compress`` cannot take: already int8, or with a recurrent memory.
    """
    agent = load_agent(path, "cpu")
    if agent.meta.get("quantization"):
        raise CheckpointError(f"{agent.sidecar} holds int8 weights already; compress the fp32 agent instead")
    if getattr(agent.config, "memory", "none") != "none":
        raise ValueError(
            f"lab compress takes feed-forward agents; {agent.run_dir} has memory={agent.config.memory}"
        )
    net = PolicyNet(agent_network(agent), agent.meta["algo"]).eval()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    return Teacher(agent, net)


def student_config(teacher: Teacher, net: str | None, overrides: list[str] | None = None) -> Any:
    """The teacher's config with another encoder (``net``) and ``key=value`` overrides, validated.

    Raises:
        ValueError: an unknown net, key or value (the message names the valid ones).
    """
    config = teacher.agent.config
    if net is not None:
        config = dataclasses.replace(config, net=net)
    config = apply_overrides(config, overrides)
    validate(config)
    return config


def build_network(algo: str, config: Any, obs_shape: tuple[int, ...], num_actions: int) -> nn.Module:
    """A fresh network of an algorithm for a config: PPO's ActorCritic or DQN's QNetwork.

    Raises:
        ValueError: the config's net is unknown or does not fit the observations.
    """
    module = ALGOS[algo]
    network = module.ActorCritic if algo == "ppo" else module.QNetwork
    return network(config, tuple(obs_shape), int(num_actions))


def model_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """A network's state dict as contiguous CPU tensors that share no memory (safetensors needs both)."""
    return {key: value.detach().cpu().contiguous().clone() for key, value in net.state_dict().items()}


def compressed_meta(
    teacher: Teacher, config: Any, compression: dict[str, Any], quantized: bool = False
) -> dict[str, Any]:
    """The checkpoint meta of a compressed run: what ``agents.load_agent`` reads, plus ``compression``."""
    meta: dict[str, Any] = {
        "algo": teacher.algo,
        "config": jsonable(dataclasses.asdict(config)),
        "obs_shape": list(teacher.obs_shape),
        "num_actions": teacher.num_actions,
        "compression": jsonable(compression),
    }
    if quantized:
        meta["quantization"] = "int8"
    return meta


def save_compressed(
    run_dir: Path,
    step: int,
    model: dict[str, torch.Tensor],
    meta: dict[str, Any],
    extra: dict[str, Any] | None = None,
    keep: int = 1,
) -> Path:
    """Writes ``config.json`` and the checkpoint ``step_<step>`` of a compressed run, atomically each.

    Args:
        run_dir: the output run directory (made if missing).
        step: frames of distillation or fine-tuning behind the weights (the checkpoint's name).
        model: the network's state dict (``model_state``), int8 buffers included.
        meta: from ``compressed_meta``.
        extra: more state to restore on resume (optimizer, history, counters).
        keep: checkpoints kept.

    Returns:
        The checkpoint's sidecar.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    config = ALGOS[meta["algo"]].config_from_dict(meta["config"])
    write_run_config(run_dir, "algo", meta["algo"], config)
    state = {"model": model, "global_step": int(step), **(extra or {})}
    return save_training_checkpoint(run_dir, int(step), state, meta, keep)


def as_batch(obs: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Observations from a vector env (B, *obs_shape) as a CPU tensor of their own dtype (uint8 frames)."""
    return torch.as_tensor(np.asarray(obs))
