"""Typed stage configs: one frozen dataclass per stage, read from one section of a params file.

`--set section.key=value` overrides are parsed as YAML scalars; unknown sections or keys and values of the
wrong type are `ConfigError`s that name the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from alignpipe.core.errors import ConfigError

DEFAULT_PARAMS = "params.yaml"


def field(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its one-line help (shown by `--help` and in the docs)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Base of every stage config. Subclasses are frozen dataclasses whose fields use `field(default, help)`."""

    @classmethod
    def section(cls) -> str:
        """The params.yaml section this config is read from (the stage name)."""
        return getattr(cls, "SECTION")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "StageConfig":
        """Build the config from a dict, checking keys and types; errors name `section.key`."""
        values = dict(values or {})
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(
                f"{cls.section()}.{unknown[0]}",
                f"unknown key; allowed keys: {', '.join(sorted(fields))}",
            )
        kwargs = {k: _coerce(f"{cls.section()}.{k}", v, hints[k]) for k, v in values.items()}
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ConfigError(cls.section(), str(e)) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the values (for MLflow params, KFP parameters and metadata files)."""
        return dataclasses.asdict(self)

    def check(self, cond: bool, key: str, message: str) -> None:
        """Raise a ValueError naming `section.key` and its value unless `cond` holds."""
        if not cond:
            raise ValueError(f"{self.section()}.{key} {message}, got {getattr(self, key)!r}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats. Raises ConfigError."""
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
    elif origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [_coerce(f"{key}[{i}]", v, get_args(tp)[0]) for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # PyYAML (YAML 1.1) reads 1e-3 and 5e-5 as strings: exponent without a dot
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config type {tp!r} for {key}")
    raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Read a params YAML file: a mapping of section name -> mapping of key -> value."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "params file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), f"not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(str(path), "expected a mapping of sections, each a mapping of key: value")
    return data


def apply_overrides(params: dict[str, Any], sets: list[str] | None, known: dict[str, type] | None = None) -> dict:
    """Apply `section.key=value` overrides (values parsed as YAML) to a copy of `params`."""
    out = {k: dict(v) for k, v in params.items()}
    for item in sets or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(item, "--set expects section.key=value")
        dotted, raw = item.split("=", 1)
        section, key = dotted.split(".", 1)
        if known is not None:
            if section not in known:
                raise ConfigError(dotted, f"unknown section {section!r}; sections: {', '.join(sorted(known))}")
            names = {f.name for f in dataclasses.fields(known[section])}
            if key not in names:
                raise ConfigError(dotted, f"unknown key; allowed keys: {', '.join(sorted(names))}")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.setdefault(section, {})[key] = value
    return out


def build_config(cls: type[StageConfig], params: dict[str, Any]) -> StageConfig:
    """The config of one stage from a whole params dict (its section may be absent: all defaults)."""
    return cls.from_dict(params.get(cls.section(), {}))
