"""Trained agents as explainable modules, and the greedy play that records what they saw.

``play`` runs a loaded agent (``agents.load_agent``) in its env exactly as ``lab watch`` does and keeps,
for every step, the observation the agent acted on, the colour frame of that moment, the action, its
value estimate and, for a recurrent agent, the memory state the agent had *before* the step.

``AgentNet`` turns the agent into what the attribution methods take: a feed-forward module from
(N, *obs_shape) observations to its outputs. For a recurrent agent it holds the recorded memory of
every frame; ``select_frames`` says which B frames the next call is about, and the memory of each is
repeated to the N = k * B rows a method evaluates (``methods.tile_rows``). So each frame is explained
with the memory the agent really had at that step, carried through the episode, and the gradient is
taken with respect to the current observation only (the memory is held fixed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

import envs
from agents import LoadedAgent
from agents.dqn import DQNPolicy
from agents.ppo import PPOPolicy, action_distribution, concat_states, detach_state, select_state
from explain.checks import Subject, Target
from explain.methods import get_method, last_conv_layer, tile_rows

HEADS = ("policy", "value")

# Feature names of the classic-control observations (Gymnasium's documentation, in order).
FEATURE_NAMES: dict[str, tuple[str, ...]] = {
    "CartPole-v1": ("cart position", "cart velocity", "pole angle", "pole angular velocity"),
    "Acrobot-v1": ("cos theta1", "sin theta1", "cos theta2", "sin theta2", "theta1 dot", "theta2 dot"),
    "MountainCar-v0": ("position", "velocity"),
    "LunarLander-v3": ("x", "y", "vx", "vy", "angle", "angular velocity", "left leg", "right leg"),
}
MINIGRID_CELL_FEATURES = 20  # one-hot object (11), colour (6) and state (3) of each cell in view
MINIGRID_DIRECTIONS = 4
MAX_PLOTTED_FEATURES = 12


# ---------------------------------------------------------------------------------------------
# The agent as a module
# ---------------------------------------------------------------------------------------------


def tile_state(state: Any, rows: int) -> Any:
    """A memory state of B frames (tensors, or tuples/dicts of (B, ...) tensors) repeated to ``rows``."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return tile_rows(state, rows)
    if isinstance(state, dict):
        return {key: tile_state(value, rows) for key, value in state.items()}
    return type(state)(tile_state(value, rows) for value in state)


class AgentNet(nn.Module):
    """A PPO actor-critic or a DQN Q-network as a feed-forward module of observations.

    ``forward(obs (N, *obs_shape))`` returns ``(logits (N, A), values (N,))`` for PPO and ``Q (N, A)``
    for DQN, N being B selected frames or k * B copies of them (copy-major).

    Args:
        network: ``policy.agent`` (PPO ``ActorCritic``) or ``policy.q_network`` (DQN).
        algo: "ppo" or "dqn".
        states: The memory state before each of T recorded frames (PPO with memory), batch size 1
            each; None for feed-forward agents.
        starts: (T,) bool, True where a frame starts an episode (the memory is reset there).
    """

    def __init__(
        self,
        network: nn.Module,
        algo: str,
        states: list[Any] | None = None,
        starts: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.network = network.eval()
        self.algo = algo
        self.memory = concat_states(states) if states and states[0] is not None else None  # (T, ...) tensors
        self.starts = starts
        self.selected: torch.Tensor | None = None

    @property
    def recurrent(self) -> bool:
        return self.memory is not None

    def select_frames(self, indices: torch.Tensor) -> None:
        """The recorded frames (indices into the T frames) the next calls are about."""
        self.selected = indices

    def forward(self, obs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.algo == "dqn":
            return self.network(obs)
        rows = obs.shape[0]
        state, starts = None, torch.zeros(rows, dtype=torch.bool, device=obs.device)
        if self.recurrent:
            if self.selected is None:
                raise ValueError("a recurrent agent needs select_frames(indices) before it is called")
            state = tile_state(select_state(self.memory, self.selected), rows)
            starts = tile_rows(self.starts[self.selected].to(obs.device), rows)
        logits, values, _ = self.network(obs[None], state, starts[None])  # (1, N, A), (1, N)
        return logits[0], values[0]


def target_of(algo: str, head: str) -> Target:
    """What a map of this agent explains.

    PPO's policy: the log-probability of the action taken (its deletion check watches the probability);
    PPO's value head: V(s). DQN: the chosen action's Q-value minus the mean Q-value, what decides the
    choice (Q itself is mostly the value of the state, shared by every action).

    Raises:
        ValueError: An unknown head, or the value head of a DQN agent.
    """
    if head not in HEADS:
        raise ValueError(f"unknown head '{head}'; valid: {', '.join(HEADS)}")
    if algo == "dqn":
        if head == "value":
            raise ValueError("--head value needs a PPO agent (DQN has no value head); valid: policy")
        return Target("q", "q_gap", "q_gap", None)
    if head == "value":
        return Target("value", "value", "value", 1)
    return Target("policy", "log_prob", "prob", 0)


def cam_module_of(module: AgentNet, head: str) -> nn.Module:
    """The encoder whose last convolution Grad-CAM explains at: the critic's own for PPO's value head
    when actor and critic have separate encoders, else the (shared or only) encoder."""
    network = module.network
    if head == "value" and getattr(network, "critic_encoder", None) is not None:
        return network.critic_encoder
    return network.encoder


def check_method(name: str, network: nn.Module, obs_shape: tuple[int, ...]) -> None:
    """Refuses, in one line, a method that cannot run on this agent (before anything is played).

    Raises:
        ValueError: An unknown method, an image-only method on vector observations, or Grad-CAM on
            an encoder without convolutions.
    """
    method = get_method(name)
    image_only = method.needs_conv or name == "perturbation"
    if image_only and len(obs_shape) < 2:
        raise ValueError(
            f"{name} needs image observations, this agent sees vectors of shape {tuple(obs_shape)}; "
            "valid here: saliency, gradient_x_input, integrated_gradients"
        )
    if method.needs_conv:
        last_conv_layer(network.encoder)


# ---------------------------------------------------------------------------------------------
# Greedy play, recorded
# ---------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One agent step as the agent saw it.

    Attributes:
        obs: (*obs_shape) the observation the action was chosen on.
        frame: (H, W, 3) uint8 colour frame of that moment, or None when not rendered.
        action: The action taken.
        value: V(s) (PPO) or max_a Q(s, a) (DQN).
        prob: pi(a | s) of the action taken (PPO), None for DQN.
        start: True for the first step of an episode.
        state: The memory state before the step (batch 1, CPU), None for feed-forward agents.
        episode: 0-based episode number.
        x_pos: Mario's x position after the step, when the env reports it.
    """

    obs: np.ndarray
    frame: np.ndarray | None
    action: int
    value: float
    prob: float | None
    start: bool
    state: Any
    episode: int
    x_pos: int | None = None


@dataclass
class EpisodeResult:
    """How an episode went: return in the game's units, length and (Mario) progress."""

    ret: float
    length: int
    x_pos_max: int | None = None
    flag_get: bool | None = None


@dataclass
class Recording:
    """Greedy play of an agent: its steps, episode results, frame rate and action names."""

    steps: list[Step] = field(default_factory=list)
    episodes: list[EpisodeResult] = field(default_factory=list)
    fps: float = 30.0
    action_names: list[str] | None = None
    crop_top: int = 0

    def obs(self) -> torch.Tensor:
        """(T, *obs_shape) the observations, in their own dtype."""
        return torch.as_tensor(np.stack([step.obs for step in self.steps]))

    def actions(self) -> torch.Tensor:
        return torch.tensor([step.action for step in self.steps], dtype=torch.long)

    def starts(self) -> torch.Tensor:
        return torch.tensor([step.start for step in self.steps], dtype=torch.bool)

    def action_name(self, action: int) -> str:
        return self.action_names[action] if self.action_names else str(action)


def _action_names(env: Any) -> list[str] | None:
    try:
        names = env.get_wrapper_attr("action_names")
    except AttributeError:
        return None
    return [str(name) for name in names] if names is not None else None


def play(
    loaded: LoadedAgent,
    episodes: int = 1,
    seed: int = 0,
    max_steps: int = 5000,
    render: bool = True,
    on_step: Callable[[Step], bool] | None = None,
) -> Recording:
    """Plays ``episodes`` episodes with the loaded agent (greedy unless it was loaded stochastic).

    The env is built as for evaluation (``envs.eval_overrides``: Mario starts after a random number of
    no-ops, seeded by ``seed``), with ``rgb_array`` rendering.

    Args:
        loaded: From ``agents.load_agent``.
        episodes: Episodes to play.
        seed: Seed of the first episode; episode i uses ``seed + i``.
        max_steps: Cut an episode after this many steps.
        render: Record the colour frame of each step.
        on_step: Called with each step as it is recorded; returning False stops the play.

    Returns:
        The ``Recording``.
    """
    policy = loaded.policy
    name = loaded.config.env
    env = envs.make(name, render_mode="rgb_array" if render else None, **envs.eval_overrides(name))
    recording = Recording(
        fps=float(env.metadata.get("render_fps") or 30),
        action_names=_action_names(env),
        crop_top=int(envs.resolve(name).env_kwargs.get("crop_top", 0) or 0),
    )
    try:
        for episode in range(episodes):
            obs, info = env.reset(seed=seed + episode)
            policy.reset(1)
            starts = np.ones(1, dtype=bool)
            furthest, flag, total, length = 0, False, 0.0, 0
            for _ in range(max_steps):
                frame = np.asarray(env.render(), dtype=np.uint8) if render else None
                state = detach_state(policy.state) if isinstance(policy, PPOPolicy) else None
                actions, extras = policy.act(obs[None], starts)
                action = int(actions[0])
                step = Step(
                    obs=np.asarray(obs),
                    frame=frame,
                    action=action,
                    value=float(extras["value"][0]),
                    prob=_prob_of(policy, obs, state, starts, action),
                    start=bool(starts[0]),
                    state=_to_cpu(state),
                    episode=episode,
                )
                obs, reward, terminated, truncated, info = env.step(action)
                starts[:] = False
                total += float(reward)
                length += 1
                if "x_pos" in info:
                    step.x_pos = int(info["x_pos"])
                    furthest = max(furthest, step.x_pos)
                    flag = flag or bool(info.get("flag_get", False))
                recording.steps.append(step)
                if on_step is not None and not on_step(step):
                    return recording
                if terminated or truncated:
                    if "episode" in info:  # the game's units (rewards may be scaled for training)
                        total = float(np.asarray(info["episode"]["r"]).reshape(-1)[0])
                    break
            recording.episodes.append(
                EpisodeResult(
                    total, length, furthest if "x_pos" in info else None, flag if "x_pos" in info else None
                )
            )
    finally:
        env.close()
    return recording


@torch.no_grad()
def _prob_of(policy: Any, obs: np.ndarray, state: Any, starts: np.ndarray, action: int) -> float | None:
    """pi(action | obs) of a PPO policy at the memory it had before the step; None for DQN."""
    if not isinstance(policy, PPOPolicy):
        return None
    obs_tensor = torch.as_tensor(obs, device=policy.device)[None, None]
    starts_tensor = torch.as_tensor(starts, device=policy.device)[None]
    logits, _, _ = policy.agent(obs_tensor, state, starts_tensor)
    return float(action_distribution(logits[0, 0]).probs[action])


def _to_cpu(state: Any) -> Any:
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {key: _to_cpu(value) for key, value in state.items()}
    return type(state)(_to_cpu(value) for value in state)


# ---------------------------------------------------------------------------------------------
# From a recording to what the checks take
# ---------------------------------------------------------------------------------------------


def agent_net(loaded: LoadedAgent, recording: Recording | None = None) -> AgentNet:
    """The loaded agent as an ``AgentNet`` on CPU, with the recorded memory of every frame."""
    policy = loaded.policy
    if isinstance(policy, DQNPolicy):
        return AgentNet(policy.q_network.cpu(), "dqn")
    if not isinstance(policy, PPOPolicy):
        raise ValueError(f"cannot explain a policy of type {type(policy).__name__}; valid: PPO, DQN")
    states = [step.state for step in recording.steps] if recording is not None else None
    starts = recording.starts() if recording is not None else None
    return AgentNet(policy.agent.cpu(), "ppo", states, starts)


def agent_subject(loaded: LoadedAgent, recording: Recording, head: str = "policy") -> Subject:
    """Everything the checks need: the agent, the recorded frames, the actions taken, the target."""
    module = agent_net(loaded, recording)
    obs = recording.obs()
    return Subject(
        module=module,
        obs=obs,
        index=recording.actions(),
        target=target_of(module.algo, head),
        cam_module=lambda copy: cam_module_of(copy, head),
        deletion_mode="blur" if obs.dim() >= 3 else "zero",
    )


def feature_groups(env_name: str, dim: int) -> list[tuple[str, list[int]]]:
    """Named groups of observation entries for a per-feature plot: one per feature for classic control,
    one per cell of the agent's view (and its direction) for MiniGrid's flat one-hot observations,
    ``x[i]`` otherwise.

    Returns:
        ``[(name, [entry indices])]``.
    """
    preset = envs.resolve(env_name)
    names = FEATURE_NAMES.get(preset.env_id)
    if names is not None and len(names) == dim:
        return [(name, [i]) for i, name in enumerate(names)]
    cells = (dim - MINIGRID_DIRECTIONS) / MINIGRID_CELL_FEATURES
    view = int(round(max(cells, 0.0) ** 0.5))
    if preset.kind == "minigrid" and view > 0 and view * view == cells:
        # MiniGrid's view image is indexed (column, row); the agent stands in the bottom row's middle.
        groups = []
        for column in range(view):
            for row in range(view):
                ahead, side = view - 1 - row, column - view // 2
                label = (f"ahead {ahead}" if ahead else "here") + (
                    f" {'right' if side > 0 else 'left'} {abs(side)}" if side else ""
                )
                start = (column * view + row) * MINIGRID_CELL_FEATURES
                groups.append((label, list(range(start, start + MINIGRID_CELL_FEATURES))))
        groups.append(("direction", list(range(dim - MINIGRID_DIRECTIONS, dim))))
        return groups
    return [(f"x[{i}]", [i]) for i in range(dim)]


def grouped_attributions(
    maps: torch.Tensor, groups: list[tuple[str, list[int]]]
) -> tuple[np.ndarray, list[str]]:
    """(T, F) signed attributions summed within each group; the ``MAX_PLOTTED_FEATURES`` groups with the
    largest mean |attribution| are kept (in their order) so that a plot stays readable.

    Returns:
        ``(values (T, G), names)``.
    """
    flat = maps.reshape(maps.shape[0], -1).double().numpy()
    values = np.stack([flat[:, index].sum(axis=1) for _, index in groups], axis=1)
    names = [name for name, _ in groups]
    if len(names) > MAX_PLOTTED_FEATURES:
        keep = np.sort(np.argsort(-np.abs(values).mean(axis=0))[:MAX_PLOTTED_FEATURES])
        values, names = values[:, keep], [names[i] for i in keep]
    return values, names
