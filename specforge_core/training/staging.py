"""Staging: turn store keys into a device-resident ``Batch`` off the training thread.

A trainer's prefetch thread reads each sample out of the transfer store into a reusable pinned
host buffer, starts its copy to the GPU on a side CUDA stream, and collates (pads, casts) on the
GPU, all while the training thread runs the previous step. The training thread then only waits on
an event (usually already passed) before using the batch.

Why this matters (measured, docs/pipeline.md): reading features lazily in the training thread
(page faults on a memory-mapped sample, a CPU-side pad/cast, a blocking copy from pageable memory)
cost as much as the training step itself.

On a CPU device the same code reads each sample into a fresh buffer (the bytes are materialised in
the prefetch thread, not faulted in later) and collates on the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import attrs
import torch

from specforge_core.components import capability
from specforge_core.training.batch import Batch
from specforge_core.training.packing import assemble
from specforge_core.types import TargetFeatures

ALIGN = 64  # byte alignment of each tensor inside a staging buffer (any dtype can view it)

Alloc = Callable[[int], torch.Tensor]  # nbytes -> uint8 tensor of exactly that many bytes


def read_into(store: Any, key: str, alloc: Alloc) -> dict[str, torch.Tensor]:
    """``key``'s tensors as views into one buffer from ``alloc``.

    A store may implement ``get_into(key, alloc)`` to read straight into that buffer (the ``shm``
    store does: one ``readv`` into pinned memory); any other store is read with ``get`` and copied.
    """
    get_into = capability(store, "TransferStore.get_into")
    if get_into is not None:
        return get_into(key, alloc)
    tensors = store.get(key)
    return pack(tensors, alloc)


def pack(tensors: Mapping[str, torch.Tensor], alloc: Alloc) -> dict[str, torch.Tensor]:
    """Copy ``tensors`` into one buffer from ``alloc`` (64-byte aligned); return views of it."""
    offsets, pos = [], 0
    for t in tensors.values():
        offsets.append(pos)
        pos = -(-(pos + t.numel() * t.element_size()) // ALIGN) * ALIGN
    buf = alloc(pos)
    out = {}
    for (name, t), off in zip(tensors.items(), offsets, strict=True):
        n = t.numel() * t.element_size()
        view = buf[off : off + n].view(t.dtype).view(t.shape)
        view.copy_(t)
        out[name] = view
    return out


class _Slot:
    def __init__(self) -> None:
        self.buf: Optional[torch.Tensor] = None
        self.event: Optional[torch.cuda.Event] = None  # the last copy that read this buffer


class PinnedRing:
    """A few grow-only pinned host buffers, reused round robin. A buffer is handed out again only
    after the device copy that last read it has finished (its event)."""

    def __init__(self, slots: int):
        if slots < 1:
            raise ValueError(f"PinnedRing: slots must be >= 1, got {slots}")
        self.slots = [_Slot() for _ in range(slots)]
        self.next = 0

    def acquire(self, nbytes: int) -> _Slot:
        slot = self.slots[self.next]
        self.next = (self.next + 1) % len(self.slots)
        if slot.event is not None:
            slot.event.synchronize()
            slot.event = None
        if slot.buf is None or slot.buf.numel() < nbytes:
            # grow with headroom so samples of slowly rising length do not reallocate every time
            slot.buf = None
            slot.buf = torch.empty(max(nbytes + nbytes // 4, 1 << 20), dtype=torch.uint8, pin_memory=True)
        return slot

    @property
    def pinned_bytes(self) -> int:
        return sum(s.buf.numel() for s in self.slots if s.buf is not None)


@attrs.define
class StagedBatch:
    """A collated batch whose device copies may still be in flight on the stager's stream."""

    batch: Batch
    event: Optional[torch.cuda.Event] = None  # recorded on the stager's stream after the batch's last copy

    def ready(self) -> Batch:
        """The batch, usable on the calling thread's current stream (call it from that thread)."""
        if self.event is not None:
            current = torch.cuda.current_stream(self.batch.aux_hidden.device)
            current.wait_event(self.event)
            # the caching allocator must not hand these blocks to the stager's stream while the
            # training stream may still read them
            for t in attrs.astuple(self.batch, recurse=False):
                if t is not None:  # doc_ids / position_ids of unpacked batches
                    t.record_stream(current)
            self.event = None
        return self.batch


class BatchStager:
    """Reads micro-batches from a transfer store into device-resident ``Batch``es (one thread)."""

    def __init__(self, device: torch.device | str, dtype: torch.dtype, ring_slots: int = 3, pack_tokens: int = 0,
                 pack_rows: int = 0):
        self.device = torch.device(device)
        self.dtype = dtype
        self.pack_tokens = pack_tokens  # training.pack_tokens (training/packing.py)
        self.pack_rows = pack_rows  # rows per packed micro-batch (token budget: micro_batch_size); 0 = as needed
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.ring = PinnedRing(ring_slots) if self.cuda else None
        self.read_s = 0.0  # seconds in the store's reads (cumulative; CUDA path)
        self.stage_s = 0.0  # seconds in stage() (cumulative; CUDA path)

    def stage(self, store: Any, keys: Sequence[str], sample_ids: Sequence[str]) -> StagedBatch:
        """Read ``keys`` from ``store`` and collate them on the device (asynchronously on CUDA)."""
        if not self.cuda:
            feats = [
                TargetFeatures.from_tensors(sid, read_into(store, key, _fresh))
                for key, sid in zip(keys, sample_ids, strict=True)
            ]
            return StagedBatch(assemble(feats, self.device, self.dtype, self.pack_tokens, self.pack_rows))  # (read_s/stage_s: CUDA only)
        assert self.stream is not None and self.ring is not None
        feats = []
        t0 = time.perf_counter()
        with torch.cuda.stream(self.stream):
            for key, sid in zip(keys, sample_ids, strict=True):
                given: list[tuple[_Slot, torch.Tensor]] = []

                def alloc(nbytes: int, given: list = given) -> torch.Tensor:
                    slot = self.ring.acquire(nbytes)  # type: ignore[union-attr]
                    given.append((slot, slot.buf[:nbytes]))  # type: ignore[index]
                    return given[-1][1]

                t = time.perf_counter()
                host = read_into(store, key, alloc)
                self.read_s += time.perf_counter() - t
                on_device = self._to_device(host, given[-1][1] if len(given) == 1 else None)
                done = torch.cuda.Event()
                done.record(self.stream)
                for slot, _ in given:
                    slot.event = done
                feats.append(TargetFeatures.from_tensors(sid, on_device))
            batch = assemble(feats, self.device, self.dtype, self.pack_tokens, self.pack_rows)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.stage_s += time.perf_counter() - t0
        return StagedBatch(batch, event)

    def _to_device(self, host: dict[str, torch.Tensor], buf: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        """One copy of the whole pinned buffer, then views at the same offsets (one transfer and
        one launch per sample instead of one per tensor); per tensor if they are not all in it."""
        if buf is not None and all(_inside(t, buf) for t in host.values()):
            dev = buf.to(self.device, non_blocking=True)
            base = buf.data_ptr()
            out = {}
            for name, t in host.items():
                off, n = t.data_ptr() - base, t.numel() * t.element_size()
                out[name] = dev[off : off + n].view(t.dtype).view(t.shape)
            return out
        return {k: t.to(self.device, non_blocking=True) for k, t in host.items()}


def _inside(t: torch.Tensor, buf: torch.Tensor) -> bool:
    """``t`` is a contiguous view of bytes within ``buf`` at an offset its dtype can view."""
    off = t.data_ptr() - buf.data_ptr()
    n = t.numel() * t.element_size()
    return t.is_contiguous() and 0 <= off and off + n <= buf.numel() and off % t.element_size() == 0


def _fresh(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)
