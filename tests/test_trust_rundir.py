"""#18 item 3: one run per output directory, with real concurrent processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from specforge_core import rundir

HOLDER = textwrap.dedent("""
    import sys, time
    from specforge_core import rundir
    with rundir.lock(sys.argv[1]):
        print("locked", flush=True)
        if sys.argv[2] == "ctrl-c":
            raise KeyboardInterrupt
        if sys.argv[2] == "error":
            raise RuntimeError("boom")
        sys.stdin.read()  # hold until the test closes stdin (or kills us)
""")


def holder(out: Path, mode: str = "hold") -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), mode], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if mode == "hold":
        assert p.stdout.readline().strip() == "locked", p.stderr.read()
    return p


def try_lock(out: Path) -> subprocess.CompletedProcess:
    """Another process tries the lock and releases it at once."""
    code = "import sys\nfrom specforge_core import rundir\nwith rundir.lock(sys.argv[1]): print('got it')"
    return subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=60)


def test_second_run_fails_naming_the_holder_then_stale_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    first = holder(out)
    try:
        second = try_lock(out)
        assert second.returncode != 0 and "got it" not in second.stdout
        assert f"pid {first.pid} on host {socket.gethostname()}" in second.stderr
        assert "run.output_dir" in second.stderr
        # a real pipeline run is refused the same way, before any work
        from specforge_core.config import load_config
        from specforge_core.pipeline.local import run_local

        cfg = load_config(data={"run": {"output_dir": str(out)}, "model": {"target": str(tmp_path / "none")}})
        with pytest.raises(rundir.RunDirError, match=f"pid {first.pid}"):
            run_local(cfg)
    finally:
        first.kill()  # like kill -9: no cleanup runs, the lock file keeps its holder
        first.wait()
    assert json.loads((out / rundir.LOCK_FILE).read_text())["pid"] == first.pid
    third = try_lock(out)
    assert third.returncode == 0 and "got it" in third.stdout
    assert f"taking over a stale lock of pid {first.pid}" in third.stdout
    assert (out / rundir.LOCK_FILE).read_text() == ""  # released on exit


@pytest.mark.parametrize("mode", ["ctrl-c", "error"])
def test_lock_released_on_ctrl_c_and_errors(tmp_path, mode):
    out = tmp_path / "run"
    p = holder(out, mode)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and ("KeyboardInterrupt" if mode == "ctrl-c" else "boom") in err
    after = try_lock(out)
    assert after.returncode == 0 and "stale" not in after.stdout  # released cleanly, not taken over


def test_lock_released_on_sigint_of_a_holding_process(tmp_path):
    out = tmp_path / "run"
    p = holder(out)
    os.kill(p.pid, signal.SIGINT)
    p.communicate(timeout=60)
    assert (out / rundir.LOCK_FILE).read_text() == ""
    assert try_lock(out).returncode == 0


def test_lock_in_process_blocks_and_releases(tmp_path):
    with rundir.lock(tmp_path):
        with pytest.raises(rundir.RunDirError, match=f"pid {os.getpid()}"):
            with rundir.lock(tmp_path):
                pass
    with rundir.lock(tmp_path):  # free again
        pass
