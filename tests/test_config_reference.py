"""docs/config-reference.md is generated from the core and every installed plugin; it must not go
stale when someone changes a field or its help text."""

from __future__ import annotations

from pathlib import Path

from specforge_core.config.reference import render_reference
from specforge_core.config.schema import CORE_SECTIONS
from specforge_core.registry import get_registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "config-reference.md"
REGEN = "specforge config reference --output docs/config-reference.md"


def test_checked_in_reference_is_current():
    expected = render_reference(get_registry())
    current = DOC.read_text() if DOC.exists() else ""
    assert current == expected, f"{DOC.name} is stale: regenerate it with `{REGEN}` and commit it"


def test_reference_covers_every_section_and_plugin_table():
    text = render_reference(get_registry())
    for section in CORE_SECTIONS:
        assert f"## `[{section}]`" in text
    for table in ("[inference.sglang]", "[inference.hf]", "[transfer.mooncake]", "[training.fsdp2]",
                  "[model.llama-eagle3]"):
        assert f"### `{table}`" in text
    # field, type, default and description of a plugin option with a choice list
    assert '| `sharding` | one of `"full"`, `"replicate"` | `"full"` |' in text
