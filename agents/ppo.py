"""Proximal Policy Optimization (Schulman et al. 2017), one readable file in the style of CleanRL.

Each update collects ``num_steps`` transitions from ``num_envs`` envs, computes advantages with
GAE, then runs ``update_epochs`` passes of minibatch SGD on the clipped objective

    L = -min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t) + c_v * L_value - c_e * H[pi],
    r_t = pi(a_t | s_t) / pi_old(a_t | s_t).

Optional memory: the encoder's features go through an LSTM, a GRU or a causal Transformer from
``nets/`` before the actor-critic head. Recurrent minibatches then hold whole env sequences
(time order kept) and re-run the memory from the state saved at the start of the rollout, with the
memory reset wherever an episode started.

Optional augmentation of pixels, ``augment=shift``: DrAC (Raileanu et al. 2021) shifts a share
(``drac_share``) of each minibatch's frames by up to 4 pixels and pulls the policy and value on them
towards those on the originals (:func:`drac_loss`); the clipped ratio only ever sees the originals,
whose probabilities the rollout recorded. ``init_encoder`` starts the encoder from a pre-trained one (a ``lab fit ssl``
run, :func:`load_encoder_tensors`), ``freeze_encoder`` keeps it fixed. ``init_weights`` starts the whole
network from another run (fine-tuning, e.g. a distilled student under sticky actions), and
``keep_zeros`` keeps a pruned network's zero weights at zero while it learns. ``kickstart`` pulls the
actor towards another PPO agent's policy with a decaying KL term (:func:`ppo_update`), so that
fine-tuning a distilled or per-stage agent starts from what it knows instead of drifting from it.

Tensors in the rollout are time-major: ``(T, N, ...)`` with T = num_steps and N = num_envs.

The file reads top-down: the config, the network, the greedy policy, then ``train`` (a short loop
on the run engine of :mod:`agents.engine`), collection, and the update's math (``ppo_update``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch
import torch.nn as nn
from torch.distributions import Categorical, kl_divergence

import nets
from agents.engine import (
    AgentConfig,
    AsyncLearner,
    EvalListener,
    StartWeights,
    TrainingRun,
    config_routes,
    env_action_set,
    played_stages,
)
from agents.episodes import env_stages, route_demonstrations
from core.checkpoint import CheckpointError, load_checkpoint, read_sidecar
from core.compute import adam_kernel, bf16_autocast, forward_copy, set_learner_threads
from core.config import config_from_dict as rebuild_config
from core.config import option
from core.runs import locate_checkpoint
from nets.augment import AUGMENTS, SHIFT_PAD, shift_images

ALGO = "ppo"


@dataclass
class PPOConfig(AgentConfig):
    """Every field can be set with ``lab train ... --set key=value``."""

    MARIO_ONLY: ClassVar[tuple[str, ...]] = (
        *AgentConfig.MARIO_ONLY,
        "imitate",
        "imitate_coef",
        "stage_gamma",
    )

    shared_encoder: bool = option(True, "actor and critic share the encoder")
    memory: Literal["none", "lstm", "gru", "transformer"] = option(
        "none", "recurrent/attention memory after the encoder"
    )
    memory_size: int = option(128, "memory width (hidden size / d_model)", min=1)
    memory_len: int = option(16, "Transformer memory length in steps", min=1)
    num_steps: int = option(128, "rollout length per env per update", min=1)
    gae_lambda: float = option(0.95, "GAE lambda", min=0.0, max=1.0)
    num_minibatches: int = option(4, "minibatches per epoch", min=1)
    update_epochs: int = option(4, "passes over each rollout", min=1)
    norm_adv: bool = option(True, "normalise advantages per minibatch")
    clip_coef: float = option(0.2, "policy ratio clip epsilon", min=0.0)
    clip_vloss: bool = option(True, "clip the value loss too")
    ent_coef: float = option(0.01, "entropy bonus coefficient", min=0.0)
    vf_coef: float = option(0.5, "value loss coefficient", min=0.0)
    target_kl: float | None = option(None, "stop the epochs early above this KL")
    reward_scale: float = option(1.0, "multiply env rewards by this", min=0.0)
    augment: Literal["none", "shift"] = option(
        "none",
        "pixels: shift (pad 4, random crop) with DrAC's regulariser; the ratio keeps the original frames",
    )
    drac_coef: float = option(0.1, "augment: weight of DrAC's policy KL and value gap (original vs shifted)", min=0.0)  # fmt: skip
    # DrAC's second pass costs a forward and backward per regularised frame; a quarter of each
    # minibatch keeps that cost small and still regularises thousands of frames per update.
    drac_share: float = option(0.25, "augment: share of each minibatch (of its envs, with memory) whose shifted copy DrAC sees", min=0.01, max=1.0)  # fmt: skip
    overlap: bool = option(
        False, "learn from a rollout in a thread while collecting the next (policy lag of one update)"
    )
    env_groups: int = option(
        1,
        "env groups stepped in turn (async back-end): one group's actions are computed "
        "while the others' workers step",
        min=1,
        max=64,
    )
    imitate: str | None = option(
        None,
        "Mario: route files (as route_starts) whose replays the actor imitates before PPO begins "
        "(behaviour cloning, imitate_epochs passes; not on resume)",
    )
    # 30 passes is what the timed 1-1 candidate used; a found route holds the search's detours (random
    # held actions, steps back), so no number of passes makes the imitation alone a reliable greedy
    # policy (RESULTS.md, "Imitating a found route": benchmarks/imitate_probe.py).
    imitate_epochs: int = option(30, "imitate: passes over the routes' (observation, action) pairs", min=1)
    imitate_coef: float = option(
        0.0,
        "imitate: weight of the routes' cross-entropy added to PPO's loss, decaying linearly to 0 over "
        "imitate_steps agent steps (DAPG's demonstration term); 0: only the fit before PPO",
        min=0.0,
    )
    imitate_steps: int = option(500_000, "imitate_coef: agent steps over which its weight decays to 0", min=1)
    # A branch that pays only after a long detour needs a longer horizon than the stages the agent
    # already plays: under gamma 0.9 1-3's high route is worth less than its dead end, and a gamma of
    # 0.99 for all of World 1 cost the other stages (RESULTS.md, "Why 1-3's branch does not move").
    stage_gamma: str | None = option(
        None,
        "Mario: discounts of single stages, e.g. 1-3:0.99 or 1-2:0.95,1-3:0.99; the other stages keep gamma",
    )
    kickstart: str | None = option(
        None,
        "a PPO run (or checkpoint) whose policy the actor is pulled towards: kickstart_coef times "
        "KL(pi_teacher || pi) on the rollout's states is added to the loss (kickstarting), decaying "
        "linearly to 0 over kickstart_steps agent steps",
    )
    # The teacher's distributions are the targets, not its greedy actions: a KL to them keeps the
    # student's sharpness where the teacher is sure and leaves it free where the teacher hesitates.
    kickstart_coef: float = option(1.0, "kickstart: weight of the KL to the teacher at step 0", min=0.0)
    kickstart_steps: int = option(
        1_000_000, "kickstart: agent steps over which the KL's weight decays to 0", min=1
    )
    critic_only_until: int = option(
        0,
        "agent step until which only the critic's head (and a separate critic encoder) learns, from the "
        "value loss alone: a warm-up for the critic when gamma or reward_scale changes on resume (with "
        "clip_vloss=false, or the critic moves at most clip_coef per update)",
        min=0,
    )

    def check(self) -> None:
        """Checks the fields against each other; ``lab train`` runs this before it creates the run."""
        super().check()
        batch_size = self.num_envs * self.num_steps
        if batch_size < self.num_minibatches or (
            self.memory != "none" and self.num_envs % self.num_minibatches
        ):
            raise ValueError(
                f"num_envs*num_steps={batch_size} must split into num_minibatches={self.num_minibatches} "
                "(recurrent PPO: num_envs must be divisible by num_minibatches)"
            )
        if self.num_envs % self.env_groups:
            raise ValueError(f"num_envs={self.num_envs} must split into env_groups={self.env_groups}")
        if self.env_groups > 1 and self.env_backend == "sync":
            raise ValueError("env_groups > 1 needs env_backend=async or ray (workers to step in turn)")
        if self.imitate:
            if self.memory != "none":
                raise ValueError(
                    f"imitate needs memory=none: a route's frames are fitted one at a time, not as sequences "
                    f"(this run has memory={self.memory})"
                )
            config_routes(self, "imitate")
        elif self.imitate_coef > 0:
            raise ValueError(f"imitate_coef={self.imitate_coef} needs routes to imitate (set imitate=ROUTES)")
        stage_gammas(self)
        if self.kickstart and self.memory != "none":
            raise ValueError(
                f"kickstart needs memory=none: the teacher labels single frames, not sequences "
                f"(this run has memory={self.memory})"
            )
        if self.memory != "none" and not self.shared_encoder:
            # The critic head reads the memory's output; a separate critic encoder would bypass it.
            raise ValueError(
                f"memory={self.memory} needs shared_encoder=true (set --set shared_encoder=true)"
            )


CONFIG = PPOConfig


def stage_gammas(config: PPOConfig) -> dict[str, float]:
    """``stage_gamma`` as ``{"1-3": 0.99}`` ({} when unset).

    Raises:
        ValueError: one line naming an entry that is not ``W-S:gamma`` with gamma in (0, 1], or a
            stage the preset never plays.
    """
    if not config.stage_gamma:
        return {}
    played = played_stages(config.env)
    gammas: dict[str, float] = {}
    for entry in config.stage_gamma.split(","):
        stage, _, value = entry.strip().partition(":")
        try:
            gamma = float(value)
        except ValueError:
            gamma = math.nan
        if not 0.0 < gamma <= 1.0:
            raise ValueError(
                f"stage_gamma={config.stage_gamma!r}: {entry.strip()!r} is not STAGE:GAMMA with GAMMA in (0, 1], "
                "e.g. 1-3:0.99"
            )
        if stage not in played:
            raise ValueError(
                f"stage_gamma={config.stage_gamma!r}: {config.env!r} never plays {stage!r}; "
                f"its stages: {', '.join(played)}"
            )
        gammas[stage] = gamma
    return gammas


def episode_gammas(infos: dict[str, Any], count: int, gammas: dict[str, float], default: float) -> np.ndarray:
    """The discount of each of ``count`` envs' episodes in progress, from the stage in a vector
    step's (or reset's) ``infos`` (after a same-step autoreset: the new episode's): ``gammas`` for
    the stages named there, ``default`` for the others. Returns (count,) float32."""
    out = np.full(count, default, dtype=np.float32)
    if not gammas:
        return out
    for index, label in enumerate(env_stages(infos, count)):
        out[index] = gammas.get(label, default) if label is not None else default
    return out


# ---------------------------------------------------------------------------------------------
# The network: encoder -> (memory) -> actor-critic head
# ---------------------------------------------------------------------------------------------


def build_encoder(config: PPOConfig, obs_shape: tuple[int, ...]) -> nn.Module:
    """The config's encoder; the MLP uses tanh, as CleanRL's PPO."""
    return nets.build_encoder(config.net, obs_shape, config.hidden, activation="tanh")


def setup_network(
    config: Any, model: nn.Module, encoders: list[nn.Module], obs_shape: tuple[int, ...], resumed: bool
) -> list[StartWeights]:
    """Applies the start options of a PPO or DQN config to a freshly built ``model`` and its
    ``encoders``: checks that ``augment`` has images to shift, loads ``init_weights`` or
    ``init_encoder`` (not on resume: the checkpoint holds the weights) and freezes the encoders with
    ``freeze_encoder``. ``keep_zeros`` is the optimizer's part (:func:`keep_zero_weights`).

    Returns:
        where the loaded weights came from (empty when none were loaded).

    Raises:
        ValueError: augmentation of non-image observations, or weights that do not fit.
        CheckpointError: nothing loadable at ``init_weights`` or ``init_encoder``.
    """
    if config.augment != "none" and len(obs_shape) != 3:
        raise ValueError(
            f"augment={config.augment} needs image observations (C, H, W), this env gives {obs_shape}; "
            f"valid: {', '.join(AUGMENTS)} (none for vectors)"
        )
    started_from = []
    if config.init_weights and not resumed:
        started_from.append(copy_tensors(config.init_weights, [model], prefix="", option="init_weights"))
    if config.init_encoder and not resumed:
        started_from.append(load_encoder_tensors(config.init_encoder, encoders))
    for encoder in encoders if config.freeze_encoder else []:
        encoder.requires_grad_(False)  # Adam skips parameters without gradients
    return started_from


def load_encoder_tensors(path: str, encoders: list[nn.Module]) -> StartWeights:
    """Copies the ``encoder.*`` tensors of the newest checkpoint at ``path`` into each encoder.

    Any run whose model keeps its encoder under ``encoder`` fits: ``lab fit ssl`` and ``lab fit
    digits`` runs, PPO and DQN agents. Only those tensors are read (never a head, a projector or a
    target network), and every tensor of the encoder must be there with its shape.

    Raises:
        CheckpointError: nothing loadable at ``path``, or no model in it.
        ValueError: a tensor of the encoder missing there, or of another shape.
    """
    return copy_tensors(path, encoders, prefix="encoder.", option="init_encoder")


def copy_tensors(path: str, modules: list[nn.Module], prefix: str, option: str) -> StartWeights:
    """Copies the model tensors named ``prefix + name`` of the newest checkpoint at ``path`` (read
    once) into each module's ``name``; every tensor of a module must be there with its shape. With an
    empty prefix (the whole network) the checkpoint may hold nothing else either, so that a recurrent
    agent never loads into a feed-forward one.

    Raises:
        CheckpointError: nothing loadable at ``path``, or no model in it.
        ValueError: a tensor missing, left over or of another shape; the message names ``option``.
    """
    sidecar, _ = locate_checkpoint(path)
    state, _ = load_checkpoint(sidecar)
    if not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{option}: {sidecar} holds no model weights")
    source = {key[len(prefix) :]: value for key, value in state["model"].items() if key.startswith(prefix)}
    hint = "train the same net (and memory) on the same observation shape"
    for module in modules:
        target = module.state_dict()
        missing, extra = sorted(target.keys() - source.keys()), sorted(source.keys() - target.keys())
        if missing:
            raise ValueError(
                f"{option}: {sidecar} has no tensor {prefix}{missing[0]} ({len(missing)} of {len(target)} "
                f"missing); {hint}"
            )
        if extra and not prefix:
            raise ValueError(f"{option}: {sidecar} has a tensor {extra[0]} that this network lacks; {hint}")
        for name, tensor in target.items():
            if source[name].shape != tensor.shape:
                raise ValueError(
                    f"{option}: {prefix}{name} is {tuple(source[name].shape)} in {sidecar} but "
                    f"{tuple(tensor.shape)} here; {hint}"
                )
        module.load_state_dict({name: source[name] for name in target})
    step = state.get("global_step", state.get("step"))
    sha256 = read_sidecar(sidecar)["weights_sha256"]  # load_checkpoint checked the weights against it
    return StartWeights(option, str(path), str(sidecar), None if step is None else int(step), sha256)


IMITATE_BATCH = 64  # (observation, action) pairs per behaviour-cloning step


class DemoTensors(NamedTuple):
    """The routes' replays on the training's device, for behaviour cloning."""

    obs: torch.Tensor  # (D, *obs_shape)
    actions: torch.Tensor  # (D,) int64


class Imitation(NamedTuple):
    """The routes' replays and the weight of their cross-entropy in one update's loss."""

    demos: DemoTensors
    weight: float


def demo_tensors(config: PPOConfig, device: torch.device) -> DemoTensors:
    """Replays the routes of ``config.imitate`` (:func:`agents.episodes.route_demonstrations`) with
    the training's action set."""
    overrides = {"actions": config.actions} if config.actions else {}
    demos = route_demonstrations(config.env, config_routes(config, "imitate"), overrides)
    return DemoTensors(
        torch.as_tensor(demos.obs, device=device), torch.as_tensor(demos.actions, device=device)
    )


def imitation_loss(
    forward: nn.Module, demos: DemoTensors, index: torch.Tensor, autocast: torch.autocast | None = None
) -> torch.Tensor:
    """The mean cross-entropy of the actor's logits on the demonstrations ``index`` (M,) against the
    routes' actions."""
    no_starts = torch.zeros((1, len(index)), dtype=torch.bool, device=index.device)  # feed-forward: unused
    with autocast or contextlib.nullcontext():
        logits, _, _ = forward(demos.obs[index].unsqueeze(0), None, no_starts)  # (1, M, A)
    return nn.functional.cross_entropy(logits[0].float(), demos.actions[index])


def imitate(
    agent: ActorCritic, config: PPOConfig, device: torch.device, demos: DemoTensors | None = None
) -> tuple[float, float]:
    """Behaviour cloning on found routes before PPO begins: ``imitate_epochs`` passes over the
    routes' (observation, action) pairs (``demos``, else :func:`demo_tensors`) in minibatches of
    :data:`IMITATE_BATCH`: the cross-entropy of the actor's logits against the route's actions, Adam
    at the config's learning rate. The critic is left to PPO's first updates; a frozen encoder stays
    as it is.

    Returns:
        ``(loss, accuracy)`` over all pairs after the fit: the mean cross-entropy and the share of
        route actions the greedy actor takes.
    """
    if demos is None:
        demos = demo_tensors(config, device)
    obs, actions = demos
    parameters = [parameter for parameter in agent.parameters() if parameter.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=config.learning_rate, eps=1e-5, **adam_kernel(device))
    generator = torch.Generator().manual_seed(config.seed)
    no_starts = torch.zeros((1, len(actions)), dtype=torch.bool, device=device)  # feed-forward: unused
    for _ in range(config.imitate_epochs):
        for index in torch.randperm(len(actions), generator=generator).split(IMITATE_BATCH):
            loss = imitation_loss(agent, demos, index.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        logits = torch.cat(
            [
                agent(obs[index].unsqueeze(0), None, no_starts[:, : len(index)])[0][0].float()
                for index in torch.arange(len(actions), device=device).split(256)
            ]
        )  # (D, A)
        loss = nn.functional.cross_entropy(logits, actions)
        accuracy = (logits.argmax(dim=-1) == actions).float().mean()
    return float(loss), float(accuracy)


KICKSTART_CHUNK = 1024  # frames per forward pass of the teacher over a rollout


class Kickstart(NamedTuple):
    """The teacher's distributions on one rollout and the weight of their KL in its update's loss."""

    log_probs: torch.Tensor  # (T, N, A) fp32, log pi_teacher(. | s_t)
    weight: float


def load_kickstart_teacher(
    config: PPOConfig, obs_shape: tuple[int, ...], num_actions: int, device: torch.device
) -> ActorCritic:
    """The policy network of ``config.kickstart``, frozen, checked to act in this run's envs.

    Raises:
        CheckpointError: nothing loadable at ``kickstart``.
        ValueError: a teacher that is no PPO agent, has a memory or int8 weights, or sees another
            observation shape or plays another action set.
    """
    try:
        sidecar, meta = locate_checkpoint(str(config.kickstart))
    except CheckpointError as error:
        raise CheckpointError(f"kickstart: {error}") from None
    if meta.get("algo") != ALGO or "config" not in meta:
        kind = f"a {meta['algo']} agent" if "algo" in meta and "config" in meta else "no agent checkpoint"
        raise ValueError(f"kickstart: {sidecar} is {kind}; the teacher must be a PPO agent")
    teacher_config = config_from_dict(meta["config"], source=str(sidecar))
    shape, actions = tuple(meta["obs_shape"]), int(meta["num_actions"])
    problems = [f"memory={teacher_config.memory}"] if teacher_config.memory != "none" else []
    problems += [f"{meta['quantization']} weights"] if meta.get("quantization") else []
    if problems:
        raise ValueError(
            f"kickstart: {sidecar} has {' and '.join(problems)}; the teacher must be a feed-forward fp32 PPO agent"
        )
    if (
        shape != obs_shape
        or actions != num_actions
        or env_action_set(teacher_config) != env_action_set(config)
    ):
        raise ValueError(
            f"kickstart: {sidecar} sees {shape} and plays {actions} actions "
            f"({env_action_set(teacher_config) or teacher_config.env}); this run sees {obs_shape} and plays "
            f"{num_actions} ({env_action_set(config) or config.env}): choose a teacher of the same env"
        )
    teacher = load_policy(sidecar, meta, device).agent
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def teacher_log_probs(teacher: ActorCritic, obs: torch.Tensor, autocast: torch.autocast) -> torch.Tensor:
    """log pi_teacher(. | s) on a rollout's observations ``(T, N, *obs_shape)``: ``(T, N, A)`` fp32,
    computed a few steps at a time (:data:`KICKSTART_CHUNK` frames) to bound the float copies."""
    steps, num_envs = obs.shape[:2]
    chunk = max(1, KICKSTART_CHUNK // num_envs)
    parts = []
    for start in range(0, steps, chunk):
        part = obs[start : start + chunk]  # (t, N, *obs_shape)
        no_starts = torch.zeros(part.shape[:2], dtype=torch.bool, device=obs.device)  # feed-forward: unused
        with autocast:
            logits, _, _ = teacher(part, None, no_starts)
        parts.append(torch.log_softmax(logits.float(), dim=-1))
    return torch.cat(parts)


def keep_zero_weights(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Keeps the weights of ``model`` that are exactly zero now at zero through every step of
    ``optimizer``, so fine-tuning a pruned network keeps its sparsity.

    A step hook re-applies the masks after Adam's update (Adam would otherwise revive them through
    their gradients); a mask is a bool tensor of the weight's shape, kept only for weights with zeros.
    Call it on a resume too: zeros of the checkpoint are zeros still.
    """
    masks = [
        (parameter, parameter.detach() != 0)
        for name, parameter in model.named_parameters()
        if name.endswith("weight") and bool((parameter.detach() == 0).any())
    ]

    @torch.no_grad()
    def reapply(*_: Any) -> None:
        for parameter, mask in masks:
            parameter.mul_(mask)

    optimizer.register_step_post_hook(reapply)


class ActorCritic(nn.Module):
    """Policy and value network. ``forward`` takes time-major batches ``(T, B, *obs_shape)``."""

    def __init__(self, config: PPOConfig, obs_shape: tuple[int, ...], num_actions: int) -> None:
        super().__init__()
        self.encoder = build_encoder(config, obs_shape)
        # CleanRL's classic-control PPO keeps separate actor and critic networks; a shared trunk suits pixels.
        self.critic_encoder = None if config.shared_encoder else build_encoder(config, obs_shape)
        features = self.encoder.out_dim
        self.memory: nn.Module | None = None
        if config.memory in ("lstm", "gru"):
            self.memory = nets.build(config.memory, in_dim=features, hidden_size=config.memory_size)
        elif config.memory == "transformer":
            self.memory = nets.build(
                "transformer",
                in_dim=features,
                d_model=config.memory_size,
                causal=True,
                memory_len=config.memory_len,
                max_len=config.memory_len + config.num_steps + 1,
            )
        if self.memory is not None:
            features = self.memory.out_dim
        self.head = nets.ActorCriticHead(features, num_actions)

    def initial_state(self, batch_size: int, device: torch.device) -> Any:
        return None if self.memory is None else self.memory.initial_state(batch_size, device=device)

    def forward(
        self, obs: torch.Tensor, state: Any, starts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Args: obs (T, B, *obs_shape); starts (T, B) bool, True where an episode begins.

        Returns: logits (T, B, A), values (T, B), the memory state after the last step.
        """
        steps, batch = starts.shape
        features = self.encoder(obs.flatten(0, 1))  # (T*B, F)
        if self.memory is not None:
            sequence = features.view(steps, batch, -1).transpose(0, 1)  # (B, T, F)
            sequence, state = self.memory(sequence, state, reset=starts.transpose(0, 1))
            features = sequence.transpose(0, 1).flatten(0, 1)  # (T*B, M)
        if self.critic_encoder is None:
            logits, values = self.head(features)
        else:
            logits = self.head.actor(features)
            values = self.head.critic(self.critic_encoder(obs.flatten(0, 1))).squeeze(-1)
        return logits.view(steps, batch, -1), values.view(steps, batch), state


def action_distribution(logits: torch.Tensor) -> Categorical:
    """pi(. | s) from the actor's logits (..., A), in fp32 even under bf16 autocast: the one place
    that builds the policy's distribution (acting, the update, stochastic evaluation)."""
    return Categorical(logits=logits.float())


def select_state(state: Any, index: torch.Tensor) -> Any:
    """Memory state of the envs in ``index``; states are dicts/tuples of (B, ...) tensors or None."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state[index]
    if isinstance(state, dict):
        return {key: select_state(value, index) for key, value in state.items()}
    return type(state)(select_state(value, index) for value in state)


def concat_states(states: list[Any]) -> Any:
    """The memory states of env groups joined along the env dimension (undoes ``select_state``)."""
    first = states[0]
    if first is None or len(states) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(states)
    if isinstance(first, dict):
        return {key: concat_states([state[key] for state in states]) for key in first}
    return type(first)(concat_states(list(parts)) for parts in zip(*states, strict=True))


def detach_state(state: Any) -> Any:
    if state is None or isinstance(state, torch.Tensor):
        return None if state is None else state.detach().clone()
    if isinstance(state, dict):
        return {key: detach_state(value) for key, value in state.items()}
    return type(state)(detach_state(value) for value in state)


# ---------------------------------------------------------------------------------------------
# Greedy policy for evaluation and video
# ---------------------------------------------------------------------------------------------


class PPOPolicy:
    """Greedy (argmax) actions from a trained ActorCritic; keeps the memory state between calls.

    With ``stochastic`` set, actions are sampled from the policy instead (torch's global generator),
    as the RL Zoo evaluates Atari agents: a deterministic policy can loop forever where a sampled one
    gets unstuck.
    """

    def __init__(self, agent: ActorCritic, device: torch.device) -> None:
        self.agent = agent.eval()
        self.device = device
        self.state: Any = None
        self.stochastic = False
        self.trained_steps: int | None = None  # agent steps behind the weights, when loaded from a checkpoint

    def sample_actions(self, seed: int) -> None:
        """Samples actions from now on, reproducibly: from torch's global generator, seeded here."""
        self.stochastic = True
        torch.manual_seed(seed)

    def reset(self, num_envs: int) -> None:
        self.state = self.agent.initial_state(num_envs, self.device)

    @torch.no_grad()
    def act(self, obs: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        obs_tensor = torch.as_tensor(obs, device=self.device).unsqueeze(0)  # (1, B, ...)
        starts_tensor = torch.as_tensor(starts, device=self.device).unsqueeze(0)
        logits, values, self.state = self.agent(obs_tensor, self.state, starts_tensor)
        actions = action_distribution(logits[0]).sample() if self.stochastic else logits[0].argmax(dim=-1)
        return actions.cpu().numpy(), {"value": values[0].float().cpu().numpy()}


def load_policy(sidecar: Path, meta: dict[str, Any], device: torch.device) -> PPOPolicy:
    """Rebuilds the greedy policy of a PPO checkpoint."""
    state, _ = load_checkpoint(sidecar)
    config = config_from_dict(meta["config"])
    agent = ActorCritic(config, tuple(meta["obs_shape"]), int(meta["num_actions"])).to(device)
    if meta.get("quantization") == "int8":  # `lab compress --method quantize`: int8 layers, fp32 scales
        from nets.quantized import int8_skeleton

        agent = int8_skeleton(agent)
    agent.load_state_dict(state["model"])
    policy = PPOPolicy(agent, device)
    policy.trained_steps = state.get("global_step")
    return policy


def config_from_dict(values: dict[str, Any], source: str = "") -> PPOConfig:
    """A PPOConfig from a preset's or a run's dictionary; an unknown key raises ConfigError."""
    return rebuild_config(PPOConfig, values, source)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One rollout on the device, time-major: (T, N, ...) with T = num_steps, N = num_envs."""

    obs: torch.Tensor  # (T, N, *obs_shape); pixel observations stay uint8 (4x less memory)
    starts: torch.Tensor  # (T, N) bool, True where an episode began at this step
    actions: torch.Tensor  # (T, N) long
    logprobs: torch.Tensor  # (T, N) log pi_old(a_t | s_t)
    rewards: torch.Tensor  # (T, N)
    ends: torch.Tensor  # (T, N) 1.0 where transition t ended its episode
    values: torch.Tensor  # (T, N) V_old(s_t)
    gammas: torch.Tensor  # (T, N) the discount of transition t's episode (stage_gamma: per stage)
    advantages: torch.Tensor  # (T, N), GAE
    returns: torch.Tensor  # (T, N), advantages + values
    start_state: Any = None  # memory state before step 0 (recurrent minibatches start from it)

    @classmethod
    def empty(
        cls,
        steps: int,
        num_envs: int,
        obs_shape: tuple[int, ...],
        obs_dtype: torch.dtype,
        device: torch.device,
    ) -> Rollout:
        def zeros(dtype: torch.dtype = torch.float32, *shape: int) -> torch.Tensor:
            return torch.zeros((steps, num_envs, *shape), dtype=dtype, device=device)

        return cls(
            obs=zeros(obs_dtype, *obs_shape), starts=zeros(torch.bool), actions=zeros(torch.long),
            logprobs=zeros(), rewards=zeros(), ends=zeros(), values=zeros(), gammas=zeros(),
            advantages=zeros(), returns=zeros(),
        )  # fmt: skip


class Minibatch(NamedTuple):
    """Feed-forward: (1, M) "sequences" of single steps; recurrent: (T, E) whole env sequences."""

    obs: torch.Tensor
    starts: torch.Tensor
    actions: torch.Tensor
    logprobs: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    values: torch.Tensor
    envs: torch.Tensor | None  # recurrent: the env indices (their memory states start the sequences)


class UpdateStats(NamedTuple):
    """One update's statistics: the last minibatch's losses, as CleanRL logs them."""

    loss: torch.Tensor
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    entropy: torch.Tensor
    approx_kl: torch.Tensor
    clipfrac: torch.Tensor
    skipped: int  # minibatch steps skipped for a non-finite loss or gradient
    all_skipped: bool
    rollout: Rollout
    learning_rate: float
    drac: torch.Tensor | None = None  # augment=shift: DrAC's regulariser of the last minibatch
    imitation: torch.Tensor | None = None  # imitate_coef: the routes' cross-entropy of the last minibatch
    kickstart: torch.Tensor | None = None  # kickstart: KL(teacher || policy) of the last minibatch


# ---------------------------------------------------------------------------------------------
# Training: the loop
# ---------------------------------------------------------------------------------------------


def train(
    config: PPOConfig,
    run_dir: Path,
    resume: bool = False,
    progress: bool = True,
    on_eval: EvalListener | None = None,
) -> dict[str, Any]:
    """Trains PPO, writing TensorBoard events, checkpoints and metrics.json into ``run_dir``.

    Returns:
        The ``lab train --json`` summary (:meth:`agents.engine.TrainingRun.finish`).
    """
    run = TrainingRun(ALGO, config, run_dir, resume, progress, on_eval)
    trainer = PPOTrainer(config, run)
    with run.guard(trainer):
        for update in range(trainer.first_update, trainer.num_updates):
            if run.done:  # a periodic eval reached config.until
                break
            rollout = trainer.rollouts[update % len(trainer.rollouts)]
            collect_rollout(trainer, rollout)  # advances run.global_step by num_envs * num_steps
            trainer.learner.submit(
                (update, run.global_step), learn, trainer, rollout, update,
                book=trainer.finish_update, refresh=trainer.refresh_actor,
            )  # fmt: skip
        trainer.learner.finish(trainer.finish_update)
        trainer.save()
    return run.finish(PPOPolicy(trainer.agent, run.device))


class PPOTrainer:
    """PPO's state during training: envs, networks, optimizer, rollout storage and counters.

    With ``config.overlap`` the update on rollout k runs in a background thread while the main
    thread collects rollout k+1 with a copy of the weights from before that update (a policy lag of
    one update, as in APPO). The importance ratio is taken against the policy that collected the
    data, so the clipped objective stays correct; only the starting ratio is no longer 1.

    With ``config.env_groups`` = G > 1 the envs form G groups, each a vector env with its own
    worker processes, stepped in turn: group g's workers run its emulators while the main thread
    computes the actions of the next group, so the inference hides behind the env steps. The data
    is the same as with one vector env (same policy, same per-env seeds and transitions); only the
    order of the random draws differs.
    """

    def __init__(self, config: PPOConfig, run: TrainingRun) -> None:
        self.config, self.run = config, run
        device = run.device
        # While env workers step on the same cores, inference keeps to one thread (set_learner_threads);
        # during a serial update the workers wait, so it may use more.
        self.rollout_threads = (
            1 if device.type == "cpu" and config.env_backend == "async" else run.learn_threads
        )
        self.num_updates = max(1, config.total_steps // (config.num_envs * config.num_steps))
        self.first_update = int(run.saved.get("update", 0))
        self.completed_updates, self.completed_steps = self.first_update, run.global_step

        # Env groups stepped in turn: group g holds envs g*n .. (g+1)*n - 1 (n = num_envs / env_groups)
        # and its own workers; env i is seeded as it would be in one vector env of num_envs.
        group_size = config.num_envs // config.env_groups
        self.groups = [slice(g * group_size, (g + 1) * group_size) for g in range(config.env_groups)]
        self.vec_envs = [
            run.make_vec_env(group_size, seed=config.seed + run.global_step + part.start)
            for part in self.groups
        ]
        space = self.vec_envs[0].single_observation_space
        obs_shape, num_actions = tuple(space.shape), int(self.vec_envs[0].single_action_space.n)
        self.agent = ActorCritic(config, obs_shape, num_actions).to(device)
        encoders = [e for e in (self.agent.encoder, self.agent.critic_encoder) if e is not None]
        run.record_start_weights(
            setup_network(config, self.agent, encoders, obs_shape, resumed="model" in run.saved)
        )
        self.optimizer = torch.optim.Adam(
            self.agent.parameters(), lr=config.learning_rate, eps=1e-5, **adam_kernel(device)
        )
        if "model" in run.saved:
            self.agent.load_state_dict(run.saved["model"])
            if "optimizer" in run.saved:  # a slim checkpoint, as shipped, resumes with a fresh optimizer
                self.optimizer.load_state_dict(run.saved["optimizer"])
        if config.keep_zeros:
            keep_zero_weights(self.agent, self.optimizer)
        # The kickstart teacher while its KL's weight lasts (a resume past kickstart_steps needs none).
        self.teacher = (
            load_kickstart_teacher(config, obs_shape, num_actions, device)
            if config.kickstart and run.global_step < config.kickstart_steps
            else None
        )
        run.start(obs_shape, num_actions, self.num_updates * config.num_envs * config.num_steps)
        # The routes' replays: for the fit before PPO (not on resume) and, while imitate_coef's weight
        # lasts, for the imitation term of every update. After run.start, so the run's clock (and a
        # timed --until) counts them.
        fit = bool(config.imitate) and "model" not in run.saved
        self.demos = (
            demo_tensors(config, device)
            if fit or (config.imitate_coef > 0 and run.global_step < config.imitate_steps)
            else None
        )
        if fit:
            loss, accuracy = imitate(self.agent, config, device, self.demos)
            assert run.logger is not None
            run.logger.scalars({"imitate/loss": loss, "imitate/accuracy": accuracy}, run.global_step)
        self.forward = torch.compile(self.agent) if config.compile else self.agent
        # The collector's network: the learner's own, or with overlap a forward copy that only changes
        # between updates (the learner thread changes `agent` while the collector runs); with bf16 it
        # stores its Linear/Conv weights in bf16, the numbers autocast would round them to anyway.
        self.actor = forward_copy(self.agent, device, config.bf16) if config.overlap else self.agent
        self.actor_forward = (
            (torch.compile(self.actor) if config.compile else self.actor) if config.overlap else self.forward
        )
        self.autocast = bf16_autocast(device, config.bf16)

        # Rollout storage on the device; with overlap two, one being filled while the other is learnt from.
        obs_dtype = torch.uint8 if space.dtype == np.uint8 else torch.float32
        self.rollouts = [
            Rollout.empty(config.num_steps, config.num_envs, obs_shape, obs_dtype, device)
            for _ in range(2 if config.overlap else 1)
        ]
        # The observation each env acts on next, (N, *obs_shape), whether it starts an episode, and
        # the discount of the episode it plays (N,).
        resets = [
            vec_env.reset(seed=config.seed + run.global_step + part.start)
            for vec_env, part in zip(self.vec_envs, self.groups, strict=True)
        ]
        self.next_obs = torch.cat([torch.as_tensor(obs, device=device) for obs, _ in resets])
        self.next_starts = torch.ones(config.num_envs, dtype=torch.bool, device=device)
        self.stage_gammas = stage_gammas(config)
        self.env_gammas = torch.cat([
            torch.as_tensor(episode_gammas(infos, group_size, self.stage_gammas, config.gamma), device=device)
            for _, infos in resets
        ])  # fmt: skip
        self.memory_states = [self.agent.initial_state(group_size, device) for _ in self.groups]
        self.learner: AsyncLearner[UpdateStats] = AsyncLearner(config.overlap, "ppo-learner")

    def refresh_actor(self) -> None:
        """The collector's copy takes the weights of the update just booked (overlap only)."""
        self.actor.load_state_dict(self.agent.state_dict())

    def finish_update(self, tag: tuple[int, int], stats: UpdateStats, wrap_up: bool = True) -> None:
        """After the update on the rollout that ended at agent step ``step``: log, then (``wrap_up``)
        eval and checkpoint when due."""
        update, step = tag
        run = self.run
        run.skipped_updates += stats.skipped
        run.bad_in_a_row = run.bad_in_a_row + 1 if stats.all_skipped else 0
        run.check_health(MAX_BAD_UPDATES, "updates")
        rollout = stats.rollout
        variance = rollout.returns.var()
        explained_variance = (
            float(1 - (rollout.returns - rollout.values).var() / variance) if variance > 0 else float("nan")
        )
        record = {key: getattr(stats, key).item() for key in ("loss", "policy_loss", "value_loss", "entropy")}
        extra = {
            key: value.item()
            for key in ("drac", "imitation", "kickstart")
            if (value := getattr(stats, key)) is not None
        }
        run.log(step, {**record, **extra}, {
            "charts/learning_rate": stats.learning_rate,
            "losses/value_loss": record["value_loss"], "losses/policy_loss": record["policy_loss"],
            "losses/entropy": record["entropy"], "losses/approx_kl": float(stats.approx_kl),
            "losses/clipfrac": float(stats.clipfrac), "losses/explained_variance": explained_variance,
            **{f"losses/{key}": value for key, value in extra.items()},
        })  # fmt: skip
        self.completed_updates, self.completed_steps = update + 1, step
        if not wrap_up:
            return
        if run.eval_due(step):
            run.evaluate(PPOPolicy(self.agent, run.device), seed=self.config.seed + 10_000 + step, step=step)
            self.agent.train()
        if run.checkpoint_due(step):
            self.save()

    def save(self) -> None:
        # Only completed updates count: an interrupted rollout is collected again on resume.
        state = {
            "model": self.agent.state_dict(), "optimizer": self.optimizer.state_dict(),
            "global_step": self.completed_steps, "update": self.completed_updates,
        }  # fmt: skip
        self.run.save(self.completed_steps, state)

    def settle(self) -> None:
        self.learner.settle(lambda tag, stats: self.finish_update(tag, stats, wrap_up=False))

    def close(self) -> None:
        self.learner.shutdown()


MAX_BAD_UPDATES = 3  # updates in a row whose every minibatch step had a non-finite loss or gradient


# ---------------------------------------------------------------------------------------------
# Training: collection
# ---------------------------------------------------------------------------------------------


def collect_rollout(trainer: PPOTrainer, rollout: Rollout) -> None:
    """Fills ``rollout`` with ``num_steps`` steps of every env, then its GAE advantages and returns.

    One batched forward pass per env group per step. With several groups, group g's workers step
    while the actions of the next groups are computed, so the inference hides behind the emulators.
    """
    config, run = trainer.config, trainer.run
    rollout.start_state = detach_state(concat_states(trainer.memory_states))
    set_learner_threads(trainer.rollout_threads)
    for step in range(config.num_steps):
        run.global_step += config.num_envs
        for group, vec_env in enumerate(trainer.vec_envs):
            if config.env_groups == 1:
                observe(trainer, rollout, step, 0, vec_env.step(act(trainer, rollout, step, 0)))
                continue
            if step:  # the group's previous step, which ran while the other groups were served
                observe(trainer, rollout, step - 1, group, vec_env.step_wait())
            vec_env.step_async(act(trainer, rollout, step, group))
    if config.env_groups > 1:
        for group, vec_env in enumerate(trainer.vec_envs):
            observe(trainer, rollout, config.num_steps - 1, group, vec_env.step_wait())

    # ---- advantages: GAE(lambda), no bootstrap across an episode end ----------------------------
    with torch.no_grad(), trainer.autocast:
        _, next_value, _ = trainer.actor_forward(
            trainer.next_obs[None], concat_states(trainer.memory_states), trainer.next_starts[None]
        )
    # One discount for all stays a Python float: gamma * lambda is then rounded once, as before
    # stage_gamma, and runs without it reproduce bit for bit.
    gamma = rollout.gammas if trainer.stage_gammas else config.gamma
    advantages = compute_gae(
        rollout.rewards, rollout.values, rollout.ends, next_value[0].float(), gamma, config.gae_lambda
    )
    rollout.advantages = advantages
    rollout.returns = advantages + rollout.values


def act(trainer: PPOTrainer, rollout: Rollout, step: int, group: int) -> np.ndarray:
    """Samples the actions of ``group``'s envs at ``step`` (stored in the rollout); returns them."""
    part = trainer.groups[group]
    obs, starts = trainer.next_obs[part], trainer.next_starts[part]  # (n, *obs_shape), (n,)
    rollout.obs[step, part] = obs
    rollout.starts[step, part] = starts
    with torch.no_grad(), trainer.autocast:
        logits, value, trainer.memory_states[group] = trainer.actor_forward(
            obs[None], trainer.memory_states[group], starts[None]
        )
    distribution = action_distribution(logits[0])
    action = distribution.sample()  # (n,)
    rollout.actions[step, part], rollout.logprobs[step, part] = action, distribution.log_prob(action)
    rollout.values[step, part] = value[0]
    return action.cpu().numpy()


def observe(trainer: PPOTrainer, rollout: Rollout, step: int, group: int, results: tuple[Any, ...]) -> None:
    """Stores what ``group``'s envs returned for ``step``; their next observations become current."""
    config, device, part = trainer.config, trainer.run.device, trainer.groups[group]
    next_obs, reward, terminations, truncations, infos = results
    reward = reward * config.reward_scale
    gammas = trainer.env_gammas[part]  # (n,) the discount of the episodes this step belongs to
    rollout.gammas[step, part] = gammas
    # A time-limit truncation is not a real end: bootstrap it, r += gamma * V(final_obs).
    truncated_only = np.flatnonzero(truncations & ~terminations)
    if truncated_only.size:
        final_obs = np.stack(infos["final_obs"][truncated_only])
        index = torch.as_tensor(truncated_only, device=device)
        with torch.no_grad(), trainer.autocast:
            _, final_value, _ = trainer.actor_forward(
                torch.as_tensor(final_obs, device=device)[None],
                select_state(trainer.memory_states[group], index),
                torch.zeros((1, truncated_only.size), dtype=torch.bool, device=device),
            )
        reward = reward.astype(np.float32)
        discount = gammas[index] if trainer.stage_gammas else config.gamma
        reward[truncated_only] += (discount * final_value[0].float()).cpu().numpy()
    rollout.rewards[step, part] = torch.as_tensor(reward, device=device, dtype=torch.float32)
    done = np.logical_or(terminations, truncations)
    rollout.ends[step, part] = torch.as_tensor(done, device=device, dtype=torch.float32)
    # Same-step autoreset: the next observation of a finished env already starts its next episode.
    trainer.next_obs[part] = torch.as_tensor(next_obs, device=device)
    trainer.next_starts[part] = torch.as_tensor(done, device=device)
    if trainer.stage_gammas:  # a finished env's infos are its next episode's (same-step autoreset)
        trainer.env_gammas[part] = torch.as_tensor(
            episode_gammas(infos, len(done), trainer.stage_gammas, config.gamma), device=device
        )
    trainer.run.add_episodes(infos)


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    ends: torch.Tensor,
    next_value: torch.Tensor,
    gamma: float | torch.Tensor,
    gae_lambda: float,
) -> torch.Tensor:
    """Generalized Advantage Estimation (Schulman et al. 2016), backwards over time.

    Args:
        rewards, values, ends: (T, N); ends[t] = 1 where transition t ended its episode.
        next_value: (N,) value of the observation after the last step.
        gamma: the discount, one for all or (T, N): transition t's (its episode's stage's, stage_gamma).

    Returns:
        advantages (T, N).
    """
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        value_after = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        not_end = 1.0 - ends[t]
        discount = gamma[t] if isinstance(gamma, torch.Tensor) else gamma
        # delta_t = r_t + gamma_t * V(s_{t+1}) * (1 - end_t) - V(s_t)
        delta = rewards[t] + discount * value_after * not_end - values[t]
        # A_t = delta_t + gamma_t * lambda * (1 - end_t) * A_{t+1}
        last_gae = delta + discount * gae_lambda * not_end * last_gae
        advantages[t] = last_gae
    return advantages


# ---------------------------------------------------------------------------------------------
# Training: the update
# ---------------------------------------------------------------------------------------------


def learn(trainer: PPOTrainer, rollout: Rollout, update: int) -> UpdateStats:
    """One PPO update on a rollout (in the learner thread with overlap): ``update_epochs`` passes of
    minibatch SGD on the clipped objective, with the learning rate of ``update``."""
    config = trainer.config
    set_learner_threads(trainer.run.learn_threads)
    learning_rate = (
        config.learning_rate * (1.0 - update / trainer.num_updates)
        if config.anneal_lr
        else config.learning_rate
    )
    # DAPG's demonstration weight, decaying linearly to 0 at imitate_steps agent steps.
    step = update * config.num_envs * config.num_steps
    imitate_weight = config.imitate_coef * max(0.0, 1.0 - step / config.imitate_steps)
    critic_only = step < config.critic_only_until
    # autocast keeps its previous state on the context object: one per call, never shared by threads.
    autocast = bf16_autocast(trainer.run.device, config.bf16)
    # Kickstarting's weight, decaying linearly to 0 at kickstart_steps; the teacher labels the rollout
    # once, here, rather than each minibatch again in every epoch.
    kickstart_weight = config.kickstart_coef * max(0.0, 1.0 - step / config.kickstart_steps)
    kickstart = (
        Kickstart(teacher_log_probs(trainer.teacher, rollout.obs, autocast), kickstart_weight)
        if kickstart_weight > 0 and trainer.teacher is not None and not critic_only
        else None
    )
    return ppo_update(
        trainer.forward,
        trainer.agent,
        trainer.optimizer,
        rollout,
        config,
        learning_rate,
        trainer.run.np_rng,
        autocast,
        Imitation(trainer.demos, imitate_weight)
        if imitate_weight > 0 and trainer.demos is not None and not critic_only
        else None,
        kickstart,
        critic_only,
    )


def ppo_update(
    forward: nn.Module,
    agent: nn.Module,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    config: PPOConfig,
    learning_rate: float,
    np_rng: np.random.Generator,
    autocast: torch.autocast,
    imitation: Imitation | None = None,
    kickstart: Kickstart | None = None,
    critic_only: bool = False,
) -> UpdateStats:
    """``update_epochs`` passes of minibatch SGD over one rollout on

        L = -min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t) + c_v * L_value - c_e * H[pi],
        r_t = pi(a_t | s_t) / pi_old(a_t | s_t),

    plus, with ``augment=shift``, DrAC's ``alpha_r * G`` (:func:`minibatch_drac`) on shifted copies
    of ``drac_share`` of the minibatch's frames; the ratio itself only ever sees the original frames;
    plus, with ``imitation``, its weight times the cross-entropy of the actor on
    :data:`IMITATE_BATCH` route frames drawn afresh for each minibatch against the route's actions
    (DAPG, Rajeswaran et al. 2018, with a linear decay in place of its geometric one);
    plus, with ``kickstart``, its weight times KL(pi_teacher(. | s_t) || pi(. | s_t)) on the
    minibatch's states (kickstarting, Schmitt et al. 2018; feed-forward minibatches only).

    With ``critic_only`` the loss is ``c_v * L_value`` and only the critic's own parameters
    (:func:`critic_parameters`) step: a critic fitted to another gamma or reward scale would
    otherwise send its large value errors through the shared encoder and move the policy with them.

    Returns:
        The last minibatch's losses, the approximate KL and the clip fraction.
    """
    optimizer.param_groups[0]["lr"] = learning_rate
    stepping = critic_parameters(agent) if critic_only else list(agent.parameters())
    kept = {id(parameter) for parameter in stepping}
    frozen = [parameter for parameter in agent.parameters() if id(parameter) not in kept]
    with no_gradients(frozen):
        clip_fractions, approx_kl, skipped, drac = [], torch.zeros((), device=rollout.obs.device), 0, None
        imitation_term, kickstart_term = None, None
        for _epoch in range(config.update_epochs):
            for mb_index in minibatch_indices(config, np_rng):
                mb = slice_minibatch(mb_index, config, rollout)
                mb_state = select_state(rollout.start_state, mb.envs) if mb.envs is not None else None
                with autocast:
                    new_logits, new_values, _ = forward(mb.obs, mb_state, mb.starts)
                distribution = action_distribution(new_logits)
                new_logprobs = distribution.log_prob(mb.actions)
                entropy = distribution.entropy().mean()
                log_ratio = new_logprobs - mb.logprobs
                ratio = log_ratio.exp()
                with torch.no_grad():
                    approx_kl = ((ratio - 1) - log_ratio).mean()  # k3 estimator, Schulman 2020
                    clip_fractions.append(((ratio - 1.0).abs() > config.clip_coef).float().mean())

                advantages = mb.advantages
                if config.norm_adv:
                    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
                policy_loss = torch.max(
                    -advantages * ratio, -advantages * ratio.clamp(1 - config.clip_coef, 1 + config.clip_coef)
                ).mean()

                new_values = new_values.float()
                if config.clip_vloss:
                    clipped = mb.values + (new_values - mb.values).clamp(-config.clip_coef, config.clip_coef)
                    value_loss = (
                        0.5 * torch.max((new_values - mb.returns) ** 2, (clipped - mb.returns) ** 2).mean()
                    )
                else:
                    value_loss = 0.5 * ((new_values - mb.returns) ** 2).mean()

                if critic_only:
                    loss = config.vf_coef * value_loss
                else:
                    loss = policy_loss - config.ent_coef * entropy + config.vf_coef * value_loss
                if config.augment == "shift" and not critic_only:
                    drac = minibatch_drac(
                        forward, mb, rollout, config, new_logits, new_values, np_rng, autocast
                    )
                    loss = loss + config.drac_coef * drac
                if imitation is not None:
                    count = len(imitation.demos.actions)
                    index = torch.as_tensor(
                        np_rng.integers(0, count, IMITATE_BATCH), device=rollout.obs.device
                    )
                    imitation_term = imitation_loss(forward, imitation.demos, index, autocast)
                    loss = loss + imitation.weight * imitation_term
                if kickstart is not None:
                    t_index, env_index = rollout_steps(mb_index, config, rollout)
                    targets = kickstart.log_probs[t_index, env_index]  # (M, A)
                    kickstart_term = kl_divergence(Categorical(logits=targets[None]), distribution).mean()
                    loss = loss + kickstart.weight * kickstart_term
                optimizer.zero_grad(set_to_none=True)
                # The frozen parameters get no gradient (no_gradients), and Adam leaves a parameter
                # without one as it is, moments included.
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(stepping, config.max_grad_norm or math.inf)
                # A non-finite loss or gradient skips this step instead of poisoning the weights.
                if torch.isfinite(loss) and torch.isfinite(grad_norm):
                    optimizer.step()
                else:
                    skipped += 1
            if config.target_kl is not None and approx_kl > config.target_kl:
                break
    return UpdateStats(
        loss=loss, policy_loss=policy_loss, value_loss=value_loss, entropy=entropy, approx_kl=approx_kl,
        clipfrac=torch.stack(clip_fractions).mean(), skipped=skipped, all_skipped=skipped == len(clip_fractions),
        rollout=rollout, learning_rate=learning_rate, drac=None if drac is None else drac.detach(),
        imitation=None if imitation_term is None else imitation_term.detach(),
        kickstart=None if kickstart_term is None else kickstart_term.detach(),
    )  # fmt: skip


@contextlib.contextmanager
def no_gradients(parameters: list[nn.Parameter]) -> Iterator[None]:
    """Parameters that do not step take no gradient either while inside (their ``requires_grad``
    restored after): with ``critic_only`` the backward pass then stops at the shared encoder's
    output instead of computing the encoder's and the actor's gradients only to drop them."""
    trainable = [parameter.requires_grad for parameter in parameters]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(parameters, trainable, strict=True):
            parameter.requires_grad_(flag)


def critic_parameters(agent: nn.Module) -> list[nn.Parameter]:
    """The parameters that only the value serves: the critic's head and a separate critic encoder."""
    own = [*agent.head.critic.parameters()]
    if agent.critic_encoder is not None:
        own += [*agent.critic_encoder.parameters()]
    return own


def minibatch_drac(
    forward: nn.Module,
    mb: Minibatch,
    rollout: Rollout,
    config: PPOConfig,
    logits: torch.Tensor,
    values: torch.Tensor,
    np_rng: np.random.Generator,
    autocast: torch.autocast,
) -> torch.Tensor:
    """DrAC's regulariser on the first ``drac_share`` of the minibatch's columns (single steps, or
    whole env sequences with memory), each frame stack shifted by its own offset.

    The minibatch is already a random draw, so its first columns are a random subset too; the
    offsets come from the update's generator, which resumes with the run and is the learner
    thread's own.
    """
    columns = max(1, round(config.drac_share * mb.obs.shape[1]))
    obs = mb.obs[:, :columns]  # (T, k, C, H, W)
    frames = obs.flatten(0, 1)
    offsets = torch.as_tensor(np_rng.integers(0, 2 * SHIFT_PAD + 1, size=(2, frames.shape[0])))
    shifted = shift_images(frames, offsets, SHIFT_PAD).view_as(obs)
    state = None if mb.envs is None else select_state(rollout.start_state, mb.envs[:columns])
    return drac_loss(
        forward, shifted, state, mb.starts[:, :columns], logits[:, :columns], values[:, :columns], autocast
    )


def drac_loss(
    forward: nn.Module,
    shifted_obs: torch.Tensor,
    state: Any,
    starts: torch.Tensor,
    logits: torch.Tensor,
    values: torch.Tensor,
    autocast: torch.autocast,
) -> torch.Tensor:
    """DrAC's regulariser (Raileanu et al. 2021): the policy and value on augmented frames f(s) are
    pulled towards those on the original frames s, which are held fixed,

        G = KL[pi(. | s) || pi(. | f(s))] + 0.5 * (V(s) - V(f(s)))^2,

    with the exact KL of the two categorical distributions (the paper samples it).

    Args:
        forward: the actor-critic, ``(T, B, *obs_shape)`` -> logits (T, B, A), values (T, B), state.
        shifted_obs: f(s), ``(T, B, *obs_shape)``.
        state, starts: the minibatch's memory state and episode starts (T, B), as for ``s``.
        logits, values: pi's logits (T, B, A) and V (T, B) on the original frames s.

    Returns:
        G, a scalar; exactly 0 when f is the identity.
    """
    with autocast:
        shifted_logits, shifted_values, _ = forward(shifted_obs, state, starts)
    policy_gap = kl_divergence(
        action_distribution(logits.detach()), action_distribution(shifted_logits)
    ).mean()
    value_gap = 0.5 * ((values.detach().float() - shifted_values.float()) ** 2).mean()
    return policy_gap + value_gap


def minibatch_indices(config: PPOConfig, np_rng: np.random.Generator) -> list[np.ndarray]:
    """Feed-forward: shuffled flat (T*N) indices. Recurrent: shuffled env indices (whole sequences)."""
    if config.memory == "none":
        flat = np_rng.permutation(config.num_steps * config.num_envs)
        return np.array_split(flat, config.num_minibatches)
    return np.array_split(np_rng.permutation(config.num_envs), config.num_minibatches)


def rollout_steps(
    index: np.ndarray, config: PPOConfig, rollout: Rollout
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (time, env) positions of a feed-forward minibatch's flat indices (M,) into (T, N) tensors."""
    index_tensor = torch.as_tensor(index, device=rollout.obs.device)
    return index_tensor // config.num_envs, index_tensor % config.num_envs


def slice_minibatch(index: np.ndarray, config: PPOConfig, rollout: Rollout) -> Minibatch:
    """Feed-forward minibatches are (1, M) "sequences" of single steps; recurrent ones (T, envs)."""
    fields = (rollout.obs, rollout.starts, rollout.actions, rollout.logprobs, rollout.advantages,
              rollout.returns, rollout.values)  # fmt: skip
    if config.memory == "none":
        t_index, env_index = rollout_steps(index, config, rollout)
        return Minibatch(*(x[t_index, env_index][None] for x in fields), envs=None)  # (1, M, ...)
    index_tensor = torch.as_tensor(index, device=rollout.obs.device)
    return Minibatch(*(x[:, index_tensor] for x in fields), envs=index_tensor)  # (T, E, ...)
