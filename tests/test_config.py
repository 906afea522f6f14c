"""--set overrides: parsed by the field's type, checked against its range metadata."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from core.config import ConfigError, apply_overrides, describe, validate


@dataclass
class Example:
    steps: int = field(default=10, metadata={"min": 1})
    lr: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0})
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    widths: tuple[int, ...] = (64, 64)
    limit: float | None = None
    name: str = field(default="x", metadata={"choices": ("x", "y")})


def test_values_are_parsed_by_type():
    config = apply_overrides(
        Example(), ["steps=1e3", "lr=0.5", "flag=true", "mode=b", "widths=32,16", "limit=none", "name=y"]
    )
    assert config == Example(steps=1000, lr=0.5, flag=True, mode="b", widths=(32, 16), limit=None, name="y")
    assert apply_overrides(Example(), ["limit=0.25"]).limit == 0.25


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("steps", "expects key=value"),
        ("stepz=3", "did you mean steps"),
        ("steps=abc", "expects an integer"),
        ("steps=2.5", "expects an integer"),
        ("steps=0", "must be >= 1"),
        ("lr=2", "must be <= 1.0"),
        ("lr=nan", "finite number"),
        ("flag=maybe", "boolean"),
        ("mode=c", "choose from: a, b"),
        ("name=z", "choose from: x, y"),
        ("widths=1,a", "expects an integer"),
    ],
)
def test_bad_overrides_raise_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as error:
        apply_overrides(Example(), [override])
    assert "\n" not in str(error.value)


def test_validate_checks_ranges_of_values_set_in_code():
    validate(Example())
    with pytest.raises(ConfigError):
        validate(Example(steps=0))


def test_a_redefaulted_field_keeps_the_base_fields_help_bounds_and_place():
    from agents.dqn import DQNConfig
    from agents.engine import AgentConfig
    from core.config import config_fields, redefault

    base, dqn = config_fields(AgentConfig), config_fields(DQNConfig)
    assert list(dqn)[: len(base)] == list(base)  # the shared fields first, in their order
    for name in ("total_steps", "num_envs", "hidden", "learning_rate", "max_grad_norm", "eval_every"):
        assert dqn[name].metadata == base[name].metadata and dqn[name].default != base[name].default
    with pytest.raises(ConfigError, match="must be >= 1"):
        apply_overrides(DQNConfig(), ["num_envs=0"])  # the base's bound holds
    with pytest.raises(KeyError):
        redefault(AgentConfig, "no_such_field", 1)


def test_listings_show_a_literals_choices_and_an_optional_type():
    types = {name: type_name for name, type_name, _default, _help in describe(Example)}
    assert types == {
        "steps": "int", "lr": "float", "flag": "bool", "mode": "a|b", "widths": "tuple[int, ...]",
        "limit": "float | None", "name": "str",
    }  # fmt: skip
