"""Registered buffer pool: memory is registered with Mooncake once and reused for every sample.

A slot grows (re-registered) only when a sample is larger than any before it, so the steady state
allocates nothing. Receive slots are lent out with the tensors ``get`` returns: the slot comes back
to the pool when the last of those tensors is garbage collected.
"""

from __future__ import annotations

import ctypes
import threading
import time
import weakref
from typing import Callable, Optional

import numpy as np
import torch

from specforge_mooncake.sizing import MiB, round_up


class Slot:
    def __init__(self) -> None:
        self.buf: Optional[torch.Tensor] = None  # uint8, registered

    @property
    def cap(self) -> int:
        return 0 if self.buf is None else self.buf.numel()

    @property
    def ptr(self) -> int:
        return self.buf.data_ptr()


class BufferPool:
    def __init__(
        self, n: int, nbytes: int, register: Callable[[int, int], int], unregister: Callable[[int], int],
        device: torch.device = torch.device("cpu"),
    ) -> None:
        self._register, self._unregister, self.device = register, unregister, device
        self._free = [Slot() for _ in range(n)]
        self._all = list(self._free)
        self._cv = threading.Condition()
        for s in self._free:
            if nbytes:
                self.grow(s, nbytes)

    def grow(self, slot: Slot, nbytes: int) -> None:
        if nbytes <= slot.cap:
            return
        if slot.buf is not None:
            self._unregister(slot.ptr)
        size = round_up(max(nbytes, MiB), MiB)
        pin = self.device.type == "cpu" and torch.cuda.is_available()
        slot.buf = torch.empty(size, dtype=torch.uint8, device=self.device, pin_memory=pin)
        rc = self._register(slot.ptr, size)
        if rc != 0:
            raise RuntimeError(f"mooncake store: register_buffer({size} bytes) failed with code {rc}")

    def acquire(self, timeout_s: float) -> Slot:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while not self._free:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"mooncake store: all {len(self._all)} registered buffers are in use for {timeout_s:.0f}s "
                        "(tensors returned by get() keep their buffer; drop them or raise "
                        "[transfer.mooncake] recv_buffers)"
                    )
                self._cv.wait(left)
            return self._free.pop()

    def release(self, slot: Slot) -> None:
        with self._cv:
            self._free.append(slot)
            self._cv.notify()

    def lend(self, slot: Slot, nbytes: int) -> torch.Tensor:
        """A uint8 CPU view of ``slot``'s first ``nbytes`` whose death returns the slot to the pool."""
        arr = np.ctypeslib.as_array((ctypes.c_uint8 * max(nbytes, 1)).from_address(slot.ptr))
        # torch.from_numpy keeps ``arr`` alive; the finalizer holds ``buf`` so the memory outlives close()
        weakref.finalize(arr, self._give_back, slot, slot.buf)
        return torch.from_numpy(arr)[:nbytes]

    def _give_back(self, slot: Slot, _buf: torch.Tensor) -> None:
        self.release(slot)

    def close(self) -> None:
        for s in self._all:
            if s.buf is not None:
                self._unregister(s.ptr)
                s.buf = None
