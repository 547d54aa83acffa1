"""A killed `specforge export` leaves its temp dir next to the export; the next export removes it
(its pid on this host is dead), says so, and keeps a live writer's temp dir (issue 18, item 10)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specforge_core.export import write_export

# a writer killed between creating its temp dir and renaming it
KILLED_EXPORT = """
import os, signal, sys, shutil
import specforge_core.export as E
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
E.save_file = die
E.write_export({"a": 1}, {}, sys.argv[1])
"""


def test_next_export_sweeps_a_killed_exports_temp_dir(tmp_path):
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".export.tmp-")]
    assert len(left) == 1 and (left[0] / "config.json").is_file() and not out.exists()
    live = tmp_path / f".export.tmp-{os.getpid()}@{os.uname().nodename.replace('.', '_')}.abc"
    live.mkdir()  # a writer that is alive (this process)

    with pytest.warns(UserWarning, match="removed 1 temp dir") as rec:
        write_export({"b": 2}, {"w": torch.ones(2)}, out)
    assert str(left[0]) in str(rec[0].message)
    assert not left[0].exists() and live.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", live.name])
    assert Path(out / "config.json").read_text().strip().startswith("{")
    # a second export over the first leaves no temp or old dir behind
    write_export({"b": 3}, {"w": torch.ones(2)}, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", live.name])
