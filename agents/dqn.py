"""Deep Q-Network (Mnih et al. 2015), one readable file in the style of CleanRL's dqn.py / dqn_atari.py.

Every vector step, act epsilon-greedily in all envs at once and store the
transitions in replay memory; every ``train_frequency`` agent steps, take ``gradient_steps``
minibatch steps on the (importance-weighted) Huber or squared TD error

    y = R^(n) + gamma^m (1 - terminated) Q_target(s_{t+m}, a*),    L = E_i[ w_i * huber(y_i - Q(s_t, a_t)) ]

with a* = argmax_a Q_target(s_{t+m}, a), or with ``double`` a* = argmax_a Q(s_{t+m}, a): the online
net picks the action, the target net values it (van Hasselt et al. 2016). R^(n) sums up to n
rewards, m <= n stops at an episode end (agents/buffers.py builds both at sample time). Options:
dueling heads Q = V + A - mean(A) (Wang et al. 2016), prioritized replay with importance weights
w_i (Schaul et al. 2016), and a target net copied every ``target_network_frequency`` agent steps
(tau = 1) or moved towards the online net by Polyak averaging, theta' <- tau theta + (1 - tau) theta'.
Pixels: ``augment=shift`` is DrQ (Kostrikov et al. 2021): each sampled s and s' is shifted by up to 4
pixels, independently, before both Q values are computed. ``init_encoder`` starts the encoder from a
pre-trained one (a ``lab fit ssl`` run), ``freeze_encoder`` keeps it fixed.

Same-step autoreset: when an episode ends, the vector env already returns the next episode's first
observation; the transition is stored with ``infos["final_obs"]`` as its next observation, so no
reset observation is ever a next observation and no "reset transition" exists to train on.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import envs
import nets
from agents.buffers import ReplayBuffer
from agents.engine import AgentConfig, AsyncLearner, EvalListener, TrainingRun
from agents.ppo import keep_zero_weights, setup_network
from core.checkpoint import load_checkpoint
from core.compute import adam_kernel, bf16_autocast, forward_copy, keep_freed_memory
from core.config import config_from_dict as rebuild_config
from core.config import option, redefault
from nets.augment import SHIFT_PAD, random_shift

ALGO = "dqn"
BUFFER_FILE = "replay_buffer.npz"  # in checkpoints/, next to the newest checkpoint (save_buffer)


@dataclass
class DQNConfig(AgentConfig):
    """Every field can be set with ``lab train ... --algo dqn --set key=value``.

    Defaults solve CartPole-v1 in 50k steps: RL Zoo's tuned DQN (lr 2.3e-3, batch 64, epsilon 1 -> 0.04
    over 16%, [256, 256] ReLU MLP, one gradient step per 2 agent steps, target copied every 256
    steps) plus 3-step double-DQN targets, a learning rate annealed to 0, and the best of the
    periodic greedy evals kept at the end.
    """

    hidden: tuple[int, ...] = redefault(AgentConfig, "hidden", (256, 256))
    head_hidden: int = option(0, "hidden layer per Q stream (0: one Linear)", min=0)
    total_steps: int = redefault(AgentConfig, "total_steps", 50_000)
    num_envs: int = redefault(AgentConfig, "num_envs", 1)
    buffer_size: int = option(100_000, "replay memory in transitions", min=1)
    learning_rate: float = redefault(AgentConfig, "learning_rate", 2.3e-3)
    batch_size: int = option(64, "transitions per gradient step", min=1)
    learning_starts: int = option(1_000, "transitions stored before learning", min=0)
    train_frequency: int = option(2, "agent steps between training phases", min=1)
    gradient_steps: int = option(1, "gradient steps per training phase", min=1)
    target_network_frequency: int = option(256, "agent steps between target-net updates", min=1)
    tau: float = option(1.0, "target update rate (1: hard copy, <1: Polyak)", min=0.0, max=1.0)
    exploration_fraction: float = option(
        0.16, "fraction of total_steps over which epsilon decays", min=0.0, max=1.0
    )
    start_e: float = option(1.0, "initial epsilon", min=0.0, max=1.0)
    end_e: float = option(0.04, "final epsilon", min=0.0, max=1.0)
    n_step: int = option(3, "steps in the bootstrapped return", min=1)
    double: bool = option(True, "double-DQN targets")
    dueling: bool = option(False, "dueling Q head: V + A - mean(A)")
    prioritized: bool = option(False, "prioritized replay (proportional)")
    prioritized_alpha: float = option(0.6, "priority exponent", min=0.0)
    prioritized_beta0: float = option(0.4, "initial importance exponent, annealed to 1", min=0.0, max=1.0)
    loss: Literal["huber", "mse"] = option("huber", "TD loss")
    max_grad_norm: float = redefault(AgentConfig, "max_grad_norm", 10.0)
    keep_freed_memory: bool = option(
        True,
        "keep memory freed between gradient steps in the process (glibc malloc thresholds) "
        "instead of page-faulting it back in at every step",
    )
    overlap: bool = option(
        False,
        "run each training phase's gradient steps in a thread while the next "
        "train_frequency agent steps are collected (acting lags one phase); fastest with the "
        "env in this process (env_backend=sync)",
    )
    log_every: int = option(1_000, "agent steps between log records", min=1)
    # Periodic evals by default: keep_best picks among them.
    eval_every: int = redefault(AgentConfig, "eval_every", 2_500)
    keep_best: bool = option(True, "end with the weights of the best periodic greedy eval (needs eval_every)")
    save_buffer: bool = option(False, "checkpoint the replay memory too (large)")
    augment: Literal["none", "shift"] = option(
        "none", "pixels: DrQ, each sampled observation and next observation shifted (pad 4, random crop)"
    )

    def check(self) -> None:
        """Checks the fields against each other; ``lab train`` runs this before it creates the run."""
        super().check()
        if self.learning_starts > self.buffer_size:
            raise ValueError(f"learning_starts={self.learning_starts} exceeds buffer_size={self.buffer_size}")
        if self.overlap and self.prioritized:
            # The learner would update the sum tree while the main thread adds to it.
            raise ValueError("overlap=true does not combine with prioritized=true; set one of them false")


CONFIG = DQNConfig

# ---------------------------------------------------------------------------------------------
# The network: encoder -> Q head
# ---------------------------------------------------------------------------------------------


def feed_forward_nets() -> tuple[str, ...]:
    """The registry's nets that map one observation to features (no sequence memory)."""
    return tuple(name for name in nets.names() if nets.kind(name) in ("vector", "image"))


def build_encoder(config: DQNConfig, obs_shape: tuple[int, ...]) -> nn.Module:
    """The config's encoder, feed-forward only; the MLP uses ReLU, as SB3's and CleanRL's DQN."""
    return nets.build_encoder(
        config.net, obs_shape, config.hidden, activation="relu", allowed=feed_forward_nets()
    )


class QNetwork(nn.Module):
    """Q(s, .) for all actions: (B, *obs_shape) -> (B, num_actions)."""

    def __init__(self, config: DQNConfig, obs_shape: tuple[int, ...], num_actions: int) -> None:
        super().__init__()
        self.encoder = build_encoder(config, obs_shape)
        self.head = nets.QHead(
            self.encoder.out_dim, num_actions, hidden=config.head_hidden or None, dueling=config.dueling
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(obs))


# ---------------------------------------------------------------------------------------------
# Greedy policy for evaluation and video
# ---------------------------------------------------------------------------------------------


class DQNPolicy:
    """Greedy actions argmax_a Q(s, a); reports max_a Q(s, a) as the value estimate.

    With ``stochastic`` set, a random action replaces the greedy one with probability ``epsilon``
    (the run's final exploration rate), as the RL Zoo evaluates Atari agents.
    """

    def __init__(self, q_network: QNetwork, device: torch.device, epsilon: float = 0.01) -> None:
        self.q_network = q_network.eval()
        self.device = device
        self.stochastic = False
        self.epsilon = epsilon
        self.rng = np.random.default_rng(0)
        self.trained_steps: int | None = None  # agent steps behind the weights, when loaded from a checkpoint

    def sample_actions(self, seed: int) -> None:
        """Acts epsilon-greedily from now on, reproducibly: the random actions come from ``seed``."""
        self.stochastic = True
        self.rng = np.random.default_rng(seed)

    def reset(self, num_envs: int) -> None:
        pass  # feed-forward: no memory between steps

    @torch.no_grad()
    def act(self, obs: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        q_values = self.q_network(torch.as_tensor(obs, device=self.device)).float()  # (B, A)
        values, actions = q_values.max(dim=1)
        chosen = actions.cpu().numpy()
        if self.stochastic:
            explore = self.rng.random(len(chosen)) < self.epsilon
            chosen = np.where(explore, self.rng.integers(0, q_values.shape[1], len(chosen)), chosen)
        return chosen, {"value": values.cpu().numpy()}


def load_policy(sidecar: Path, meta: dict[str, Any], device: torch.device) -> DQNPolicy:
    """Rebuilds the greedy policy of a DQN checkpoint."""
    state, _ = load_checkpoint(sidecar)
    config = config_from_dict(meta["config"])
    q_network = QNetwork(config, tuple(meta["obs_shape"]), int(meta["num_actions"])).to(device)
    if meta.get("quantization") == "int8":  # `lab compress --method quantize`: int8 layers, fp32 scales
        from nets.quantized import int8_skeleton

        q_network = int8_skeleton(q_network)
    q_network.load_state_dict(state["model"])
    policy = DQNPolicy(q_network, device, epsilon=config.end_e)
    policy.trained_steps = state.get("global_step")
    return policy


def config_from_dict(values: dict[str, Any], source: str = "") -> DQNConfig:
    """A DQNConfig from a preset's or a run's dictionary; an unknown key raises ConfigError."""
    return rebuild_config(DQNConfig, values, source)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def linear_schedule(start: float, end: float, duration: int, step: int) -> float:
    """``start`` at step 0, linearly to ``end`` at ``duration``, then ``end``."""
    if duration <= 0:
        return end
    return start + (end - start) * min(1.0, step / duration)


class PhaseStats(NamedTuple):
    """One training phase (``gradient_steps`` minibatch steps): its newest step's numbers and counts."""

    loss: torch.Tensor  # the last step's TD loss
    q_taken: torch.Tensor  # (B,) Q(s_t, a_t) of the last step's batch
    applied: int  # steps whose loss and gradient were finite
    skipped: int  # steps skipped for a non-finite loss or gradient
    trailing_bad: int  # skipped steps after the last applied one (the end of a NaN streak)


# Gradient steps in a row with a non-finite loss or gradient before training stops (PPO counts whole
# updates). Replay draws one poisoned transition again and again, so a few bad steps are survivable;
# this many mean the data or the weights are broken for good.
MAX_BAD_STEPS = 100


# ---------------------------------------------------------------------------------------------
# Training: the loop
# ---------------------------------------------------------------------------------------------


def train(
    config: DQNConfig,
    run_dir: Path,
    resume: bool = False,
    progress: bool = True,
    on_eval: EvalListener | None = None,
) -> dict[str, Any]:
    """Trains DQN, writing TensorBoard events, checkpoints and metrics.json into ``run_dir``.

    Returns:
        The ``lab train --json`` summary (:meth:`agents.engine.TrainingRun.finish`), with the step
        and return of the best periodic eval when ``keep_best`` is on.
    """
    run = TrainingRun(ALGO, config, run_dir, resume, progress, on_eval)
    trainer = DQNTrainer(config, run)
    with run.guard(trainer):
        while run.global_step < config.total_steps and not run.done:
            previous_step = run.global_step
            pending = send_actions(trainer)  # advances run.global_step by num_envs
            if trainer.buffer.added >= config.learning_starts and len(trainer.buffer) >= config.batch_size:
                train_phases(trainer, previous_step)
                run.check_health(MAX_BAD_STEPS, "gradient steps")
                update_target(trainer, previous_step)
            store_transitions(trainer, pending)
            trainer.wrap_up(previous_step)  # log, eval and checkpoint when due
        trainer.learner.finish(trainer.book)
        trainer.keep_best_weights()
        trainer.save()
    best = trainer.best
    extra = {"best_eval_step": int(best["step"]), "best_eval_return": float(best["return"])} if best else {}
    return run.finish(DQNPolicy(trainer.q_network, run.device), extra)


class DQNTrainer:
    """DQN's state during training: the env, the networks, the optimizer, replay memory, counters.

    With ``config.overlap`` each training phase's gradient steps run in a learner thread while the
    next ``train_frequency`` agent steps are collected; acting then lags one phase behind.
    """

    def __init__(self, config: DQNConfig, run: TrainingRun) -> None:
        self.config, self.run = config, run
        device, saved = run.device, run.saved
        if config.keep_freed_memory:
            keep_freed_memory()
        # The epsilon, beta and learning-rate schedules run over the total of the run's first start, so
        # raising --steps on resume continues them instead of re-opening exploration.
        self.schedule_steps = int(saved.get("schedule_steps", config.total_steps))
        self.vec_env = run.make_vec_env(config.num_envs, seed=config.seed + run.global_step)
        space = self.vec_env.single_observation_space
        obs_shape, self.num_actions = tuple(space.shape), int(self.vec_env.single_action_space.n)
        self.q_network = QNetwork(config, obs_shape, self.num_actions).to(device)
        resumed = "model" in saved
        run.record_start_weights(
            setup_network(config, self.q_network, [self.q_network.encoder], obs_shape, resumed)
        )
        self.target_network = QNetwork(config, obs_shape, self.num_actions).to(device)
        self.target_network.load_state_dict(self.q_network.state_dict())
        self.optimizer = torch.optim.Adam(
            self.q_network.parameters(), lr=config.learning_rate, **adam_kernel(device)
        )
        self.frame_stack = frame_stack_of(config.env, obs_shape, space.dtype)
        self.buffer = self.new_buffer(obs_shape, space.dtype)
        self.gradient_updates = int(saved.get("gradient_updates", 0))
        self.best: dict[str, Any] = saved.get("best", {})  # keep_best: {"return", "step", "model"}
        if "model" in saved:
            self.q_network.load_state_dict(saved["model"])
            self.target_network.load_state_dict(saved.get("target", saved["model"]))
            if "optimizer" in saved:
                self.optimizer.load_state_dict(saved["optimizer"])
        if config.keep_zeros:
            keep_zero_weights(self.q_network, self.optimizer)
        run.start(obs_shape, self.num_actions, config.total_steps)
        if run.resumed:
            self.restore_buffer()
        self.forward = torch.compile(self.q_network) if config.compile else self.q_network
        # Target values come from a forward copy of the target network: with bf16 its Linear/Conv weights
        # are stored in bf16, the numbers autocast would round them to at every gradient step.
        # target_network itself stays fp32: it is what checkpoints hold and what Polyak averaging moves.
        self.target_copy = forward_copy(self.target_network, device, config.bf16)
        self.target_forward = torch.compile(self.target_copy) if config.compile else self.target_copy
        # The acting network: the learner's own one, or with overlap a forward copy refreshed at each
        # hand-over of a training phase to the learner thread (which changes q_network meanwhile).
        self.actor = forward_copy(self.q_network, device, config.bf16) if config.overlap else self.q_network
        self.actor_forward = (
            (torch.compile(self.actor) if config.compile else self.actor) if config.overlap else self.forward
        )
        # Acting on one frame stack in fp32 without overlap on the CPU: autocast would re-cast the fp32
        # weights to bf16 at every call. The overlap actor copy already holds bf16 weights.
        self.act_autocast = bf16_autocast(device, config.bf16 and (config.overlap or device.type != "cpu"))
        self.obs, _ = self.vec_env.reset(seed=config.seed + run.global_step)
        self.env_steps_in_workers = config.env_backend != "sync"
        self.exploration_steps = int(config.exploration_fraction * self.schedule_steps)
        self.epsilon = linear_schedule(config.start_e, config.end_e, self.exploration_steps, run.global_step)
        self.actions = np.zeros(config.num_envs, dtype=np.int64)  # the actions of the step in flight
        self.last = PhaseStats(torch.full((), float("nan")), torch.full((), float("nan")), 0, 0, 0)
        self.learner: AsyncLearner[PhaseStats] = AsyncLearner(config.overlap, "dqn-learner")
        # augment=shift: the shifts come from a generator only the learner uses (with overlap, a thread).
        self.augment_generator = torch.Generator().manual_seed(config.seed + run.global_step)

    def new_buffer(self, obs_shape: tuple[int, ...], dtype: np.dtype) -> ReplayBuffer:
        config = self.config
        return ReplayBuffer(
            config.buffer_size, config.num_envs, obs_shape, dtype, frame_stack=self.frame_stack,
            n_step=config.n_step, gamma=config.gamma, prioritized=config.prioritized,
            alpha=config.prioritized_alpha,
        )  # fmt: skip

    def refresh_actor(self) -> None:
        """The acting copy takes the weights of the phase just booked (overlap only)."""
        self.actor.load_state_dict(self.q_network.state_dict())

    def restore_buffer(self) -> None:
        """The saved replay memory is used only when it was saved with this checkpoint (same step)."""
        path = self.run.run_dir / "checkpoints" / BUFFER_FILE
        if self.config.save_buffer and path.exists():
            try:
                buffer_step = self.buffer.load(path)
                problem = f"it is from step {buffer_step}, the checkpoint from {self.run.global_step}"
            except ValueError as error:
                buffer_step, problem = None, str(error)
            if buffer_step != self.run.global_step:
                print(f"warning: not using {path} ({problem}); refilling the replay memory", file=sys.stderr)
                self.buffer = self.new_buffer(self.buffer.obs_shape, self.buffer.obs_dtype)
        self.buffer.break_episodes()  # the envs restart with fresh episodes

    def book(self, tag: int, stats: PhaseStats) -> None:
        """Counts a finished training phase (serial: at once; overlap: when the thread is done)."""
        run = self.run
        self.gradient_updates += stats.applied
        run.skipped_updates += stats.skipped
        run.bad_in_a_row = stats.trailing_bad if stats.applied else run.bad_in_a_row + stats.trailing_bad
        self.last = stats

    def wrap_up(self, previous_step: int) -> None:
        """Every ``log_every`` agent steps a log record; eval and checkpoint when due."""
        config, run, step = self.config, self.run, self.run.global_step
        if step // config.log_every > previous_step // config.log_every:
            self.learner.finish(self.book)  # the losses logged are those of the newest phase
            td_loss, q_values = float(self.last.loss.detach()), float(self.last.q_taken.detach().mean())
            run.log(step, {"td_loss": td_loss, "q_values": q_values, "epsilon": self.epsilon}, {
                "charts/epsilon": self.epsilon, "charts/learning_rate": self.optimizer.param_groups[0]["lr"],
                "charts/replay_size": len(self.buffer), "charts/gradient_updates": self.gradient_updates,
                "losses/td_loss": td_loss, "losses/q_values": q_values,
            })  # fmt: skip
        if run.eval_due(step):
            self.learner.finish(self.book)
            self.periodic_eval()
        if run.checkpoint_due(step):
            self.learner.finish(self.book)
            self.save()

    def periodic_eval(self) -> None:
        """Greedy eval during training; with ``keep_best`` it remembers the best weights so far."""
        step = self.run.global_step
        summary = self.run.evaluate(
            DQNPolicy(self.q_network, self.run.device), self.config.seed + 10_000 + step, step
        )
        self.q_network.train()
        # >= prefers the later of equally good policies: they have trained on more data.
        if self.config.keep_best and summary["return_mean"] >= self.best.get("return", -math.inf):
            weights = {key: value.detach().clone() for key, value in self.q_network.state_dict().items()}
            self.best = {"return": summary["return_mean"], "step": step, "model": weights}
            self.run.logger.scalars({"eval/best_return": self.best["return"]}, step)

    def keep_best_weights(self) -> None:
        """DQN's greedy policy can oscillate late in training: the final weights compete with the best
        periodic eval's, and the run ends with the winner (the final eval then uses new episodes)."""
        if not (self.config.keep_best and self.best):
            return
        if self.run.last_eval_step != self.run.global_step:
            self.periodic_eval()
        if self.best["step"] != self.run.global_step:
            self.q_network.load_state_dict(self.best["model"])
            self.target_network.load_state_dict(self.best["model"])

    def save(self) -> None:
        step = self.run.global_step
        state = {
            "model": self.q_network.state_dict(), "target": self.target_network.state_dict(),
            "optimizer": self.optimizer.state_dict(), "global_step": step,
            "schedule_steps": self.schedule_steps, "gradient_updates": self.gradient_updates,
        }  # fmt: skip
        if self.best:
            state["best"] = self.best
        if self.config.save_buffer:  # one file, replaced atomically; it records its step (restore_buffer)
            self.buffer.save(self.run.run_dir / "checkpoints" / BUFFER_FILE, step)
        self.run.save(step, state)

    def settle(self) -> None:
        self.learner.settle(self.book)

    def close(self) -> None:
        self.learner.shutdown()


# ---------------------------------------------------------------------------------------------
# Training: acting and storing
# ---------------------------------------------------------------------------------------------


def send_actions(trainer: DQNTrainer) -> Any:
    """Acts epsilon-greedily in all envs at once (one batched forward pass) and starts the env step.

    Our subprocess vector env steps in its workers while the gradient steps of this agent step run
    (on 2 cores: the emulator on one, learning on the other); learning then sees the memory as it was
    before this step, whichever back-end. An in-process vector env steps right here; with overlap that
    is the faster choice, as the learner thread learns meanwhile on the other core (nes-py's emulator
    releases the GIL) without a pipe round trip per step.

    Returns:
        The step's results (in-process env), or None (worker env: :func:`store_transitions` waits).
    """
    config, run = trainer.config, trainer.run
    trainer.epsilon = linear_schedule(
        config.start_e, config.end_e, trainer.exploration_steps, run.global_step
    )
    with torch.no_grad(), trainer.act_autocast:
        q_values = trainer.actor_forward(torch.as_tensor(trainer.obs, device=run.device))  # (N, A)
    explore = torch.rand(config.num_envs, device=run.device) < trainer.epsilon
    random_actions = torch.randint(trainer.num_actions, (config.num_envs,), device=run.device)
    trainer.actions = torch.where(explore, random_actions, q_values.argmax(dim=1)).cpu().numpy()
    run.global_step += config.num_envs
    if trainer.env_steps_in_workers:
        trainer.vec_env.step_async(trainer.actions)
        return None
    return trainer.vec_env.step(trainer.actions)


def store_transitions(trainer: DQNTrainer, results: Any) -> None:
    """Stores the step's transitions; a finished episode's next observation is its true last one
    (``infos["final_obs"]``), never the reset observation the vector env already returned."""
    next_obs, rewards, terminations, truncations, infos = (
        results if results is not None else trainer.vec_env.step_wait()
    )
    real_next_obs = next_obs
    finished = np.flatnonzero(np.logical_or(terminations, truncations))
    if finished.size:
        real_next_obs = next_obs.copy()
        for index in finished:
            real_next_obs[index] = infos["final_obs"][index]
    trainer.buffer.add(trainer.obs, real_next_obs, trainer.actions, rewards, terminations, truncations)
    trainer.obs = next_obs
    trainer.run.add_episodes(infos)


# ---------------------------------------------------------------------------------------------
# Training: learning
# ---------------------------------------------------------------------------------------------


def train_phases(trainer: DQNTrainer, previous_step: int) -> None:
    """``gradient_steps`` per ``train_frequency`` agent steps that passed, with annealed lr and beta."""
    config, step = trainer.config, trainer.run.global_step
    phases = step // config.train_frequency - previous_step // config.train_frequency
    if not phases:
        return
    fraction_left = max(0.0, 1.0 - step / trainer.schedule_steps)
    learning_rate = config.learning_rate * fraction_left if config.anneal_lr else config.learning_rate
    beta = linear_schedule(config.prioritized_beta0, 1.0, trainer.schedule_steps, step)
    # Serial: each batch is drawn just before its step (prioritized replay changes the priorities in
    # between). Overlap: all are drawn now, before the memory changes.
    batches = (
        trainer.buffer.sample(config.batch_size, trainer.run.np_rng, beta)
        for _ in range(phases * config.gradient_steps)
    )
    if trainer.learner.enabled:
        batches = list(batches)
    trainer.learner.submit(
        step, dqn_update, trainer, batches, learning_rate, book=trainer.book, refresh=trainer.refresh_actor
    )


def update_target(trainer: DQNTrainer, previous_step: int) -> None:
    """Every ``target_network_frequency`` agent steps: a hard copy (tau = 1) or Polyak averaging."""
    config, step = trainer.config, trainer.run.global_step
    if step // config.target_network_frequency <= previous_step // config.target_network_frequency:
        return
    trainer.learner.finish(
        trainer.book
    )  # the target copies the weights after this step's phase, as in serial
    with torch.no_grad():
        if config.tau >= 1.0:
            trainer.target_network.load_state_dict(trainer.q_network.state_dict())
        else:
            for target_param, param in zip(
                trainer.target_network.parameters(), trainer.q_network.parameters(), strict=True
            ):
                target_param.lerp_(param, config.tau)  # theta' += tau (theta - theta')
        trainer.target_copy.load_state_dict(trainer.target_network.state_dict())


def dqn_update(trainer: DQNTrainer, batches: Iterable[Any], learning_rate: float) -> PhaseStats:
    """The gradient steps of one training phase, one per batch (in the learner thread with overlap):

    y = R^(n) + gamma^m (1 - terminated) Q_target(s_{t+m}, a*),    L = E_i[ w_i * huber(y_i - Q(s_t, a_t)) ]
    """
    config, device, optimizer = trainer.config, trainer.run.device, trainer.optimizer
    # autocast keeps its previous state on the context object: one per call, never shared by threads.
    autocast = bf16_autocast(device, config.bf16)
    optimizer.param_groups[0]["lr"] = learning_rate
    loss = q_taken = torch.full((), float("nan"))
    applied = skipped = trailing_bad = 0
    for batch in batches:
        b_obs = torch.as_tensor(batch.obs, device=device)
        b_next_obs = torch.as_tensor(batch.next_obs, device=device)
        if config.augment == "shift":
            # DrQ (Kostrikov et al. 2021, K = M = 1): s and s' shifted independently, every step anew.
            b_obs = random_shift(b_obs, SHIFT_PAD, trainer.augment_generator)
            b_next_obs = random_shift(b_next_obs, SHIFT_PAD, trainer.augment_generator)
        b_actions = torch.as_tensor(batch.actions, device=device)
        b_returns = torch.as_tensor(batch.returns, device=device)
        b_discounts = torch.as_tensor(batch.discounts, device=device)
        b_weights = torch.as_tensor(batch.weights, device=device)

        with torch.no_grad(), autocast:
            next_q_target = trainer.target_forward(b_next_obs).float()  # (B, A)
            if config.double:
                next_actions = trainer.forward(b_next_obs).argmax(dim=1, keepdim=True)  # online net picks
            else:
                next_actions = next_q_target.argmax(dim=1, keepdim=True)
            # y = R^(n) + gamma^m (1 - terminated) Q_target(s_{t+m}, a*)
            td_target = b_returns + b_discounts * next_q_target.gather(1, next_actions).squeeze(1)
        with autocast:
            q_all = trainer.forward(b_obs).float()  # (B, A)
        q_taken = q_all.gather(1, b_actions[:, None]).squeeze(1)  # Q(s_t, a_t)
        td_error = td_target - q_taken
        if config.loss == "huber":
            elementwise = F.smooth_l1_loss(q_taken, td_target, reduction="none")
        else:
            elementwise = td_error.pow(2)
        loss = (b_weights * elementwise).mean()  # importance weights are 1 without PER

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(trainer.q_network.parameters(), config.max_grad_norm or math.inf)
        # A non-finite loss or gradient skips this step instead of poisoning the weights.
        if torch.isfinite(loss) and torch.isfinite(grad_norm):
            optimizer.step()
            applied, trailing_bad = applied + 1, 0
            if config.prioritized:
                trainer.buffer.update_priorities(batch.indices, td_error.detach().abs().cpu().numpy())
        else:
            skipped, trailing_bad = skipped + 1, trailing_bad + 1
    return PhaseStats(loss, q_taken, applied, skipped, trailing_bad)


def frame_stack_of(env_name: str, obs_shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Frames per observation when the env stacks image frames (FrameStackObservation), else 1.

    Asked of one probe env in this process: an async vector env's workers would die on a missing
    attribute. The replay buffer checks every step that the observations really are such stacks.
    """
    if len(obs_shape) != 3 or np.dtype(dtype) != np.uint8:
        return 1
    probe = envs.make(env_name)
    try:
        return int(probe.get_wrapper_attr("stack_size"))
    except AttributeError:
        return 1
    finally:
        probe.close()
