"""``option()``: an attrs field with the description the config reference prints.

Every field of a config class (core or plugin) should be declared with it::

    @attrs.define
    class MyOptions:
        gamma: float = option(0.5, "LR multiplier per decay", validator=in_range(0, 1))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import attrs

HELP = "specforge_help"
CHOICES = "specforge_choices"
# A path-typed field: its value is resolved by the loader (specforge_core/config/paths.py) against
# the directory of the config file that set it, or the working directory (command line, defaults).
PATH = "specforge_path"
# Kinds of path field (the value of the PATH metadata):
PATH_FILE = "path"  # always a local path
PATH_OR_HUB = "path-or-hub-id"  # a local path, or a hub id like 'Qwen/Qwen3-8B' (kept when no such path)
PATH_OR_COMMAND = "path-or-command"  # a local path, or a bare command name looked up in $PATH ('python3')
PATH_KINDS = (PATH_FILE, PATH_OR_HUB, PATH_OR_COMMAND)


def option(
    default: Any = attrs.NOTHING,
    help: str = "",
    *,
    validator: Optional[Callable] = None,
    choices: Optional[Sequence[Any]] = None,
    factory: Optional[Callable[[], Any]] = None,
    path: bool | str = False,
) -> Any:
    """``path=True`` (or one of ``PATH_KINDS``) marks a path-typed field: a relative value is resolved
    against the directory of the config file that set it (see specforge_core/config/paths.py)."""
    kind = PATH_FILE if path is True else (path or None)
    if kind is not None and kind not in PATH_KINDS:
        raise ValueError(f"option(path=...): {kind!r} is not allowed; allowed: True, {', '.join(PATH_KINDS)}")
    validators = []
    if choices is not None:
        validators.append(one_of(choices))
    if validator is not None:
        validators.append(validator)
    kwargs: dict[str, Any] = {
        "metadata": {HELP: help, CHOICES: tuple(choices) if choices is not None else None, PATH: kind},
        "validator": validators or None,
    }
    if factory is not None:
        kwargs["factory"] = factory
    else:
        kwargs["default"] = default
    return attrs.field(**kwargs)


class RangeError(ValueError):
    """A value outside what a field allows; the loader adds the field path and file."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


def one_of(choices: Sequence[Any]) -> Callable:
    allowed = tuple(choices)

    def check(_inst, attribute, value):
        if value not in allowed:
            raise RangeError(
                f"{value!r} is not allowed; allowed: {', '.join(repr(c) for c in allowed)}", attribute.name
            )

    return check


def in_range(lo: Optional[float] = None, hi: Optional[float] = None, *, lo_open: bool = False) -> Callable:
    def check(_inst, attribute, value):
        if value is None:
            return
        bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
        bad_hi = hi is not None and value > hi
        if bad_lo or bad_hi:
            lo_s = "-inf" if lo is None else repr(lo)
            hi_s = "inf" if hi is None else repr(hi)
            bracket = "(" if lo_open else "["
            raise RangeError(f"{value!r} is out of range; allowed: {bracket}{lo_s}, {hi_s}]", attribute.name)

    return check


def positive(_inst, attribute, value):
    if value is not None and value <= 0:
        raise RangeError(f"{value!r} is not allowed; allowed: a value > 0", attribute.name)


def non_negative(_inst, attribute, value):
    if value is not None and value < 0:
        raise RangeError(f"{value!r} is not allowed; allowed: a value >= 0", attribute.name)


def help_of(attribute: attrs.Attribute) -> str:
    return attribute.metadata.get(HELP, "")


def path_kind(attribute: attrs.Attribute) -> Optional[str]:
    """The field's path kind (one of ``PATH_KINDS``), or None for a field that is not a path."""
    return attribute.metadata.get(PATH)
