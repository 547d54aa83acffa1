"""A third-party plugin works after `pip install`: the example package, installed for real."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugins" / "specforge-step-decay"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """pip-install the example into a private prefix on the test environment's sys.path."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(EXAMPLE)],
        check=True,
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]), COLUMNS="200")
    return env


def test_plugins_command_lists_installed_example(installed):
    out = subprocess.run(
        [sys.executable, "-m", "specforge_core.cli", "plugins"], env=installed, capture_output=True, text=True, check=True
    ).stdout
    row = next(line for line in out.splitlines() if "step-decay" in line and "specforge-step-decay" in line)
    assert "0.1.0" in row and "lr_scheduler" in row
    for bundled in ("hf-backend", "llama-eagle3", "defaults"):
        assert bundled in out


def test_example_selected_by_name_from_toml(installed, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[training]\nscheduler = "step-decay"\n[training.step-decay]\nevery = 2\ngamma = 0.5\n')
    code = (
        "import sys;from specforge_core.config import load_config;from specforge_core.registry import get_registry;"
        f"c=load_config([{str(cfg)!r}]);f=get_registry().create_for(c,'lr_scheduler',10,0);"
        "print([f(s) for s in range(6)])"
    )
    out = subprocess.run([sys.executable, "-c", code], env=installed, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[1.0, 1.0, 0.5, 0.5, 0.25, 0.25]"
    bad = tmp_path / "bad.toml"
    bad.write_text('[training]\nscheduler = "step-decay"\n[training.step-decay]\ngamma = 2.0\n')
    res = subprocess.run(
        [sys.executable, "-m", "specforge_core.cli", "config", "validate", str(bad)], env=installed, capture_output=True, text=True
    )
    assert res.returncode == 2 and "training.step-decay.gamma" in res.stderr and "out of range" in res.stderr
