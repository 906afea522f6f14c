"""Deep Q-Network (Mnih et al. 2015), one readable file in the style of CleanRL's dqn.py / dqn_atari.py.

The loop is flat: every vector step, act epsilon-greedily in all envs at once and store the
transitions in replay memory; every ``train_frequency`` agent steps, take ``gradient_steps``
minibatch steps on the (importance-weighted) Huber or squared TD error

    y = R^(n) + gamma^m (1 - terminated) Q_target(s_{t+m}, a*),    L = E_i[ w_i * huber(y_i - Q(s_t, a_t)) ]

with a* = argmax_a Q_target(s_{t+m}, a), or with ``double`` a* = argmax_a Q(s_{t+m}, a): the online
net picks the action, the target net values it (van Hasselt et al. 2016). R^(n) sums up to n
rewards, m <= n stops at an episode end (agents/buffers.py builds both at sample time). Options:
dueling heads Q = V + A - mean(A) (Wang et al. 2016), prioritized replay with importance weights
w_i (Schaul et al. 2016), and a target net copied every ``target_network_frequency`` agent steps
(tau = 1) or moved towards the online net by Polyak averaging, theta' <- tau theta + (1 - tau) theta'.

Same-step autoreset: when an episode ends, the vector env already returns the next episode's first
observation; the transition is stored with ``infos["final_obs"]`` as its next observation, so no
reset observation is ever a next observation and no "reset transition" exists to train on.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import envs
import nets
from agents import common
from agents.buffers import ReplayBuffer
from agents.checkpoint import config_from_dict as rebuild_config
from agents.checkpoint import is_storage_error, rng_state, set_rng_state
from envs.vector import SubprocVectorEnv

ALGO = "dqn"
BUFFER_FILE = "replay_buffer.npz"  # in checkpoints/, next to the newest checkpoint (save_buffer)
# Gradient steps in a row with a non-finite loss or gradient before training stops (PPO counts whole
# updates, common.MAX_BAD_UPDATES). Replay draws one poisoned transition again and again, so a few
# bad steps are survivable; this many mean the data or the weights are broken for good.
MAX_BAD_STEPS = 100


@dataclass
class DQNConfig:
    """Every field can be set with ``lab train ... --algo dqn --set key=value``.

    Defaults solve CartPole-v1 in 50k steps: RL Zoo's tuned DQN (lr 2.3e-3, batch 64, epsilon 1 -> 0.04
    over 16%, [256, 256] ReLU MLP, one gradient step per 2 agent steps, target copied every 256
    steps) plus 3-step double-DQN targets, a learning rate annealed to 0, and the best of the
    periodic greedy evals kept at the end.
    """

    env: str = field(default="cartpole", metadata={"help": "preset name or Gymnasium id"})
    net: str = field(default="auto", metadata={"help": "encoder from nets/ (auto: by observation type)"})
    hidden: tuple[int, ...] = field(
        default=(256, 256), metadata={"help": "MLP widths for vector observations"}
    )
    head_hidden: int = field(
        default=0, metadata={"help": "hidden layer per Q stream (0: one Linear)", "min": 0}
    )
    seed: int = field(default=1, metadata={"help": "seed of torch, numpy and the envs", "min": 0})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    total_steps: int = field(default=50_000, metadata={"help": "agent steps over the whole run", "min": 1})
    num_envs: int = field(default=1, metadata={"help": "parallel envs", "min": 1, "max": 1024})
    env_backend: Literal["sync", "async"] = field(default="sync", metadata={"help": "vector env back-end"})
    sticky: float = field(
        default=0.0,
        metadata={"help": "Mario: repeat the previous action on each frame with this probability", "min": 0.0,
                  "max": 0.99},
    )  # fmt: skip
    buffer_size: int = field(default=100_000, metadata={"help": "replay memory in transitions", "min": 1})
    learning_rate: float = field(default=2.3e-3, metadata={"help": "Adam learning rate", "min": 0.0})
    anneal_lr: bool = field(default=True, metadata={"help": "linearly anneal the learning rate to 0"})
    gamma: float = field(default=0.99, metadata={"help": "discount", "min": 0.0, "max": 1.0})
    batch_size: int = field(default=64, metadata={"help": "transitions per gradient step", "min": 1})
    learning_starts: int = field(
        default=1_000, metadata={"help": "transitions stored before learning", "min": 0}
    )
    train_frequency: int = field(
        default=2, metadata={"help": "agent steps between training phases", "min": 1}
    )
    gradient_steps: int = field(default=1, metadata={"help": "gradient steps per training phase", "min": 1})
    target_network_frequency: int = field(
        default=256, metadata={"help": "agent steps between target-net updates", "min": 1}
    )
    tau: float = field(
        default=1.0,
        metadata={"help": "target update rate (1: hard copy, <1: Polyak)", "min": 0.0, "max": 1.0},
    )
    exploration_fraction: float = field(
        default=0.16,
        metadata={"help": "fraction of total_steps over which epsilon decays", "min": 0.0, "max": 1.0},
    )
    start_e: float = field(default=1.0, metadata={"help": "initial epsilon", "min": 0.0, "max": 1.0})
    end_e: float = field(default=0.04, metadata={"help": "final epsilon", "min": 0.0, "max": 1.0})
    n_step: int = field(default=3, metadata={"help": "steps in the bootstrapped return", "min": 1})
    double: bool = field(default=True, metadata={"help": "double-DQN targets"})
    dueling: bool = field(default=False, metadata={"help": "dueling Q head: V + A - mean(A)"})
    prioritized: bool = field(default=False, metadata={"help": "prioritized replay (proportional)"})
    prioritized_alpha: float = field(default=0.6, metadata={"help": "priority exponent", "min": 0.0})
    prioritized_beta0: float = field(
        default=0.4, metadata={"help": "initial importance exponent, annealed to 1", "min": 0.0, "max": 1.0}
    )
    loss: Literal["huber", "mse"] = field(default="huber", metadata={"help": "TD loss"})
    max_grad_norm: float = field(
        default=10.0, metadata={"help": "gradient clipping norm (0: none)", "min": 0.0}
    )
    threads: int = field(
        default=1,
        metadata={
            "help": "CPU threads of the learner (0: torch's default, one per core)",
            "min": 0,
            "max": 1024,
        },
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the network"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (CUDA, or a CPU with native bf16)"})
    keep_freed_memory: bool = field(
        default=True,
        metadata={
            "help": "keep memory freed between gradient steps in the process (glibc malloc thresholds) "
            "instead of page-faulting it back in at every step"
        },
    )
    overlap: bool = field(
        default=False,
        metadata={
            "help": "run each training phase's gradient steps in a thread while the next "
            "train_frequency agent steps are collected (acting lags one phase); fastest with the "
            "env in this process (env_backend=sync)"
        },
    )
    log_every: int = field(default=1_000, metadata={"help": "agent steps between log records", "min": 1})
    eval_every: int = field(
        default=2_500, metadata={"help": "agent steps between greedy evals (0: at end)", "min": 0}
    )
    eval_episodes: int = field(default=10, metadata={"help": "episodes per greedy eval", "min": 1})
    keep_best: bool = field(
        default=True,
        metadata={"help": "end with the weights of the best periodic greedy eval (needs eval_every)"},
    )
    checkpoint_every: int = field(
        default=50_000, metadata={"help": "agent steps between checkpoints", "min": 1}
    )
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept on disk", "min": 1})
    save_buffer: bool = field(default=False, metadata={"help": "checkpoint the replay memory too (large)"})

    def check(self) -> None:
        """Checks the fields against each other; ``lab train`` runs this before it creates the run."""
        if self.learning_starts > self.buffer_size:
            raise ValueError(f"learning_starts={self.learning_starts} exceeds buffer_size={self.buffer_size}")
        if self.overlap and self.prioritized:
            # The learner would update the sum tree while the main thread adds to it.
            raise ValueError("overlap=true does not combine with prioritized=true; set one of them false")


# ---------------------------------------------------------------------------------------------
# The network: encoder -> Q head
# ---------------------------------------------------------------------------------------------

FEED_FORWARD_NETS = ("mlp", "nature", "impala", "vit")


def build_encoder(config: DQNConfig, obs_shape: tuple[int, ...]) -> nn.Module:
    name = config.net
    if name == "auto":
        name = "nature" if len(obs_shape) == 3 else "mlp"
    if name not in FEED_FORWARD_NETS:
        raise ValueError(
            f"DQN needs a feed-forward net, got {name!r}; valid nets: {', '.join(FEED_FORWARD_NETS)}"
        )
    if name == "mlp":
        # ReLU as in SB3's and CleanRL's DQN (PPO's MLP uses tanh).
        return nets.build("mlp", in_shape=obs_shape, hidden=config.hidden, activation="relu")
    return nets.build(name, in_shape=obs_shape)


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
    from agents.checkpoint import load_checkpoint

    state, _ = load_checkpoint(sidecar)
    config = config_from_dict(meta["config"])
    q_network = QNetwork(config, tuple(meta["obs_shape"]), int(meta["num_actions"])).to(device)
    q_network.load_state_dict(state["model"])
    policy = DQNPolicy(q_network, device, epsilon=config.end_e)
    policy.trained_steps = state.get("global_step")
    return policy


def config_from_dict(values: dict[str, Any]) -> DQNConfig:
    return rebuild_config(DQNConfig, values)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def linear_schedule(start: float, end: float, duration: int, step: int) -> float:
    """``start`` at step 0, linearly to ``end`` at ``duration``, then ``end``."""
    if duration <= 0:
        return end
    return start + (end - start) * min(1.0, step / duration)


def train(config: DQNConfig, run_dir: Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Trains DQN, writing TensorBoard events, checkpoints and metrics.json into ``run_dir``.

    Returns:
        The summary of DESIGN.md's ``lab train --json``: run_dir, steps, sps, episodes,
        eval_return_mean (and eval_clear_rate for Mario).
    """
    device = common.resolve_device(config.device)
    common.set_learner_threads(config.threads)
    if config.keep_freed_memory:
        common.keep_freed_memory()
    np_rng = common.seed_everything(config.seed)
    config.check()

    # Resume: networks, optimizer, counters and RNG states come from the newest good checkpoint.
    checkpoint = common.load_training_checkpoint(run_dir) if resume else None
    saved = checkpoint[0] if checkpoint is not None else {}
    global_step = int(saved.get("global_step", 0))
    # The epsilon, beta and learning-rate schedules run over the total of the run's first start, so raising
    # --steps on resume continues them instead of re-opening exploration.
    schedule_steps = int(saved.get("schedule_steps", config.total_steps))

    vec_env = envs.make_vec(
        config.env,
        config.num_envs,
        seed=config.seed + global_step,
        backend=config.env_backend,
        **common.train_env_overrides(config),
    )
    obs_space = vec_env.single_observation_space
    obs_shape = tuple(obs_space.shape)
    num_actions = int(vec_env.single_action_space.n)
    q_network = QNetwork(config, obs_shape, num_actions).to(device)
    target_network = QNetwork(config, obs_shape, num_actions).to(device)
    target_network.load_state_dict(q_network.state_dict())
    optimizer = torch.optim.Adam(
        q_network.parameters(), lr=config.learning_rate, **common.adam_kernel(device)
    )

    frame_stack = frame_stack_of(config.env, obs_shape, obs_space.dtype)

    def new_buffer() -> ReplayBuffer:
        return ReplayBuffer(
            config.buffer_size,
            config.num_envs,
            obs_shape,
            obs_space.dtype,
            frame_stack=frame_stack,
            n_step=config.n_step,
            gamma=config.gamma,
            prioritized=config.prioritized,
            alpha=config.prioritized_alpha,
        )

    buffer = new_buffer()
    buffer_path = run_dir / "checkpoints" / BUFFER_FILE
    episodes = common.EpisodeTracker()
    history: list[dict[str, float]] = []
    skipped_updates = gradient_updates = 0
    bad_steps_in_a_row = 0  # reset by every applied step; MAX_BAD_STEPS of them stop training
    best: dict[str, Any] = {}  # keep_best: {"return", "step", "model"} of the best periodic greedy eval
    if checkpoint is not None:
        q_network.load_state_dict(saved["model"])
        target_network.load_state_dict(saved["target"])
        optimizer.load_state_dict(saved["optimizer"])
        set_rng_state(saved["rng"], np_rng)
        episodes.restore(saved)
        history = list(saved.get("history", []))
        skipped_updates, gradient_updates = int(saved["skipped_updates"]), int(saved["gradient_updates"])
        best = saved.get("best", best)
        if config.save_buffer and buffer_path.exists():
            # The memory is used only when it was saved with this checkpoint (same step); else refilled.
            try:
                buffer_step = buffer.load(buffer_path)
                problem = f"it is from step {buffer_step}, the checkpoint from {global_step}"
            except ValueError as error:
                buffer_step, problem = None, str(error)
            if buffer_step != global_step:
                print(
                    f"warning: not using {buffer_path} ({problem}); refilling the replay memory",
                    file=sys.stderr,
                )
                buffer = new_buffer()
        buffer.break_episodes()  # the envs restart with fresh episodes
    forward = torch.compile(q_network) if config.compile else q_network
    # Target values come from a forward copy of the target network: with bf16 its Linear/Conv weights
    # are stored in bf16, the same numbers autocast would round them to at every gradient step
    # (common.forward_copy). target_network itself stays fp32: it is what checkpoints hold and what
    # Polyak averaging moves; the copy is refreshed from it at every target update.
    target_copy = common.forward_copy(target_network, device, config.bf16)
    target_forward = torch.compile(target_copy) if config.compile else target_copy
    # The acting network: the learner's own one, or with overlap a forward copy refreshed at each
    # hand-over of a training phase to the learner thread (which changes q_network meanwhile).
    actor = common.forward_copy(q_network, device, config.bf16) if config.overlap else q_network
    actor_forward = (torch.compile(actor) if config.compile else actor) if config.overlap else forward
    # Acting is a forward pass on num_envs observations (one in the Mario preset). Without overlap on
    # the CPU it runs in fp32: autocast would re-cast the fp32 weights to bf16 at every call (one Mario
    # frame stack: 0.80 ms with bf16 autocast, 0.57 ms in fp32 on the EPYC of benchmarks/RESULTS.md,
    # benchmarks/learner_parts.py). With overlap the actor copy holds bf16 weights, so autocast casts
    # nothing: as fast as fp32 alone, and faster beside the learner thread, which competes for the
    # caches (half the bytes to read). Learning keeps config.bf16 (a gradient step on 32: 20 vs 36 ms).
    act_autocast = common.bf16_autocast(device, config.bf16 and (config.overlap or device.type != "cpu"))
    meta = {
        "algo": ALGO,
        "config": dataclasses.asdict(config),
        "obs_shape": list(obs_shape),
        "num_actions": num_actions,
    }

    obs, _ = vec_env.reset(seed=config.seed + global_step)
    env_steps_in_workers = isinstance(vec_env, SubprocVectorEnv)
    logger = common.RunLogger(run_dir, config.total_steps, global_step, progress, config)
    run_start, run_start_step = time.time(), global_step
    last_checkpoint_step, last_eval_step = global_step, global_step
    exploration_steps = int(config.exploration_fraction * schedule_steps)
    epsilon = linear_schedule(config.start_e, config.end_e, exploration_steps, global_step)
    loss = q_taken = torch.full((), float("nan"))

    def save() -> None:
        state = {
            "model": q_network.state_dict(),
            "target": target_network.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": rng_state(np_rng),
            "global_step": global_step,
            "schedule_steps": schedule_steps,
            **episodes.state(),
            "skipped_updates": skipped_updates,
            "gradient_updates": gradient_updates,
            "history": history,
        }
        if best:
            state["best"] = best
        if config.save_buffer:  # one file, replaced atomically; it records its step (see the resume above)
            buffer.save(buffer_path, global_step)
        common.save_training_checkpoint(run_dir, global_step, state, meta, config.keep_checkpoints)

    def learn(batches: Iterable[Any], learning_rate: float) -> None:
        """The gradient steps of one training phase, one per batch (in the learner thread with overlap)."""
        nonlocal loss, q_taken, gradient_updates, skipped_updates, bad_steps_in_a_row
        # autocast keeps its previous state on the context object: one per call, never shared by threads.
        autocast = common.bf16_autocast(device, config.bf16)
        optimizer.param_groups[0]["lr"] = learning_rate
        for batch in batches:
            b_obs = torch.as_tensor(batch.obs, device=device)
            b_next_obs = torch.as_tensor(batch.next_obs, device=device)
            b_actions = torch.as_tensor(batch.actions, device=device)
            b_returns = torch.as_tensor(batch.returns, device=device)
            b_discounts = torch.as_tensor(batch.discounts, device=device)
            b_weights = torch.as_tensor(batch.weights, device=device)

            with torch.no_grad(), autocast:
                next_q_target = target_forward(b_next_obs).float()  # (B, A)
                if config.double:
                    next_actions = forward(b_next_obs).argmax(dim=1, keepdim=True)  # online net picks
                else:
                    next_actions = next_q_target.argmax(dim=1, keepdim=True)
                # y = R^(n) + gamma^m (1 - terminated) Q_target(s_{t+m}, a*)
                td_target = b_returns + b_discounts * next_q_target.gather(1, next_actions).squeeze(1)
            with autocast:
                q_all = forward(b_obs).float()  # (B, A)
            q_taken = q_all.gather(1, b_actions[:, None]).squeeze(1)  # Q(s_t, a_t)
            td_error = td_target - q_taken
            if config.loss == "huber":
                elementwise = F.smooth_l1_loss(q_taken, td_target, reduction="none")
            else:
                elementwise = td_error.pow(2)
            loss = (b_weights * elementwise).mean()  # importance weights are 1 without PER

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(
                q_network.parameters(),
                config.max_grad_norm if config.max_grad_norm > 0 else float("inf"),
            )
            # A non-finite loss or gradient skips this step instead of poisoning the weights.
            if torch.isfinite(loss) and torch.isfinite(grad_norm):
                optimizer.step()
                gradient_updates += 1
                bad_steps_in_a_row = 0
                if config.prioritized:
                    buffer.update_priorities(batch.indices, td_error.detach().abs().cpu().numpy())
            else:
                skipped_updates += 1
                bad_steps_in_a_row += 1

    # With overlap: the learner thread and the training phase in flight there.
    learner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dqn-learner") if config.overlap else None
    pending: Future[None] | None = None

    def settle_learner() -> None:
        """Waits for the phase in flight (its error, if any, is raised here)."""
        nonlocal pending
        if pending is not None:
            future, pending = pending, None
            future.result()

    def stop_learner() -> None:
        """Waits for whatever the learner thread still runs (even after a Ctrl-C cut a settle short),
        so that no weights change while saving; its errors are not this one's to report."""
        if learner is not None:
            learner.shutdown(wait=True)

    try:
        while global_step < config.total_steps:
            # ---- act: epsilon-greedy, batched over all envs on the device ---------------------------
            epsilon = linear_schedule(config.start_e, config.end_e, exploration_steps, global_step)
            with torch.no_grad(), act_autocast:
                q_values = actor_forward(torch.as_tensor(obs, device=device))  # (N, A)
            explore = torch.rand(config.num_envs, device=device) < epsilon
            random_actions = torch.randint(num_actions, (config.num_envs,), device=device)
            actions = torch.where(explore, random_actions, q_values.argmax(dim=1)).cpu().numpy()

            # Our subprocess vector env steps in its workers while the gradient steps below run (on 2
            # cores: the emulator on one, learning on the other); learning then sees the memory as it
            # was before this step, whichever back-end. An in-process vector env steps right here; with
            # overlap that is the faster choice, as the learner thread learns meanwhile on the other core
            # (nes-py's emulator releases the GIL) without a pipe round trip per step (RESULTS.md).
            if env_steps_in_workers:
                vec_env.step_async(actions)
            else:
                step_result = vec_env.step(actions)
            previous_step, global_step = global_step, global_step + config.num_envs

            # ---- learn: gradient_steps per train_frequency agent steps, once the memory is filled ---
            if buffer.added >= config.learning_starts and len(buffer) >= config.batch_size:
                phases = global_step // config.train_frequency - previous_step // config.train_frequency
                if phases:
                    learning_rate = (
                        config.learning_rate * max(0.0, 1.0 - global_step / schedule_steps)
                        if config.anneal_lr
                        else config.learning_rate
                    )
                    num_gradient_steps = phases * config.gradient_steps
                    beta = linear_schedule(config.prioritized_beta0, 1.0, schedule_steps, global_step)
                    # Serial: each batch is drawn just before its step (prioritized replay changes the
                    # priorities in between). Overlap: all are drawn now, before the memory changes.
                    batches = (
                        buffer.sample(config.batch_size, np_rng, beta) for _ in range(num_gradient_steps)
                    )
                    if learner is None:
                        learn(batches, learning_rate)
                    else:
                        batches = list(batches)
                        settle_learner()  # the previous phase's steps, which ran while this phase was collected
                        actor.load_state_dict(q_network.state_dict())
                        pending = learner.submit(learn, batches, learning_rate)
                # Persistent non-finite losses will not heal: stop, keeping the last good checkpoint.
                if bad_steps_in_a_row >= MAX_BAD_STEPS:
                    raise common.TrainingStopped(
                        f"loss or gradients were not finite for {bad_steps_in_a_row} gradient steps in a "
                        f"row; the last good checkpoint in {run_dir / 'checkpoints'} is kept "
                        "(try a lower learning_rate)"
                    )

                # ---- target network: hard copy, or Polyak averaging -----------------------------
                if (
                    global_step // config.target_network_frequency
                    > previous_step // config.target_network_frequency
                ):
                    settle_learner()  # the target copies the weights after this step's phase, as in serial
                    with torch.no_grad():
                        if config.tau >= 1.0:
                            target_network.load_state_dict(q_network.state_dict())
                        else:
                            for target_param, param in zip(
                                target_network.parameters(), q_network.parameters(), strict=True
                            ):
                                target_param.lerp_(param, config.tau)  # theta' += tau (theta - theta')
                        target_copy.load_state_dict(target_network.state_dict())

            # ---- remember: the transition of this step --------------------------------------------
            if env_steps_in_workers:
                step_result = vec_env.step_wait()
            next_obs, rewards, terminations, truncations, infos = step_result
            # Same-step autoreset: a finished env's next_obs already starts its next episode; the
            # transition's true next observation is infos["final_obs"].
            real_next_obs = next_obs
            finished = np.flatnonzero(np.logical_or(terminations, truncations))
            if finished.size:
                real_next_obs = next_obs.copy()
                for index in finished:
                    real_next_obs[index] = infos["final_obs"][index]
            buffer.add(obs, real_next_obs, actions, rewards, terminations, truncations)
            obs = next_obs
            for _, stats in common.finished_episodes(infos):
                episodes.add(stats)

            # ---- log every log_every agent steps (losses are read back to the host only here) ----
            if global_step // config.log_every > previous_step // config.log_every:
                settle_learner()  # the losses logged are those of the newest phase, not one in flight
                sps = (global_step - run_start_step) / max(time.time() - run_start, 1e-9)
                record = {
                    "step": global_step,
                    "sps": sps,
                    "td_loss": float(loss.detach()),
                    "q_values": float(q_taken.detach().mean()),
                    "epsilon": epsilon,
                    "return_mean": episodes.mean("return"),
                    "x_pos_max_mean": episodes.mean("x_pos_max"),
                    "clear_rate": episodes.mean("flag_get"),
                }
                if episodes.stage_means():
                    record["stages"] = episodes.stage_means()
                history.append(record)
                logger.scalars(
                    {
                        "charts/epsilon": epsilon,
                        "charts/learning_rate": optimizer.param_groups[0]["lr"],
                        "charts/SPS": sps,
                        "charts/episodic_return": record["return_mean"],
                        "charts/episodic_length": episodes.mean("length"),
                        "charts/x_pos_max": record["x_pos_max_mean"],
                        "charts/clear_rate": record["clear_rate"],
                        "charts/episodes": episodes.count,
                        "charts/replay_size": len(buffer),
                        "charts/gradient_updates": gradient_updates,
                        "charts/skipped_updates": skipped_updates,
                        "losses/td_loss": record["td_loss"],
                        "losses/q_values": record["q_values"],
                        **common.worker_scalars(vec_env),
                        **common.stage_scalars(episodes),
                    },
                    global_step,
                )
                logger.progress(global_step, episodes, sps)

            # On the multiples of eval_every (the first step past each), so that a resumed run evaluates
            # at the same steps, with the same eval seeds, as one that was never interrupted.
            if config.eval_every and global_step // config.eval_every > last_eval_step // config.eval_every:
                last_eval_step = global_step
                settle_learner()
                best = periodic_eval(q_network, config, device, global_step, best, logger)
            # Only a healthy stretch is worth a checkpoint: a NaN streak keeps the last good one.
            if global_step - last_checkpoint_step >= config.checkpoint_every and bad_steps_in_a_row == 0:
                last_checkpoint_step = global_step
                settle_learner()
                save()
        settle_learner()
    except KeyboardInterrupt:
        try:
            stop_learner()
            save()
        finally:
            logger.close()
            vec_env.close()
        raise
    except common.TrainingStopped:
        stop_learner()
        logger.close()
        vec_env.close()
        raise
    except Exception as error:
        # An env worker that keeps failing, a full disk...: keep what was learnt, then report. A disk that
        # refused one checkpoint refuses the next: the last good one stays the newest.
        stop_learner()
        if is_storage_error(error):
            save_note = f"; the last good checkpoint in {run_dir / 'checkpoints'} is kept"
        else:
            save_note = common.try_to_save(save)
        logger.close()
        vec_env.close()
        raise common.TrainingStopped(f"training stopped: {error}{save_note}") from error
    finally:
        stop_learner()
    vec_env.close()
    logger.progress(
        global_step, episodes, (global_step - run_start_step) / max(time.time() - run_start, 1e-9)
    )
    if config.keep_best and best:
        # DQN's greedy policy can oscillate late in training: the final weights compete with the best
        # periodic eval's, and the run ends with the winner (the final eval below uses new episodes).
        if last_eval_step != global_step:
            best = periodic_eval(q_network, config, device, global_step, best, logger)
        if best["step"] != global_step:
            q_network.load_state_dict(best["model"])
            target_network.load_state_dict(best["model"])
    save()

    eval_summary = run_eval(q_network, config, device, seed=config.seed + 10_000)
    logger.scalars(common.eval_scalars(eval_summary), global_step)
    logger.close()
    sps = (global_step - run_start_step) / max(time.time() - run_start, 1e-9)
    summary = common.run_summary(
        run_dir, ALGO, config.env, global_step, sps, episodes.count, skipped_updates, eval_summary
    )
    if best:
        summary["best_eval_step"] = int(best["step"])
        summary["best_eval_return"] = float(best["return"])
    common.finish_run(run_dir, summary, history)
    return summary


def periodic_eval(
    q_network: QNetwork,
    config: DQNConfig,
    device: torch.device,
    global_step: int,
    best: dict[str, Any],
    logger: common.RunLogger,
) -> dict[str, Any]:
    """Greedy eval during training, logged under ``eval/``; returns the (possibly new) best record."""
    eval_summary = run_eval(q_network, config, device, seed=config.seed + 10_000 + global_step)
    q_network.train()
    logger.scalars(common.eval_scalars(eval_summary), global_step)
    # >= prefers the later of equally good policies: they have trained on more data.
    if config.keep_best and eval_summary["return_mean"] >= best.get("return", -math.inf):
        weights = {key: value.detach().clone() for key, value in q_network.state_dict().items()}
        best = {"return": eval_summary["return_mean"], "step": global_step, "model": weights}
        logger.scalars({"eval/best_return": best["return"]}, global_step)
    return best


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


def run_eval(q_network: QNetwork, config: DQNConfig, device: torch.device, seed: int) -> dict[str, Any]:
    policy = DQNPolicy(q_network, device)
    return common.evaluate(
        policy,
        lambda n: envs.make_vec(config.env, n, seed=seed, **common.eval_env_overrides(config)),
        config.eval_episodes,
        seed,
    )
