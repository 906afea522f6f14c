"""The run engine under PPO and DQN: everything a training run does that is not the algorithm.

An algorithm's ``train`` is a short loop in the shape of Stable-Baselines3's ``learn``::

    run = TrainingRun(ALGO, config, run_dir, resume, progress)   # device, seeds, resume state
    trainer = PPOTrainer(config, run)                             # envs, networks, optimizer
    with run.guard(trainer):                                      # Ctrl-C, SIGTERM, NaNs, dead workers
        while ...:
            collect ...; update ...                               # the algorithm's own math
            run.log(...); run.evaluate_if_due(...); run.checkpoint_if_due(...)
        trainer.save()
    return run.finish(trainer.policy())                           # final eval, metrics.json, plot

The engine owns the run directory and the checkpoints, the TensorBoard log and the progress bar,
the episode statistics, periodic and final evaluation, and one shutdown behaviour for every
algorithm (:meth:`TrainingRun.guard`). Exit statuses follow one rule (ARCHITECTURE.md): what the
user must fix (bad input, a full or read-only disk) exits 2, a run that failed on its own (NaNs
that do not heal, env workers that keep crashing) exits 1, an interrupted run exits 130; every
one of them keeps the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, Protocol

from tqdm.auto import tqdm

import envs
from agents.episodes import (
    EpisodeTracker,
    Policy,
    adaptive_stage_weights,
    advance_route_frontiers,
    eval_scalars,
    evaluate_preset,
    finished_episodes,
    first_route_frontiers,
    fixed_route_frontiers,
    preset_stages,
    retry_scalars,
    route_start_scalars,
    route_windows,
    stage_scalars,
)
from core.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from core.compute import resolve_device, seed_everything, set_learner_threads
from core.config import option
from core.errors import TrainingStopped
from core.files import atomic_write_json, is_storage_error, jsonable
from core.plots import Panel, plot_history
from core.runs import CHECKPOINTS, tensorboard_writer
from envs.mario import ACTION_SETS, load_routes, stage_of

# ---------------------------------------------------------------------------------------------
# Checkpoints of a training run
# ---------------------------------------------------------------------------------------------


def save_training_checkpoint(
    run_dir: Path, global_step: int, state: dict[str, Any], meta: dict[str, Any], keep: int
) -> Path:
    """Saves ``checkpoints/step_<global_step>`` atomically and keeps only the newest ``keep``."""
    # A run has one writer: temp files here, and weights without their sidecar (a SIGKILL between
    # the two renames), were left by a process killed mid-write.
    for stale in (run_dir / CHECKPOINTS).glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    for weights in (run_dir / CHECKPOINTS).glob("step_*.safetensors"):
        if not weights.with_suffix(".json").exists():
            weights.unlink(missing_ok=True)
    sidecar = save_checkpoint(run_dir / CHECKPOINTS / f"step_{global_step:012d}", state, meta)
    prune_checkpoints(run_dir / CHECKPOINTS, keep)
    return sidecar


class StartWeights(NamedTuple):
    """Which checkpoint a run's starting weights came from: a path such as ``runs/X`` names only the
    newest checkpoint there at the time, and the hash tells it apart from a later one."""

    option: str  # init_weights, init_encoder or init_student
    path: str  # as given
    checkpoint: str  # the checkpoint's sidecar that was read
    step: int | None  # its training step, when it records one
    weights_sha256: str  # of its .safetensors file (its sidecar's own record)


def load_training_checkpoint(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(state, meta)`` of the newest good checkpoint of a run, or None when it has none yet."""
    sidecar = latest_checkpoint(run_dir / CHECKPOINTS)
    return None if sidecar is None else load_checkpoint(sidecar)


#: What a shipped (slim) checkpoint keeps: weights and the counters behind its curves.
SLIM_KEYS = (
    "model", "global_step", "update", "episodes", "recent_episodes", "recent_by_stage", "history",
    "route_start_episodes", "recent_route_starts", "route_frontiers",  # a route-start curriculum goes on
    "retry_episodes", "recent_retries",
    "seconds", "evals", "config_changes", "start_weights",
)  # fmt: skip


def export_slim_checkpoint(run_dir: Path, out_dir: Path) -> Path:
    """Copies a run's newest checkpoint without optimizer state and RNG (a few MB, for shipping).

    ``out_dir`` becomes a run directory of its own: ``lab eval|watch`` load it, and
    ``lab train --resume`` continues from its weights with a fresh optimizer.
    """
    loaded = load_training_checkpoint(run_dir)
    if loaded is None:
        raise CheckpointError(f"{run_dir} holds no loadable checkpoint")
    state, meta = loaded
    slim = {key: state[key] for key in SLIM_KEYS if key in state}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_bytes((run_dir / "config.json").read_bytes())
    for old in (out_dir / CHECKPOINTS).glob("*") if (out_dir / CHECKPOINTS).is_dir() else []:
        old.unlink()
    return save_training_checkpoint(out_dir, int(state["global_step"]), slim, meta, keep=1)


# ---------------------------------------------------------------------------------------------
# Environments of a training run
# ---------------------------------------------------------------------------------------------


@dataclass
class AgentConfig:
    """The config fields that every agent shares: what to train on, the run's envs and their
    back-end, evaluation and checkpoints, and where the weights start from. ``PPOConfig`` and
    ``DQNConfig`` extend it with their algorithm's fields (those whose defaults differ, such as
    ``total_steps`` or ``learning_rate``, are declared by each). Every field can be set with
    ``lab train ... --set key=value``."""

    env: str = option("cartpole", "preset name or Gymnasium id")
    net: str = option("auto", "encoder from nets/ (auto: by observation type)")
    seed: int = option(1, "seed of torch, numpy and the envs", min=0)
    device: str = option("auto", "auto, cpu or cuda")
    threads: int = option(
        1,
        "CPU threads of the learner (0: one per core); PPO's inference beside env workers uses one",
        min=0,
        max=1024,
    )
    total_steps: int = option(200_000, "agent steps over the whole run", min=1)
    num_envs: int = option(8, "parallel envs", min=1, max=1024)
    hidden: tuple[int, ...] = option((64, 64), "MLP widths for vector observations")
    learning_rate: float = option(2.5e-4, "Adam learning rate", min=0.0)
    gamma: float = option(0.99, "discount", min=0.0, max=1.0)
    max_grad_norm: float = option(0.5, "gradient clipping norm (0: none)", min=0.0)
    env_backend: Literal["sync", "async", "ray"] = option(
        "sync", "vector env back-end: sync (in process), async (worker processes), ray (Ray actors)"
    )
    ray_address: str | None = option(
        None, "env_backend=ray: None starts a local Ray; auto or HOST:PORT joins a running cluster"
    )
    sticky: float = option(0.0, "Mario: repeat the previous action on each frame with this probability", min=0.0, max=0.99)  # fmt: skip
    noop_max: int = option(0, "Mario: start each training episode with 0..noop_max random no-ops (the eval protocol uses 30)", min=0, max=1000)  # fmt: skip
    flag_bonus: float = option(
        0.0,
        "Mario: extra training reward, in the game's units, on the step a flag is reached (the game's own "
        "50 is clipped to 15 a frame); returns in the logs and evals stay the game's",
        min=0.0,
    )
    stall_patience: int = option(
        0,
        "Mario: cut a training episode after this many agent steps without a new furthest x (a truncation, "
        "as the evaluation's 200): no samples spent standing in a dead end until the clock runs out; 0: off",
        min=0,
        max=100_000,
    )
    # The action sets are prefixes of one another (right_only, the first 5 of simple's 7, the first 7 of
    # complex's 12: the same buttons at the same indices), so an agent trained on a smaller set plays
    # in the preset's own env unchanged, and lab eval, watch, explain and compress need not know.
    actions: Literal["right_only", "simple", "complex"] | None = option(
        None,
        "Mario: train on this action set instead of the preset's (simple, 7 actions); right_only (5: no "
        "left, no standing jump) is easier to explore, and its agent plays in the preset's env as it is",
    )
    route_starts: str | None = option(
        None,
        'Mario: a route file {"actions": "simple", "routes": {"1-3": [action, ...]}}, or several separated by '
        "commas: start route_start_prob of the training episodes part-way along a route (a start-state "
        "curriculum; evals start as usual)",
    )
    route_start_prob: float = option(0.5, "Mario: the share of training episodes that start along a route", min=0.0, max=1.0)  # fmt: skip
    route_start_schedule: Literal["uniform", "backward", "window"] = option(
        "uniform",
        "route starts: anywhere along the route (uniform), from a window that begins near the flag "
        "and moves route_start_step actions back whenever a fifth of its starts clear (backward), or "
        "from a window that stays at route_start_from (window: practice one stretch)",
    )
    # A wide window mixes starts before and after a hard spot (1-3's moving lift): those after it
    # clear, and the window moves on before the spot itself is learnt.
    route_start_step: int = option(10, "route_start_schedule=backward or window: the window's width (and backward's step), in actions", min=1)  # fmt: skip
    # A dead end early in a stage (1-3's turn back at route action 87) is far from the flag: a window
    # that walks back from the flag takes a million steps to get there, so it can begin nearer.
    route_start_from: int = option(
        0,
        "route_start_schedule=backward: the action where the window begins (or the window of a resumed "
        "run, if that is earlier; 0: just before the flag); window: where the fixed window begins",
        min=0,
    )
    # Route starts hand over in the route's states; the agent dies in its own (another lift phase,
    # another speed), which a retry starts shortly before.
    retry_prob: float = option(
        0.0,
        "Mario: the share of training episodes that restart shortly before where a recent episode of the "
        "same env died (from an emulator snapshot; evals start as usual); 0: off",
        min=0.0,
        max=1.0,
    )
    retry_back: int = option(40, "retry_prob: the most agent steps before the death that a retry starts", min=4)  # fmt: skip
    stage_sampling: Literal["uniform", "adaptive"] = option(
        "uniform",
        "multi-stage presets: draw stages uniformly, or the less often cleared ones more often (adaptive)",
    )
    anneal_lr: bool = option(True, "linearly anneal the learning rate to 0")
    compile: bool = option(False, "torch.compile the network")
    bf16: bool = option(False, "bf16 autocast (CUDA, or a CPU with native bf16)")
    until: str | None = option(
        None,
        "stop once a periodic greedy eval reaches METRIC=VALUE, e.g. clear_rate=0.9, and a second eval of as "
        "many episodes confirms it (the mean of both)",
    )
    eval_every: int = option(0, "agent steps between greedy evals (0: at end)", min=0)
    eval_episodes: int = option(10, "episodes per greedy eval", min=1)
    checkpoint_every: int = option(50_000, "agent steps between checkpoints", min=1)
    keep_checkpoints: int = option(2, "checkpoints kept on disk", min=1)
    init_encoder: str | None = option(
        None,
        "start the encoder from the encoder.* tensors of this run or checkpoint (e.g. a `lab fit ssl` run)",
    )
    freeze_encoder: bool = option(False, "keep the encoder's weights fixed; the heads (and memory) learn")
    init_weights: str | None = option(
        None,
        "start the whole network from this run or checkpoint (fine-tuning: the same network and env shapes)",
    )
    keep_zeros: bool = option(
        False, "weights that start at exactly zero stay zero (fine-tuning a pruned agent)"
    )

    #: Fields that only a Mario preset takes (set on another env, ``check`` refuses them in one line);
    #: an algorithm's config adds its own.
    MARIO_ONLY: ClassVar[tuple[str, ...]] = (
        "sticky", "noop_max", "route_starts", "actions", "flag_bonus", "stall_patience", "retry_prob",
    )  # fmt: skip

    def check(self) -> None:
        """Checks the shared fields against each other and the env (the algorithms' ``check`` calls
        it first, before anything is written): raises ValueError for a bad ``until`` or one without
        periodic evals (``eval_every``), when a field of :attr:`MARIO_ONLY` is set for an env that is
        not Mario, for an action set larger than the preset's, for a route file that is unreadable or
        names a stage the preset never plays, for a backward route-start schedule without routes, when
        ``init_weights`` and ``init_encoder`` are both given, or when ``stage_sampling=adaptive`` has no
        stages to sample."""
        if parse_until(self.until) and not self.eval_every:
            raise ValueError("until needs periodic evaluations: set eval_every (agent steps between them)")
        mario_only = [f"{name}={getattr(self, name)}" for name in self.MARIO_ONLY if getattr(self, name)]
        preset = envs.resolve(self.env)
        if mario_only and preset.kind != "mario":
            raise ValueError(
                f"{' and '.join(mario_only)}: Mario presets only; this run trains {self.env!r} (leave them unset)"
            )
        if self.actions and len(ACTION_SETS[self.actions]) > (fits := len(ACTION_SETS[preset.action_set])):
            smaller = [name for name, buttons in ACTION_SETS.items() if len(buttons) <= fits]
            raise ValueError(
                f"actions={self.actions} has more actions than {self.env!r}'s own set ({preset.action_set}), so "
                f"its agent could not play the preset's env; choose from: {', '.join(smaller)}"
            )
        if self.route_starts:
            config_routes(self)
        if self.route_start_schedule != "uniform" and not self.route_starts:
            raise ValueError(
                f"route_start_schedule={self.route_start_schedule} needs route_starts=FILE (a route file)"
            )
        if self.route_start_from and self.route_start_schedule == "uniform":
            raise ValueError(
                f"route_start_from={self.route_start_from} places the backward or fixed schedule's window; "
                "set route_start_schedule=backward or window too"
            )
        if self.init_weights and self.init_encoder:
            raise ValueError(
                "init_weights already holds the encoder: give init_weights or init_encoder, not both"
            )
        if self.stage_sampling != "uniform" and not preset_stages(self.env):
            raise ValueError(
                f"stage_sampling={self.stage_sampling} needs a multi-stage preset (e.g. mario-world-1); "
                f"this run trains {self.env!r}: use stage_sampling=uniform"
            )


def train_env_overrides(config: AgentConfig) -> dict[str, Any]:
    """``envs.make_vec`` options that a training config sets: the action set, sticky actions, random
    no-op starts, the flag bonus, the stall cut-off and route starts (Mario presets only)."""
    overrides: dict[str, Any] = {"actions": config.actions} if config.actions else {}
    if config.sticky:
        overrides["sticky_prob"] = config.sticky
    if config.noop_max:
        overrides["noop_max"] = config.noop_max
    if config.flag_bonus:
        overrides["flag_bonus"] = config.flag_bonus
    if config.stall_patience:
        overrides["stall_patience"] = config.stall_patience
    if config.route_starts:
        overrides["route_starts"] = config_routes(config)
        overrides["route_start_prob"] = config.route_start_prob
    if config.retry_prob:
        overrides["retry_prob"] = config.retry_prob
        overrides["retry_back"] = config.retry_back
    return overrides


def env_action_set(config: AgentConfig) -> str | None:
    """The Mario action set a run plays with (its ``actions``, else its preset's); None off Mario."""
    preset = envs.resolve(config.env)
    return (config.actions or preset.action_set) if preset.kind == "mario" else None


def config_routes(config: AgentConfig, option: str = "route_starts") -> dict[str, list[int]]:
    """The routes of the route files in the config field ``option``, checked against the training's
    action set and the stages its preset plays (ValueError naming what is wrong)."""
    paths = getattr(config, option)
    action_set = env_action_set(config)
    assert paths and action_set  # route options are Mario-only: check() refuses them elsewhere first
    routes = load_routes(paths, action_set, option)
    played = played_stages(config.env)
    if unplayed := sorted(set(routes) - set(played)):
        raise ValueError(
            f"{option}={paths!r} has routes for {', '.join(unplayed)}, which "
            f"{config.env!r} never plays ({', '.join(played)})"
        )
    return routes


def played_stages(env: str) -> tuple[str, ...]:
    """The Mario stages a preset plays (``("1-1", ..., "1-4")``, ``("1-3",)``); () for other envs."""
    return preset_stages(env) or tuple(filter(None, [stage_of(envs.resolve(env).env_id)]))


def eval_env_overrides(config: AgentConfig) -> dict[str, Any]:
    """Options of the periodic evaluation's envs: the training's sticky actions and the preset's eval
    protocol, whose no-op starts win over the training's (every run is measured alike); every
    episode starts at the stage's start."""
    overrides = {"sticky_prob": config.sticky} if config.sticky else {}
    return {**overrides, **envs.eval_overrides(config.env)}


def worker_counts(vec_envs: list[Any]) -> dict[str, float]:
    """Env-worker failures of subprocess vector envs, summed: restarts, dropped episodes, by kind."""
    with_workers = [vec_env for vec_env in vec_envs if hasattr(vec_env, "failure_counts")]
    if not with_workers:
        return {}
    counts = {
        "worker_restarts": float(sum(vec_env.restarts for vec_env in with_workers)),
        "dropped_episodes": float(sum(vec_env.dropped_episodes for vec_env in with_workers)),
    }
    for kind in with_workers[0].failure_counts:
        counts[f"worker_failures_{kind}"] = float(
            sum(vec_env.failure_counts[kind] for vec_env in with_workers)
        )
    return counts


# ---------------------------------------------------------------------------------------------
# Logging: TensorBoard + a progress bar (SPS, recent return, ETA)
# ---------------------------------------------------------------------------------------------


class RunLogger:
    """TensorBoard writer plus a tqdm bar over agent steps; resumes the event stream on resume."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, progress: bool, config: Any) -> None:
        self.writer = tensorboard_writer(run_dir, purge_step=start_step if start_step > 0 else None)
        if start_step == 0:
            rows = "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(config).items())
            self.writer.add_text("config", f"|param|value|\n|-|-|\n{rows}")
        self.bar = tqdm(
            total=total_steps, initial=start_step, disable=not progress, unit="step", dynamic_ncols=True,
            smoothing=0.05,
        )  # fmt: skip
        self.last_step = start_step

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Writes the finite values of ``values`` at ``step`` (NaN means "nothing yet")."""
        for name, value in values.items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                self.writer.add_scalar(name, value, step)

    def progress(self, step: int, episodes: EpisodeTracker, sps: float) -> None:
        """Moves the bar to ``step`` with the speed and the recent episodes' return and distance."""
        self.bar.update(step - self.last_step)
        self.last_step = step
        postfix = {"sps": f"{sps:.0f}", "eps": episodes.count}
        if episodes.recent:
            postfix["return"] = f"{episodes.mean('return'):.1f}"
            if not math.isnan(episodes.mean("x_pos_max")):
                postfix["x"] = f"{episodes.mean('x_pos_max'):.0f}"
        self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        self.bar.close()
        self.writer.flush()
        self.writer.close()


# ---------------------------------------------------------------------------------------------
# Learning beside collection (overlap)
# ---------------------------------------------------------------------------------------------


class AsyncLearner[T]:
    """Runs an algorithm's updates in one background thread while the next data is collected, or
    in place when ``enabled`` is False; either way each update's result is booked once, in order.

    With overlap the update on batch k runs while batch k+1 is collected with weights from before
    that update (a policy lag of one update, as in APPO); on a CPU the learner then uses the core
    that the env workers leave idle during a serial update.
    """

    def __init__(self, enabled: bool, name: str) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name) if enabled else None
        self.pending: tuple[Future[T], Any] | None = None  # the update in flight, with its tag

    @property
    def enabled(self) -> bool:
        return self.executor is not None

    def submit(
        self,
        tag: Any,
        update: Callable[..., T],
        *args: Any,
        book: Callable[[Any, T], None],
        refresh: Callable[[], None] | None = None,
    ) -> None:
        """Runs ``update(*args)`` and books its result with ``book(tag, result)``.

        Serial: now. Overlap: first books the update in flight (it ran while this batch was
        collected), calls ``refresh`` (the collector's copy of the weights takes them), then starts
        this one in the thread; it is booked by the next ``submit`` or :meth:`finish`.
        """
        if self.executor is None:
            book(tag, update(*args))
            return
        self.finish(book)
        if refresh is not None:
            refresh()
        self.pending = (self.executor.submit(update, *args), tag)

    def finish(self, book: Callable[[Any, T], None]) -> None:
        """Waits for the update in flight and books it; raises its error. It is cleared only once
        booked: a Ctrl-C during the wait leaves it to :meth:`settle`."""
        if self.pending is not None:
            future, tag = self.pending
            result = future.result()
            self.pending = None
            book(tag, result)

    def settle(self, book: Callable[[Any, T], None]) -> None:
        """On shutdown: waits for the update in flight, so that no weights change while saving, and
        books it unless it failed (the error being handled is the one to report)."""
        if self.pending is not None:
            future, tag = self.pending
            self.pending = None
            if future.exception() is None:
                with contextlib.suppress(Exception):
                    book(tag, future.result())

    def shutdown(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


class Trainer(Protocol):
    """What :meth:`TrainingRun.guard` needs of an algorithm's trainer."""

    def settle(self) -> None:
        """Waits for learning in flight and books its result (no eval, no checkpoint)."""

    def save(self) -> None:
        """Writes a checkpoint of the state after the last completed update."""

    def close(self) -> None:
        """Stops background work (the learner thread); the run closes the envs and the log."""


#: The eval summary keys ``until`` may name, and a listener's signature (step, eval summary, final?).
UNTIL_METRICS = ("return_mean", "clear_rate", "x_pos_mean", "length_mean")
#: Added to a periodic eval's seed for the confirming eval of ``until`` (far from every eval's seed).
UNTIL_CONFIRM_SEED_OFFSET = 500_000_003
EvalListener = Callable[[int, dict[str, Any], bool], None]


def parse_until(text: str | None) -> tuple[str, float] | None:
    """``"clear_rate=0.9"`` -> ``("clear_rate", 0.9)``; ValueError naming the valid metrics otherwise."""
    if not text:
        return None
    metric, _, value = text.partition("=")
    if metric not in UNTIL_METRICS or not value:
        raise ValueError(f"until={text!r} must be METRIC=VALUE with METRIC one of {', '.join(UNTIL_METRICS)}")
    try:
        return metric, float(value)
    except ValueError:
        raise ValueError(f"until={text!r}: {value!r} is not a number") from None


class TrainingRun:
    """One training run's life around an algorithm: set-up, resume, logs, evals, checkpoints, stop.

    Args:
        algo: the algorithm's name (``"ppo"``), recorded in checkpoints.
        config: the algorithm's config dataclass; the engine reads ``env``, ``seed``, ``device``,
            ``threads``, ``env_backend``, ``sticky``, ``eval_every``, ``eval_episodes``,
            ``checkpoint_every`` and ``keep_checkpoints``.
        run_dir: the run directory (its ``config.json`` is written by the caller).
        resume: continue from the newest good checkpoint in ``run_dir``.
        progress: show a progress bar.
        on_eval: called as ``on_eval(step, summary, final)`` after every greedy evaluation (a sweep
            reports them to Ray Tune).
    """

    def __init__(
        self,
        algo: str,
        config: Any,
        run_dir: Path,
        resume: bool,
        progress: bool,
        on_eval: EvalListener | None = None,
    ) -> None:
        self.algo, self.config, self.run_dir, self.show_progress = algo, config, Path(run_dir), progress
        self.device = resolve_device(config.device)
        self.learn_threads = set_learner_threads(config.threads)
        self.np_rng = seed_everything(config.seed)
        config.check()
        loaded = load_training_checkpoint(self.run_dir) if resume else None
        #: The resumed checkpoint's state ({} for a new run); the trainer reads its own keys from it.
        self.saved: dict[str, Any] = loaded[0] if loaded is not None else {}
        self.resumed = loaded is not None
        self.global_step = int(self.saved.get("global_step", 0))
        self.episodes = EpisodeTracker()
        self.episodes.restore(self.saved)
        self.history: list[dict[str, Any]] = list(self.saved.get("history", []))
        #: One record per greedy evaluation (periodic and final): step, seconds, final and the
        #: ``eval/`` scalars without their prefix (return_mean, clear_rate, stages/1-1/clear_rate...).
        self.evals: list[dict[str, Any]] = list(self.saved.get("evals", []))
        self.skipped_updates = int(self.saved.get("skipped_updates", 0))
        #: ``--set`` changes made on resume, ``{"step", "changes": {key: [was, now]}}`` each, so a run's
        #: history says from which step it trained with what (the config.json holds only the last).
        self.config_changes: list[dict[str, Any]] = list(self.saved.get("config_changes", []))
        if loaded is not None:
            defaults = jsonable(dataclasses.asdict(type(config)()))
            changes = config_changes(
                loaded[1].get("config", {}), jsonable(dataclasses.asdict(config)), defaults
            )
            if changes:
                self.config_changes.append({"step": self.global_step, "changes": changes})
        #: where init_weights / init_encoder came from (StartWeights records), kept across resumes.
        self.start_weights: list[dict[str, Any]] = list(self.saved.get("start_weights", []))
        # route_start_schedule=backward or window: {stage: the first action of its route-start window}.
        self.route_lengths: dict[str, int] = {}
        self.route_frontiers: dict[str, int] = {}
        if config.route_start_schedule != "uniform":
            self.route_lengths = {label: len(route) for label, route in config_routes(config).items()}
        if config.route_start_schedule == "window":
            self.route_frontiers = fixed_route_frontiers(self.route_lengths, config.route_start_from)
        if config.route_start_schedule == "backward":
            first = first_route_frontiers(
                self.route_lengths, config.route_start_step, config.route_start_from
            )
            saved = self.saved.get("route_frontiers", {})
            self.route_frontiers = {label: min(int(saved.get(label, k)), k) for label, k in first.items()}
        self.bad_in_a_row = 0  # updates (PPO) or gradient steps (DQN) in a row with non-finite numbers
        # Worker failures of earlier processes of this run: the counts carry on across resumes.
        self.workers_before: dict[str, float] = dict(self.saved.get("worker_counts", {}))
        self.vec_envs: list[Any] = []
        self.meta: dict[str, Any] = {}
        self.logger: RunLogger | None = None
        self.last_eval_step = self.last_checkpoint_step = self.global_step
        self.start_time, self.start_step = time.time(), self.global_step
        # Wall-clock seconds of training before this process (resumes add up); older checkpoints
        # without the count fall back to their last history record.
        last_seconds = self.history[-1].get("seconds", 0.0) if self.history else 0.0
        self.seconds_before = float(self.saved.get("seconds", last_seconds))
        self.on_eval = on_eval
        self.until = parse_until(config.until)
        #: Set when a periodic eval reached ``until``: (agent step, seconds of training across resumes); the loop ends.
        self.reached: tuple[int, float] | None = None

    # ---- set-up ---------------------------------------------------------------------------

    def make_vec_env(self, num_envs: int, seed: int) -> Any:
        """The training envs (closed by the run): the config's env, back-end and sticky actions."""
        ray = {"ray_address": self.config.ray_address} if self.config.env_backend == "ray" else {}
        windows = {"route_start_windows": self.route_windows()} if self.route_frontiers else {}
        vec_env = envs.make_vec(
            self.config.env, num_envs, seed=seed, backend=self.config.env_backend, **ray,
            **train_env_overrides(self.config), **windows,
        )  # fmt: skip
        self.vec_envs.append(vec_env)
        return vec_env

    def record_start_weights(self, started_from: Sequence[StartWeights]) -> None:
        """Keeps which checkpoints the starting weights were read from (``setup_network``'s records;
        none on a resume, which keeps the first process's)."""
        self.start_weights.extend(record._asdict() for record in started_from)

    def start(self, obs_shape: tuple[int, ...], num_actions: int, total_steps: int) -> None:
        """Called once the networks and optimizer exist (and hold the resumed weights): restores the
        RNG states of the checkpoint, then opens the log. The checkpoint meta records the shapes."""
        self.meta = {
            "algo": self.algo,
            "config": jsonable(dataclasses.asdict(self.config)),
            "obs_shape": list(obs_shape),
            "num_actions": num_actions,
        }
        if "rng" in self.saved:  # a slim (weights-only) checkpoint resumes with fresh RNGs
            set_rng_state(self.saved["rng"], self.np_rng)
        self.logger = RunLogger(self.run_dir, total_steps, self.global_step, self.show_progress, self.config)
        self.start_time, self.start_step = time.time(), self.global_step

    # ---- during training ------------------------------------------------------------------

    @property
    def seconds(self) -> float:
        """Wall-clock seconds of training since the run began, across resumes (evaluations included)."""
        return self.seconds_before + time.time() - self.start_time

    @property
    def sps(self) -> float:
        """Agent steps per second of training in this process (evaluations included, as they run)."""
        return (self.global_step - self.start_step) / max(time.time() - self.start_time, 1e-9)

    def add_episodes(self, infos: dict[str, Any]) -> None:
        """Books the episodes that ended at a vector step."""
        for _, stats in finished_episodes(infos):
            self.episodes.add(stats)

    def log(self, step: int, record: dict[str, float], scalars: dict[str, float]) -> None:
        """Appends a history record and writes TensorBoard scalars at ``step``.

        Args:
            step: the agent step the record describes.
            record: the algorithm's numbers for ``metrics.json`` (losses...).
            scalars: the algorithm's TensorBoard scalars (``losses/...``, ``charts/...``).
        """
        sps = self.sps
        episodes = self.episodes
        record = {
            "step": step, "sps": sps, "seconds": self.seconds, **record,
            "return_mean": episodes.mean("return"), "x_pos_max_mean": episodes.mean("x_pos_max"),
            "clear_rate": episodes.mean("flag_get"),
        }  # fmt: skip
        if episodes.stage_means():
            record["stages"] = episodes.stage_means()
        shares = self.rebalance_stages(record.get("stages", {}))
        route_scalars = route_start_scalars(episodes) if self.config.route_starts else {}
        if route_scalars:
            record["route_start_clear_rate"] = route_scalars["route_starts/clear_rate"]
        if self.config.retry_prob:  # TensorBoard only
            route_scalars.update(retry_scalars(episodes))
        self.advance_route_starts()
        if self.route_frontiers:
            record["route_frontiers"] = dict(self.route_frontiers)
        self.history.append(record)
        workers = self.worker_counts()
        assert self.logger is not None
        self.logger.scalars(
            {
                **scalars,
                "charts/SPS": sps,
                "charts/episodic_return": record["return_mean"],
                "charts/episodic_length": episodes.mean("length"),
                "charts/x_pos_max": record["x_pos_max_mean"],
                "charts/clear_rate": record["clear_rate"],
                "charts/episodes": episodes.count,
                **route_scalars,
                **{f"route_starts/frontier/{label}": k for label, k in self.route_frontiers.items()},
                "charts/skipped_updates": self.skipped_updates,
                **{f"charts/{name}": count for name, count in workers.items()},
                **stage_scalars(episodes),
                **{f"stages/{label}/share": share for label, share in shares.items()},
            },
            step,
        )
        self.logger.progress(self.global_step, episodes, sps)

    def rebalance_stages(self, stage_means: dict[str, dict[str, float]]) -> dict[str, float]:
        """``stage_sampling=adaptive``: the training envs draw their next stages by
        :func:`adaptive_stage_weights` of the recent episodes; returns each stage's share ({} when
        sampling stays uniform, or before every stage has been played). Called between updates, when
        no env is stepping."""
        if self.config.stage_sampling != "adaptive" or len(stage_means) < len(preset_stages(self.config.env)):
            return {}
        weights = adaptive_stage_weights(stage_means)
        for vec_env in self.vec_envs:
            vec_env.call("set_stage_weights", weights)
        total = sum(weights.values())
        return {label: weight / total for label, weight in weights.items()}

    def route_windows(self) -> dict[str, tuple[int, int]]:
        """The backward schedule's route-start windows: ``{stage: (low, high)}`` actions replayed."""
        return route_windows(self.route_frontiers, self.route_lengths, self.config.route_start_step)

    def advance_route_starts(self) -> None:
        """``route_start_schedule=backward``: moves each stage's window back once enough of its
        starts cleared (:func:`advance_route_frontiers`) and hands the new windows to the training
        envs. Called between updates, when no env is stepping."""
        if self.config.route_start_schedule != "backward":
            return
        moved = advance_route_frontiers(self.route_frontiers, self.episodes, self.config.route_start_step)
        if moved != self.route_frontiers:
            self.route_frontiers = moved
            for vec_env in self.vec_envs:
                vec_env.call("set_route_windows", self.route_windows())

    def worker_counts(self) -> dict[str, float]:
        """Env-worker failures over the whole run (earlier processes of a resumed run included)."""
        now = worker_counts(self.vec_envs)
        return {name: self.workers_before.get(name, 0.0) + now.get(name, 0.0) for name in now}

    def check_health(self, limit: int, unit: str) -> None:
        """Stops the run once ``bad_in_a_row`` reaches ``limit``: non-finite losses that persist
        will not heal, and the last good checkpoint is worth more than more steps."""
        if self.bad_in_a_row >= limit:
            raise TrainingStopped(
                f"loss or gradients were not finite for {self.bad_in_a_row} {unit} in a row; the last "
                f"good checkpoint in {self.run_dir / CHECKPOINTS} is kept (try a lower learning_rate)"
            )

    def eval_due(self, step: int) -> bool:
        """True at the first step past each multiple of ``eval_every``: a resumed run evaluates at
        the same steps, with the same eval seeds, as one that was never interrupted."""
        every = self.config.eval_every
        if every and step // every > self.last_eval_step // every:
            self.last_eval_step = step
            return True
        return False

    def checkpoint_due(self, step: int) -> bool:
        """True every ``checkpoint_every`` steps, but only after a healthy stretch: a NaN streak
        keeps the last good checkpoint."""
        if step - self.last_checkpoint_step >= self.config.checkpoint_every and self.bad_in_a_row == 0:
            self.last_checkpoint_step = step
            return True
        return False

    def evaluate(self, policy: Policy, seed: int, step: int) -> dict[str, Any]:
        """Greedy episodes with the eval protocol of the preset (and the training's sticky actions),
        logged under ``eval/`` at ``step``."""
        config = self.config
        # A multi-stage preset plays its stages in turn, eval_episodes spread over them (rounded up).
        stages = max(1, len(preset_stages(config.env)))
        episodes = -(-config.eval_episodes // stages)
        overrides = eval_env_overrides(config)
        summary = evaluate_preset(policy, config.env, episodes, seed, overrides)
        assert self.logger is not None
        scalars = eval_scalars(summary)
        final = seed == config.seed + 10_000
        if self.until is not None and not final and self.reached is None:
            metric, target = self.until
            if summary.get(metric, -math.inf) >= target:
                # A target met on eval_episodes alone is often luck (an agent that clears 70% draws 10 of
                # 10 about once in 35 evals), so as many fresh episodes with the same weights follow, and the
                # stop is judged on the mean of both (equal episode counts: the pooled mean).
                again = evaluate_preset(
                    policy, config.env, episodes, seed + UNTIL_CONFIRM_SEED_OFFSET, overrides
                )
                confirmed = (summary[metric] + again.get(metric, -math.inf)) / 2
                scalars[f"eval/until_{metric}"] = confirmed
                if confirmed >= target:
                    self.reached = (step, self.seconds)
        self.logger.scalars(scalars, step)
        self.evals.append({"step": step, "seconds": self.seconds, "final": final,
                           **{name.removeprefix("eval/"): value for name, value in scalars.items()}})  # fmt: skip
        if self.on_eval is not None:
            self.on_eval(step, summary, final)
        return summary

    @property
    def done(self) -> bool:
        """True once the ``until`` target was reached: the algorithm's loop ends there."""
        return self.reached is not None

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Checkpoints the algorithm's ``state`` plus the engine's (RNGs, episodes, history, counts)."""
        full = {
            **state,
            "rng": rng_state(self.np_rng),
            **self.episodes.state(),
            "history": self.history,
            "evals": self.evals,
            "skipped_updates": self.skipped_updates,
            "worker_counts": self.worker_counts(),
            "route_frontiers": self.route_frontiers,
            "seconds": self.seconds,
            "config_changes": self.config_changes,
            "start_weights": self.start_weights,
        }
        save_training_checkpoint(self.run_dir, step, full, self.meta, self.config.keep_checkpoints)

    # ---- stopping -------------------------------------------------------------------------

    @contextlib.contextmanager
    def guard(self, trainer: Trainer) -> Iterator[None]:
        """The one shutdown behaviour of every algorithm.

        * Ctrl-C or SIGTERM (raised as KeyboardInterrupt by ``lab train``): wait for the update in
          flight, save a checkpoint, close, re-raise.
        * :class:`TrainingStopped` (NaNs that persist): close, keeping the last good checkpoint.
        * Any other error (env workers that keep failing, a full disk): save what was learnt unless
          the disk itself failed (a disk that refused one checkpoint refuses the next), close, and
          raise TrainingStopped with the cause chained.
        """
        try:
            yield
        except KeyboardInterrupt:
            try:
                trainer.settle()
                trainer.save()
            finally:
                self.close(trainer)
            raise
        except TrainingStopped:
            trainer.settle()
            self.close(trainer)
            raise
        except Exception as error:
            trainer.settle()
            if is_storage_error(error):
                note = f"; the last good checkpoint in {self.run_dir / CHECKPOINTS} is kept"
            else:
                note = try_to_save(trainer.save)
            self.close(trainer)
            raise TrainingStopped(f"training stopped: {error}{note}") from error
        finally:
            trainer.close()

    def close(self, trainer: Trainer | None = None) -> None:
        """Stops the trainer's background work, closes the envs and the log (idempotent)."""
        if trainer is not None:
            trainer.close()
        for vec_env in self.vec_envs:
            vec_env.close()
        self.vec_envs.clear()
        if self.logger is not None:
            self.logger.close()

    def finish(self, policy: Policy, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """After the last checkpoint: the final greedy eval, ``metrics.json`` and the learning curve.

        Returns:
            The ``lab train --json`` summary: run_dir, algo, env, steps, sps (training throughput,
            without the final eval), start_step (where this process began: 0, or the step resumed
            from), train_seconds (this process), run_seconds (since the run began, across resumes,
            without the final eval), eval_seconds, episodes, skipped_updates and the
            final eval (eval_return_mean..., for Mario eval_clear_rate, per stage when several).
        """
        train_seconds = time.time() - self.start_time
        run_seconds = self.seconds
        steps = self.global_step - self.start_step
        for vec_env in self.vec_envs:  # the training envs are done; the eval makes its own
            vec_env.close()
        self.vec_envs.clear()
        eval_start = time.time()
        final = self.evaluate(policy, seed=self.config.seed + 10_000, step=self.global_step)
        eval_seconds = time.time() - eval_start
        self.close()
        summary: dict[str, Any] = {
            "run_dir": str(self.run_dir), "algo": self.algo, "env": self.config.env, "steps": self.global_step,
            "start_step": self.start_step, "sps": round(steps / max(train_seconds, 1e-9), 1),
            "train_seconds": round(train_seconds, 1), "run_seconds": round(run_seconds, 1),
            "eval_seconds": round(eval_seconds, 1), "episodes": self.episodes.count,
            "skipped_updates": self.skipped_updates, "eval_episodes": final["episodes"],
            "eval_return_mean": final["return_mean"], "eval_return_std": final["return_std"],
        }  # fmt: skip
        if "clear_rate" in final:
            summary["eval_clear_rate"] = final["clear_rate"]
            summary["eval_x_pos_mean"] = final["x_pos_mean"]
        if "stages" in final:
            summary["eval_stages"] = final["stages"]
        if self.until is not None:
            metric, target = self.until
            step, seconds = self.reached if self.reached else (None, None)
            summary["until"] = {"metric": metric, "target": target, "reached_at_step": step,
                                "reached_after_seconds": None if seconds is None else round(seconds, 1)}  # fmt: skip
        summary.update(extra or {})
        metrics = {
            **summary,
            "history": self.history,
            "evals": self.evals,
            "config_changes": self.config_changes,
            "start_weights": self.start_weights,
        }
        atomic_write_json(self.run_dir / "metrics.json", jsonable(metrics))
        if self.history:
            plot_learning_curve(
                self.history,
                self.run_dir / "learning_curve.png",
                f"{self.algo} on {self.config.env}",
                self.evals,
            )
        return summary


def config_changes(
    was: dict[str, Any], now: dict[str, Any], defaults: dict[str, Any]
) -> dict[str, list[Any]]:
    """``{key: [was, now]}`` for every config field whose value differs; a field new since ``was``
    was written had its default until now (a resume that sets it is a change from the default)."""
    changes = {}
    for key, value in now.items():
        before = was.get(key, defaults.get(key, value))
        if before != value:
            changes[key] = [before, value]
    return changes


def try_to_save(save: Callable[[], None]) -> str:
    """Runs ``save``; returns a note on whether the checkpoint was written."""
    try:
        save()
    except OSError as error:
        return f" (and the checkpoint could not be written: {error.strerror or error})"
    return "; a checkpoint was saved"


# ---------------------------------------------------------------------------------------------
# Learning curves of agent runs
# ---------------------------------------------------------------------------------------------

# (clear rate of the last 100 training episodes, plot label, `lab export` summary key)
CLEAR_MILESTONES = (
    (1e-9, "first clear", "steps_to_first_clear"),
    (0.9, "90% clears", "steps_to_90_clears"),
)


def first_step_reaching(history: list[dict[str, Any]], key: str, threshold: float) -> int | None:
    """The agent step of the first history record whose ``key`` is at least ``threshold``."""
    for record in history:
        value = record.get(key)
        if value is not None and not math.isnan(value) and value >= threshold:
            return int(record["step"])
    return None


def spread_columns(
    history: list[dict[str, Any]], key: str, name: str, pick: Callable[[Any], float]
) -> tuple[list[str], list[dict[str, Any]]]:
    """The stages of the records' ``{stage: value}`` dicts under ``key``, and the records with a
    flat column ``name/<stage>`` of ``pick(value)`` each, for :func:`plot_history`."""
    labels = sorted({label for record in history for label in record.get(key, {})})
    rows = [
        {**record, **{f"{name}/{label}": pick(value) for label, value in record.get(key, {}).items()}}
        for record in history
    ]
    return labels, rows


def plot_learning_curve(
    history: list[dict[str, Any]], path: Path, title: str = "", evals: Sequence[dict[str, Any]] = ()
) -> Path:
    """Recent mean episode return over agent steps; Mario adds furthest x and the clear rate with
    the steps of the first clear and of 90% clears (and of the route starts' episodes, with
    ``route_starts``); multi-stage runs add the clear rate per stage, a backward route-start
    schedule where its window is. The greedy evaluations (``evals``) are dots on the return and
    clear-rate panels."""

    def eval_points(key: str) -> tuple[tuple[float, float], ...]:
        return tuple((record["step"], record[key]) for record in evals if key in record)

    # Mario's episodes report their furthest x (NaN elsewhere); a run without a clear is Mario too.
    has_mario = any(not math.isnan(record.get("x_pos_max_mean") or math.nan) for record in history)
    panels = [Panel(("return_mean",), "mean episode return (last 100)", points=eval_points("return_mean"))]
    if has_mario:
        markers = []
        for threshold, text, _key in CLEAR_MILESTONES:
            step = first_step_reaching(history, "clear_rate", threshold)
            if step is not None:
                markers.append((step, f"{text}: {step / 1e6:.2f}M"))
        routes = any("route_start_clear_rate" in record for record in history)
        panels += [
            Panel(("x_pos_max_mean",), "furthest x (last 100 episodes)"),
            Panel(
                ("clear_rate", "route_start_clear_rate") if routes else ("clear_rate",),
                "flag reached (last 100)",
                legend=("from the stage's start", "from route starts") if routes else (),
                ylim=(-0.02, 1.02),
                markers=tuple(markers),
                points=eval_points("clear_rate"),
            ),
        ]
    stages, history = spread_columns(history, "stages", "clear_rate", lambda means: means["clear_rate"])
    if stages:
        panels.append(
            Panel(tuple(f"clear_rate/{label}" for label in stages), "flag reached per stage (last 100)",
                  legend=tuple(stages), ylim=(-0.02, 1.02))
        )  # fmt: skip
    frontier_stages, history = spread_columns(history, "route_frontiers", "frontier", lambda k: k)
    if frontier_stages:
        panels.append(
            Panel(tuple(f"frontier/{label}" for label in frontier_stages), "route starts from action",
                  legend=tuple(frontier_stages) if len(frontier_stages) > 1 else ())
        )  # fmt: skip
    return plot_history(history, "step", panels, path, title=title, xlabel="agent steps")
