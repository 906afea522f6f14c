"""Argument types shared by the command modules: numbers checked as they are parsed, so that bad
input fails with one line (argparse's ``ArgumentTypeError``, exit 2) before anything runs."""

from __future__ import annotations

import argparse
import math
from typing import Any

STOCHASTIC_HELP = (
    "sample actions from the policy (PPO; DQN: epsilon-greedy at its final epsilon) instead of the greedy "
    "argmax, as the RL Zoo evaluates Atari agents"
)


def add_repeatable(
    parser: argparse.ArgumentParser, flag: str, help: str, dest: str = "overrides", metavar: str = "KEY=VALUE"
) -> None:
    """Adds a repeatable ``flag KEY=VALUE`` option collecting its values in a list at ``dest``
    (``--set`` of train, fit, compress and sweep; ``--param`` of sweep)."""
    parser.add_argument(flag, dest=dest, action="append", default=[], metavar=metavar, help=help)


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def probability(text: str) -> float:
    value = _number(text, float)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _number(text: str, kind: type) -> Any:
    try:
        value = float(text)
        if kind is int:
            if not value.is_integer() or abs(value) > 2**62:
                raise ValueError
            return int(value)
        if math.isnan(value):
            raise ValueError
        return value
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a{'n integer' if kind is int else ' number'}, got {text!r}"
        ) from None
