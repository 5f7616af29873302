"""Typed stage configs: one frozen dataclass per stage, read from one section of a params file.

`--set section.key=value` overrides are parsed as YAML scalars; unknown sections or keys and values of the
wrong type are `ConfigError`s that name the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from pathlib import Path
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

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
    """Base of every stage config. Subclasses are frozen dataclasses whose fields use `field(default, help)`.
    `RENAMED` maps a key's old name to its new one: an old key gets one line naming the new key."""

    RENAMED: ClassVar[dict[str, str]] = {}

    @classmethod
    def section(cls) -> str:
        """The params.yaml section this config is read from (the stage name)."""
        return getattr(cls, "SECTION")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "StageConfig":
        """Build the config from a dict, checking keys and types; errors name `section.key`."""
        values = dict(values or {})
        hints = typing.get_type_hints(cls)
        for key in sorted(values):
            cls.check_key(key)
        kwargs = {k: _coerce(f"{cls.section()}.{k}", v, hints[k]) for k, v in values.items()}
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ConfigError(cls.section(), str(e)) from None

    @classmethod
    def check_key(cls, key: str) -> None:
        """A ConfigError naming `section.key` unless `key` is one of this config's fields (an old name: the new)."""
        names = {f.name for f in dataclasses.fields(cls)}
        if key in names:
            return
        if key in cls.RENAMED:
            raise ConfigError(f"{cls.section()}.{key}", f"renamed to {cls.section()}.{cls.RENAMED[key]}")
        raise ConfigError(f"{cls.section()}.{key}", f"unknown key; allowed keys: {', '.join(sorted(names))}")

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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, int) and abs(value) > 2 ** 1023 or not math.isfinite(value):
                raise ConfigError(key, f"must be a finite number, got {str(value)[:40]}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config type {tp!r} for {key}")
    raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")


OVERLAY_KEY = "overlay"  # a params file with `overlay: FILE` lists only what it changes on top of FILE


def _read_params_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(str(path), "params file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), f"not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:  # PyYAML builds nested collections recursively
        raise ConfigError(str(path), "YAML nested too deep") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "expected a mapping of sections, each a mapping of key: value")
    base = data.pop(OVERLAY_KEY, None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: {OVERLAY_KEY}", f"expected the path of the params file it overlays, got {base!r}")
    if not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(str(path), "expected a mapping of sections, each a mapping of key: value")
    return {"base": base, "sections": data}


def params_layers(path: str | Path = DEFAULT_PARAMS) -> list[tuple[str, dict[str, Any]]]:
    """The params files `path` stands for, base first: `(file, sections)` for each file of its overlay chain.
    An overlay's `overlay: FILE` is resolved relative to the overlay's own folder."""
    layers: list[tuple[str, dict[str, Any]]] = []
    seen: set[Path] = set()
    current: Path | None = Path(path)
    while current is not None:
        if current.resolve() in seen:
            raise ConfigError(str(current), f"{OVERLAY_KEY} chain loops back to this file")
        seen.add(current.resolve())
        data = _read_params_file(current)
        layers.insert(0, (str(current), data["sections"]))
        current = Path(os.path.normpath(current.parent / data["base"])) if data["base"] is not None else None
    return layers


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Read a params YAML file (a mapping of section -> mapping of key -> value), layered on the file it
    overlays (`overlay: FILE`, recursively): a key an overlay does not list keeps the base file's value."""
    merged: dict[str, dict[str, Any]] = {}
    for _, sections in params_layers(path):
        for section, values in sections.items():
            merged.setdefault(section, {}).update(values)
    return merged


def effective_params(path: str | Path, sets: list[str] | None, known: Mapping[str, type]
                     ) -> dict[str, dict[str, tuple[Any, str]]]:
    """Every key of every known section as `(value, origin)`: origin is `default` (the Config dataclass), the
    params file that set it last (`params.yaml`, an overlay) or `--set`. What `alignpipe config show` prints."""
    layers = params_layers(path)
    out: dict[str, dict[str, tuple[Any, str]]] = {}
    for section in known:
        cls = known[section]
        values: dict[str, tuple[Any, str]] = {
            f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory(), "default")
            for f in dataclasses.fields(cls)}
        for name, sections in layers:
            for k, v in (sections.get(section) or {}).items():
                values[k] = (v, name)
        for k, v in apply_overrides({}, sets, known).get(section, {}).items():
            values[k] = (v, "--set")
        cfg = cls.from_dict({k: v for k, (v, _) in values.items()}).to_dict()  # checked and coerced
        out[section] = {k: (cfg[k], values[k][1]) for k in cfg}
    return out


def apply_overrides(params: dict[str, Any], sets: list[str] | None, known: Mapping[str, type] | None = None) -> dict:
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
            known[section].check_key(key)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        except RecursionError:
            raise ConfigError(dotted, "value nested too deep") from None
        out.setdefault(section, {})[key] = value
    return out


def build_config(cls: type[StageConfig], params: dict[str, Any]) -> StageConfig:
    """The config of one stage from a whole params dict (its section may be absent: all defaults)."""
    return cls.from_dict(params.get(cls.section(), {}))
