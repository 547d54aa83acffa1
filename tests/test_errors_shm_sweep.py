"""A driver killed with SIGKILL never stops its shm store; the next run's store removes the
directories whose owner (pid on this host) is dead, says what it removed, and leaves live runs',
other hosts' and unknown directories alone (issue 18, item 10)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from specforge_defaults.transfer_shm import OWNER_SUFFIX, ShmOptions, ShmStoreProvider

KILLED_DRIVER = """
import os, signal, sys, torch
from specforge_defaults.transfer_shm import ShmOptions, ShmStoreProvider
p = ShmStoreProvider(ShmOptions(root=sys.argv[1]))
h = p.start("killed-run")
p.connect(h).put("k0", {"x": torch.arange(1000)})
print(h.path, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_next_run_sweeps_the_store_of_a_killed_driver_only(tmp_path):
    root = tmp_path / "shm"
    root.mkdir()
    provider = ShmStoreProvider(ShmOptions(root=str(root)))
    live = provider.start("live-run")  # owned by this (live) process
    provider.connect(live).put("a", {"y": torch.ones(3)})
    proc = subprocess.run([sys.executable, "-c", KILLED_DRIVER, str(root)], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    assert proc.returncode == -9, proc.stderr
    dead = proc.stdout.strip()
    assert os.path.isdir(dead) and os.listdir(dead) and os.path.isfile(dead + OWNER_SUFFIX)
    foreign = root / "specforge-other-host"
    foreign.mkdir()
    (root / f"specforge-other-host{OWNER_SUFFIX}").write_text(json.dumps({"pid": 999999, "host": "elsewhere"}))
    unknown = root / "specforge-no-owner-file"
    unknown.mkdir()

    with pytest.warns(UserWarning, match="removed 1 store") as rec:
        new = provider.start("next-run")
    msg = str(rec[0].message)
    assert dead in msg and "1 keys" in msg and "killed-run" in msg
    assert not os.path.exists(dead) and not os.path.exists(dead + OWNER_SUFFIX)
    assert os.path.isdir(live.path) and provider.connect(live).keys() == ["a"]
    assert foreign.is_dir() and unknown.is_dir()
    provider.stop(new)
    provider.stop(live)
    assert sorted(os.listdir(root)) == sorted([foreign.name, foreign.name + OWNER_SUFFIX, unknown.name])
