"""Proximal Policy Optimization (Schulman et al. 2017), one readable file in the style of CleanRL.

The loop is flat: collect ``num_steps`` transitions from ``num_envs`` envs, compute advantages
with GAE, then run ``update_epochs`` passes of minibatch SGD on the clipped objective

    L = -min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t) + c_v * L_value - c_e * H[pi],
    r_t = pi(a_t | s_t) / pi_old(a_t | s_t).

Optional memory: the encoder's features go through an LSTM, a GRU or a causal Transformer from
``nets/`` before the actor-critic head. Recurrent minibatches then hold whole env sequences
(time order kept) and re-run the memory from the state saved at the start of the rollout, with the
memory reset wherever an episode started.

Tensors in the rollout are time-major: ``(T, N, ...)`` with T = num_steps and N = num_envs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
from torch.distributions import Categorical

import envs
import nets
from agents import common
from agents.checkpoint import config_from_dict as rebuild_config
from agents.checkpoint import rng_state, set_rng_state

ALGO = "ppo"


@dataclass
class PPOConfig:
    """Every field can be set with ``lab train ... --set key=value``."""

    env: str = field(default="cartpole", metadata={"help": "preset name or Gymnasium id"})
    net: str = field(default="auto", metadata={"help": "encoder from nets/ (auto: by observation type)"})
    hidden: tuple[int, ...] = field(default=(64, 64), metadata={"help": "MLP widths for vector observations"})
    shared_encoder: bool = field(default=True, metadata={"help": "actor and critic share the encoder"})
    memory: Literal["none", "lstm", "gru", "transformer"] = field(
        default="none", metadata={"help": "recurrent/attention memory after the encoder"}
    )
    memory_size: int = field(default=128, metadata={"help": "memory width (hidden size / d_model)", "min": 1})
    memory_len: int = field(default=16, metadata={"help": "Transformer memory length in steps", "min": 1})
    seed: int = field(default=1, metadata={"help": "seed of torch, numpy and the envs", "min": 0})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    total_steps: int = field(default=200_000, metadata={"help": "agent steps over the whole run", "min": 1})
    num_envs: int = field(default=8, metadata={"help": "parallel envs", "min": 1, "max": 1024})
    num_steps: int = field(default=128, metadata={"help": "rollout length per env per update", "min": 1})
    env_backend: Literal["sync", "async"] = field(default="sync", metadata={"help": "vector env back-end"})
    sticky: float = field(
        default=0.0,
        metadata={"help": "Mario: repeat the previous action on each frame with this probability", "min": 0.0,
                  "max": 0.99},
    )  # fmt: skip
    learning_rate: float = field(default=2.5e-4, metadata={"help": "Adam learning rate", "min": 0.0})
    anneal_lr: bool = field(default=True, metadata={"help": "linearly anneal the learning rate to 0"})
    gamma: float = field(default=0.99, metadata={"help": "discount", "min": 0.0, "max": 1.0})
    gae_lambda: float = field(default=0.95, metadata={"help": "GAE lambda", "min": 0.0, "max": 1.0})
    num_minibatches: int = field(default=4, metadata={"help": "minibatches per epoch", "min": 1})
    update_epochs: int = field(default=4, metadata={"help": "passes over each rollout", "min": 1})
    norm_adv: bool = field(default=True, metadata={"help": "normalise advantages per minibatch"})
    clip_coef: float = field(default=0.2, metadata={"help": "policy ratio clip epsilon", "min": 0.0})
    clip_vloss: bool = field(default=True, metadata={"help": "clip the value loss too"})
    ent_coef: float = field(default=0.01, metadata={"help": "entropy bonus coefficient", "min": 0.0})
    vf_coef: float = field(default=0.5, metadata={"help": "value loss coefficient", "min": 0.0})
    max_grad_norm: float = field(default=0.5, metadata={"help": "gradient clipping norm", "min": 0.0})
    target_kl: float | None = field(default=None, metadata={"help": "stop the epochs early above this KL"})
    reward_scale: float = field(default=1.0, metadata={"help": "multiply env rewards by this", "min": 0.0})
    threads: int = field(
        default=1,
        metadata={
            "help": "CPU threads of the learner (0: one per core); inference with env workers uses one",
            "min": 0,
            "max": 1024,
        },
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the network"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (CUDA, or a CPU with native bf16)"})
    overlap: bool = field(
        default=False,
        metadata={
            "help": "learn from a rollout in a thread while collecting the next (policy lag of one update)"
        },
    )
    env_groups: int = field(
        default=1,
        metadata={
            "help": "env groups stepped in turn (async back-end): one group's actions are computed "
            "while the others' workers step",
            "min": 1,
            "max": 64,
        },
    )
    eval_every: int = field(
        default=0, metadata={"help": "agent steps between greedy evals (0: at end)", "min": 0}
    )
    eval_episodes: int = field(default=10, metadata={"help": "episodes per greedy eval", "min": 1})
    checkpoint_every: int = field(
        default=50_000, metadata={"help": "agent steps between checkpoints", "min": 1}
    )
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept on disk", "min": 1})

    def check(self) -> None:
        """Checks the fields against each other; ``lab train`` runs this before it creates the run."""
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
        if self.env_groups > 1 and self.env_backend != "async":
            raise ValueError("env_groups > 1 needs env_backend=async (worker processes to step in turn)")


# ---------------------------------------------------------------------------------------------
# The network: encoder -> (memory) -> actor-critic head
# ---------------------------------------------------------------------------------------------


def build_encoder(config: PPOConfig, obs_shape: tuple[int, ...]) -> nn.Module:
    name = config.net
    if name == "auto":
        name = "nature" if len(obs_shape) == 3 else "mlp"
    if name == "mlp":
        return nets.build("mlp", in_shape=obs_shape, hidden=config.hidden, activation="tanh")
    return nets.build(name, in_shape=obs_shape)


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
        if self.stochastic:
            actions = Categorical(logits=logits[0].float()).sample()
        else:
            actions = logits[0].argmax(dim=-1)
        return actions.cpu().numpy(), {"value": values[0].float().cpu().numpy()}


def load_policy(sidecar: Path, meta: dict[str, Any], device: torch.device) -> PPOPolicy:
    """Rebuilds the greedy policy of a PPO checkpoint."""
    from agents.checkpoint import load_checkpoint

    state, _ = load_checkpoint(sidecar)
    config = config_from_dict(meta["config"])
    agent = ActorCritic(config, tuple(meta["obs_shape"]), int(meta["num_actions"])).to(device)
    agent.load_state_dict(state["model"])
    policy = PPOPolicy(agent, device)
    policy.trained_steps = state.get("global_step")
    return policy


def config_from_dict(values: dict[str, Any]) -> PPOConfig:
    return rebuild_config(PPOConfig, values)


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
            obs=zeros(obs_dtype, *obs_shape),
            starts=zeros(torch.bool),
            actions=zeros(torch.long),
            logprobs=zeros(),
            rewards=zeros(),
            ends=zeros(),
            values=zeros(),
            advantages=zeros(),
            returns=zeros(),
        )


def train(config: PPOConfig, run_dir: Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Trains PPO, writing TensorBoard events, checkpoints and metrics.json into ``run_dir``.

    With ``config.overlap`` the update on rollout k runs in a background thread while the main
    thread collects rollout k+1 with a copy of the weights from before that update (a policy lag of
    one update, as in APPO): on a CPU the learner then uses the core that the env workers leave
    idle during a serial update. The importance ratio is still taken against the policy that
    collected the data, so the clipped objective stays correct; only the starting ratio is no longer 1.

    With ``config.env_groups`` = G > 1 the envs form G groups, each a vector env with its own
    worker processes, stepped in turn: group g's workers run its emulators while the main thread
    computes the actions of the next group, so the inference hides behind the env steps and each
    core has a worker ready to run. The data is the same as with one vector env (same policy, same
    per-env seeds and transitions; a test checks it); only the order of the random draws differs.

    Returns:
        The summary of DESIGN.md's ``lab train --json``: run_dir, steps, sps, episodes,
        eval_return_mean (and eval_clear_rate for Mario).
    """
    device = common.resolve_device(config.device)
    learn_threads = common.set_learner_threads(config.threads)
    # While env workers step on the same cores, inference keeps to one thread (see set_learner_threads);
    # during a serial update the workers wait, so it may use more.
    rollout_threads = 1 if device.type == "cpu" and config.env_backend == "async" else learn_threads
    np_rng = common.seed_everything(config.seed)
    config.check()
    batch_size = config.num_envs * config.num_steps
    num_updates = max(1, config.total_steps // batch_size)

    # Resume: model, optimizer, counters and RNG states come from the newest good checkpoint.
    checkpoint = common.load_training_checkpoint(run_dir) if resume else None
    global_step = 0 if checkpoint is None else int(checkpoint[0]["global_step"])
    start_update = 0 if checkpoint is None else int(checkpoint[0]["update"])

    # Env groups stepped in turn: group g holds envs g*n .. (g+1)*n - 1 (n = num_envs / env_groups)
    # and its own workers; env i is seeded as it would be in one vector env of num_envs.
    group_size = config.num_envs // config.env_groups
    groups = [slice(g * group_size, (g + 1) * group_size) for g in range(config.env_groups)]
    vec_envs = [
        envs.make_vec(
            config.env,
            group_size,
            seed=config.seed + global_step + part.start,
            backend=config.env_backend,
            **common.train_env_overrides(config),
        )
        for part in groups
    ]
    obs_shape = tuple(vec_envs[0].single_observation_space.shape)
    num_actions = int(vec_envs[0].single_action_space.n)
    agent = ActorCritic(config, obs_shape, num_actions).to(device)
    optimizer = torch.optim.Adam(
        agent.parameters(), lr=config.learning_rate, eps=1e-5, **common.adam_kernel(device)
    )
    episodes = common.EpisodeTracker()
    history: list[dict[str, float]] = []
    if checkpoint is not None:
        agent.load_state_dict(checkpoint[0]["model"])
        # A slim (weights-only) checkpoint, as shipped, resumes with a fresh optimizer and RNG.
        if "optimizer" in checkpoint[0]:
            optimizer.load_state_dict(checkpoint[0]["optimizer"])
        if "rng" in checkpoint[0]:
            set_rng_state(checkpoint[0]["rng"], np_rng)
        episodes.restore(checkpoint[0])
        history = list(checkpoint[0].get("history", []))
    forward = torch.compile(agent) if config.compile else agent
    # The collector's network: the learner's own one, or with overlap a forward copy that only changes
    # between updates (the learner thread changes `agent` while the collector runs). With bf16 the
    # copy stores its Linear/Conv weights in bf16, the numbers autocast would round them to at every
    # forward (common.forward_copy): 8 Mario frames 1.41 instead of 1.72 ms (benchmarks/learner_parts.py).
    actor = common.forward_copy(agent, device, config.bf16) if config.overlap else agent
    actor_forward = (torch.compile(actor) if config.compile else actor) if config.overlap else forward
    meta = {
        "algo": ALGO,
        "config": dataclasses.asdict(config),
        "obs_shape": list(obs_shape),
        "num_actions": num_actions,
    }

    # Rollout storage on the device; with overlap two, one being filled while the other is learnt from.
    obs_dtype = torch.uint8 if vec_envs[0].single_observation_space.dtype == np.uint8 else torch.float32
    rollouts = [
        Rollout.empty(config.num_steps, config.num_envs, obs_shape, obs_dtype, device)
        for _ in range(2 if config.overlap else 1)
    ]

    # The observation each env acts on next, (N, *obs_shape), and whether it starts an episode.
    next_obs = torch.cat(
        [
            torch.as_tensor(vec_env.reset(seed=config.seed + global_step + part.start)[0], device=device)
            for vec_env, part in zip(vec_envs, groups, strict=True)
        ]
    )
    next_starts = torch.ones(config.num_envs, dtype=torch.bool, device=device)
    # One memory state per group: (n, ...) tensors, or None without memory.
    memory_states = [agent.initial_state(group_size, device) for _ in groups]

    logger = common.RunLogger(run_dir, num_updates * batch_size, global_step, progress, config)
    run_start, run_start_step = time.time(), global_step
    last_checkpoint_step, last_eval_step = global_step, global_step
    skipped_updates, bad_updates_in_a_row = 0, 0
    eval_summary: dict[str, Any] = {}

    def save() -> None:
        state = {
            "model": agent.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": rng_state(np_rng),
            # Only completed updates count: an interrupted rollout is collected again on resume.
            "global_step": completed_steps,
            "update": completed_updates,
            **episodes.state(),
            "history": history,
        }
        common.save_training_checkpoint(run_dir, completed_steps, state, meta, config.keep_checkpoints)

    def learn(rollout: Rollout, update: int) -> dict[str, Any]:
        """update_epochs passes of minibatch SGD over one rollout; returns the last minibatch's stats."""
        common.set_learner_threads(learn_threads)
        # autocast keeps its previous state on the context object: one per call, never shared by threads.
        autocast = common.bf16_autocast(device, config.bf16)
        if config.anneal_lr:
            optimizer.param_groups[0]["lr"] = config.learning_rate * (1.0 - update / num_updates)
        clip_fractions, approx_kl, skipped = [], torch.zeros((), device=device), 0
        for _epoch in range(config.update_epochs):
            for mb_index in minibatch_indices(config, np_rng):
                mb = slice_minibatch(mb_index, config, rollout)
                mb_state = select_state(rollout.start_state, mb["envs"]) if mb["envs"] is not None else None
                with autocast:
                    new_logits, new_values, _ = forward(mb["obs"], mb_state, mb["starts"])
                distribution = Categorical(logits=new_logits.float())
                new_logprobs = distribution.log_prob(mb["actions"])
                entropy = distribution.entropy().mean()
                log_ratio = new_logprobs - mb["logprobs"]
                ratio = log_ratio.exp()
                with torch.no_grad():
                    approx_kl = ((ratio - 1) - log_ratio).mean()  # k3 estimator, Schulman 2020
                    clip_fractions.append(((ratio - 1.0).abs() > config.clip_coef).float().mean())

                mb_advantages = mb["advantages"]
                if config.norm_adv:
                    mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
                policy_loss = torch.max(
                    -mb_advantages * ratio,
                    -mb_advantages * ratio.clamp(1 - config.clip_coef, 1 + config.clip_coef),
                ).mean()

                new_values = new_values.float()
                if config.clip_vloss:
                    clipped = mb["values"] + (new_values - mb["values"]).clamp(
                        -config.clip_coef, config.clip_coef
                    )
                    value_loss = (
                        0.5
                        * torch.max((new_values - mb["returns"]) ** 2, (clipped - mb["returns"]) ** 2).mean()
                    )
                else:
                    value_loss = 0.5 * ((new_values - mb["returns"]) ** 2).mean()

                loss = policy_loss - config.ent_coef * entropy + config.vf_coef * value_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), config.max_grad_norm)
                # A non-finite loss or gradient skips this step instead of poisoning the weights.
                if torch.isfinite(loss) and torch.isfinite(grad_norm):
                    optimizer.step()
                else:
                    skipped += 1
            if config.target_kl is not None and approx_kl > config.target_kl:
                break
        return {
            "loss": loss,
            "policy_loss": policy_loss,
            "value_loss": value_loss,
            "entropy": entropy,
            "approx_kl": approx_kl,
            "clipfrac": torch.stack(clip_fractions).mean(),
            "skipped": skipped,
            "all_skipped": skipped == len(clip_fractions),
            "rollout": rollout,
        }

    def finish_update(update: int, stats: dict[str, Any], step: int, wrap_up: bool = True) -> None:
        """After the update on the rollout that ended at agent step ``step``: log, then (``wrap_up``)
        eval and checkpoint when due."""
        nonlocal skipped_updates, bad_updates_in_a_row, last_eval_step, last_checkpoint_step
        nonlocal eval_summary, completed_updates, completed_steps
        skipped_updates += stats["skipped"]
        # Persistent non-finite losses will not heal: stop, keeping the last good checkpoint.
        bad_updates_in_a_row = bad_updates_in_a_row + 1 if stats["all_skipped"] else 0
        if bad_updates_in_a_row >= common.MAX_BAD_UPDATES:
            raise common.TrainingStopped(
                f"loss or gradients were not finite for {bad_updates_in_a_row} updates in a row; "
                f"the last good checkpoint in {run_dir / 'checkpoints'} is kept (try a lower learning_rate)"
            )

        # ---- log once per update (the only host syncs besides actions) ----------------------
        seconds = time.time() - run_start
        sps = (global_step - run_start_step) / max(seconds, 1e-9)
        rollout = stats["rollout"]
        variance = rollout.returns.var()
        explained_variance = (
            float(1 - (rollout.returns - rollout.values).var() / variance) if variance > 0 else float("nan")
        )
        record = {
            "step": step,
            "sps": sps,
            "seconds": seconds,  # since this process started training (a resume restarts it)
            "loss": stats["loss"].item(),
            "policy_loss": stats["policy_loss"].item(),
            "value_loss": stats["value_loss"].item(),
            "entropy": stats["entropy"].item(),
            "return_mean": episodes.mean("return"),
            "x_pos_max_mean": episodes.mean("x_pos_max"),
            "clear_rate": episodes.mean("flag_get"),
        }
        if episodes.stage_means():
            record["stages"] = episodes.stage_means()
        history.append(record)
        logger.scalars(
            {
                "charts/learning_rate": optimizer.param_groups[0]["lr"],
                "charts/SPS": sps,
                "charts/episodic_return": record["return_mean"],
                "charts/episodic_length": episodes.mean("length"),
                "charts/x_pos_max": record["x_pos_max_mean"],
                "charts/clear_rate": record["clear_rate"],
                "charts/episodes": episodes.count,
                "charts/skipped_updates": skipped_updates,
                "losses/value_loss": record["value_loss"],
                "losses/policy_loss": record["policy_loss"],
                "losses/entropy": record["entropy"],
                "losses/approx_kl": float(stats["approx_kl"]),
                "losses/clipfrac": float(stats["clipfrac"]),
                "losses/explained_variance": explained_variance,
                **common.worker_scalars(*vec_envs),
                **common.stage_scalars(episodes),
            },
            step,
        )
        logger.progress(global_step, episodes, sps)
        completed_updates, completed_steps = update + 1, step
        if not wrap_up:
            return

        # On the multiples of eval_every (the first step past each), so that a resumed run evaluates
        # at the same steps, with the same eval seeds, as one that was never interrupted.
        if config.eval_every and step // config.eval_every > last_eval_step // config.eval_every:
            last_eval_step = step
            eval_summary = run_eval(agent, config, device, seed=config.seed + 10_000 + step)
            agent.train()
            logger.scalars(common.eval_scalars(eval_summary), step)
        # Only a healthy update is worth a checkpoint: NaN streaks keep the last good one.
        if step - last_checkpoint_step >= config.checkpoint_every and bad_updates_in_a_row == 0:
            last_checkpoint_step = step
            save()

    # With overlap: the learner thread's update in flight, with its update index and end step.
    learner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ppo-learner") if config.overlap else None
    pending: tuple[Future[dict[str, Any]], int, int] | None = None

    def settle_learner() -> None:
        """Waits for the update in flight and books it (no eval, no checkpoint), so that the save after
        a Ctrl-C or an error holds it and no weights change while saving."""
        nonlocal pending
        if pending is not None:
            future, update, step = pending
            pending = None
            if future.exception() is None:
                with contextlib.suppress(Exception):  # the error being handled is the one to report
                    finish_update(update, future.result(), step, wrap_up=False)

    def finish_pending() -> None:
        """Waits for the update in flight and finishes it (log, eval, checkpoint). It is cleared only
        once done: a Ctrl-C during the wait leaves it to settle_learner, which waits for it and books
        it before the checkpoint is written."""
        nonlocal pending
        if pending is not None:
            future, update, step = pending
            stats = future.result()
            pending = None
            finish_update(update, stats, step)

    def act(rollout: Rollout, step: int, group: int) -> np.ndarray:
        """Samples the actions of ``group``'s envs at ``step`` (stored in the rollout); returns them."""
        part = groups[group]
        obs, starts = next_obs[part], next_starts[part]  # (n, *obs_shape), (n,)
        rollout.obs[step, part] = obs
        rollout.starts[step, part] = starts
        with torch.no_grad(), autocast:
            logits, value, memory_states[group] = actor_forward(obs[None], memory_states[group], starts[None])
        distribution = Categorical(logits=logits[0].float())
        action = distribution.sample()  # (n,)
        rollout.actions[step, part], rollout.logprobs[step, part] = action, distribution.log_prob(action)
        rollout.values[step, part] = value[0]
        return action.cpu().numpy()

    def observe(rollout: Rollout, step: int, group: int, results: tuple[Any, ...]) -> None:
        """Stores what ``group``'s envs returned for ``step``; their next observations become current."""
        part = groups[group]
        next_obs_np, reward, terminations, truncations, infos = results
        reward = reward * config.reward_scale
        # A time-limit truncation is not a real end: bootstrap it, r += gamma * V(final_obs).
        truncated_only = np.flatnonzero(truncations & ~terminations)
        if truncated_only.size:
            final_obs = np.stack(infos["final_obs"][truncated_only])
            index = torch.as_tensor(truncated_only, device=device)
            with torch.no_grad(), autocast:
                _, final_value, _ = actor_forward(
                    torch.as_tensor(final_obs, device=device)[None],
                    select_state(memory_states[group], index),
                    torch.zeros((1, truncated_only.size), dtype=torch.bool, device=device),
                )
            reward = reward.astype(np.float32)
            reward[truncated_only] += config.gamma * final_value[0].float().cpu().numpy()
        rollout.rewards[step, part] = torch.as_tensor(reward, device=device, dtype=torch.float32)
        done = np.logical_or(terminations, truncations)
        rollout.ends[step, part] = torch.as_tensor(done, device=device, dtype=torch.float32)
        # Same-step autoreset: the next observation of a finished env already starts its next episode.
        next_obs[part] = torch.as_tensor(next_obs_np, device=device)
        next_starts[part] = torch.as_tensor(done, device=device)
        for _, stats in common.finished_episodes(infos):
            episodes.add(stats)

    def close_envs() -> None:
        for vec_env in vec_envs:
            vec_env.close()

    completed_updates, completed_steps = start_update, global_step
    autocast = common.bf16_autocast(device, config.bf16)
    try:
        for update in range(start_update, num_updates):
            rollout = rollouts[update % len(rollouts)]
            rollout.start_state = detach_state(concat_states(memory_states))

            # ---- collect: one batched forward pass per env group per step ------------------------
            # With several groups, group g's workers step while the actions of the next groups are
            # computed, so the inference hides behind the emulators (and each core has a worker
            # ready to run while another waits for its actions).
            common.set_learner_threads(rollout_threads)
            for step in range(config.num_steps):
                global_step += config.num_envs
                for group, vec_env in enumerate(vec_envs):
                    if config.env_groups == 1:
                        observe(rollout, step, 0, vec_env.step(act(rollout, step, 0)))
                        continue
                    if step:  # the group's previous step, which ran while the other groups were served
                        observe(rollout, step - 1, group, vec_env.step_wait())
                    vec_env.step_async(act(rollout, step, group))
            if config.env_groups > 1:
                for group, vec_env in enumerate(vec_envs):
                    observe(rollout, config.num_steps - 1, group, vec_env.step_wait())

            # ---- advantages: GAE(lambda), no bootstrap across an episode end --------------------
            with torch.no_grad(), autocast:
                _, next_value, _ = actor_forward(
                    next_obs[None], concat_states(memory_states), next_starts[None]
                )
            rollout.advantages = compute_gae(
                rollout.rewards,
                rollout.values,
                rollout.ends,
                next_value[0].float(),
                config.gamma,
                config.gae_lambda,
            )
            rollout.returns = rollout.advantages + rollout.values

            # ---- learn: clipped surrogate, clipped value loss, entropy bonus ---------------------
            if learner is None:
                finish_update(update, learn(rollout, update), global_step)
                continue
            finish_pending()  # the update on the previous rollout, which ran during this one
            actor.load_state_dict(agent.state_dict())
            pending = (learner.submit(learn, rollout, update), update, global_step)
        finish_pending()
    except KeyboardInterrupt:
        settle_learner()
        save()
        logger.close()
        close_envs()
        raise
    except common.TrainingStopped:
        settle_learner()
        logger.close()
        close_envs()
        raise
    except Exception as error:
        # An env worker that keeps failing, a full disk...: keep what was learnt, then report.
        settle_learner()
        save_error = common.try_to_save(save)
        logger.close()
        close_envs()
        raise common.TrainingStopped(f"training stopped: {error}{save_error}") from error
    finally:
        if learner is not None:
            learner.shutdown(wait=True)
    close_envs()
    save()

    eval_summary = run_eval(agent, config, device, seed=config.seed + 10_000)
    logger.scalars(common.eval_scalars(eval_summary), global_step)
    logger.close()
    sps = (global_step - run_start_step) / max(time.time() - run_start, 1e-9)
    summary = common.run_summary(
        run_dir, ALGO, config.env, global_step, sps, episodes.count, skipped_updates, eval_summary
    )
    common.finish_run(run_dir, summary, history)
    return summary


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    ends: torch.Tensor,
    next_value: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> torch.Tensor:
    """Generalized Advantage Estimation (Schulman et al. 2016), backwards over time.

    Args:
        rewards, values, ends: (T, N); ends[t] = 1 where transition t ended its episode.
        next_value: (N,) value of the observation after the last step.

    Returns:
        advantages (T, N).
    """
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        value_after = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        not_end = 1.0 - ends[t]
        # delta_t = r_t + gamma * V(s_{t+1}) * (1 - end_t) - V(s_t)
        delta = rewards[t] + gamma * value_after * not_end - values[t]
        # A_t = delta_t + gamma * lambda * (1 - end_t) * A_{t+1}
        last_gae = delta + gamma * gae_lambda * not_end * last_gae
        advantages[t] = last_gae
    return advantages


def minibatch_indices(config: PPOConfig, np_rng: np.random.Generator) -> list[np.ndarray]:
    """Feed-forward: shuffled flat (T*N) indices. Recurrent: shuffled env indices (whole sequences)."""
    if config.memory == "none":
        flat = np_rng.permutation(config.num_steps * config.num_envs)
        return np.array_split(flat, config.num_minibatches)
    return np.array_split(np_rng.permutation(config.num_envs), config.num_minibatches)


def slice_minibatch(index: np.ndarray, config: PPOConfig, rollout: Rollout) -> dict[str, Any]:
    """Feed-forward minibatches are (1, M) "sequences" of single steps; recurrent ones (T, envs)."""
    index_tensor = torch.as_tensor(index, device=rollout.obs.device)
    if config.memory == "none":
        t_index, env_index = index_tensor // config.num_envs, index_tensor % config.num_envs

        def take(x: torch.Tensor) -> torch.Tensor:
            return x[t_index, env_index][None]  # (1, M, ...)

        envs_in_batch = None
    else:

        def take(x: torch.Tensor) -> torch.Tensor:
            return x[:, index_tensor]  # (T, E, ...)

        envs_in_batch = index_tensor
    return {
        "obs": take(rollout.obs),
        "starts": take(rollout.starts),
        "actions": take(rollout.actions),
        "logprobs": take(rollout.logprobs),
        "advantages": take(rollout.advantages),
        "returns": take(rollout.returns),
        "values": take(rollout.values),
        "envs": envs_in_batch,
    }


def run_eval(agent: ActorCritic, config: PPOConfig, device: torch.device, seed: int) -> dict[str, Any]:
    policy = PPOPolicy(agent, device)
    return common.evaluate(
        policy,
        lambda n: envs.make_vec(config.env, n, seed=seed, **common.eval_env_overrides(config)),
        config.eval_episodes,
        seed,
    )
