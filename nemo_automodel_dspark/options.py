"""Declared options: one `option(...)` per key gives its type (the annotation), default, range and allowed values.

An option class is a frozen, keyword-only dataclass deriving from `Options`. Construction checks every field
against its declaration and then the class's cross-field `rules()`, so an instance is valid by construction,
however it was built (YAML, command line, a saved draft, a test). Errors are `ConfigError`s whose message starts
with the dotted key (`'recipe_args.block_size' must be ...`). To add a key, add one field:

    keep_last_n: int | None = option(None, ge=1, doc="keep only the newest N checkpoints")

This module imports only the standard library, so a config is checked before torch or NeMo AutoModel load.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar, Union


class ConfigError(ValueError):
    """A user error in the configuration; the message names the dotted key and is printed as one line."""


@dataclass(frozen=True)
class Spec:
    """What an option accepts beyond its type: a closed range and/or a set of allowed values."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    doc: str = ""
    from_yaml: bool = True  # False: set by code (derived from other options or written by a tool), never a YAML key


def option(
    default: Any = MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple | None = None,
    doc: str = "",
    from_yaml: bool = True,
) -> Any:
    """A dataclass field with its checks; no default means the key is required."""
    spec = Spec(ge=ge, gt=gt, le=le, lt=lt, choices=choices, doc=doc, from_yaml=from_yaml)
    return dataclasses.field(default=default, metadata={"spec": spec})


@dataclass(frozen=True, kw_only=True)
class Options:
    """Base of the option classes; `SECTION` is the YAML section the keys are read from (used in messages)."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in fields(self):
            value = check_value(self.key(f.name), getattr(self, f.name), hints[f.name], spec_of(f))
            object.__setattr__(self, f.name, value)  # normalised (int → float, tuple → list) while constructing
        self.rules()

    def rules(self) -> None:
        """Cross-field rules; raise `ConfigError` naming the key."""

    @classmethod
    def key(cls, name: str) -> str:
        return f"{cls.SECTION}.{name}" if cls.SECTION else name

    @classmethod
    def yaml_keys(cls) -> list[str]:
        return [f.name for f in fields(cls) if spec_of(f).from_yaml]

    @classmethod
    def required_keys(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def spec_of(f: dataclasses.Field) -> Spec:
    return f.metadata.get("spec", Spec())


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


# ---------------------------------------------------------------------------------------------------- type checks


_NAMES = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers")}
_NAMES[str] = ("a string", "strings")


def _describe(hint: Any, plural: bool = False) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    if origin in (list, tuple):
        count = f"{len(args)} " if origin is tuple and args[-1] is not Ellipsis else ""
        return f"a list of {count}{_describe(args[0], plural=True)}"
    if isinstance(hint, type) and issubclass(hint, Options):
        return "a mapping of its keys"
    return _NAMES.get(hint, (str(hint), str(hint)))[plural]


def _scalar(value: Any, hint: Any) -> tuple[bool, Any]:
    """(accepted, normalised value) for one non-union type."""
    if hint is Any:
        return True, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if hint is dict:
        return isinstance(value, dict), value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple) and isinstance(value, list | tuple):
        item_types = args[:-1] if origin is tuple and args[-1] is Ellipsis else args
        if origin is tuple and args[-1] is not Ellipsis and len(value) != len(args):
            return False, value
        checked = [_scalar(v, item_types[min(i, len(item_types) - 1)]) for i, v in enumerate(value)]
        if not all(ok for ok, _ in checked):
            return False, value
        items = [v for _, v in checked]
        return True, tuple(items) if origin is tuple else items
    if isinstance(hint, type) and issubclass(hint, Options):
        return isinstance(value, hint), value
    return False, value


def _typed(key: str, value: Any, hint: Any) -> Any:
    options = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    for candidate in options:
        ok, normalised = _scalar(value, candidate)
        if ok:
            return normalised
    raise ConfigError(f"'{key}' must be {_describe(hint)}, got {value!r}")


def _in_range(key: str, value: Any, spec: Spec, nullable: bool) -> None:
    numbers = value if isinstance(value, list | tuple) else [value]
    for number in numbers:
        if not isinstance(number, int | float) or isinstance(number, bool):
            continue
        for bound, test, word in (
            (spec.ge, lambda v, b: v >= b, ">="),
            (spec.gt, lambda v, b: v > b, ">"),
            (spec.le, lambda v, b: v <= b, "<="),
            (spec.lt, lambda v, b: v < b, "<"),
        ):
            if bound is not None and not test(number, bound):
                alternative = " or null" if nullable else ""
                raise ConfigError(f"'{key}' must be {word} {bound}{alternative}, got {value!r}")


def check_value(key: str, value: Any, hint: Any, spec: Spec) -> Any:
    """The value, type-checked and normalised, or a `ConfigError` naming `key`."""
    value = _typed(key, value, hint)
    if value is None:
        return value
    if spec.choices is not None and value not in spec.choices:
        allowed = ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in spec.choices)
        raise ConfigError(f"'{key}' must be one of {allowed}; got {value!r}")
    _in_range(key, value, spec, nullable=type(None) in typing.get_args(hint))
    return value


def build(cls: type[Options], values: dict, **derived: Any) -> Any:
    """`cls(**values, **derived)` with every required key present and no key outside `cls`'s YAML keys."""
    for name in cls.required_keys():
        if values.get(name) is None and name not in derived:
            raise ConfigError(f"'{cls.key(name)}' is required")
    return cls(**values, **derived)


def rule(condition: bool, message: str) -> None:
    """Raise `ConfigError(message)` unless `condition` (messages start with the quoted key)."""
    if not condition:
        raise ConfigError(message)
