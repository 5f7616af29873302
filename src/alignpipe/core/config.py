"""Typed stage configs: one frozen dataclass per stage, read from one section of a params file.

`--set section.key=value` overrides are parsed as YAML scalars; unknown sections or keys and values of the
wrong type are `ConfigError`s that name the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path
from collections.abc import Collection, Mapping
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import yaml

from alignpipe.core.errors import ConfigError

DEFAULT_PARAMS = "params.yaml"


# Size policy: the upper bounds of the size fields, so an impossible budget fails when the config is built with one
# line naming the field (not after minutes, in an allocator). Each is far above what this project has run.
MAX_STEPS = 10_000_000        # optimizer steps, iterations, warm-up, logging and checkpoint intervals
MAX_TOKENS = 131_072          # a sequence: context, prompt, completion and new-token caps
MAX_BATCH = 65_536            # rows of one batch, group or generation call
MAX_ROWS = 10_000_000         # prompts, pairs and rows a stage selects
MAX_CHARS = 10_000_000_000    # characters read for a measurement or allowed in a field
MAX_LINES = 1_000_000         # lines of code in a chunk, a prompt or a context
MAX_THREADS = 1024            # CPU threads
MAX_GPUS = 1024               # processes or GPUs of one launch
MAX_REPEATS = 1000            # epochs, retries, repeats, buckets
MAX_SEED = 2 ** 32 - 1        # numpy's seed range
MAX_VOCAB = 1_048_576         # tokenizer vocabulary
MAX_WIDTH = 16_384            # hidden size (GPT-3 175B: 12288), LoRA rank
MAX_LAYERS = 256              # transformer layers, attention heads
MAX_PARAMS = 20_000_000_000   # parameters of a model built from scratch
# (regex, what it is) for `field(..., pattern=)`: MLflow's rules for registered-model names (no / or :, not . or
# ..) and aliases (word characters and -, not numeric, not vN or latest: those name versions), kept to characters
# that are safe in a models:/NAME@ALIAS URI.
MODEL_NAME = (r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}", "a registered-model name (a letter or digit, then letters, digits, "
              "., _ or -; at most 255)")
ALIAS = (r"(?![vV]?\d+$)(?![lL][aA][tT][eE][sS][tT]$)[A-Za-z0-9_-]{1,255}",
         "an alias (letters, digits, _ or -; not a number, vN or latest)")

CONSTRAINTS = ("ge", "gt", "le", "lt", "choices", "nonempty", "pattern", "allow")


def field(default: Any, help: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
          lt: float | None = None, choices: tuple | None = None, nonempty: bool = False,
          pattern: tuple[str, str] | None = None, allow: tuple = ()) -> Any:
    """A config field with its one-line help (shown by `--help` and in the docs) and its constraints, checked when
    the config is built (`StageConfig.__post_init__`): bounds `ge`/`gt`/`le`/`lt` (`allow`: sentinel values
    outside them, e.g. -1 = all), `choices`, `nonempty` (a string with a non-blank character, a list with an item),
    `pattern` = (regex, what it describes) that a string, or each string of a list, must match whole."""
    metadata: dict[str, Any] = {"help": help}
    for key, value in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt), ("choices", choices),
                       ("pattern", pattern)):
        if value is not None:
            metadata[key] = tuple(value) if key == "choices" else value
    if nonempty:
        metadata["nonempty"] = True
    if allow:
        metadata["allow"] = tuple(allow)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _num(x: Any) -> str:
    return repr(x) if isinstance(x, float) and not x.is_integer() else str(int(x)) if isinstance(x, (int, float)) \
        else repr(x)


def _short(value: Any) -> str:
    """repr of a value, cut to one readable line (a value may be a huge int or a long string)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10 ** 30:
        return f"an integer of {len(str(abs(value))) if abs(value) < 10 ** 4000 else 'over 4000'} digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def describe_constraints(f: dataclasses.Field) -> str:
    """The constraints of a field in one phrase (`--help`, docs): e.g. `in [1, 10000000]`, `one of a, b`."""
    m = f.metadata
    parts = []
    lo = ("[", m["ge"]) if "ge" in m else ("(", m["gt"]) if "gt" in m else None
    hi = ("]", m["le"]) if "le" in m else (")", m["lt"]) if "lt" in m else None
    if lo and hi:
        parts.append(f"in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}")
    elif lo:
        parts.append(f"{'>=' if lo[0] == '[' else '>'} {_num(lo[1])}")
    elif hi:
        parts.append(f"{'<=' if hi[0] == ']' else '<'} {_num(hi[1])}")
    if m.get("allow"):
        parts.append("or " + ", ".join(_num(a) for a in m["allow"]))
    if "choices" in m:
        parts.append("one of " + ", ".join(repr(c) if c == "" else str(c) for c in m["choices"]))
    if m.get("nonempty"):
        parts.append("not empty")
    if "pattern" in m:
        parts.append(m["pattern"][1])
    return " ".join(parts)


def _violation(value: Any, m: Mapping[str, Any]) -> str | None:
    """What `value` breaks of the constraints `m` (a field's metadata), as `must be ...`; None when it keeps them."""
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if value in m.get("allow", ()):
        return None
    if "ge" in m and not value >= m["ge"]:
        return f"must be >= {_num(m['ge'])}" + (f" (or {', '.join(_num(a) for a in m['allow'])})" if m.get("allow")
                                               else "")
    if "gt" in m and not value > m["gt"]:
        return f"must be > {_num(m['gt'])}"
    if "le" in m and not value <= m["le"]:
        return f"must be <= {_num(m['le'])}"
    if "lt" in m and not value < m["lt"]:
        return f"must be < {_num(m['lt'])}"
    if "choices" in m and value not in m["choices"]:
        return "must be one of " + ", ".join(repr(c) if c == "" else str(c) for c in m["choices"])
    if m.get("nonempty") and not (value.strip() if isinstance(value, str) else value):
        return "must not be empty"
    if "pattern" in m:
        regex, what = m["pattern"]
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            if not re.fullmatch(regex, item):
                return f"must be {what} ({item!r} is not)" if isinstance(value, (list, tuple)) else f"must be {what}"
    return None


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Base of every stage config. Subclasses are frozen dataclasses whose fields use `field(default, help)`.
    `RENAMED` maps a key's old name to its new one: an old key gets one line naming the new key."""

    RENAMED: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        """Check every field's declared constraints (`field(..., ge=, le=, choices=, ...)`), a group's keys too; a
        group given as a mapping (e.g. `Config(**cfg.to_dict())`) is built on the field's default. A subclass with
        cross-field checks defines `__post_init__`, calling `super().__post_init__()` first."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            group = _group_type(type(self), f.name)
            if group is not None and isinstance(value, Mapping):
                value = group.build(value, f"{self.section()}.{f.name}", _field_default(f))
                object.__setattr__(self, f.name, value)
            if isinstance(value, ConfigGroup):
                value.check(f"{self.section()}.{f.name}")
                continue
            problem = _violation(value, f.metadata)
            if problem:
                raise ValueError(f"{self.section()}.{f.name} {problem}, got {_short(value)}")

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
        defaults = {f.name: f for f in dataclasses.fields(cls)}
        try:
            kwargs = {k: hints[k].build(v, f"{cls.section()}.{k}", _field_default(defaults[k]))
                      if _group_type(cls, k) else _coerce(f"{cls.section()}.{k}", v, hints[k])
                      for k, v in values.items()}
            return cls(**kwargs)
        except ValueError as e:
            raise ConfigError(cls.section(), str(e)) from None

    @classmethod
    def check_key(cls, key: str) -> None:
        """A ConfigError naming `section.key` unless `key` is one of this config's fields, or `group.key` a key of
        one of its groups (an old name: one line naming the new)."""
        names = {f.name for f in dataclasses.fields(cls)}
        head, dot, rest = key.partition(".")
        if dot and head in names and _group_type(cls, head):
            _group_type(cls, head).check_key(rest, f"{cls.section()}.{head}")
            return
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
            raise ValueError(f"{self.section()}.{key} {message}, got {_short(getattr(self, key))}")


@dataclasses.dataclass(frozen=True)
class ConfigGroup:
    """Base of a group of keys that several stages share, nested as one key of their sections (e.g.
    `evaluate.sampling.temperature`). Its fields use `field(default, help, ...)`; a stage declares it as
    `sampling: Sampling = field(Sampling(max_new_tokens=32), help)`: the instance is that stage's defaults, and a
    params file's mapping overrides only the keys it lists."""

    def __post_init__(self) -> None:
        self.check(type(self).__name__)

    def check(self, where: str) -> None:
        """A ValueError naming `where.key` and its value unless every field keeps its declared constraints."""
        _check_values(type(self), {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, where)

    @classmethod
    def check_key(cls, key: str, where: str) -> None:
        """A ConfigError naming `where.key` unless `key` is one of the group's fields."""
        names = sorted(f.name for f in dataclasses.fields(cls))
        if key not in names:
            raise ConfigError(f"{where}.{key}", f"unknown key; allowed keys: {', '.join(names)}")

    @classmethod
    def build(cls, values: Any, where: str, base: "ConfigGroup") -> "ConfigGroup":
        """The group `where` from a mapping of some of its keys, the others `base`'s; checked and coerced."""
        if isinstance(values, cls):
            return values
        if not isinstance(values, Mapping):
            raise ConfigError(where, f"expected a mapping of key: value, got {_short(values)}")
        hints = typing.get_type_hints(cls)
        for key in sorted(values):
            cls.check_key(key, where)
        merged = {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)}
        merged.update({k: _coerce(f"{where}.{k}", v, hints[k]) for k, v in values.items()})
        _check_values(cls, merged, where)  # first, so an error names the key in full (`evaluate.sampling.top_p`)
        return cls(**merged)


def _check_values(cls: type, values: Mapping[str, Any], where: str) -> None:
    for f in dataclasses.fields(cls):
        problem = _violation(values[f.name], f.metadata)
        if problem:
            raise ValueError(f"{where}.{f.name} {problem}, got {_short(values[f.name])}")


def _group_type(cls: type, name: str) -> type[ConfigGroup] | None:
    """The ConfigGroup class of `cls`'s field `name`, or None when the field is a plain value."""
    tp = typing.get_type_hints(cls).get(name)
    return tp if isinstance(tp, type) and issubclass(tp, ConfigGroup) else None


def _field_default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def config_keys(cls: type) -> list[tuple[str, dataclasses.Field, Any, Any]]:
    """(key, field, annotation, default) of every key of a config in field order, a group's keys as `group.key`
    (their defaults those of the group field's default): what `config show`, `--help`, dvc.yaml and the KFP
    parameters list."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = _field_default(f)
        group = _group_type(cls, f.name)
        if group is None:
            out.append((f.name, f, hints[f.name], default))
            continue
        group_hints = typing.get_type_hints(group)
        out += [(f"{f.name}.{g.name}", g, group_hints[g.name], getattr(default, g.name))
                for g in dataclasses.fields(group)]
    return out


def flatten(values: Mapping[str, Any]) -> dict[str, Any]:
    """A section's values with each group's mapping as `group.key` entries."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, Mapping):
            out.update({f"{k}.{kk}": vv for kk, vv in flatten(v).items()})
        else:
            out[k] = v
    return out


def unflatten(values: Mapping[str, Any]) -> dict[str, Any]:
    """`flatten` undone: `group.key` entries nested under `group` (a value given for `group` itself stays, and the
    config then refuses it)."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        _set(out, k.split("."), v)
    return out


def _set(values: dict[str, Any], path: list[str], value: Any) -> None:
    """Set `values[path[0]][path[1]]... = value`, copying the nested mappings it writes into."""
    if len(path) == 1:
        values[path[0]] = value
        return
    inner = values.get(path[0])
    if inner is None:
        inner = {}
    elif not isinstance(inner, Mapping):
        return  # `group: 3` given: the config refuses it
    values[path[0]] = inner = dict(inner)
    _set(inner, path[1:], value)


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
    raise ConfigError(key, f"expected {_type_name(tp)}, got {_short(value)}")


OVERLAY_KEY = "overlay"  # a params file with `overlay: FILE` lists only what it changes on top of FILE


MAX_YAML_NODES = 100_000  # a params file or --set value, aliases expanded; a "billion laughs" file stops here


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last silently) and a
    document whose aliases expand to more than MAX_YAML_NODES nodes (counted on the composed graph, before
    anything is built, so a "billion laughs" file is refused in milliseconds)."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set())
        return self.construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise _YamlRefusal(f"line {key_node.start_mark.line + 1}: duplicate key {key_node.value!r}")
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


class _YamlRefusal(Exception):
    """What `_ParamsLoader` refuses (a repeated key, too large an expansion, a recursive alias)."""


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Nodes of `node` with every alias expanded (memoised per node, so the cost is the composed graph's)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise _YamlRefusal(f"line {node.start_mark.line + 1}: a recursive alias")
    open_nodes.add(id(node))
    children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else \
        node.value if isinstance(node, yaml.SequenceNode) else []
    total = 1
    for child in children:
        total += _expanded_size(child, sizes, open_nodes)
        if total > MAX_YAML_NODES:
            raise _YamlRefusal(f"line {node.start_mark.line + 1}: aliases expand to more than {MAX_YAML_NODES} "
                               "values")
    open_nodes.discard(id(node))
    sizes[id(node)] = total
    return total


def parse_yaml(text: str, where: str, what: str = "YAML") -> Any:
    """`text` parsed as YAML by the bounded loader above; a ConfigError naming `where` when it is not valid YAML,
    repeats a key, expands beyond MAX_YAML_NODES values, nests too deep or holds an integer too long to read."""
    try:
        return yaml.load(text, Loader=_ParamsLoader)
    except _YamlRefusal as e:
        raise ConfigError(where, str(e)) from None
    except yaml.YAMLError as e:
        raise ConfigError(where, f"not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:  # PyYAML composes and builds nested collections recursively
        raise ConfigError(where, f"{what} nested too deep") from None
    except ValueError as e:  # an integer of more than 4300 digits (int() refuses to read it)
        raise ConfigError(where, f"not a readable value: {str(e)[:100]}") from None


def _read_params_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(str(path), "params file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), f"not valid YAML: {str(e).splitlines()[0]}") from None
    data = parse_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "expected a mapping of sections, each a mapping of key: value")
    base = data.pop(OVERLAY_KEY, None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: {OVERLAY_KEY}", f"expected the path of the params file it overlays, got "
                                                    f"{_short(base)}")
    if not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(str(path), "expected a mapping of sections, each a mapping of key: value")
    return {"base": base, "sections": data}


def check_sections(layers: list[tuple[str, dict[str, Any]]], known: Collection[str]) -> None:
    """A ConfigError naming the file and the section unless every section of every params file is a known one
    (a typo'd `pretrian:` would otherwise leave the stage on its defaults)."""
    for name, sections in layers:
        for section in sections:
            if section not in known:
                close = difflib.get_close_matches(str(section), list(known), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(f"{name}: {section}", f"unknown section{hint}; sections: {', '.join(known)}")


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


def load_params(path: str | Path = DEFAULT_PARAMS, known: Collection[str] | None = None) -> dict[str, Any]:
    """Read a params YAML file (a mapping of section -> mapping of key -> value), layered on the file it
    overlays (`overlay: FILE`, recursively): a key an overlay does not list keeps the base file's value. With
    `known`, a section that is not one of them is a ConfigError."""
    merged: dict[str, dict[str, Any]] = {}
    layers = params_layers(path)
    if known is not None:
        check_sections(layers, known)
    for _, sections in layers:
        for section, values in sections.items():
            merged[section] = unflatten({**flatten(merged.get(section, {})), **flatten(values)})
    return merged


def effective_params(path: str | Path, sets: list[str] | None, known: Mapping[str, type]
                     ) -> dict[str, dict[str, tuple[Any, str]]]:
    """Every key of every known section as `(value, origin)`: origin is `default` (the Config dataclass), the
    params file that set it last (`params.yaml`, an overlay) or `--set`. What `alignpipe config show` prints."""
    layers = params_layers(path)
    check_sections(layers, known)
    out: dict[str, dict[str, tuple[Any, str]]] = {}
    for section in known:
        cls = known[section]
        values: dict[str, tuple[Any, str]] = {key: (default, "default") for key, _, _, default in config_keys(cls)}
        for name, sections in layers:
            for k, v in flatten(sections.get(section) or {}).items():
                values[k] = (v, name)
        for k, v in flatten(apply_overrides({}, sets, known).get(section, {})).items():
            values[k] = (v, "--set")
        cfg = flatten(cls.from_dict(unflatten({k: v for k, (v, _) in values.items()})).to_dict())  # checked
        out[section] = {k: (cfg[k], values[k][1]) for k in cfg}
    return out


def apply_overrides(params: dict[str, Any], sets: list[str] | None, known: Mapping[str, type] | None = None) -> dict:
    """Apply `section.key=value` (or `section.group.key=value`) overrides, values parsed as YAML, to a copy of
    `params`."""
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
            value = parse_yaml(raw, dotted, "value") if raw != "" else ""
        except ConfigError as e:
            if not e.reason.startswith("not valid YAML"):
                raise
            value = raw  # taken as the string it is (e.g. a template with a colon)
        _set(out.setdefault(section, {}), key.split("."), value)  # `group.key`: into the group's mapping
    return out


def build_config(cls: type[StageConfig], params: dict[str, Any]) -> StageConfig:
    """The config of one stage from a whole params dict (its section may be absent: all defaults)."""
    return cls.from_dict(params.get(cls.section(), {}))
