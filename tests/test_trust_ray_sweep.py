"""#18.10: a ``kill -9`` of the Ray driver leaves processes of the local cluster it started (the
raylet's agents); the next Ray run kills them and says which (pids), and leaves
live drivers' and other hosts' clusters alone. Real Ray on loopback, real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from specforge_core.pipeline.ray import leftovers

ROOT = Path(__file__).resolve().parents[1]

# Starts the local cluster through the pipeline's own connect_ray, waits for the raylet's agents,
# stops them (SIGSTOP: "hung", so they cannot exit on their own before the sweep) and dies. (Its
# workers die with the raylet: Ray kills them when their parent dies.)
KILLED_DRIVER = """
import json, os, signal, sys, time
import ray
from specforge_core.config import load_config
from specforge_core.pipeline.ray import leftovers
from specforge_core.pipeline.ray_pipeline import connect_ray

assert connect_ray(load_config(data={"run": {"pipeline": "ray"}}, registry=None))
@ray.remote(num_cpus=0)
class Hold:
    def pid(self):
        return os.getpid()
worker = ray.get(Hold.remote().pid.remote())
rec = json.loads(leftovers._CURRENT[0].read_text())
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    agents = [p for p, cmd in leftovers.leftovers_of(rec) if "Agent" in cmd]
    if len(agents) >= 2:
        break
    time.sleep(0.2)
for p in agents:
    os.kill(p, signal.SIGSTOP)
raylet = [d["pid"] for d in rec["daemons"] if "/raylet/raylet" in d["cmd"]][0]
print(json.dumps({"record": str(leftovers._CURRENT[0]), "hung": agents, "worker": worker, "node": rec["node_id"],
                  "raylet": raylet}), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""

NEXT_RUN = """
import warnings, ray
from specforge_core.config import load_config
from specforge_core.pipeline.ray import leftovers
from specforge_core.pipeline.ray_pipeline import connect_ray

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert connect_ray(load_config(data={"run": {"pipeline": "ray"}}, registry=None))
ray.shutdown()
leftovers.forget()
for w in caught:
    print("WARNING", w.message, flush=True)
"""


def _env(owners: Path) -> dict[str, str]:
    env = {**os.environ, leftovers.OWNERS_ENV: str(owners), "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": "0.004"}
    env.pop("RAY_ADDRESS", None)
    return env


def _with_node(node: str, raylet: int) -> list[int]:
    entries = (f"RAY_NODE_ID={node}".encode(), f"RAY_RAYLET_PID={raylet}".encode())
    return [p for p in leftovers._pids() if any(leftovers._environ_has(p, e) for e in entries)]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="the sweep reads /proc (Linux)")
def test_next_ray_run_kills_what_a_killed_driver_left_and_nothing_else(tmp_path):
    owners = tmp_path / "owners"
    proc = subprocess.run([sys.executable, "-c", KILLED_DRIVER], capture_output=True, text=True, cwd=ROOT,
                          env=_env(owners), timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    hung, node, raylet = info["hung"], info["node"], info["raylet"]
    starts = {p: leftovers.proc_start(p) for p in hung}
    try:
        assert Path(info["record"]).is_file() and len(hung) == 2
        # still there after their driver died (by pid and start time: setproctitle can already have
        # overwritten an agent's environment block, node id included, so it is not the test here)
        assert all(leftovers._alive(p, starts[p]) for p in hung)
        # found without the environment too (setproctitle may overwrite it): by the session's open logs
        rec = json.loads(Path(info["record"]).read_text())
        by_files = leftovers.leftovers_of({**rec, "node_id": "", "daemons": []})
        assert rec["session_dir"] and set(hung) <= {p for p, _ in by_files}
        # a live driver's record and another host's are not to be touched
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": leftovers.proc_start(os.getpid()),
              "node_id": "live-node", "daemons": []}
        (owners / "live.json").write_text(json.dumps(me))
        (owners / "other.json").write_text(json.dumps({**me, "pid": 999999, "host": "elsewhere"}))

        nxt = subprocess.run([sys.executable, "-c", NEXT_RUN], capture_output=True, text=True, cwd=ROOT,
                             env=_env(owners), timeout=240)
        assert nxt.returncode == 0, nxt.stderr[-3000:]
        warned = [line for line in nxt.stdout.splitlines() if line.startswith("WARNING ray: the local cluster")]
        assert len(warned) == 1, nxt.stdout
        assert "killed" in warned[0] and all(f"{p} (" in warned[0] for p in hung), warned[0]
        assert not any(leftovers._alive(p, None) for p in [*hung, info["worker"]])
        assert _with_node(node, raylet) == []
        assert sorted(p.name for p in owners.iterdir()) == ["live.json", "other.json"]  # next run's: forgotten
    finally:  # never leave stopped processes behind, whatever failed
        for p in set(_with_node(node, raylet)) | {p for p in hung if leftovers._alive(p, starts[p])}:
            os.kill(p, signal.SIGKILL)


def test_a_record_is_written_for_this_driver_and_forgotten(tmp_path, monkeypatch):
    monkeypatch.setenv(leftovers.OWNERS_ENV, str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)  # ray stand-in"])
    try:
        path = leftovers.record("node-x", "/tmp/ray/session_x")
        rec = json.loads(path.read_text())
        assert rec["pid"] == os.getpid() and rec["node_id"] == "node-x" and rec["start"] == leftovers.proc_start(
            os.getpid())
        assert all(d["pid"] != child.pid for d in rec["daemons"])  # a child is a daemon only if it is ray's
        assert leftovers.sweep() == [] and path.is_file()  # this driver is alive: untouched
        leftovers.forget()
        assert not path.exists()
        # a dead driver whose cluster left nothing: its record is dropped without a word
        dead = {**rec, "pid": child.pid, "start": leftovers.proc_start(child.pid), "node_id": "gone"}
        child.kill()
        child.wait()
        (tmp_path / "dead.json").write_text(json.dumps(dead))
        assert leftovers.sweep() == [] and not (tmp_path / "dead.json").exists()
    finally:
        child.kill()
