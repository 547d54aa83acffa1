"""``MooncakeProvider``: start/join a master on the head, connect stores, clean up at stop."""

from __future__ import annotations

import atexit
import logging
import re
import subprocess
from typing import Optional

import attrs

from specforge_mooncake.master import default_host, launch_master, split_addr, stop_master, wait_reachable
from specforge_mooncake.options import MooncakeOptions
from specforge_mooncake.sizing import MooncakeSizes, compute_sizes
from specforge_mooncake.store import MooncakeHandle, MooncakeStore

log = logging.getLogger("specforge.mooncake")
KEY_ROOT = "specforge"
_RUN_ID = re.compile(r"^[A-Za-z0-9_.\-]+$")


class MooncakeProvider:
    def __init__(self, options: Optional[MooncakeOptions] = None) -> None:
        self.options = options or MooncakeOptions()
        self.sizes: MooncakeSizes = compute_sizes(0, 3, 2048, 4 << 30)
        self._masters: dict[str, subprocess.Popen] = {}

    def __getstate__(self) -> dict:
        # a provider may be shipped to actors; the master process handle stays on the head
        return {**self.__dict__, "_masters": {}}

    def configure(
        self, hidden_size: int, n_aux: int, max_seq_length: int, max_pool_bytes: int, dtype_bytes: int = 2
    ) -> MooncakeSizes:
        """Optional, before ``start``: size buffers and segments from the model (see compute_sizes)."""
        self.sizes = compute_sizes(hidden_size, n_aux, max_seq_length, max_pool_bytes, dtype_bytes)
        return self.sizes

    def start(self, run_id: str) -> MooncakeHandle:
        if not _RUN_ID.match(run_id):
            raise ValueError(f"mooncake store: run id {run_id!r} may only use letters, digits, '_', '.', '-'")
        o = self.options
        if o.master_addr:
            host, _ = split_addr(o.master_addr, "master_addr")
            wait_reachable(o.master_addr, o.connect_timeout_s, "master")
            addrs = {
                "master_addr": o.master_addr,
                "metrics_addr": o.metrics_addr or f"{host}:9003",
                "metadata_server": o.metadata_server or f"http://{host}:8080/metadata",
            }
            launched = False
        else:
            host = o.master_host or default_host()
            bind = host if host.startswith("127.") else "0.0.0.0"
            proc, addrs = launch_master(host, bind, o.master_log, o.connect_timeout_s)
            self._masters[run_id] = proc
            atexit.register(stop_master, proc)  # no orphaned master if the head exits without stop()
            if o.metadata_server:
                addrs["metadata_server"] = o.metadata_server
            launched = True
        return MooncakeHandle(
            run_id=run_id,
            prefix=f"{KEY_ROOT}/{run_id}/",
            master_addr=addrs["master_addr"],
            metrics_addr=addrs["metrics_addr"],
            metadata_server=addrs["metadata_server"],
            protocol=o.protocol,
            device_name=o.device_name,
            local_hostname=o.local_hostname,
            global_segment_size=o.global_segment_size or self.sizes.global_segment_size,
            local_buffer_size=o.local_buffer_size or self.sizes.local_buffer_size,
            sample_bytes=o.sample_bytes or self.sizes.sample_bytes,
            recv_buffers=o.recv_buffers,
            gpu_direct=o.gpu_direct,
            put_timeout_s=o.put_timeout_s,
            connect_timeout_s=o.connect_timeout_s,
            launched=launched,
        )

    def connect(self, handle: MooncakeHandle) -> MooncakeStore:
        return MooncakeStore(handle)

    def leftover_keys(self, handle: MooncakeHandle) -> list[str]:
        """Keys of this run still in the store (the run-end check: should be empty)."""
        return MooncakeStore.keys_of(handle)

    def stop(self, handle: MooncakeHandle) -> None:
        """Remove what this run left behind (e.g. a killed consumer's samples); stop our master."""
        try:
            left = self._cleanup(handle)
            if left:
                log.warning("mooncake store: %d keys of run %s were left at stop; removed them",
                            left, handle.run_id)
        finally:
            proc = self._masters.pop(handle.run_id, None)
            if proc is not None:
                stop_master(proc)

    def _cleanup(self, handle: MooncakeHandle) -> int:
        try:
            left = len(MooncakeStore.keys_of(handle))
        except OSError as exc:
            log.warning("mooncake store: master admin server %s unreachable at stop (%s)", handle.metrics_addr, exc)
            return 0
        if left:
            # a client that contributes no memory, only to remove this run's keys
            cleaner = MooncakeStore(attrs.evolve(handle, global_segment_size=0, recv_buffers=1, sample_bytes=0))
            try:
                cleaner.remove_run()
            finally:
                cleaner.close()
        return left


def make_mooncake(options: Optional[MooncakeOptions]) -> MooncakeProvider:
    return MooncakeProvider(options)
