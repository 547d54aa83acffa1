"""Resolve a config: built-in defaults < config files (each may ``extends`` another) < CLI overrides.

Every value remembers where it came from, so an error names the file (or "command line"), the dotted
key, and what is allowed.
"""

from __future__ import annotations

import difflib
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import attrs
import cattrs

from specforge_core.components import KINDS, capability
from specforge_core.config.fields import RangeError, path_kind
from specforge_core.config.paths import resolve_value
from specforge_core.config.schema import CORE_SECTIONS, MOVED_KEYS, SpecforgeConfig
from specforge_core.hookspecs import selected

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

CLI = "command line"
DEFAULTS = "defaults"


class ConfigError(ValueError):
    """A config problem, with the dotted key and the file it came from."""

    def __init__(self, message: str, key: str = "", source: str = "") -> None:
        where = f"{source}: " if source else ""
        at = f"{key}: " if key else ""
        super().__init__(f"{where}{at}{message}")
        self.key = key
        self.source = source


# ------------------------------------------------------------------------------------- raw layers
def read_toml(path: str | Path, _seen: tuple[Path, ...] = ()) -> tuple[dict, dict[str, str]]:
    """Read one file, following ``extends`` (a path or list of paths, relative to the file).

    Returns the merged raw dict and the source of every leaf key (path-typed values are resolved
    against their source file's directory when the sections are structured: config/paths.py).
    """
    path = Path(path)
    resolved = path.resolve()
    if resolved in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, resolved))
        raise ConfigError(f"'extends' forms a cycle: {chain}", source=str(path))
    if not path.is_file():
        raise ConfigError("config file not found", source=str(path))
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", source=str(path)) from None

    merged: dict = {}
    sources: dict[str, str] = {}
    parents = data.pop("extends", [])
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError("must be a path or a list of paths", key="extends", source=str(path))
    for parent in parents:
        parent_path = (path.parent / parent) if not Path(parent).is_absolute() else Path(parent)
        if not parent_path.is_file():  # name the including file: the missing path is its line
            raise ConfigError(f"extends {parent!r}: {parent_path} not found", key="extends", source=str(path))
        pdata, psources = read_toml(parent_path, (*_seen, resolved))
        deep_merge(merged, pdata, sources, psources)
    deep_merge(merged, data, sources, _leaf_sources(data, str(path)))
    return merged, sources


def _leaf_sources(data: Mapping, source: str, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        out[dotted] = source
        if isinstance(value, Mapping):
            out.update(_leaf_sources(value, source, dotted + "."))
    return out


def deep_merge(base: dict, new: Mapping, sources: dict[str, str], new_sources: dict[str, str], prefix: str = "") -> None:
    """Merge ``new`` into ``base`` in place; tables merge key by key, anything else replaces."""
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            deep_merge(base[key], value, sources, new_sources, dotted + ".")
            sources[dotted] = new_sources.get(dotted, sources.get(dotted, ""))
        else:
            base[key] = _copy(value)
            for k in [k for k in sources if k == dotted or k.startswith(dotted + ".")]:
                del sources[k]
            sources.update({k: v for k, v in new_sources.items() if k == dotted or k.startswith(dotted + ".")})


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.field=value`` with the value parsed as TOML (bare words fall back to strings)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value", source=CLI)
    key, raw = text.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"override {text!r} has an empty key part", source=CLI)
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # e.g. model.target=Qwen/Qwen3-8B without quotes
    return parts, value


def apply_overrides(data: dict, sources: dict[str, str], overrides: Sequence[str]) -> None:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"cannot set {'.'.join(parts)}: {'.'.join(parts[: i + 1])} is not a table", source=CLI)
            node = child
        node[parts[-1]] = value
        dotted = ".".join(parts)
        for k in [k for k in sources if k == dotted or k.startswith(dotted + ".")]:
            del sources[k]
        sources.update(_leaf_sources({parts[-1]: value}, CLI, ".".join(parts[:-1]) + "." if len(parts) > 1 else ""))
        sources[dotted] = CLI


# ------------------------------------------------------------------------------------ structuring
def _strict_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)

    def _int(v: Any, _t: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"expected an integer, got {_describe(v)}")
        return v

    def _float(v: Any, _t: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"expected a number, got {_describe(v)}")
        return float(v)

    def _bool(v: Any, _t: Any) -> bool:
        if not isinstance(v, bool):
            raise TypeError(f"expected true or false, got {_describe(v)}")
        return v

    def _str(v: Any, _t: Any) -> str:
        if not isinstance(v, str):
            raise TypeError(f"expected a string, got {_describe(v)}")
        return v

    conv.register_structure_hook(int, _int)
    conv.register_structure_hook(float, _float)
    conv.register_structure_hook(bool, _bool)
    conv.register_structure_hook(str, _str)
    return conv


CONVERTER = _strict_converter()


def _describe(v: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}
    return f"{kind.get(type(v), type(v).__name__)} ({v!r})"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + (" (or omitted)" if len(inner) < len(args) else "")
    if origin in (list, Sequence):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict or tp is dict:
        return "a table"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, getattr(tp, "__name__", str(tp)))


def _resolved_fields(cls: type) -> tuple[attrs.Attribute, ...]:
    module = sys.modules.get(cls.__module__)
    attrs.resolve_types(cls, globalns=vars(module) if module else None)
    return attrs.fields(cls)


def structure_section(cls: type, raw: Mapping, prefix: str, sources: Mapping[str, str], extra_ok: Sequence[str] = ()) -> Any:
    """Structure ``raw`` into attrs class ``cls``; errors name ``prefix.field`` and its file."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"expected a table, got {_describe(raw)}", key=prefix, source=sources.get(prefix, ""))
    fields = _resolved_fields(cls)
    names = [f.name for f in fields]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}"
        if key in extra_ok:
            continue
        if key not in names:
            raise unknown_key(dotted, [*names, *extra_ok], sources)
        field = next(f for f in fields if f.name == key)
        tp = field.type
        if typing.get_origin(tp) is list and typing.get_args(tp) == (str,) and isinstance(value, str):
            value = [value]  # a single path where a list of paths is expected
        if path_kind(field):  # relative to the file that set it (or the cwd): config/paths.py
            value = resolve_value(value, path_kind(field), sources.get(dotted, ""))
        try:
            kwargs[key] = CONVERTER.structure(value, tp)
        except Exception as exc:
            detail = _leaf_message(exc)
            raise ConfigError(
                f"expected {_type_name(tp)}, got {_describe(value)}" + (f" ({detail})" if detail and "expected" not in detail else ""),
                key=dotted,
                source=sources.get(dotted, ""),
            ) from None
    for field in fields:  # a path left at its default is relative to the working directory
        if path_kind(field) and field.name not in kwargs and isinstance(field.default, str):
            kwargs[field.name] = resolve_value(field.default, path_kind(field), DEFAULTS)
    try:
        return cls(**kwargs)
    except RangeError as exc:
        dotted = f"{prefix}.{exc.field}" if exc.field else prefix
        raise ConfigError(str(exc), key=dotted, source=sources.get(dotted, DEFAULTS)) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc), key=prefix, source=sources.get(prefix, "")) from None


def _leaf_message(exc: BaseException) -> str:
    if isinstance(exc, cattrs.BaseValidationError) and exc.exceptions:
        return _leaf_message(exc.exceptions[0])
    return str(exc)


def unknown_key(dotted: str, allowed: Sequence[str], sources: Mapping[str, str]) -> ConfigError:
    if dotted in MOVED_KEYS:
        return ConfigError(f"moved to {MOVED_KEYS[dotted]}", key=dotted, source=sources.get(dotted, ""))
    leaf = dotted.rsplit(".", 1)[-1]
    hint = difflib.get_close_matches(leaf, list(allowed), n=1, cutoff=0.6)
    parent = dotted.rsplit(".", 1)[0] if "." in dotted else ""
    suggestion = f"; did you mean '{parent + '.' if parent else ''}{hint[0]}'?" if hint else ""
    listing = ", ".join(sorted(allowed))
    return ConfigError(f"unknown key{suggestion} (allowed here: {listing})", key=dotted, source=sources.get(dotted, ""))


def structure_config(data: Mapping, sources: dict[str, str], registry: Any) -> SpecforgeConfig:
    """Turn a merged raw dict into a ``SpecforgeConfig``, validating plugin tables via ``registry``."""
    sections: dict[str, Any] = {}
    plugin_options: dict[tuple[str, str], Any] = {}
    for key in data:
        if key not in CORE_SECTIONS:
            raise unknown_key(key, list(CORE_SECTIONS), sources)
    for section, cls in CORE_SECTIONS.items():
        raw = data.get(section, {})
        if not isinstance(raw, Mapping):
            raise ConfigError(f"expected a table, got {_describe(raw)}", key=section, source=sources.get(section, ""))
        core_names = {f.name for f in _resolved_fields(cls)}
        plugin_tables = {k: v for k, v in raw.items() if k not in core_names}
        core_raw = {k: v for k, v in raw.items() if k in core_names}
        for name, table in plugin_tables.items():
            dotted = f"{section}.{name}"
            owner = registry.find_section_owner(section, name) if registry is not None else None
            if owner is None:
                allowed = sorted(core_names | {c.name for c in registry.section_components(section)}) if registry else sorted(core_names)
                raise unknown_key(dotted, allowed, sources)
            if owner.config_class is None:
                if table:
                    raise ConfigError(f"{owner.kind} {name!r} takes no options", key=dotted, source=sources.get(dotted, ""))
                continue
            plugin_options[(section, name)] = structure_section(owner.config_class, table, dotted, sources)
        sections[section] = structure_section(cls, core_raw, section, sources)

    cfg = SpecforgeConfig(**sections, plugin_options=plugin_options, sources=dict(sources))
    if registry is not None:
        _check_selected_components(cfg, registry)
    return cfg


def _check_selected_components(cfg: SpecforgeConfig, registry: Any) -> None:
    from specforge_core.registry import RegistryError

    for kind, (section, selector) in KINDS.items():
        name = selected(cfg, kind)
        dotted = f"{section}.{selector}"
        try:
            if not name:  # unset: the component a plugin declares the default (config show prints it)
                name = registry.default_name(kind)
                setattr(getattr(cfg, section), selector, name)
            comp = registry.get(kind, name)
        except RegistryError as exc:
            raise ConfigError(str(exc), key=dotted, source=cfg.sources.get(dotted, DEFAULTS)) from None
        if name in attrs.fields_dict(CORE_SECTIONS[section]):  # [section.name] would be ambiguous
            raise ConfigError(f"plugin {comp.plugin.name!r}: {kind} name {name!r} clashes with the core field "
                              f"[{section}].{name}; the plugin must choose another name", key=dotted,
                              source=cfg.sources.get(dotted, DEFAULTS))
        if (section, name) not in cfg.plugin_options and comp.config_class is not None:
            cfg.plugin_options[(section, name)] = comp.config_class()
    # Cross-section checks a plugin options class may define: ``validate_with(config)``.
    for (section, name), options in cfg.plugin_options.items():
        check = capability(options, "ComponentOptions.validate_with")
        if check is not None:
            try:
                check(cfg)
            except (ValueError, RangeError) as exc:
                dotted = f"{section}.{name}"
                raise ConfigError(str(exc), key=dotted, source=cfg.sources.get(dotted, DEFAULTS)) from None


# ------------------------------------------------------------------------------------------ API
def load_config(
    paths: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    *,
    data: Optional[Mapping] = None,
    registry: Any = "default",
) -> SpecforgeConfig:
    """Resolve defaults < ``paths`` (in order) < ``data`` < ``overrides`` into a typed config.

    ``registry="default"`` uses the process-wide registry (installed plugins); pass a ``Registry``
    to use another one, or ``None`` to skip plugin validation (plugin tables are then rejected).
    """
    if registry == "default":
        from specforge_core.registry import get_registry

        registry = get_registry()
    merged: dict = {}
    sources: dict[str, str] = {}
    for path in paths:
        pdata, psources = read_toml(path)
        deep_merge(merged, pdata, sources, psources)
    if data is not None:
        deep_merge(merged, dict(data), sources, _leaf_sources(data, "python"))
    apply_overrides(merged, sources, overrides)
    return structure_config(merged, sources, registry)
