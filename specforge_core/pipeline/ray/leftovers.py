"""What a ``kill -9``'d driver leaves of the local Ray cluster it started, and the next run's sweep.

A driver that starts a local cluster (no ``run.ray_address`` / ``$RAY_ADDRESS``) writes an owner
record: its pid, host and process start, the cluster's node id and the Ray daemons it started
(gcs_server, raylet, monitor, dashboard, log_monitor: its direct children). Ray ties the daemons to
the driver and workers to the raylet, but the raylet's agents (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``) outlive it, reparented to init, for up to a minute here, for good when they
hang. The sweep finds them by their environment (the agents
carry ``RAY_NODE_ID=<node id>``, workers ``RAY_RAYLET_PID=<raylet pid>``) or, as ``setproctitle``
may overwrite that, by a file of the cluster's session directory (its logs) they hold open.

The next Ray run (:func:`sweep`, called before it starts Ray) kills, for each record whose driver is
dead on this host, the recorded daemons still alive (same pid *and* start time) and every process
with that node id, then removes the record; a process it may not kill is reported with its pid and
the ``kill`` command, and the record kept. Records of live drivers and of other hosts are left
alone. A clean end of the run removes its record (:func:`forget`). Linux only (``/proc``); elsewhere
nothing is recorded or swept.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

# Records live here; $SPECFORGE_RAY_OWNERS moves them (tests).
OWNERS_ENV = "SPECFORGE_RAY_OWNERS"


def owners_dir() -> Path:
    return Path(os.environ.get(OWNERS_ENV) or os.path.join(tempfile.gettempdir(), "specforge-ray"))


# ------------------------------------------------------------------------------------ /proc helpers
def _stat(pid: int) -> Optional[list[str]]:
    """Fields of /proc/<pid>/stat after the command name (index 1 = ppid, 19 = start time)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def proc_start(pid: int) -> Optional[str]:
    """Start time in clock ticks since boot: tells a reused pid apart."""
    fields = _stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _environ_has(pid: int, entry: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return entry in f.read().split(b"\0")
    except OSError:  # gone, or another user's process: not ours to judge
        return False


def _has_open_under(pid: int, prefix: str) -> bool:
    """A file under ``prefix`` is open in the process (Ray's processes keep their session's logs open)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                return True
        except OSError:
            continue
    return False


def _is_ray(cmd: str) -> bool:
    return cmd.startswith("ray::") or "/ray/" in cmd


def _pids() -> list[int]:
    try:
        return [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return []


def _alive(pid: int, start: Optional[str]) -> bool:
    """Running (not a zombie nobody reaped yet) and the same process as when ``start`` was read."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _stat(pid)
    if not fields or len(fields) < 20 or fields[0] in ("Z", "X"):
        return False
    return start is None or fields[19] == start


# ------------------------------------------------------------------------------------------ record
_CURRENT: list[Path] = []  # this process's record, removed by forget()


def record(node_id: str, session_dir: str = "") -> Optional[Path]:
    """Write this driver's owner record (call right after starting a local cluster)."""
    if not os.path.isdir("/proc"):
        return None
    me = os.getpid()
    daemons = []
    for pid in _pids():
        fields = _stat(pid)
        if fields and fields[1] == str(me) and "/ray/" in _cmdline(pid):  # started from the ray package
            daemons.append({"pid": pid, "start": fields[19], "cmd": _cmdline(pid)[:200]})
    rec = {"pid": me, "host": socket.gethostname(), "start": proc_start(me), "node_id": node_id,
           "session_dir": session_dir, "daemons": daemons}
    root = owners_dir()
    path = root / f"{rec['host']}-{me}-{rec['start']}.json"
    tmp = path.with_suffix(".tmp")
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, path)
    except OSError:  # e.g. another user's directory: the run goes on, only its leftovers go unswept
        return None
    _CURRENT.append(path)
    return path


def record_current_cluster() -> Optional[Path]:
    """:func:`record` for the cluster ``ray.init()`` just started in this process."""
    import ray

    try:  # the session dir only names the cluster in messages; it has no public accessor
        session = ray._private.worker._global_node.get_session_dir_path()
    except Exception:
        session = ""
    return record(ray.get_runtime_context().get_node_id(), session)


def forget(path: Optional[Path] = None) -> None:
    """The run stopped its cluster itself: its record (default: this process's) is not needed."""
    paths = [path] if path is not None else list(_CURRENT)
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
        if p in _CURRENT:
            _CURRENT.remove(p)


# ------------------------------------------------------------------------------------------- sweep
def leftovers_of(rec: dict[str, Any]) -> list[tuple[int, str]]:
    """(pid, what) of the live processes a dead driver's cluster left on this host."""
    found: dict[int, str] = {}
    for d in rec.get("daemons", []):
        if _alive(int(d["pid"]), d.get("start")):
            found[int(d["pid"])] = d.get("cmd", "")[:60]
    # the raylet's agents carry the node id; its workers only the raylet's pid, trusted while that
    # pid is not another process now (a reused pid would point at a live cluster's workers)
    entries = [f"RAY_NODE_ID={rec['node_id']}".encode()] if rec.get("node_id") else []
    for d in rec.get("daemons", []):
        pid, start = int(d["pid"]), d.get("start")
        if "/raylet/raylet" in d.get("cmd", "") and proc_start(pid) in (None, start):  # gone, zombie or it
            entries.append(f"RAY_RAYLET_PID={pid}".encode())
    # setproctitle can overwrite a process's environment block (seen for the agents after a minute):
    # a Ray process that holds a file of the session open is the other sign
    session = rec.get("session_dir") or ""
    prefix = session.rstrip("/") + "/" if session.startswith("/") else ""
    for pid in _pids():
        if pid == os.getpid() or pid in found:
            continue
        if any(_environ_has(pid, e) for e in entries) or (
                prefix and _is_ray(_cmdline(pid)) and _has_open_under(pid, prefix)):
            found[pid] = _cmdline(pid)[:60]
    return sorted(found.items())


def _kill_all(pids: list[int], grace_s: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL what is still there after ``grace_s``. Returns the pids it may not kill."""
    starts = {p: proc_start(p) for p in pids}
    denied = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            if _alive(p, starts[p]):
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
                except PermissionError:
                    denied.append(p)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(p, starts[p]) for p in pids if p not in denied):
            time.sleep(0.05)
        pids = [p for p in pids if p not in denied]
    return sorted(set(denied) | {p for p in pids if _alive(p, starts[p])})


def sweep() -> list[str]:
    """Kill what dead drivers' local clusters left on this host; one message per dead driver (what
    was killed, or which pids could not be and the command to kill them)."""
    root = owners_dir()
    try:
        files = sorted(root.glob("*.json"))
    except OSError:
        return []
    host, messages = socket.gethostname(), []
    for path in files:
        try:
            rec = json.loads(path.read_text())
            if rec["host"] != host or _alive(int(rec["pid"]), rec.get("start")):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable or being written: not provably dead
        left = leftovers_of(rec)
        stuck = _kill_all([p for p, _ in left]) if left else []
        what = ", ".join(f"{p} ({cmd})" for p, cmd in left)
        head = f"ray: the local cluster of a dead specforge run (pid {rec['pid']}, {rec.get('session_dir') or 'node ' + str(rec.get('node_id'))})"
        if stuck:
            messages.append(f"{head} left processes that could not be stopped: {what}; kill them with "
                            f"`kill -9 {' '.join(map(str, stuck))}`")
            continue  # keep the record: the next run tries again
        if left:
            messages.append(f"{head} left {len(left)} process(es), killed: {what}")
        forget(path)
    return messages
