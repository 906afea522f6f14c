"""Presets: an env id, its wrappers' options, a default encoder and tuned hyperparameters.

``ppo`` and ``dqn`` hold overrides for the fields of the agents' config dataclasses. Values come
from CleanRL (``ppo.py``, ``ppo_atari.py``, ``dqn.py``) and the RL Baselines3 Zoo (``ppo.yml``,
``dqn.yml``), mapped onto our field names (Zoo's ``n_timesteps`` is our ``total_steps``,
``train_freq``/``gradient_steps`` our ``train_frequency``/``gradient_steps``, and its
``gradient_steps: -1`` as many gradient steps as env steps). Beyond the agreed names, both may set
other fields of the agents' configs (``memory`` for recurrent PPO, ``env_backend``,
``gradient_steps``, ...). They are starting points that learn, not the last word.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import warnings
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

from envs.gridworld import MINIGRID_TMAZE_ID, TMAZE_ID, register_envs

KINDS = ("mario", "classic", "minigrid", "gym")


@dataclass(frozen=True)
class Preset:
    """A named environment set-up.

    Attributes:
        name: the preset's name, e.g. ``"mario-1-1"``.
        env_id: the Gymnasium id it builds on.
        kind: ``"mario"`` (the Mario stack), ``"classic"`` (vector observations as they are),
            ``"minigrid"`` (memory gridworlds with flat one-hot observations) or ``"gym"`` (any
            other registered id, with default wrappers chosen by observation type).
        env_kwargs: keyword arguments for the builder (wrapper options and env constructor ones).
        net: the default encoder name for ``nets.build``.
        ppo: overrides for PPO's config fields.
        dqn: overrides for DQN's config fields.
        description: one line for ``lab list envs``.
        eval_kwargs: extra ``env_kwargs`` for evaluation (Mario: random no-op starts, so that
            greedy episodes differ), see :func:`envs.eval_overrides`.
    """

    name: str
    env_id: str
    kind: str
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    net: str = "mlp"
    ppo: dict[str, Any] = field(default_factory=dict)
    dqn: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    eval_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"preset {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def action_set(self) -> str:
        """The Mario action set its envs use: its ``actions`` option, else ``envs.mario.make``'s simple."""
        return self.env_kwargs.get("actions", "simple")


# ---------------------------------------------------------------------------------------------
# Hyperparameters
# ---------------------------------------------------------------------------------------------

# RL Zoo ppo.yml CartPole-v1 (8 envs x 32 steps, 20 epochs, gamma 0.98, lambda 0.8, lr 1e-3 annealed),
# with CleanRL's separate actor and critic MLPs (tests/test_ppo.py checks that it solves CartPole).
PPO_CARTPOLE = dict(
    total_steps=100_000, num_envs=8, num_steps=32, learning_rate=1e-3, gamma=0.98, gae_lambda=0.8,
    num_minibatches=1, update_epochs=20, clip_coef=0.2, ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5,
    anneal_lr=True, net="mlp", shared_encoder=False,
)  # fmt: skip
# RL Zoo dqn.yml CartPole-v1 (net_arch [256, 256] in the Zoo).
DQN_CARTPOLE = dict(
    total_steps=50_000, num_envs=1, buffer_size=100_000, learning_rate=2.3e-3, anneal_lr=True, gamma=0.99,
    batch_size=64, learning_starts=1_000, train_frequency=2, gradient_steps=1, target_network_frequency=256,
    tau=1.0, exploration_fraction=0.16, start_e=1.0, end_e=0.04, n_step=3, double=True, dueling=False,
    prioritized=False, net="mlp", hidden=(256, 256), eval_every=2_500, keep_best=True,
)  # fmt: skip
# CleanRL ppo.py's classic-control settings, the base of the Zoo values below.
PPO_CLASSIC = dict(
    total_steps=500_000, num_envs=4, num_steps=128, learning_rate=2.5e-4, gamma=0.99, gae_lambda=0.95,
    num_minibatches=4, update_epochs=4, clip_coef=0.2, ent_coef=0.01, vf_coef=0.5, max_grad_norm=0.5,
    anneal_lr=True, net="mlp", shared_encoder=False,
)  # fmt: skip
# RL Zoo ppo.yml Acrobot-v1 / MountainCar-v0 (16 envs, ent_coef 0), lr as Zoo's default 3e-4.
PPO_ACROBOT = {**PPO_CLASSIC, "total_steps": 500_000, "num_envs": 16, "num_steps": 256, "gae_lambda": 0.94,
               "learning_rate": 3e-4, "ent_coef": 0.0, "anneal_lr": False}  # fmt: skip
PPO_MOUNTAINCAR = {**PPO_ACROBOT, "total_steps": 1_000_000, "num_steps": 16, "gae_lambda": 0.98}
# RL Zoo dqn.yml Acrobot-v1 / LunarLander-v2 (train_freq 4, gradient_steps -1: 4 steps every 4).
DQN_ACROBOT = dict(
    total_steps=100_000, num_envs=1, buffer_size=50_000, learning_rate=6.3e-4, gamma=0.99, batch_size=128,
    learning_starts=0, train_frequency=4, gradient_steps=4, target_network_frequency=250, tau=1.0,
    exploration_fraction=0.12,
    start_e=1.0, end_e=0.1, n_step=1, double=False, dueling=False, prioritized=False, net="mlp", eval_every=0, keep_best=False, anneal_lr=False,
)  # fmt: skip
DQN_LUNARLANDER = DQN_ACROBOT
# RL Zoo dqn.yml MountainCar-v0.
DQN_MOUNTAINCAR = {**DQN_ACROBOT, "total_steps": 120_000, "buffer_size": 10_000, "learning_rate": 4e-3,
                   "learning_starts": 1_000, "gamma": 0.98, "target_network_frequency": 600,
                   "train_frequency": 16, "gradient_steps": 8, "exploration_fraction": 0.2,
                   "end_e": 0.07}  # fmt: skip
# RL Zoo ppo.yml LunarLander (16 envs x 1024 steps, minibatch 64 -> 256 minibatches, gamma 0.999).
PPO_LUNARLANDER = {**PPO_CLASSIC, "total_steps": 1_000_000, "num_envs": 16, "num_steps": 1024,
                   "num_minibatches": 256, "gamma": 0.999, "gae_lambda": 0.98, "learning_rate": 3e-4,
                   "anneal_lr": False}  # fmt: skip

# CleanRL ppo_atari.py (Nature CNN) with gamma 0.9, as the published PPO Mario agents use: the
# shaped reward is dense, and a short horizon learns a stage faster. 16 envs x 256 steps = 4096 per
# update in 8 minibatches of 512, CleanRL's Atari clip and entropy coefficients.
PPO_MARIO = dict(
    total_steps=2_000_000, num_envs=16, num_steps=256, learning_rate=2.5e-4, gamma=0.9, gae_lambda=0.95,
    num_minibatches=8, update_epochs=4, clip_coef=0.2, ent_coef=0.01, vf_coef=0.5, max_grad_norm=0.5,
    anneal_lr=True, net="nature", env_backend="async", checkpoint_every=100_000, eval_every=250_000,
    bf16=True,  # native bf16 only (CUDA, AVX512-BF16/AMX CPUs); the speed-ups are in RESULTS.md
    overlap=True,  # learn while the next rollout is collected, on the core the env workers leave idle
)  # fmt: skip
# CleanRL dqn_atari.py with a smaller buffer (each (4, 84, 84) uint8 observation is 28 KB, twice).
DQN_MARIO = dict(
    total_steps=2_000_000, num_envs=1, buffer_size=100_000, learning_rate=1e-4, gamma=0.9, batch_size=32,
    learning_starts=10_000, train_frequency=4, gradient_steps=1, target_network_frequency=1_000, tau=1.0,
    exploration_fraction=0.1, start_e=1.0, end_e=0.01, n_step=3, double=True, dueling=True,
    prioritized=False, net="nature", eval_every=0, keep_best=False, anneal_lr=False,
    # Learn in a thread while the next 4 agent steps are collected, with bf16 learning where native
    # (benchmark systems dqn-preset and dqn-preset-serial; its Mario learning curve: RESULTS.md).
    overlap=True, bf16=True,
)  # fmt: skip

# Memory tasks: recurrent PPO (an MLP encoder, then an LSTM). MiniGrid values after rl-starter-files
# (16 procs x 128 steps).
PPO_MINIGRID = dict(
    total_steps=1_000_000, num_envs=16, num_steps=128, learning_rate=5e-4, gamma=0.99, gae_lambda=0.95,
    num_minibatches=4, update_epochs=4, clip_coef=0.2, ent_coef=0.01, vf_coef=0.5, max_grad_norm=0.5,
    anneal_lr=False, net="mlp", memory="lstm",
)  # fmt: skip
# The MiniGrid T-maze: a GRU, 64-step rollouts, lr 1e-3 annealed, and advantages left unnormalised
# as in rl-starter-files (torch-ac): normalised per minibatch, the advantages of a solved task are
# noise scaled up to unit size, which pushes a near-deterministic policy into large jumps.
PPO_MINIGRID_TMAZE = {**PPO_MINIGRID, "total_steps": 200_000, "num_steps": 64, "learning_rate": 1e-3,
                      "anneal_lr": True, "norm_adv": False, "memory": "gru"}  # fmt: skip
# The vector T-maze, the same way with an LSTM.
PPO_TMAZE = {**PPO_MINIGRID_TMAZE, "total_steps": 100_000, "memory": "lstm"}
# A 20-step corridor: a random walk rarely reaches the junction, and the few successes only move the
# policy when the advantages are normalised.
PPO_TMAZE_LONG = {**PPO_TMAZE, "total_steps": 500_000, "num_steps": 128, "norm_adv": True}
DQN_GRID = dict(
    total_steps=200_000, num_envs=1, buffer_size=50_000, learning_rate=2.5e-4, gamma=0.99, batch_size=64,
    learning_starts=1_000, train_frequency=4, gradient_steps=1, target_network_frequency=500, tau=1.0,
    exploration_fraction=0.3, start_e=1.0, end_e=0.05, n_step=1, double=True, dueling=False,
    prioritized=False, net="mlp", eval_every=0, keep_best=False, anneal_lr=False,
)  # fmt: skip

# Defaults for ids without a preset, by observation type.
PPO_IMAGE = {**PPO_MARIO, "gamma": 0.99, "total_steps": 10_000_000}
DQN_IMAGE = {**DQN_MARIO, "gamma": 0.99}


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

# Evaluation: 0-30 random no-ops at the start (the emulator is deterministic, so greedy episodes
# would otherwise all be one), and an episode that makes no progress for 200 agent steps (13 s of
# game time) is cut and counted as stalled.
MARIO_EVAL = {"noop_max": 30, "stall_patience": 200}
WORLD_1_STAGES = ("1-1", "1-2", "1-3", "1-4")


def _mario(name: str, env_id: str, description: str, **env_kwargs: Any) -> Preset:
    return Preset(
        name=name,
        env_id=env_id,
        kind="mario",
        env_kwargs=env_kwargs,
        net="nature",
        ppo=dict(PPO_MARIO),
        dqn=dict(DQN_MARIO),
        description=description,
        eval_kwargs=dict(MARIO_EVAL),
    )


def _lost_levels_label(world: int) -> str:
    return str(world) if world <= 9 else "ABCD"[world - 10]


def _build_presets() -> dict[str, Preset]:
    presets: list[Preset] = []
    for world in range(1, 9):
        for stage in range(1, 5):
            presets.append(
                _mario(
                    f"mario-{world}-{stage}",
                    f"SuperMarioBros-{world}-{stage}-v0",
                    f"Super Mario Bros. world {world}-{stage}; simple actions, (4, 84, 84) gray stack",
                )
            )
    # 1-1 with the held jump button drawn in the corner: about half of the greedy 1-1 agents' failures
    # are stalls holding A against a step, where a held A cannot jump again (envs.mario.ShowHeldJump).
    presets.append(
        _mario(
            "mario-1-1-hud",
            "SuperMarioBros-1-1-v0",
            "world 1-1 with a corner block showing whether the jump button (A) is held",
            show_held_jump=True,
        )
    )
    presets.append(
        _mario(
            "mario-world-1",
            "SuperMarioBros-v0",
            "Super Mario Bros. world 1: each episode a stage drawn from 1-1..1-4",
            stages=WORLD_1_STAGES,
        )
    )
    presets.append(
        _mario(
            "mario",
            "SuperMarioBros-v0",
            "Super Mario Bros., the whole game from 1-1 with 3 lives",
            max_episode_steps=20_000,
        )
    )
    presets.append(
        _mario(
            "lost-levels",
            "SuperMarioBros2-v0",
            "Super Mario Bros. 2 (Japan) / The Lost Levels, the whole game",
            max_episode_steps=20_000,
        )
    )
    for world in range(1, 14):
        label = _lost_levels_label(world)
        for stage in range(1, 5):
            presets.append(
                _mario(
                    f"lost-levels-{label}-{stage}",
                    f"SuperMarioBros2-{label}-{stage}-v0",
                    f"The Lost Levels world {label}-{stage}",
                )
            )

    presets += [
        Preset("cartpole", "CartPole-v1", "classic", net="mlp", ppo=dict(PPO_CARTPOLE), dqn=dict(DQN_CARTPOLE),
               description="CartPole-v1: balance a pole, 500 steps max (solved at 475)"),
        Preset("acrobot", "Acrobot-v1", "classic", net="mlp", ppo=dict(PPO_ACROBOT), dqn=dict(DQN_ACROBOT),
               description="Acrobot-v1: swing a two-link arm above a line (-100 is good)"),
        Preset("mountaincar", "MountainCar-v0", "classic", net="mlp", ppo=dict(PPO_MOUNTAINCAR),
               dqn=dict(DQN_MOUNTAINCAR), description="MountainCar-v0: sparse reward, needs exploration"),
        Preset("lunarlander", "LunarLander-v3", "classic", net="mlp", ppo=dict(PPO_LUNARLANDER),
               dqn=dict(DQN_LUNARLANDER), description="LunarLander-v3 (box2d): land softly (200 is solved)"),
        Preset("tmaze", TMAZE_ID, "minigrid", env_kwargs={"corridor_length": 6}, net="mlp",
               ppo=dict(PPO_TMAZE), dqn=dict(DQN_GRID),
               description="T-maze: remember a cue for 6 steps; feed-forward caps at 50% success"),
        Preset("tmaze-long", TMAZE_ID, "minigrid", env_kwargs={"corridor_length": 20}, net="mlp",
               ppo={**PPO_TMAZE_LONG}, dqn=dict(DQN_GRID),
               description="T-maze with a 20-step corridor: a longer memory span"),
        Preset("minigrid-memory-s7", "MiniGrid-MemoryS7-v0", "minigrid", net="mlp", ppo=dict(PPO_MINIGRID),
               dqn=dict(DQN_GRID), description="MiniGrid MemoryS7: see an object, walk, pick its match"),
        Preset("minigrid-tmaze", MINIGRID_TMAZE_ID, "minigrid", env_kwargs={"size": 7, "agent_view_size": 3},
               net="mlp", ppo=dict(PPO_MINIGRID_TMAZE), dqn=dict(DQN_GRID),
               description="MiniGrid T-maze (MemoryS7, start by the cue, 3x3 view): feed-forward caps at 50%"),
        Preset("minigrid-memory-s9", "MiniGrid-MemoryS9-v0", "minigrid", net="mlp",
               ppo={**PPO_MINIGRID, "total_steps": 3_000_000}, dqn=dict(DQN_GRID),
               description="MiniGrid MemoryS9: a longer hallway"),
        Preset("minigrid-doorkey-5x5", "MiniGrid-DoorKey-5x5-v0", "minigrid", net="mlp",
               ppo={**PPO_MINIGRID, "memory": "none", "total_steps": 300_000}, dqn=dict(DQN_GRID),
               description="MiniGrid DoorKey 5x5: pick up a key, open a door (no memory needed)"),
    ]  # fmt: skip
    return {preset.name: preset for preset in presets}


PRESETS: dict[str, Preset] = _build_presets()


def names() -> list[str]:
    """Returns the preset names, in table order (Mario stages first)."""
    return list(PRESETS)


def get_preset(name: str) -> Preset:
    """Returns a copy of the preset called ``name`` (so callers cannot change the table).

    Raises:
        ValueError: ``name`` is no preset; the message suggests close matches.
    """
    if name in PRESETS:
        return copy.deepcopy(PRESETS[name])
    lowered = {key.lower(): key for key in PRESETS}
    if name.lower() in lowered:
        return copy.deepcopy(PRESETS[lowered[name.lower()]])
    raise ValueError(_unknown_message(name))


def _unknown_message(name: str) -> str:
    candidates = list(PRESETS) + [env_id for env_id in gym.registry if _usable_id(env_id)]
    matches = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    if not matches:  # case-insensitive second try: "Cartpole-V1" -> "CartPole-v1"
        lowered = {candidate.lower(): candidate for candidate in candidates}
        matches = [
            lowered[m] for m in difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.6)
        ]
    hint = f"did you mean {', '.join(repr(m) for m in matches)}? " if matches else ""
    return f"unknown env {name!r}; {hint}see `lab list envs`"


def _usable_id(env_id: str) -> bool:
    # Hide the registry's internal/aliased clutter from suggestions, not from resolve().
    return not env_id.startswith(("phys2d/", "tabular/")) and "Alias" not in env_id


def resolve(name: str) -> Preset:
    """Returns the preset called ``name``, or one built on the fly for a registered Gymnasium id.

    Ids of gym-super-mario-bros get the Mario stack; MiniGrid ids the one-hot grid encoding;
    other ids default wrappers by observation type (see :func:`envs.factory.make`).

    Raises:
        ValueError: neither a preset nor a registered id; the message suggests close matches.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"env name must be a non-empty string, got {name!r}")
    try:
        return get_preset(name)
    except ValueError:
        pass
    for preset in PRESETS.values():  # an id that a preset wraps gets that preset's defaults
        if preset.env_id == name:
            return copy.deepcopy(preset)
    if name not in gym.registry:
        raise ValueError(_unknown_message(name))
    if name not in _ON_THE_FLY:  # building one costs an env construction: once per id and process
        _ON_THE_FLY[name] = _preset_for_id(name)
    return copy.deepcopy(_ON_THE_FLY[name])


_ON_THE_FLY: dict[str, Preset] = {}


def _preset_for_id(name: str) -> Preset:
    if name.startswith("SuperMarioBros"):
        return _mario(name, name, f"{name} with the Mario stack")
    if name.startswith("MiniGrid-") or name.startswith("BabyAI-"):
        return Preset(name, name, "minigrid", net="mlp", ppo=dict(PPO_MINIGRID), dqn=dict(DQN_GRID),
                      description=f"{name} (one-hot partial view)")  # fmt: skip
    # Build it once to learn its spaces: the action space must be discrete (PPO and DQN here are
    # for discrete actions), and the observation type picks the encoder and hyperparameters.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # old -v0 ids print multi-line deprecation notes
            env = gym.make(name)
    except ImportError as error:  # DependencyNotInstalled, a missing physics package...
        raise ValueError(f"env {name!r} needs a package that is not installed: {error}") from None
    try:
        action_space, observation_space = env.action_space, env.observation_space
    finally:
        env.close()
    if not isinstance(action_space, gym.spaces.Discrete):
        raise ValueError(
            f"env {name!r} has action space {action_space}; only Discrete action spaces are supported"
        )
    if is_image_space(observation_space):
        return Preset(name, name, "gym", net="nature", ppo=dict(PPO_IMAGE), dqn=dict(DQN_IMAGE),
                      description=f"{name} (image observations: gray, 84x84, 4 stacked)")  # fmt: skip
    return Preset(name, name, "gym", net="mlp", ppo=dict(PPO_CLASSIC), dqn=dict(DQN_CARTPOLE),
                  description=f"{name} (registered Gymnasium id)")  # fmt: skip


def is_image_space(space: gym.Space) -> bool:
    """True for uint8 Box spaces shaped like a picture: (H, W) or (H, W, 1|3) with H, W >= 16."""
    if not isinstance(space, gym.spaces.Box) or space.dtype != np.uint8:
        return False
    shape = space.shape
    return (len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3))) and min(shape[:2]) >= 16


def _import_env_packages() -> None:
    """Registers the ids of the env packages the presets use, once, on import of ``envs``."""
    import gym_super_mario_bros  # noqa: F401

    # minigrid is a dependency; were it missing, only the MiniGrid presets would fail.
    with contextlib.suppress(ImportError):
        import minigrid  # noqa: F401
    register_envs()


_import_env_packages()
