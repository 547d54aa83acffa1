"""One packed blob per sample: a small header, then each tensor's bytes (64-byte aligned).

Packing into one object means one master round trip per put/get (vs one per tensor) and one
allocation in the pool. Layout::

    b"SFMC" | u32 header_len | header (JSON: [[name, dtype, shape], ...]) | pad | t0 | pad | t1 ...
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import torch

from specforge_mooncake.sizing import ALIGN, round_up

MAGIC = b"SFMC"
PREFIX = struct.Struct("<4sI")


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"mooncake store: unknown dtype {name!r} in a sample header")
    return dt


def layout(tensors: Mapping[str, torch.Tensor]) -> tuple[bytes, list[int], int]:
    """(header bytes, byte offset of each tensor, total blob size)."""
    meta = [[k, str(t.dtype).removeprefix("torch."), list(t.shape)] for k, t in tensors.items()]
    body = json.dumps(meta, separators=(",", ":")).encode()
    header = PREFIX.pack(MAGIC, len(body)) + body
    offsets, pos = [], round_up(len(header), ALIGN)
    for t in tensors.values():
        offsets.append(pos)
        pos = round_up(pos + t.numel() * t.element_size(), ALIGN)
    return header, offsets, pos


def pack_into(buf: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """Write the blob into uint8 ``buf``; return (blob size, payload bytes). Copies device->host."""
    header, offsets, total = layout(tensors)
    if total > buf.numel():
        raise ValueError(f"sample needs {total} bytes but the buffer holds {buf.numel()}")
    buf[: len(header)].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
    payload = 0
    for t, off in zip(tensors.values(), offsets, strict=True):
        n = t.numel() * t.element_size()
        if n:
            buf[off : off + n].view(t.dtype).view(t.shape).copy_(t)
        payload += n
    return total, payload


def unpack(buf: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of uint8 ``buf`` (no copies)."""
    magic, hlen = PREFIX.unpack(buf[: PREFIX.size].cpu().numpy().tobytes())
    if magic != MAGIC:
        raise ValueError("mooncake store: object is not a specforge sample (bad magic)")
    meta = json.loads(buf[PREFIX.size : PREFIX.size + hlen].cpu().numpy().tobytes())
    out, pos = {}, round_up(PREFIX.size + hlen, ALIGN)
    for name, dtype, shape in meta:
        dt = _dtype(dtype)
        n = dt.itemsize
        for s in shape:
            n *= s
        out[name] = buf[pos : pos + n].view(dt).view(shape) if n else torch.empty(shape, dtype=dt)
        pos = round_up(pos + n, ALIGN)
    return out
