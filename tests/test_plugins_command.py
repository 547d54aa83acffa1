"""`specforge plugins` shows every installed component with the one-line description its plugin
registered (what a user reads to choose `model.draft`, `training.loss`, ...)."""

import os
import subprocess
import sys

from specforge_core.registry import registry_from


def test_every_draft_algorithm_is_listed_with_its_registered_description():
    out = subprocess.run([sys.executable, "-m", "specforge_core.cli", "plugins"], capture_output=True, text=True,
                         env=dict(os.environ, COLUMNS="400"), check=True).stdout
    reg = registry_from([])
    algorithms = [c for c in reg.components() if c.kind == "draft_algorithm"]
    assert {c.name for c in algorithms} >= {"llama-eagle3", "dflash", "dspark", "peagle"}
    for c in algorithms:
        assert c.description, f"{c.name} registered no description"
        row = next(line for line in out.splitlines() if f" {c.name} " in line and "draft_algorithm" in line)
        assert c.description in row
