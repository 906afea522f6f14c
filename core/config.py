"""The config schema of agents and tasks: one way to declare a field, one way to set it.

Every config is a dataclass whose fields are declared with :func:`option` (default, help, and where
they apply ``min``/``max``/``choices``). Values given as text (``--set key=value``) are parsed by the
field's annotated type (int, float, bool, str, ``Literal[...]``, ``tuple[int, ...]``, ``X | None``)
and checked against that metadata; dictionaries (presets, resumed ``config.json`` files, benchmark
settings) go through :func:`config_from_dict`. An unknown key is an error that names close matches,
never a value that silently vanishes.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A malformed or out-of-range override; the message is one line fit for the user."""


def option(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    choices: tuple | None = None,
) -> Any:
    """Declares a config field: a ``dataclasses.field`` whose metadata the setters validate against.

    Args:
        default: the default value (immutable: ints, floats, strings, tuples, None).
        help: one-line description shown by ``--help-config``.
        min: smallest allowed value (inclusive), for numbers and each item of a tuple.
        max: largest allowed value (inclusive).
        choices: the allowed values.

    Returns:
        A ``dataclasses.field`` carrying ``metadata={"help", "min", "max", "choices"}``.
    """
    metadata: dict[str, Any] = {"help": help}
    if min is not None:
        metadata["min"] = min
    if max is not None:
        metadata["max"] = max
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return dataclasses.field(default=default, metadata=metadata)


def redefault(base: type, name: str, default: Any) -> Any:
    """A subclass's field that only changes the default of ``base``'s field ``name``: its help and
    bounds stay declared once, in ``base``. The field keeps its place among ``base``'s fields."""
    return dataclasses.field(default=default, metadata=config_fields(base)[name].metadata)


def config_fields(config_class: type) -> dict[str, dataclasses.Field]:
    """The fields of a config dataclass by name."""
    return {f.name: f for f in dataclasses.fields(config_class)}


def unknown_key_message(key: str, valid: list[str] | set[str] | dict, where: str = "config key") -> str:
    """``unknown config key 'lr' (did you mean learning_rate?); valid keys: ...`` in one line."""
    close = difflib.get_close_matches(key, list(valid), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"unknown {where} {key!r}{hint}; valid keys: {', '.join(sorted(valid))}"


def config_from_dict(config_class: type, values: dict[str, Any], source: str = "") -> Any:
    """Builds a config from a dictionary (a preset, a run's ``config.json``, benchmark settings).

    JSON lists become tuples. A key the config does not have raises instead of vanishing.

    Args:
        config_class: the config dataclass.
        values: field values; missing fields keep their defaults.
        source: where the values come from, for the message (``"runs/x/config.json"``).

    Raises:
        ConfigError: an unknown key, naming close matches and where it came from.
    """
    fields = config_fields(config_class)
    for key in values:
        if key not in fields:
            origin = f" in {source}" if source else ""
            raise ConfigError(unknown_key_message(key, fields) + origin)
    return config_class(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()})


def apply_overrides(config: Any, overrides: list[str] | None) -> Any:
    """Returns a copy of dataclass ``config`` with ``key=value`` overrides applied and validated.

    Raises:
        ConfigError: unknown key (with close matches), unparsable value, or value out of range.
    """
    if not overrides:
        return config
    fields = config_fields(type(config))
    hints = get_type_hints(type(config))
    changes: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = (part.strip() for part in item.split("=", 1))
        key = key.replace("-", "_")
        if key not in fields:
            raise ConfigError(unknown_key_message(key, fields))
        changes[key] = parse_value(key, raw, hints[key], fields[key].metadata)
    return dataclasses.replace(config, **changes)


def validate(config: Any) -> None:
    """Checks every field of ``config`` against its range metadata (for values set in code or files)."""
    for name, field in config_fields(type(config)).items():
        _check_range(name, getattr(config, name), field.metadata)
    # Fields that must agree with each other (an algorithm's config may say so in ``check``).
    check = getattr(config, "check", None)
    if check is not None:
        try:
            check()
        except ValueError as error:
            raise ConfigError(str(error)) from None


def parse_value(key: str, raw: str, annotation: Any, metadata: typing.Mapping[str, Any]) -> Any:
    value = _parse_typed(key, raw, annotation)
    _check_range(key, value, metadata)
    return value


def _parse_typed(key: str, raw: str, annotation: Any) -> Any:
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        if type(None) in get_args(annotation) and raw.lower() in ("none", "null", ""):
            return None
        errors = []
        for option in options:
            try:
                return _parse_typed(key, raw, option)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{key}: cannot parse {raw!r}")
    if origin is Literal:
        choices = get_args(annotation)
        for choice in choices:
            if str(choice) == raw:
                return choice
        raise ConfigError(f"{key}={raw!r} is not valid; choose from: {', '.join(map(str, choices))}")
    if origin is tuple:
        args = get_args(annotation)
        item_type = args[0] if args else str
        parts = [p for p in raw.strip("()[] ").split(",") if p.strip()]
        return tuple(_parse_typed(key, p.strip(), item_type) for p in parts)
    if annotation is bool:
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} expects a boolean (true/false), got {raw!r}")
    if annotation is int:
        try:
            return int(float(raw)) if _is_integral_float(raw) else int(raw)
        except ValueError:
            raise ConfigError(f"{key} expects an integer, got {raw!r}") from None
    if annotation is float:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{key} expects a number, got {raw!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{key} expects a finite number, got {raw!r}")
        return value
    if annotation is str:
        return raw
    raise ConfigError(f"{key} cannot be set from the command line")


def _is_integral_float(raw: str) -> bool:
    # Accept 1e6 or 2.0 for integer fields (step counts are often written that way), not 2.5.
    try:
        value = float(raw)
    except ValueError:
        return False
    return value.is_integer() and any(c in raw for c in ".eE") and abs(value) < 2**62


def _check_range(key: str, value: Any, metadata: typing.Mapping[str, Any]) -> None:
    if value is None:
        return
    choices = metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose from: {', '.join(map(str, choices))}")
    values = value if isinstance(value, tuple) else (value,)
    for item in values:
        if isinstance(item, bool) or not isinstance(item, int | float):
            continue
        if "min" in metadata and item < metadata["min"]:
            raise ConfigError(f"{key}={value!r} is out of range; it must be >= {metadata['min']}")
        if "max" in metadata and item > metadata["max"]:
            raise ConfigError(f"{key}={value!r} is out of range; it must be <= {metadata['max']}")


def describe(config_class: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for every field, for ``--help`` listings."""
    hints = get_type_hints(config_class)
    rows = []
    for field in dataclasses.fields(config_class):
        default = field.default if field.default is not dataclasses.MISSING else None
        rows.append((field.name, type_label(hints[field.name]), default, field.metadata.get("help", "")))
    return rows


def type_label(annotation: Any) -> str:
    """A field's type as a listing shows it: a ``Literal``'s choices (``sync|async|ray``), ``X | None``
    for an optional field, else the type's name (``int``, ``tuple[int, ...]``)."""
    origin = get_origin(annotation)
    if origin is Literal:
        return "|".join(map(str, get_args(annotation)))
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if arg is type(None) else type_label(arg) for arg in get_args(annotation))
    if origin is not None:
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", str(annotation))
