"""Typed TOML configs: core sections, plugin tables, layering and overrides."""

from specforge_core.config.dump import dump_toml
from specforge_core.config.fields import in_range, non_negative, one_of, option, positive
from specforge_core.config.loader import ConfigError, load_config, parse_override
from specforge_core.config.schema import CORE_SECTIONS, SpecforgeConfig

__all__ = [
    "CORE_SECTIONS",
    "ConfigError",
    "SpecforgeConfig",
    "dump_toml",
    "in_range",
    "load_config",
    "non_negative",
    "one_of",
    "option",
    "parse_override",
    "positive",
]
