"""``MooncakeStore``: the TransferStore every process gets from ``connect``."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Optional

import attrs
import torch

from specforge_mooncake import codec
from specforge_mooncake.buffers import BufferPool
from specforge_mooncake.master import MooncakeUnavailable, http_json, route_ip, split_addr, wait_reachable

log = logging.getLogger("specforge.mooncake")

# Mooncake store error codes (mooncake-store/include/types.h) that we handle by name.
NO_AVAILABLE_HANDLE = -200  # no segment has room: the store is full
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
OBJECT_HAS_LEASE = -706
ERRORS = {-10: "BUFFER_OVERFLOW", -200: "NO_AVAILABLE_HANDLE (store full)", -600: "INVALID_PARAMS",
          -704: "OBJECT_NOT_FOUND", -705: "OBJECT_ALREADY_EXISTS", -706: "OBJECT_HAS_LEASE",
          -800: "TRANSFER_FAIL", -900: "RPC_FAIL"}


class MooncakeStoreFull(RuntimeError):
    pass


def err(code: int) -> str:
    return f"{code} {ERRORS.get(code, '')}".strip()


@attrs.define(frozen=True)
class MooncakeHandle:
    """Everything ``connect`` needs; plain data so it pickles to Ray actors."""

    run_id: str
    prefix: str  # every key of this run starts with it
    master_addr: str
    metrics_addr: str
    metadata_server: str
    protocol: str = "tcp"
    device_name: str = ""
    local_hostname: str = ""
    global_segment_size: int = 0
    local_buffer_size: int = 16 << 20
    sample_bytes: int = 0
    recv_buffers: int = 4
    put_timeout_s: float = 60.0
    connect_timeout_s: float = 15.0
    gpu_direct: bool = False  # get(device=cuda) reads straight into registered GPU buffers
    launched: bool = False  # start() launched the master (stop() terminates it)


def node_settings(h: MooncakeHandle) -> tuple[str, str, str]:
    """(protocol, device_name, local_hostname) with this node's environment overrides applied."""
    protocol = os.environ.get("SPECFORGE_MOONCAKE_PROTOCOL", h.protocol)
    if protocol not in ("tcp", "rdma"):
        raise ValueError(f"SPECFORGE_MOONCAKE_PROTOCOL={protocol!r}; allowed: 'tcp', 'rdma'")
    device = os.environ.get("SPECFORGE_MOONCAKE_DEVICE_NAME", h.device_name)
    if protocol == "rdma" and not device:
        raise ValueError("[transfer.mooncake] protocol = 'rdma' needs device_name (e.g. 'mlx5_0') or "
                         "SPECFORGE_MOONCAKE_DEVICE_NAME on this node")
    host = os.environ.get("SPECFORGE_MOONCAKE_LOCAL_HOSTNAME") or h.local_hostname
    if not host:
        host = os.environ.get("MC_TCP_BIND_ADDRESS") or route_ip(*split_addr(h.master_addr, "master_addr"))
    return protocol, device, host


class MooncakeStore:
    def __init__(self, handle: MooncakeHandle) -> None:
        from mooncake.store import MooncakeDistributedStore, ReplicateConfig

        self.h = handle
        wait_reachable(handle.master_addr, handle.connect_timeout_s, "master")
        protocol, device_name, host = node_settings(handle)
        self._mc = MooncakeDistributedStore()
        rc = self._mc.setup(host, handle.metadata_server, handle.global_segment_size, handle.local_buffer_size,
                            protocol, device_name, handle.master_addr)
        if rc != 0:
            raise MooncakeUnavailable(
                f"Mooncake setup failed ({err(rc)}): master {handle.master_addr}, metadata "
                f"{handle.metadata_server}, protocol {protocol}, device {device_name!r}, host {host}"
            )
        self._cfg = ReplicateConfig()
        self._cfg.replica_num = 1
        self._cfg.with_hard_pin = True  # never evicted: a full store errors instead of dropping samples
        reg, unreg = self._mc.register_buffer, self._mc.unregister_buffer
        self._send = BufferPool(1, handle.sample_bytes, reg, unreg)
        self._recv = BufferPool(handle.recv_buffers, handle.sample_bytes, reg, unreg)
        self._gpu_recv: dict[torch.device, BufferPool] = {}  # gpu_direct: one pool per device
        self._pending_delete: list[str] = []
        self._lock = threading.Lock()
        self._closed = False

    def _key(self, key: str) -> str:
        return self.h.prefix + key

    # -- producer -------------------------------------------------------------------------------
    def put(self, key: str, tensors: Mapping[str, torch.Tensor]) -> int:
        _, _, need = codec.layout(tensors)
        slot = self._send.acquire(self.h.put_timeout_s)
        try:
            self._send.grow(slot, need)
            size, payload = codec.pack_into(slot.buf, tensors)
            self._put_blob(self._key(key), slot.ptr, size)
        finally:
            self._send.release(slot)
        return payload

    def _put_blob(self, mkey: str, ptr: int, size: int) -> None:
        deadline, wait, logged = time.monotonic() + self.h.put_timeout_s, 0.05, False
        while True:
            # upsert: a second put of a key replaces it (as the other stores do)
            rc = self._mc.batch_upsert_from([mkey], [ptr], [size], self._cfg)[0]
            if rc == 0:
                return
            if rc != NO_AVAILABLE_HANDLE:
                raise RuntimeError(f"mooncake store: put {mkey!r} ({size} bytes) failed: {err(rc)}")
            self._flush_deletes()
            if time.monotonic() >= deadline:
                raise MooncakeStoreFull(
                    f"mooncake store full: put {mkey!r} ({size} bytes) found no room for "
                    f"{self.h.put_timeout_s:.0f}s; lower transfer.max_pool_bytes or raise "
                    "[transfer.mooncake] global_segment_size"
                )
            if not logged:
                log.warning("mooncake store full putting %s (%d bytes); retrying up to %.0fs",
                            mkey, size, self.h.put_timeout_s)
                logged = True
            time.sleep(wait)
            wait = min(wait * 2, 1.0)

    # -- consumer -------------------------------------------------------------------------------
    def get(self, key: str, device: Optional[torch.device] = None) -> dict[str, torch.Tensor]:
        mkey = self._key(key)
        on_gpu = device is not None and torch.device(device).type != "cpu"
        pool = self._gpu_pool(torch.device(device)) if on_gpu and self.h.gpu_direct else self._recv
        slot = pool.acquire(self.h.put_timeout_s)
        try:
            n = self._get_blob(mkey, slot, pool)
        except BaseException:
            pool.release(slot)
            raise
        if on_gpu:
            try:  # copy out to the device (device-to-device with gpu_direct) and hand the slot back
                return {k: v.to(device, copy=True) for k, v in codec.unpack(slot.buf[:n]).items()}
            finally:
                pool.release(slot)
        return codec.unpack(pool.lend(slot, n))  # zero-copy views; the slot returns when they die

    def _gpu_pool(self, device: torch.device) -> BufferPool:
        # The CUDA wheel can register GPU memory (GPUDirect RDMA); the non-CUDA wheel cannot.
        if device not in self._gpu_recv:
            self._gpu_recv[device] = BufferPool(self.h.recv_buffers, self.h.sample_bytes,
                                                self._mc.register_buffer, self._mc.unregister_buffer, device)
        return self._gpu_recv[device]

    def _get_blob(self, mkey: str, slot, pool: BufferPool) -> int:
        if slot.cap == 0:
            pool.grow(slot, self._size(mkey))
        n = self._mc.batch_get_into([mkey], [slot.ptr], [slot.cap])[0]
        if n < 0 and n != OBJECT_NOT_FOUND:  # most likely a buffer too small: size it and retry once
            pool.grow(slot, self._size(mkey))
            n = self._mc.batch_get_into([mkey], [slot.ptr], [slot.cap])[0]
        if n == OBJECT_NOT_FOUND:
            raise KeyError(f"mooncake store: no key {mkey!r} (never put, already deleted, or its "
                           "segment's owner process died)")
        if n < 0:
            raise RuntimeError(f"mooncake store: get {mkey!r} failed: {err(n)}")
        return n

    def _size(self, mkey: str) -> int:
        n = self._mc.get_size(mkey)
        if n < 0:
            raise KeyError(f"mooncake store: no key {mkey!r} ({err(n)})")
        return n

    # -- lifecycle ------------------------------------------------------------------------------
    def delete(self, keys: Sequence[str]) -> None:
        with self._lock:
            self._pending_delete.extend(self._key(k) for k in keys)
        self._flush_deletes()

    def _flush_deletes(self) -> None:
        with self._lock:
            keys, self._pending_delete = self._pending_delete, []
        if not keys:
            return
        # force=True skips the read lease: we delete only after the consumer has read the sample
        codes = self._mc.batch_remove(keys, True)
        retry = [k for k, rc in zip(keys, codes, strict=True) if rc not in (0, OBJECT_NOT_FOUND)]
        if retry:
            log.warning("mooncake store: %d deletes deferred (%s); retrying on the next call",
                        len(retry), err(codes[keys.index(retry[0])]))
            with self._lock:
                self._pending_delete.extend(retry)

    @staticmethod
    def keys_of(h: MooncakeHandle) -> list[str]:
        """Run ``h``'s keys as the master lists them (from every process)."""
        body = http_json(f"http://{h.metrics_addr}/get_all_keys")
        n = len(h.prefix)
        return [k[n:] for k in body.splitlines() if k.startswith(h.prefix)]

    def keys(self) -> list[str]:
        return self.keys_of(self.h)

    def remove_run(self) -> None:
        """Force-remove every key of this run (whoever put it)."""
        pattern = "^" + re.sub(r"([.^$*+?()\[\]{}|\\])", r"\\\1", self.h.prefix)
        rc = self._mc.remove_by_regex(pattern, True)
        if rc < 0:
            raise RuntimeError(f"mooncake store: removing run {self.h.run_id!r} keys failed: {err(rc)}")

    def count(self) -> int:
        self._flush_deletes()
        return len(self.keys())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._flush_deletes()
        finally:
            for pool in (self._send, self._recv, *self._gpu_recv.values()):
                pool.close()
            self._mc.close()

    def __del__(self) -> None:  # noqa: D105
        try:
            self.close()
        except Exception:
            pass
