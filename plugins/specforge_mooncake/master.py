"""Launching, probing and stopping ``mooncake_master`` (the binary ships inside the wheel)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import stat
import subprocess
import tempfile
import time
import urllib.request

log = logging.getLogger("specforge.mooncake")


class MooncakeUnavailable(RuntimeError):
    """The master (or its metadata/admin server) cannot be reached or started."""


def master_binary() -> str:
    import mooncake

    path = os.path.join(os.path.dirname(mooncake.__file__), "mooncake_master")
    if not os.path.exists(path):
        raise MooncakeUnavailable(f"mooncake_master not found at {path}; reinstall mooncake-transfer-engine")
    if not os.access(path, os.X_OK):
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def split_addr(addr: str, what: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"[transfer.mooncake] {what} must be 'host:port', got {addr!r}")
    return host, int(port)


def default_host() -> str:
    """The address this head advertises: $MC_TCP_BIND_ADDRESS, else the host's primary IP."""
    if os.environ.get("MC_TCP_BIND_ADDRESS"):
        return os.environ["MC_TCP_BIND_ADDRESS"]
    try:
        ip = socket.gethostbyname(socket.gethostname())
        return ip if not ip.startswith("127.") else "127.0.0.1"
    except OSError:
        return "127.0.0.1"


def route_ip(host: str, port: int) -> str:
    """The local interface address used to reach ``host`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, port))
            return s.getsockname()[0]
        except OSError:
            return default_host()


def wait_reachable(addr: str, timeout_s: float, what: str) -> None:
    """Bounded TCP probe of ``host:port``: Mooncake's own setup retries for ~90 s otherwise."""
    host, port = split_addr(addr, what)
    deadline, last = time.monotonic() + timeout_s, None
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, timeout_s)):
                return
        except OSError as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise MooncakeUnavailable(
                f"Mooncake {what} {addr} is unreachable after {timeout_s:.0f}s ({last}); start "
                "mooncake_master there, fix [transfer.mooncake] master_addr, or check the firewall"
            )
        time.sleep(0.2)


def http_json(url: str, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return r.read().decode()


def launch_master(host: str, bind: str, log_path: str, timeout_s: float) -> tuple[subprocess.Popen, dict]:
    """Start a master with its HTTP metadata server on free ports; wait until it serves."""
    ports = {"rpc": free_port(bind), "metrics": free_port(bind), "metadata": free_port(bind)}
    cmd = [
        master_binary(),
        f"--rpc_port={ports['rpc']}", f"--rpc_address={bind}",
        f"--metrics_port={ports['metrics']}", f"--metrics_host={bind}",
        "--enable_http_metadata_server=true",
        f"--http_metadata_server_port={ports['metadata']}", f"--http_metadata_server_host={bind}",
        "--rpc_thread_num=4",
    ]
    if not log_path:
        fd, log_path = tempfile.mkstemp(prefix="mooncake_master-", suffix=".log")
        os.close(fd)
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    health = f"http://{host}:{ports['metrics']}/health"
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise MooncakeUnavailable(f"mooncake_master exited with {proc.returncode}; log: {log_path}\n"
                                      + _tail(log_path))
        try:
            if json.loads(http_json(health, 1.0)).get("service_ready"):
                break
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            stop_master(proc)
            raise MooncakeUnavailable(f"mooncake_master did not become ready in {timeout_s:.0f}s; log: "
                                      f"{log_path}\n" + _tail(log_path))
        time.sleep(0.1)
    log.info("mooncake_master pid %d serving rpc %s:%d (log %s)", proc.pid, host, ports["rpc"], log_path)
    return proc, {
        "master_addr": f"{host}:{ports['rpc']}",
        "metrics_addr": f"{host}:{ports['metrics']}",
        "metadata_server": f"http://{host}:{ports['metadata']}/metadata",
        "log_path": log_path,
    }


def stop_master(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout_s)


def _tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""
