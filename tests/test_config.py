"""--set overrides: parsed by the field's type, checked against its range metadata."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from core.config import ConfigError, apply_overrides, validate


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
