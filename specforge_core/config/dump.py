"""Write a resolved config back as TOML (``specforge config show``); parsing it gives the same config."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import attrs

from specforge_core.config.schema import CORE_SECTIONS, SpecforgeConfig

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _table(name: str, values: dict[str, Any], lines: list[str]) -> None:
    scalars = {k: v for k, v in values.items() if v is not None and not isinstance(v, dict)}
    tables = {k: v for k, v in values.items() if isinstance(v, dict)}
    lines.append(f"[{name}]")
    for k, v in scalars.items():
        lines.append(f"{_key(k)} = {_value(v)}")
    lines.append("")
    for k, v in tables.items():
        _table(f"{name}.{_key(k)}", v, lines)


def _as_dict(instance: Any) -> dict[str, Any]:
    return attrs.asdict(instance, recurse=True)


def dump_toml(cfg: SpecforgeConfig) -> str:
    """Every core field and every plugin options table, in a stable order. ``None`` is omitted
    (TOML has no null); the loader restores it from the field's default, which is ``None``."""
    lines: list[str] = []
    for section in CORE_SECTIONS:
        values = _as_dict(getattr(cfg, section))
        for (sec, name), options in sorted(cfg.plugin_options.items()):
            if sec == section and options is not None:
                values[name] = _as_dict(options)
        _table(section, values, lines)
    return "\n".join(lines).rstrip() + "\n"
