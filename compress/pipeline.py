"""``lab compress``: distil, prune or quantise a trained agent into a new run directory.

- **distil**: a fresh student (a smaller net from the registry) learns the teacher's action
  distribution (KL at temperature T; a DQN teacher's softmax(Q / tau)) on the states that it visits
  itself. Collection follows DAgger: in round i the teacher acts with probability
  ``beta_decay ** i`` (0 after ``beta_rounds`` rounds), the student otherwise, and the teacher labels
  every state whoever acted, so the student learns how to recover from its own mistakes. Labels go
  into a replay of the latest ``buffer_size`` states; each round of ``num_envs * rollout`` frames is
  followed by ``replay * frames / batch_size`` gradient steps.
- **prune**: a copy of the teacher loses its smallest weights over all Conv2d/Linear layers
  (``torch.nn.utils.prune.global_unstructured``) in ``rounds`` steps of a cubic schedule up to
  ``sparsity``, fine-tuned in between with the same loop (the pruned net acts, the unpruned teacher
  labels); the masks are folded into the saved weights. ``structured=True`` instead cuts whole
  convolution channels and units of a NatureCNN down to the widths of the ``student`` net at once
  (largest L1 norms kept) and fine-tunes that genuinely smaller net by distillation.
- **quantize**: int8 weights and activations (``compress.quantize``), calibrated on ``steps`` frames
  that the teacher itself plays; no training.

Collection envs use the evaluation protocol (random no-op starts) plus sticky actions for Mario, so
the labelled states spread around the teacher's path. A run checkpoints every ``checkpoint_every``
frames (folded weights, loadable by every command) and ``resume`` continues it with fresh envs and
an empty replay.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import envs
from agents.engine import StartWeights, env_action_set, load_training_checkpoint, played_stages
from agents.episodes import env_stages, finished_episodes, stage_label
from agents.ppo import copy_tensors
from compress import METHODS, get_method
from compress.agents import (
    PolicyNet,
    Teacher,
    as_batch,
    build_network,
    compressed_meta,
    load_teacher,
    model_state,
    save_compressed,
    student_config,
)
from compress.distill import DistillBuffer, beta, distill_step
from compress.measure import compare_outputs, count_parameters
from compress.prune import (
    cubic_schedule,
    end_layers,
    folded_state,
    nature_widths,
    prunable_weights,
    prune_channels,
    prune_global,
    slice_inputs,
    sparsity_count,
)
from compress.quantize import calibrate, quantize_int8
from core.checkpoint import CheckpointError
from core.compute import seed_everything, set_learner_threads
from core.config import option, validate
from core.files import atomic_write_json, jsonable
from core.plots import Panel, plot_history
from nets.cnn import NatureCNN

#: Frames of the default run per method: distillation, fine-tuning between prunings, calibration.
DEFAULT_STEPS = {"distil": 200_000, "prune": 100_000, "quantize": 4_096}
#: Default student for image agents (the teacher's own net stays for vector ones: pass --student-set).
DEFAULT_STUDENT = {"distil": "nature-tiny", "prune": "nature-half"}


@dataclass
class CompressConfig:
    """Every field can be set with ``lab compress ... --set key=value``."""

    method: str = option("distil", f"compression method: {', '.join(METHODS)}")
    student: str | None = option(
        None, "distil, structured prune: the student's net from nets/ (default nature-tiny / nature-half)"
    )
    init_student: str | None = option(
        None,
        "distil, structured prune: start the student from this run's weights (the same net), e.g. to go "
        "on distilling a shipped student with other settings",
    )
    stage_teachers: str = option(
        "",
        "distil, prune: teachers of their own for named stages of a multi-stage Mario teacher, "
        "STAGE:RUN[,STAGE:RUN...], e.g. 1-3:runs/mario-1-3-training; the teacher labels the other stages",
    )
    structured: bool = option(False, "prune: remove whole channels and units down to the student's widths")
    sparsity: float = option(0.9, "prune: fraction of the Conv2d/Linear weights set to zero, in (0, 1)")
    steps: int = option(0, "frames collected (0: the method's default: distil 200k, prune 100k, quantize 4096)", min=0)  # fmt: skip
    rounds: int = option(5, "prune: rounds of the cubic sparsity schedule", min=1)
    dense_ends: bool = option(
        False,
        "prune: keep the first layer and the output heads dense; the others lose more to reach the sparsity",
    )
    num_envs: int = option(8, "collection envs", min=1, max=256)
    rollout: int = option(64, "steps per env between learning phases", min=1)
    batch_size: int = option(256, "states per gradient step", min=1)
    replay: float = option(
        4.0, "times each collected state is drawn for a gradient step, on average", min=0.0
    )
    learning_rate: float = option(1e-3, "Adam learning rate (annealed linearly to a tenth)", min=0.0)
    temperature: float = option(1.0, "distillation temperature T of a PPO teacher's softmax", min=1e-6)
    value_coef: float = option(0.5, "PPO: weight of the critic's regression on the teacher's values", min=0.0)
    beta_decay: float = option(0.9, "DAgger: the teacher acts with probability beta_decay**round", min=0.0, max=0.999)  # fmt: skip
    beta_rounds: int = option(40, "DAgger: rounds after which only the student acts", min=1)
    sticky: float = option(0.25, "Mario: sticky-action probability of the collection envs", min=0.0, max=0.99)
    buffer_size: int = option(100_000, "labelled states kept for replay", min=1)
    env_backend: Literal["sync", "async"] = option("sync", "collection envs: in process or worker processes")
    seed: int = option(0, "seed of torch, numpy and the envs", min=0)
    threads: int = option(1, "torch CPU threads (0: one per core)", min=0, max=1024)
    checkpoint_every: int = option(20_000, "frames between checkpoints", min=1)
    log_every: int = option(5_000, "frames between history records", min=1)

    def check(self) -> None:
        get_method(self.method)
        if not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in (0, 1), got {self.sparsity}")

    @property
    def total_steps(self) -> int:
        return self.steps or DEFAULT_STEPS[self.method]


@dataclass
class LoopState:
    """Where a distillation or fine-tuning run stands; checkpointed and restored on resume."""

    frames: int = 0
    rounds: int = 0
    seconds: float = 0.0
    pruned_stage: int = -1  # prune: index of the last schedule entry applied
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class CompressResult:
    """What ``lab compress`` made.

    Attributes:
        run_dir: The new run directory.
        method: distil, prune or quantize (``structured`` says which pruning).
        teacher: The teacher's run directory.
        frames: Frames collected (distillation, fine-tuning or calibration).
        seconds: Wall time of this process's work.
        teacher_parameters: Weights and biases of the teacher.
        parameters: Of the result (``nonzero``: not exactly zero).
        nonzero_parameters: Of those, not exactly zero.
        record: The ``compression`` record of the checkpoint's meta.
    """

    run_dir: str
    method: str
    teacher: str
    frames: int
    seconds: float
    teacher_parameters: int
    parameters: int
    nonzero_parameters: int
    record: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def check(teacher: Teacher, config: CompressConfig, student_overrides: list[str] | None = None) -> None:
    """Raises the ValueError that ``compress`` would, before anything is written: a bad setting, an
    unknown student net or override, a teacher that the method cannot take."""
    validate(config)
    if config.method != "quantize":
        make_student(teacher, config, student_overrides or [])
    load_stage_teachers(teacher, config)
    if config.method == "prune" and not config.structured:
        prune_schedule(teacher, config)


def compress(
    teacher: Teacher,
    config: CompressConfig,
    out_dir: Path,
    student_overrides: list[str] | None = None,
    resume: bool = False,
    progress: bool = False,
) -> CompressResult:
    """Compresses a teacher (``compress.agents.load_teacher``) into the run directory ``out_dir``.

    Args:
        teacher: the trained agent.
        config: what to do and how (``resume`` replaces it by the saved one, except ``steps``).
        out_dir: the new run directory; with ``resume`` the one to continue.
        student_overrides: ``key=value`` changes of the student's agent config (``hidden=16``).
        resume: continue the unfinished run in ``out_dir``.
        progress: print a line per history record.

    Raises:
        CheckpointError: ``out_dir`` holds nothing to resume.
        ValueError: a bad setting (method, sparsity, net, key), named in one line.
    """
    start = time.time()
    saved: tuple[dict[str, Any], dict[str, Any]] | None = None
    if resume:
        saved = load_training_checkpoint(out_dir)
        if saved is None or "compression" not in saved[1]:
            raise CheckpointError(f"{out_dir} holds no `lab compress` checkpoint to resume")
        record = saved[1]["compression"]
        if record.get("finished") and config.steps <= record["frames"]:
            raise CheckpointError(f"{out_dir} is finished; raise --steps above {record['frames']} to go on")
        settings = {**record["settings"], "steps": config.steps or record["settings"]["steps"]}
        config = CompressConfig(**settings)
        student_overrides = record.get("student_overrides", [])
    validate(config)
    threads = torch.get_num_threads()
    set_learner_threads(config.threads)
    try:
        if config.method == "quantize":
            result = _quantize(teacher, config, out_dir)
        else:
            result = _train(teacher, config, out_dir, student_overrides or [], saved, progress)
    finally:
        torch.set_num_threads(threads)
    return dataclasses.replace(result, seconds=round(time.time() - start, 1))


def _record(teacher: Teacher, config: CompressConfig, **values: Any) -> dict[str, Any]:
    """The ``compression`` record of a checkpoint: the method, the teacher, the settings, results."""
    return {
        "method": config.method,
        "structured": config.structured if config.method == "prune" else None,
        "teacher": str(teacher.agent.run_dir),
        "teacher_checkpoint": teacher.agent.sidecar.name,
        "teacher_parameters": count_parameters(teacher.net).total,
        "settings": dataclasses.asdict(config),
        **values,
    }


def stage_teacher_runs(config: CompressConfig, env: str) -> dict[str, str]:
    """``stage_teachers`` as ``{"1-3": "runs/mario-1-3-training"}`` ({} when unset).

    Raises:
        ValueError: one line naming an entry that is not ``STAGE:RUN``, a stage named twice or one that
            the teacher's preset never plays, or the quantize method (it trains nothing to label).
    """
    if not config.stage_teachers:
        return {}
    if config.method == "quantize":
        raise ValueError("stage_teachers applies to distil and prune; quantize labels nothing")
    played = played_stages(env)
    runs: dict[str, str] = {}
    for entry in config.stage_teachers.split(","):
        stage, _, run = (part.strip() for part in entry.partition(":"))
        if not stage or not run:
            raise ValueError(
                f"stage_teachers={config.stage_teachers!r}: {entry.strip()!r} is not STAGE:RUN, "
                "e.g. 1-3:runs/mario-1-3-training"
            )
        if stage not in played:
            raise ValueError(
                f"stage_teachers={config.stage_teachers!r}: the teacher's {env!r} never plays {stage!r}; "
                f"its stages: {', '.join(played) or 'none (not a Mario preset)'}"
            )
        if stage in runs:
            raise ValueError(f"stage_teachers={config.stage_teachers!r} names {stage} twice")
        runs[stage] = run
    return runs


def load_stage_teachers(teacher: Teacher, config: CompressConfig) -> dict[str, Teacher]:
    """The teachers of ``stage_teachers`` by stage, each checked to label the teacher's envs.

    Raises:
        ValueError: a bad ``stage_teachers`` (``stage_teacher_runs``), or a stage teacher whose
            algorithm, observations or action set differ from the teacher's.
        CheckpointError: nothing loadable at a named run.
    """
    loaded: dict[str, Teacher] = {}
    for stage, run in stage_teacher_runs(config, teacher.agent.config.env).items():
        other = load_teacher(run)
        for what, own, theirs in (
            ("algorithm", teacher.algo, other.algo),
            ("observation shape", teacher.obs_shape, other.obs_shape),
            ("action set", env_action_set(teacher.agent.config), env_action_set(other.agent.config)),
        ):
            if own != theirs:
                raise ValueError(
                    f"stage_teachers: {run} cannot label {stage} for {teacher.agent.run_dir}: "
                    f"its {what} is {theirs}, the teacher's {own}"
                )
        loaded[stage] = other
    return loaded


@torch.no_grad()
def label_by_stage(
    teacher: Teacher, stage_teachers: dict[str, Teacher], obs: torch.Tensor, stages: list[str | None]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Targets on obs (B, *obs_shape) as ``Teacher.label`` gives them, each row labelled by the teacher
    of its env's stage (``stages``, (B,) labels) where ``stage_teachers`` names one, else by ``teacher``.
    Returns (logits (B, A) fp32, values (B,) fp32 or None)."""
    if not stage_teachers:
        return teacher.label(obs)
    owners = [stage if stage in stage_teachers else None for stage in stages]
    logits = torch.empty(len(obs), teacher.num_actions)
    values: torch.Tensor | None = torch.empty(len(obs)) if teacher.algo == "ppo" else None
    for owner in set(owners):
        rows = torch.tensor([index for index, label in enumerate(owners) if label == owner])
        owner_logits, owner_values = (teacher if owner is None else stage_teachers[owner]).label(obs[rows])
        logits[rows] = owner_logits
        if values is not None and owner_values is not None:
            values[rows] = owner_values
    return logits, values


def collection_env(env_name: str, config: CompressConfig, seed: int) -> Any:
    """Vector envs that collect labelled states: the eval protocol's random starts, sticky for Mario."""
    overrides = envs.eval_overrides(env_name)
    if config.sticky > 0 and envs.resolve(env_name).kind == "mario":
        overrides["sticky_prob"] = config.sticky
    return envs.make_vec(env_name, config.num_envs, seed=seed, backend=config.env_backend, **overrides)


# ---------------------------------------------------------------------------------------------
# Quantisation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def play_frames(teacher: Teacher, config: CompressConfig, count: int) -> torch.Tensor:
    """(count, *obs_shape) observations of the teacher's own greedy play in the collection envs."""
    env = collection_env(teacher.agent.config.env, config, config.seed)
    frames: list[torch.Tensor] = []
    try:
        obs, _ = env.reset(seed=config.seed)
        while sum(len(f) for f in frames) < count:
            batch = as_batch(obs)
            frames.append(batch.clone())
            logits, _ = teacher.net(batch)
            obs, *_ = env.step(logits.argmax(dim=-1).numpy())
    finally:
        env.close()
    return torch.cat(frames)[:count]


def _quantize(teacher: Teacher, config: CompressConfig, out_dir: Path) -> CompressResult:
    count = config.total_steps
    if count < 2:
        raise ValueError(f"quantize needs at least 2 calibration frames (steps), got {count}")
    frames = play_frames(teacher, config, count)
    held_out = max(1, count // 4)  # compared on frames that calibration did not see
    calibration = calibrate(teacher.net, frames[:-held_out])
    quantized = quantize_int8(teacher.net, calibration)
    left = [name for name, m in quantized.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    if left:  # `nets.quantized.int8_skeleton` swaps every layer, so every layer must be int8
        raise ValueError(f"layers that never ran on the calibration frames stay fp32: {', '.join(left)}")
    comparison = compare_outputs(teacher.net, quantized, frames[-held_out:])
    record = _record(
        teacher,
        config,
        scheme="int8 weights per output channel, int8 activations per tensor (static), fp32 bias",
        library="torchao Int8Tensor (Linear), integer-valued fp32 conv2d (Conv2d)",
        calibration_frames=count - held_out,
        agreement=comparison.agreement,
        max_abs_diff=comparison.max_abs_diff,
    )
    meta = compressed_meta(teacher, teacher.agent.config, record, quantized=True)
    save_compressed(out_dir, count, model_state(quantized.net), meta)
    counts = count_parameters(quantized)
    return CompressResult(
        str(out_dir), "quantize", str(teacher.agent.run_dir), count, 0.0,
        record["teacher_parameters"], counts.total, counts.nonzero, record,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Distillation and pruning: the student and its start
# ---------------------------------------------------------------------------------------------


def _student_net_name(teacher: Teacher, config: CompressConfig) -> str | None:
    if config.student is not None:
        return config.student
    if len(teacher.obs_shape) == 3:  # images: the registry's small NatureCNNs
        return DEFAULT_STUDENT["prune" if config.method == "prune" else "distil"]
    return None  # vector observations: the teacher's net, made smaller with --student-set hidden=...


def make_student(
    teacher: Teacher, config: CompressConfig, overrides: list[str], resuming: bool = False
) -> tuple[PolicyNet, Any, StartWeights | None]:
    """The network to train, its agent config and where its weights came from: a fresh student
    (distil), the channel-pruned teacher (structured prune) or a copy of the teacher (prune);
    ``init_student``'s weights unless ``resuming`` (the checkpoint holds the weights then, and the
    run it named may be gone).

    Raises:
        ValueError: an unknown student net or override, a teacher structured pruning cannot cut, or an
            ``init_student`` whose tensors do not fit the student.
        CheckpointError: nothing loadable at ``init_student``.
    """
    algo = teacher.algo
    if config.method == "prune" and not config.structured:
        if config.student is not None or overrides:
            raise ValueError(
                "--student applies to distil and to prune --structured; prune keeps the teacher's net"
            )
        if config.init_student is not None:
            raise ValueError(
                "init_student applies to distil and to prune --structured; prune starts from the teacher"
            )
        net = copy.deepcopy(teacher.net.net)
        for parameter in net.parameters():
            parameter.requires_grad_(True)
        return PolicyNet(net, algo, detach_value=True), teacher.agent.config, None
    agent_config = student_config(teacher, _student_net_name(teacher, config), overrides)
    net = build_network(algo, agent_config, teacher.obs_shape, teacher.num_actions)
    if config.method == "prune":
        _copy_channel_pruned(teacher.net.net, net)
    started_from = None
    if config.init_student is not None and not resuming:  # every tensor with its shape, or a ValueError
        started_from = copy_tensors(config.init_student, [net], prefix="", option="init_student")
    return PolicyNet(net, algo, detach_value=True), agent_config, started_from


@torch.no_grad()
def _copy_channel_pruned(teacher: nn.Module, student: nn.Module) -> None:
    """Fills ``student`` (same algorithm, a narrower NatureCNN) with the teacher's largest channels."""
    if getattr(teacher, "critic_encoder", None) is not None:
        raise ValueError("structured pruning needs an agent whose actor and critic share the encoder")
    if not isinstance(teacher.encoder, NatureCNN) or not isinstance(student.encoder, NatureCNN):
        raise ValueError(
            "structured pruning cuts NatureCNN encoders (nature, nature-half, nature-tiny); "
            f"got {type(teacher.encoder).__name__} -> {type(student.encoder).__name__}"
        )
    channels, out_dim = nature_widths(student.encoder)
    cut = prune_channels(teacher.encoder, channels=channels, out_dim=out_dim)
    student.encoder.load_state_dict(cut.module.state_dict())
    # Each stream of the head (actor, critic; advantage, value) reads the features in its first layer.
    readers = {
        f"{name}.0" for name, stream in teacher.head.named_children() if isinstance(stream, nn.Sequential)
    }
    student_layers = dict(student.head.named_modules())
    for name, layer in teacher.head.named_modules():
        if isinstance(layer, nn.Linear):
            source = slice_inputs(layer, cut.kept_units) if name in readers else layer
            student_layers[name].load_state_dict(source.state_dict())


def prune_schedule(teacher: Teacher, config: CompressConfig) -> list[float]:
    """The sparsity of each pruning round, from the teacher's own exact zeros (they count towards the
    target) up to ``config.sparsity``."""
    initial = sparsity_count(teacher.net).sparsity
    if initial >= config.sparsity:
        raise ValueError(
            f"the teacher's weights are {initial:.1%} zeros already; ask for a sparsity above that"
        )
    return cubic_schedule(config.sparsity, config.rounds, initial=initial)


def _mask_zeros(net: nn.Module) -> None:
    """Re-applies pruning masks to folded weights (their exact zeros), so fine-tuning keeps them zero."""
    for layer, name in prunable_weights(net):
        torch_prune.custom_from_mask(layer, name, getattr(layer, name) != 0)


def _folded_state(student: PolicyNet) -> dict[str, torch.Tensor]:
    """The student's weights with any pruning masks multiplied in (the keys of the unpruned net)."""
    return {key: value.cpu().contiguous().clone() for key, value in folded_state(student.net).items()}


# ---------------------------------------------------------------------------------------------
# Distillation and pruning: the loop
# ---------------------------------------------------------------------------------------------


def _train(
    teacher: Teacher,
    config: CompressConfig,
    out_dir: Path,
    overrides: list[str],
    saved: tuple[dict[str, Any], dict[str, Any]] | None,
    progress: bool,
) -> CompressResult:
    seed_everything(config.seed)
    student, agent_config, started_from = make_student(teacher, config, overrides, resuming=saved is not None)
    # The compression record keeps where init_student's weights came from; a resume keeps the first's.
    if saved is not None:
        start_weights = list(saved[1].get("compression", {}).get("start_weights", []))
    else:
        start_weights = [started_from._asdict()] if started_from else []
    state = LoopState()
    if saved is not None:
        checkpoint = saved[0]
        student.net.load_state_dict(checkpoint["model"])
        state = LoopState(
            frames=int(checkpoint["global_step"]),
            rounds=int(checkpoint["rounds"]),
            seconds=float(checkpoint["seconds"]),
            pruned_stage=int(checkpoint["pruned_stage"]),
            history=list(checkpoint["history"]),
        )
    unstructured = config.method == "prune" and not config.structured
    schedule = prune_schedule(teacher, config) if unstructured else []
    keep_dense = end_layers(student) if unstructured and config.dense_ends else []
    if unstructured:
        if state.pruned_stage >= 0:
            _mask_zeros(student.net)
        else:
            prune_global(student, schedule[0], keep_dense)
            state.pruned_stage = 0
    optimizer = torch.optim.Adam(student.parameters(), lr=config.learning_rate)
    if saved is not None and "optimizer" in saved[0]:
        optimizer.load_state_dict(saved[0]["optimizer"])
    total = config.total_steps
    record_base = {
        "student_net": agent_config.net,
        "student_overrides": list(overrides),
        "start_weights": start_weights,
    }

    def save(final: bool) -> dict[str, Any]:
        counts = sparsity_count(student)
        record = _record(
            teacher, config, **record_base, frames=state.frames, sparsity=counts.sparsity,
            seconds=round(state.seconds, 1), finished=final,
        )  # fmt: skip
        extra: dict[str, Any] = {
            "rounds": state.rounds,
            "seconds": state.seconds,
            "pruned_stage": state.pruned_stage,
            "history": state.history,
        }
        if not final:  # the shipped result keeps weights only
            extra["optimizer"] = optimizer.state_dict()
        meta = compressed_meta(teacher, agent_config, record)
        save_compressed(out_dir, state.frames, _folded_state(student), meta, extra, keep=1)
        return record

    def before_round() -> None:
        if not unstructured:
            return
        stage = min(len(schedule) - 1, state.frames * len(schedule) // total)
        if stage > state.pruned_stage:
            prune_global(student, schedule[stage], keep_dense)
            state.pruned_stage = stage

    # The pruned net acts from the start; a fresh or channel-cut student first follows the teacher.
    dagger = not unstructured
    stage_teachers = load_stage_teachers(teacher, config)
    run_loop(
        teacher,
        stage_teachers,
        student,
        optimizer,
        config,
        state,
        total,
        dagger,
        before_round,
        save,
        progress,
    )
    if unstructured and state.pruned_stage < len(schedule) - 1:  # too few rounds to reach every stage
        prune_global(student, schedule[-1], keep_dense)
        state.pruned_stage = len(schedule) - 1
    record = save(final=True)
    atomic_write_json(out_dir / "metrics.json", jsonable({"method": config.method, "history": state.history}))
    if state.history:
        title = f"{config.method} of {teacher.agent.run_dir.name} into {agent_config.net}"
        plot_compression(state.history, out_dir / "learning_curve.png", title, pruning=unstructured)
    parameters = count_parameters(student)
    return CompressResult(
        str(out_dir), config.method, str(teacher.agent.run_dir), state.frames, 0.0,
        record["teacher_parameters"], parameters.total, parameters.nonzero, record,
    )  # fmt: skip


def run_loop(
    teacher: Teacher,
    stage_teachers: dict[str, Teacher],
    student: PolicyNet,
    optimizer: torch.optim.Optimizer,
    config: CompressConfig,
    state: LoopState,
    total: int,
    dagger: bool,
    before_round: Callable[[], None],
    save: Callable[[bool], Any],
    progress: bool,
) -> None:
    """Collects with DAgger mixing, labels with the teacher, trains the student, until ``total`` frames.

    One round: ``rollout`` steps of ``num_envs`` envs; with ``dagger`` the teacher acts with
    probability ``beta(round)`` per env and step, the student greedily otherwise; the teacher labels
    every observation into the replay (the teacher of its stage where ``stage_teachers`` names one, and
    that teacher is the one that acts); then ``replay * frames / batch_size`` gradient steps on it.
    """
    env = collection_env(teacher.agent.config.env, config, config.seed + state.frames)
    obs_dtype = torch.uint8 if env.single_observation_space.dtype == np.uint8 else torch.float32
    buffer = DistillBuffer(
        config.buffer_size, teacher.obs_shape, teacher.num_actions, obs_dtype, config.seed + state.frames,
        with_values=teacher.algo == "ppo",
    )  # fmt: skip
    rng = np.random.default_rng(config.seed + state.frames)
    teacher_acted = np.zeros(config.num_envs, dtype=bool)  # in the episode each env is playing
    student_episodes: deque[dict[str, float]] = deque(maxlen=50)  # episodes the student played alone
    stats_window: list[tuple[float, float, float]] = []  # (kl, agreement, value loss) since the last record
    last_log, last_save, started = state.frames, state.frames, time.time() - state.seconds
    value_coef = config.value_coef if teacher.algo == "ppo" else 0.0
    try:
        obs, infos = env.reset(seed=config.seed + state.frames)
        while state.frames < total:
            before_round()
            teacher_share = beta(state.rounds, config.beta_decay, config.beta_rounds) if dagger else 0.0
            student.eval()
            for _ in range(config.rollout):
                batch = as_batch(obs)
                stages = env_stages(infos, config.num_envs)
                teacher_logits, teacher_values = label_by_stage(teacher, stage_teachers, batch, stages)
                with torch.no_grad():
                    student_actions = student(batch)[0].argmax(dim=-1).numpy()
                use_teacher = rng.random(config.num_envs) < teacher_share
                actions = np.where(use_teacher, teacher_logits.argmax(dim=-1).numpy(), student_actions)
                buffer.add(batch, teacher_logits, teacher_values)
                teacher_acted |= use_teacher
                obs, _, terminations, truncations, infos = env.step(actions)
                for index, stats in finished_episodes(infos):
                    if not teacher_acted[index]:
                        student_episodes.append(stats)
                teacher_acted[np.logical_or(terminations, truncations)] = False
                state.frames += config.num_envs
            learning_rate = config.learning_rate * (1.0 - 0.9 * min(1.0, state.frames / total))
            for group in optimizer.param_groups:
                group["lr"] = learning_rate
            steps = max(1, round(config.replay * config.rollout * config.num_envs / config.batch_size))
            for _ in range(steps if config.replay > 0 else 0):
                sample = buffer.sample(config.batch_size)
                step = distill_step(
                    student, sample.teacher_logits, sample.obs, optimizer, config.temperature,
                    max_grad_norm=10.0, teacher_values=sample.teacher_values, value_coef=value_coef,
                )  # fmt: skip
                stats_window.append((step.loss, step.agreement, step.value_loss))
            state.rounds += 1
            state.seconds = time.time() - started
            if state.frames - last_log >= config.log_every or state.frames >= total:
                state.history.append(
                    _history_record(state, teacher_share, stats_window, student_episodes, student)
                )
                stats_window.clear()
                last_log = state.frames
                if progress:
                    print(_describe(state.history[-1]), flush=True)
            if state.frames - last_save >= config.checkpoint_every and state.frames < total:
                save(False)
                last_save = state.frames
    except (KeyboardInterrupt, Exception):
        # Ctrl-C, SIGTERM (lab.errors.stoppable_run) or a failure (env workers that keep dying): keep
        # what was learnt. A save that fails too must not hide the error that stopped the run.
        state.seconds = time.time() - started
        with contextlib.suppress(Exception):
            save(False)
        raise
    finally:
        env.close()


def _history_record(
    state: LoopState,
    teacher_share: float,
    window: list[tuple[float, float, float]],
    episodes: deque[dict[str, float]],
    student: PolicyNet,
) -> dict[str, float]:
    mean = (lambda i: float(np.mean([w[i] for w in window]))) if window else (lambda i: math.nan)
    record = {
        "step": state.frames,
        "seconds": round(state.seconds, 1),
        "beta": teacher_share,
        "kl": mean(0),
        "agreement": mean(1),
        "value_loss": mean(2),
        "sparsity": sparsity_count(student).sparsity,
        # The student's own episodes (no teacher action in them), named as a training run's history.
        "episodes": float(len(episodes)),
        "return_mean": float(np.mean([e["return"] for e in episodes])) if episodes else math.nan,
    }
    if episodes and "flag_get" in episodes[0]:
        record["clear_rate"] = float(np.mean([e.get("flag_get", 0.0) for e in episodes]))
        record["x_pos_max_mean"] = float(np.mean([e.get("x_pos_max", 0.0) for e in episodes]))
        by_stage: dict[str, list[float]] = {}
        for stats in episodes:
            by_stage.setdefault(stage_label(stats) or "", []).append(stats.get("flag_get", 0.0))
        if len(by_stage) > 1:  # a multi-stage teacher: how the student does on each stage
            for label, flags in sorted(by_stage.items()):
                record[f"clear_rate/{label}"] = float(np.mean(flags))
    return record


def _describe(record: dict[str, float]) -> str:
    text = (
        f"{record['step']:>9,} frames  {record['seconds']:>6.0f} s  beta {record['beta']:.2f}  "
        f"kl {record['kl']:.4f}  agreement {record['agreement']:.1%}  sparsity {record['sparsity']:.1%}  "
        f"student alone: return {record['return_mean']:.1f} ({record['episodes']:.0f} episodes)"
    )
    if "clear_rate" in record:
        text += f", clears {record['clear_rate']:.0%}"
        stages = [key.removeprefix("clear_rate/") for key in record if key.startswith("clear_rate/")]
        if stages:
            text += " (" + ", ".join(f"{label} {record['clear_rate/' + label]:.0%}" for label in stages) + ")"
    return text


def plot_compression(history: list[dict[str, float]], path: Path, title: str, pruning: bool = False) -> Path:
    """The run's curves over frames: agreement with the teacher, the KL, and how the student plays
    alone (clear rate on Mario, return elsewhere) beside the share of teacher actions (distillation)
    or the sparsity (pruning)."""
    mario = any("clear_rate" in record for record in history)
    # A multi-stage teacher: a panel with a line per stage.
    stages = sorted({key for record in history for key in record if key.startswith("clear_rate/")})
    panels = [
        Panel(("agreement",), "student's greedy action = teacher's", ylim=(0.0, 1.02)),
        Panel(("kl",), "KL(teacher || student)", log=True),
        Panel(
            ("clear_rate",) if mario else ("return_mean",),
            "flag reached, student alone (last 50)" if mario else "return, student alone (last 50)",
            ylim=(-0.02, 1.02) if mario else None,
            twin_key="sparsity" if pruning else "beta",
            twin_label="sparsity" if pruning else "teacher acts (beta)",
        ),
    ]
    if stages:
        legend = tuple(key.removeprefix("clear_rate/") for key in stages)
        panels.append(
            Panel(tuple(stages), "flag reached per stage, student alone", legend, ylim=(-0.02, 1.02))
        )
    return plot_history(history, "step", panels, path, title=title, xlabel="frames")
