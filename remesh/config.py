"""Typed dataclass configs from YAML plus dotted command-line overrides.

    cfg = load_config(SFTConfig, "configs/sft_demo.yaml", ["optim.lr=1e-5", "data.max_prompt_len=256"])

Overrides are applied to the raw YAML tree before anything is type-checked, so an
override can supply a required field the file leaves out, and it can set a key
inside an ``Optional[Sub] = None`` section (the section is created with its
defaults). Override values are parsed as YAML: ``true``, ``null``, ``[1, 2]``,
``{a: 1}`` work, and an empty value (``key=``) means null.

Only ``true`` and ``false`` are booleans (as in YAML 1.2; `load_yaml`): PyYAML's YAML 1.1
would read ``spec: off`` or ``rollout.spec=off`` as False.

PyYAML follows YAML 1.1, where a float needs a dot, so ``1e-5`` loads as the
string ``'1e-5'``. Where a float is expected, a string that looks like a decimal
number (``1e-5``, ``-3E2``, ``0.5``) is therefore accepted and converted; any
other string (``'nan'``, ``'abc'``) is a type error.

Every problem raises ``ConfigError`` whose one-line message starts with the place
(the file, or ``override 'k=v'``) and names the dotted key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union

import yaml

__all__ = ["ConfigError", "FieldError", "load_config", "load_yaml", "config_to_dict", "dump_config",
           "require_at_least", "require_positive", "check_output_file"]

T = TypeVar("T")
Key = tuple  # a dotted key as a tuple of str (field / dict key) and int (list index)

_NUMERIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class _Loader12(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only true/false, not on/off/yes/no/y/n;
    and, as YAML 1.2 requires, a key given twice in one mapping is an error (PyYAML keeps the
    last silently: a second `lr:` further down a file would win unseen)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` keys may be overridden, as YAML's merge keys allow
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_BOOL = "tag:yaml.org,2002:bool"
_Loader12.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader12.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_yaml(text: str | typing.IO) -> Any:
    """YAML as every remesh file and override is read: safe, and `off` is the string 'off'."""
    return yaml.load(text, Loader=_Loader12)


class ConfigError(ValueError):
    """A bad config; the message is a single line naming the place and the key."""

    def __init__(self, message: str):
        # Messages embed user text (YAML values, __post_init__ errors); keep them on one line.
        super().__init__(re.sub(r"\s*\n\s*", " ", str(message)).strip())


def load_config(cls: type[T], path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> T:
    """Build dataclass ``cls`` from the YAML file at ``path`` (if any), then ``key.sub=value`` overrides."""
    place = os.fspath(path) if path is not None else "<no config file>"
    tree: dict = {}
    if path is not None:
        tree = read_yaml(place)
    loader = _Loader(place)
    for text in overrides:
        loader.apply_override(tree, text)
    return loader.build(cls, tree, (), base=None)


class FieldError(ValueError):
    """One field's value is out of range (raised in ``__post_init__``): the loader blames the
    file or override that set that field. A plain ValueError is about a combination of fields."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def require_at_least(cfg: Any, minimum: float, *names: str) -> None:
    """For a config's ``__post_init__``: each named field, unless None, is at least ``minimum``."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < minimum:
            raise FieldError(name, f"{name} must be >= {minimum:g}, got {value}")


def require_positive(cfg: Any, *names: str) -> None:
    """For a config's ``__post_init__``: each named field, unless None, is above 0."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise FieldError(name, f"{name} must be positive, got {value}")


def check_output_file(path: str | os.PathLike, option: str) -> None:
    """Before any work: ``path`` can become a file (it is not a folder, and no part of its
    parent is a file), so that the work's result is not lost at the end (ConfigError)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{option} {path}: is a folder; give a file name")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{option} {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK):
                raise ConfigError(f"{option} {path}: cannot write in {parent}")
            return


def config_to_dict(cfg: Any) -> Any:
    """Plain nested dicts/lists/scalars (tuples become lists), loadable back by ``load_config``."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    return cfg


def dump_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML (creating parent directories), e.g. next to a run's checkpoints."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)


def read_yaml(place: str) -> dict:
    """A config file's top-level mapping ({} for an empty file); ConfigError naming the file (and line)."""
    try:
        with open(place) as f:
            data = load_yaml(f)
    except OSError as e:
        raise ConfigError(f"{place}: cannot read config file ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise ConfigError(f"{place}:{line}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r})") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{place}:{mark.line + 1}" if mark is not None else place
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from e
    if data is None:  # an empty file means "all defaults"
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{place}: top level must be a mapping of keys, got {_got(data)}")
    return data


def _dotted(path: Key) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _got(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) and not typing.get_args(tp) else repr(tp).replace("typing.", "")


class _Loader:
    """Per-call state: which override last set which part of the tree, for error messages."""

    def __init__(self, file_place: str):
        self.file_place = file_place
        self.origins: dict[Key, str] = {}  # in application order; later overrides win

    def apply_override(self, tree: dict, text: str) -> None:
        place = f"override '{text}'"
        key, sep, value_text = text.partition("=")
        path = tuple(key.strip().split("."))
        if not sep or not all(path):
            raise ConfigError(f"{place}: expected 'dotted.key=value'")
        try:
            value = load_yaml(value_text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{place}: cannot parse value ({getattr(e, 'problem', None) or e})") from e
        node = tree
        for i, part in enumerate(path[:-1]):
            if not isinstance(node.get(part), dict):  # absent or null section: create it
                node[part] = {}
                self.origins.setdefault(path[: i + 1], place)  # so its missing keys blame this override
            node = node[part]
        node[path[-1]] = value
        # Older origins at or below this key were overwritten.
        for old in [p for p in self.origins if p[: len(path)] == path]:
            del self.origins[old]
        self.origins[path] = place

    def place(self, path: Key, section: bool = False) -> str:
        """Where the value at ``path`` came from; with ``section``, the last override inside it
        (a guess at the culprit when __post_init__ rejects a combination of values)."""
        for p, place in reversed(self.origins.items()):
            if path[: len(p)] == p or (section and p[: len(path)] == path):
                return place
        return self.file_place

    def error(self, path: Key, message: str, section: bool = False) -> ConfigError:
        return ConfigError(f"{self.place(path, section)}: {message}")

    def build(self, cls: type, raw: dict, path: Key, base: Any) -> Any:
        """Instantiate dataclass ``cls`` from ``raw``; fields absent from ``raw`` come from ``base`` if given."""
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        hints = typing.get_type_hints(cls)
        for key in raw:
            if key not in fields:
                full = _dotted(path + (str(key),))
                close = difflib.get_close_matches(str(key), list(fields), n=1)
                if close:
                    hint = f"did you mean '{_dotted(path + (close[0],))}'?"
                else:
                    section = f"in '{_dotted(path)}'" if path else "at top level"
                    hint = f"valid keys {section}: {', '.join(fields)}"
                raise self.error(path + (str(key),), f"unknown key '{full}' ({hint})")
        kwargs = {}
        for name, f in fields.items():
            sub = path + (name,)
            if name in raw:
                kwargs[name] = self.convert(raw[name], hints[name], sub, _field_default(f, base))
            elif base is not None:
                kwargs[name] = copy.deepcopy(getattr(base, name))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise self.error(path, f"missing required key '{_dotted(sub)}'")
        try:
            return cls(**kwargs)
        except ConfigError:
            raise
        except FieldError as e:
            raise self.error(path + (e.field,), f"{_dotted(path) or cls.__name__}: {e}") from e
        except ValueError as e:
            raise self.error(path, f"{_dotted(path) or cls.__name__}: {e}", section=True) from e

    def convert(self, value: Any, tp: Any, path: Key, base: Any = None) -> Any:
        def mismatch(expected: str = _type_name(tp)) -> ConfigError:
            return self.error(path, f"{_dotted(path)}: expected {expected}, got {_got(value)}")

        origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
        if tp is Any:
            return value
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise mismatch(f"a mapping for {tp.__name__}")
            return self.build(tp, value, path, base if isinstance(base, tp) else None)
        if origin in (Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            options = [a for a in args if a is not type(None)]
            if len(options) == 1:  # Optional[X]: X's own error is the most precise
                return self.convert(value, options[0], path, base)
            for option in options:
                try:
                    return self.convert(value, option, path, base)
                except ConfigError:
                    pass
            raise mismatch()
        if origin is Literal:
            # type() check so that True does not pass for Literal[1] (True == 1).
            if any(value == c and type(value) is type(c) for c in args):
                return value
            raise mismatch("one of " + ", ".join(repr(c) for c in args))
        if origin is list:
            if not isinstance(value, list):
                raise mismatch()
            item = args[0] if args else Any
            return [self.convert(v, item, path + (i,)) for i, v in enumerate(value)]
        if origin is tuple:
            if not isinstance(value, (list, tuple)):
                raise mismatch()
            if not args or (len(args) == 2 and args[1] is Ellipsis):
                items = [args[0] if args else Any] * len(value)
            elif len(args) != len(value):
                raise mismatch(f"{_type_name(tp)} of length {len(args)}")
            else:
                items = list(args)
            return tuple(self.convert(v, t, path + (i,)) for i, (v, t) in enumerate(zip(value, items)))
        if origin is dict:
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise mismatch(f"{_type_name(tp)} (a mapping with string keys)")
            item = args[1] if args else Any
            return {k: self.convert(v, item, path + (k,)) for k, v in value.items()}
        if tp is bool:
            if isinstance(value, bool):
                return value
            raise mismatch()
        if tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise mismatch()
        if tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                number = float(value)
            elif isinstance(value, str) and _NUMERIC.fullmatch(value):  # YAML 1.1's '1e-5' (see module doc)
                number = float(value)
            else:
                raise mismatch()
            if not math.isfinite(number):  # .inf / .nan pass every range check and train into NaN weights
                raise mismatch("a finite number")
            return number
        if tp is str:
            if isinstance(value, str):
                return value
            raise mismatch()
        raise TypeError(f"config field {_dotted(path)}: unsupported type {_type_name(tp)}")


def _field_default(f: dataclasses.Field, base: Any) -> Any:
    """The value a nested dataclass field starts from, so partial YAML keeps non-class defaults."""
    if base is not None:
        return getattr(base, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None
