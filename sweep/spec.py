"""What a sweep searches: ``--param NAME=SPEC`` parsing, the configurations drawn, ``sweep.json``.

A SPEC names how a config field varies::

    uniform:LO:HI       a number drawn uniformly in [LO, HI] (an integer field draws integers)
    loguniform:LO:HI    a number whose logarithm is uniform (learning rates); 0 < LO
    randint:LO:HI       an integer in [LO, HI], both ends included
    choice:A,B,...      one of the values, drawn at random
    grid:A,B,...        every one of the values (the configurations are the grid times the draws)

Values are parsed and range-checked by the field's declared type (``core.config``): ``choice:64,128``
on ``num_steps`` gives ints, ``choice:(64,64),(128,128)`` on ``hidden`` gives tuples, and
``uniform:0.9:1.5`` on ``gamma`` fails because gamma is at most 1.

The configurations are drawn up front, from a seeded generator, rather than by Tune's search
algorithm as trials start: every seed of a configuration must train the same values, the trial
directories are named by the configuration (``trials/<key>-seed<k>``), and ``sweep.json`` holds
the whole plan, so that ``lab sweep --resume DIR`` needs nothing else. Tune then runs the grid of
configurations x seeds, and its scheduler (ASHA) decides which trials go on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, get_args, get_origin, get_type_hints

import numpy as np

from core.config import (
    ConfigError,
    apply_overrides,
    config_fields,
    parse_value,
    unknown_key_message,
    validate,
)
from core.files import atomic_write_json, jsonable

SPEC_KINDS = ("uniform", "loguniform", "randint", "choice", "grid")
SPEC_HELP = "uniform:LO:HI, loguniform:LO:HI, randint:LO:HI, choice:A,B,... or grid:A,B,..."
# Fields a sweep sets itself, and what to give instead.
NOT_SWEPT = {
    "seed": "seeds are repeated per configuration: give --seeds K (and --set seed=S for the first)",
    "env": "a sweep trains one env: give it as PRESET_OR_ENV",
    "total_steps": "give --steps S, the budget each trial (and ASHA) works with",
}
#: Eval summary keys a sweep can rank by (all of them: higher is better); Mario adds two.
METRICS = ("return_mean", "clear_rate", "x_pos_mean")
MARIO_METRICS = ("clear_rate", "x_pos_mean")
SCHEDULERS = ("asha", "none")
SWEEP_FILE = "sweep.json"
SWEEP_FORMAT_VERSION = 1
#: Periodic greedy evaluations per trial when the preset or ``--set eval_every`` does not say.
EVALS_PER_TRIAL = 10
# Drawn floats keep 4 significant digits: tables and labels stay readable, and no tuning result
# depends on the fifth digit of a learning rate.
SIGNIFICANT_DIGITS = 4


class SweepError(ValueError):
    """Bad sweep input (a malformed SPEC, a field the config lacks, not a sweep directory): one line."""


# ---------------------------------------------------------------------------------------------
# --param NAME=SPEC
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSpec:
    """How one config field varies across a sweep.

    Attributes:
        name: the config field.
        kind: one of :data:`SPEC_KINDS`.
        low: the lower bound of ``uniform``, ``loguniform`` and ``randint``.
        high: their upper bound (included).
        values: the values of ``choice`` and ``grid``, typed like the field.
        integer: the field holds integers (``uniform`` and ``loguniform`` round their draws).
        text: the SPEC as given, for ``sweep.json`` and messages.
    """

    name: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    values: tuple[Any, ...] = ()
    integer: bool = False
    text: str = ""

    def sample(self, rng: np.random.Generator) -> Any:
        """One value drawn with ``rng`` (``grid`` specs are enumerated, not drawn)."""
        if self.kind in ("choice", "grid"):
            return self.values[int(rng.integers(len(self.values)))]
        if self.kind == "randint":
            return int(rng.integers(int(self.low), int(self.high) + 1))
        if self.kind == "loguniform":
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        if self.integer:
            return int(min(max(round(value), self.low), self.high))
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def parse_param(text: str, config_class: type) -> ParamSpec:
    """``"learning_rate=loguniform:1e-5:1e-3"`` -> a :class:`ParamSpec` for a field of ``config_class``.

    Raises:
        SweepError: not NAME=SPEC, a field the config lacks (with close matches), one a sweep sets
            itself, an unknown kind, bounds out of order or out of the field's range, a value the
            field's type does not parse.
    """
    name, sep, spec = (part.strip() for part in text.partition("="))
    name = name.replace("-", "_")
    if not sep or not name or not spec:
        raise SweepError(f"--param expects NAME=SPEC with SPEC one of {SPEC_HELP}; got {text!r}")
    fields = config_fields(config_class)
    if name in NOT_SWEPT:
        raise SweepError(f"--param {name}: {NOT_SWEPT[name]}")
    if name not in fields:
        raise SweepError(unknown_key_message(name, fields, where="--param key"))
    kind, sep, rest = spec.partition(":")
    if kind not in SPEC_KINDS or not sep or not rest.strip():
        raise SweepError(f"--param {name}={spec}: malformed SPEC; valid: {SPEC_HELP}")
    annotation = get_type_hints(config_class)[name]
    metadata = fields[name].metadata
    try:
        if kind in ("choice", "grid"):
            items = split_values(rest)
            if any(not item for item in items):
                raise SweepError(f"{kind} has an empty value")
            values = tuple(dict.fromkeys(parse_value(name, item, annotation, metadata) for item in items))
            return ParamSpec(name, kind, values=values, text=spec)
        return _range_spec(name, kind, rest, annotation, metadata, spec)
    except ConfigError as error:  # the field's own type or range refused a value
        raise SweepError(f"--param {name}={spec}: {error}") from None
    except SweepError as error:
        message = str(error)
        if message.startswith("--param"):
            raise
        raise SweepError(f"--param {name}={spec}: {message}") from None


def _range_spec(
    name: str, kind: str, rest: str, annotation: Any, metadata: typing.Mapping[str, Any], spec: str
) -> ParamSpec:
    number = number_type(annotation)
    if number is None:
        raise SweepError(f"{kind} needs a numeric field; give choice:A,B,... instead")
    if kind == "randint" and number is not int:
        raise SweepError("randint needs an integer field; give uniform:LO:HI for a float")
    bounds = rest.split(":")
    if len(bounds) != 2 or not all(b.strip() for b in bounds):
        raise SweepError(f"{kind} takes two bounds, {kind}:LO:HI")
    low, high = (parse_value(name, bound.strip(), number, metadata) for bound in bounds)
    if not low < high:
        raise SweepError(f"LO must be below HI, got {low} and {high}")
    if kind == "loguniform" and low <= 0:
        raise SweepError(f"loguniform needs 0 < LO, got {low}")
    return ParamSpec(name, kind, low=low, high=high, integer=number is int, text=spec)


def number_type(annotation: Any) -> type | None:
    """``int`` or ``float`` for a numeric field (``float | None`` included), else None."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        options = [option for option in get_args(annotation) if option is not type(None)]
        return number_type(options[0]) if len(options) == 1 else None
    return annotation if annotation in (int, float) else None


def split_values(text: str) -> list[str]:
    """``"(64,64),(128,128)"`` -> ``["(64,64)", "(128,128)"]``: commas inside brackets stay."""
    items, depth, current = [], 0, []
    for char in text:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        if char == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    items.append("".join(current).strip())
    return items


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Configuration:
    """One point of the search: the swept fields' values, named by a short hash of them."""

    key: str
    params: dict[str, Any]

    def label(self) -> str:
        """``learning_rate=0.001 num_minibatches=4`` (the key when nothing is swept)."""
        return " ".join(f"{name}={value_text(value)}" for name, value in self.params.items()) or self.key


def config_key(params: dict[str, Any]) -> str:
    """8 hex digits of the SHA-1 of the values: the same values give the same key in every sweep."""
    text = json.dumps(jsonable(params), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def value_text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "(" + ",".join(value_text(item) for item in value) + ")"
    if isinstance(value, float):
        return f"{value:.{SIGNIFICANT_DIGITS}g}"
    return str(value)


def draw_configurations(specs: list[ParamSpec], samples: int, seed: int) -> list[Configuration]:
    """Every point of the ``grid`` specs times ``samples`` draws of the others, duplicates dropped.

    Without random specs the grid is taken once (more samples would repeat it); without any spec
    there is one configuration, the base config. ``seed`` makes the draws reproducible.
    """
    rng = np.random.default_rng(seed)
    grid = [spec for spec in specs if spec.kind == "grid"]
    drawn = [spec for spec in specs if spec.kind != "grid"]
    configurations: dict[str, Configuration] = {}
    for point in itertools.product(*(spec.values for spec in grid)):
        fixed = {spec.name: value for spec, value in zip(grid, point, strict=True)}
        for _ in range(samples if drawn else 1):
            values = {**fixed, **{spec.name: spec.sample(rng) for spec in drawn}}
            params = {spec.name: values[spec.name] for spec in specs}  # in the order given
            key = config_key(params)
            configurations.setdefault(key, Configuration(key, params))
    return list(configurations.values())


# ---------------------------------------------------------------------------------------------
# The sweep's plan: sweep.json
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepSpec:
    """Everything ``lab sweep`` decided before the first trial: the plan ``--resume`` continues.

    Attributes:
        env: the preset (or Gymnasium id) every trial trains.
        algo: ``ppo`` or ``dqn``.
        base: the trial config before the swept values and the seed (JSON values).
        params: the swept fields and their SPECs as given.
        configurations: the configurations drawn.
        seeds: the seeds each configuration trains with.
        metric: the eval summary key the sweep ranks by (higher is better).
        scheduler: ``asha`` (stop poor trials early) or ``none``.
        trial_cpus: Ray CPUs each trial asks for.
        address: the Ray cluster the sweep ran on (``local``, ``auto``, ``ray://host:port``).
        sample_seed: the seed of the configurations' draws.
        created: when the sweep began (local time, ISO 8601).
    """

    env: str
    algo: str
    base: dict[str, Any]
    params: dict[str, str]
    configurations: tuple[Configuration, ...]
    seeds: tuple[int, ...]
    metric: str = "return_mean"
    scheduler: str = "asha"
    trial_cpus: float = 1.0
    address: str = "local"
    sample_seed: int = 0
    created: str = ""

    @property
    def total_steps(self) -> int:
        return int(self.base["total_steps"])

    @property
    def eval_every(self) -> int:
        return int(self.base["eval_every"])

    def configuration(self, key: str) -> Configuration:
        for configuration in self.configurations:
            if configuration.key == key:
                return configuration
        raise SweepError(f"this sweep has no configuration {key!r}")

    def trials(self) -> list[tuple[Configuration, int]]:
        """Every (configuration, seed) pair, configuration by configuration."""
        return [(configuration, seed) for configuration in self.configurations for seed in self.seeds]

    def trial_config(self, configuration: Configuration, seed: int) -> tuple[ModuleType, Any]:
        """``(algorithm module, config)`` of one trial: the base, the configuration's values, the seed."""
        import agents

        module = agents.algo_module(self.algo)
        values = {**self.base, **configuration.params, "seed": seed}
        config = module.config_from_dict(values, source=f"sweep configuration {configuration.key}")
        validate(config)
        return module, config

    def to_json(self) -> dict[str, Any]:
        data = jsonable(dataclasses.asdict(self))
        return {"sweep_format_version": SWEEP_FORMAT_VERSION, **data}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SweepSpec:
        values = {key: value for key, value in data.items() if key != "sweep_format_version"}
        values["configurations"] = tuple(Configuration(**item) for item in values["configurations"])
        values["seeds"] = tuple(values["seeds"])
        return cls(**values)


def write_sweep(sweep_dir: Path, spec: SweepSpec) -> None:
    atomic_write_json(Path(sweep_dir) / SWEEP_FILE, spec.to_json())


def read_sweep(sweep_dir: str | Path) -> SweepSpec:
    """The plan in ``DIR/sweep.json``.

    Raises:
        SweepError: no such directory, no ``sweep.json`` in it, or one this lab cannot read.
    """
    path = Path(sweep_dir) / SWEEP_FILE
    if not Path(sweep_dir).is_dir():
        raise SweepError(f"{sweep_dir} does not exist; give the directory of a sweep (it holds {SWEEP_FILE})")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SweepError(
            f"{sweep_dir} is not a sweep directory (no {SWEEP_FILE}); start one with "
            "`lab sweep PRESET --param NAME=SPEC ... --dir DIR`"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SweepError(f"{path} is unreadable ({error})") from None
    version = data.get("sweep_format_version") if isinstance(data, dict) else None
    if version != SWEEP_FORMAT_VERSION:
        raise SweepError(f"{path} has sweep format {version!r}; this lab reads {SWEEP_FORMAT_VERSION}")
    try:
        return SweepSpec.from_json(data)
    except (TypeError, KeyError, ValueError) as error:
        raise SweepError(f"{path} is not a valid sweep file ({error})") from None


def new_sweep(
    env: str,
    algo: str,
    params: list[str],
    sets: list[str] | None = None,
    seeds: int = 2,
    samples: int = 8,
    steps: int | None = None,
    metric: str = "return_mean",
    scheduler: str = "asha",
    trial_cpus: float = 1.0,
    address: str = "local",
    sample_seed: int = 0,
) -> SweepSpec:
    """Plans a sweep: the preset's config, ``--steps`` and ``--set``, the trial defaults, the draws.

    Trials default to ``threads`` = the CPUs each asks for (one core each, so trials do not fight
    over cores), :data:`EVALS_PER_TRIAL` periodic greedy evaluations (what ASHA judges) and a
    checkpoint at each of them (a resumed trial loses at most one interval).

    Raises:
        SweepError, ConfigError, ValueError: bad input, one line each; nothing is written.
    """
    import agents
    import envs

    preset = envs.resolve(env)
    module = agents.algo_module(algo)
    config = module.config_from_dict(getattr(preset, module.ALGO) or {}, source=f"preset {preset.name!r}")
    config = dataclasses.replace(config, env=preset.name, **({"total_steps": steps} if steps else {}))
    sets = list(sets or [])
    set_keys = {item.partition("=")[0].strip().replace("-", "_") for item in sets}
    if "env" in set_keys:
        raise SweepError(f"--set env: {NOT_SWEPT['env']}")
    config = apply_overrides(config, sets)
    defaults: dict[str, Any] = {}
    if "threads" not in set_keys:
        defaults["threads"] = max(1, int(trial_cpus))
    if "eval_every" not in set_keys:
        defaults["eval_every"] = max(1, config.total_steps // EVALS_PER_TRIAL)
    if "checkpoint_every" not in set_keys:
        defaults["checkpoint_every"] = (
            defaults.get("eval_every") or config.eval_every or config.checkpoint_every
        )
    config = dataclasses.replace(config, **defaults)
    validate(config)
    if metric not in METRICS:
        raise SweepError(f"unknown --metric {metric!r}; valid: {', '.join(METRICS)}")
    if metric in MARIO_METRICS and preset.kind != "mario":
        raise SweepError(f"--metric {metric} applies to Mario presets only; {preset.name} has return_mean")
    if scheduler not in SCHEDULERS:
        raise SweepError(f"unknown --scheduler {scheduler!r}; valid: {', '.join(SCHEDULERS)}")
    if scheduler == "asha" and not config.eval_every:
        raise SweepError(
            "--scheduler asha judges periodic evaluations: set eval_every > 0 (or --scheduler none)"
        )
    specs = [parse_param(text, type(config)) for text in params]
    names = [spec.name for spec in specs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise SweepError(f"--param {twice[0]} is given twice; give each field once")
    configurations = draw_configurations(specs, samples, sample_seed)
    base = jsonable(dataclasses.asdict(config))
    first_seed = base.pop("seed")
    spec = SweepSpec(
        env=preset.name, algo=module.ALGO, base=base, params={s.name: s.text for s in specs},
        configurations=tuple(configurations), seeds=tuple(range(first_seed, first_seed + seeds)),
        metric=metric, scheduler=scheduler, trial_cpus=trial_cpus, address=address, sample_seed=sample_seed,
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )  # fmt: skip
    for configuration in configurations:  # fields that must agree with each other (PPOConfig.check)
        try:
            spec.trial_config(configuration, spec.seeds[0])
        except ValueError as error:
            raise SweepError(f"configuration {configuration.label()} is invalid: {error}") from None
    return spec
