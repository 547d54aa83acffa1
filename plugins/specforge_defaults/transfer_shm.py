"""``shm`` transfer store: one file per key in a shared-memory directory, for several processes on
one node (the Ray pipeline's default).

File layout (little endian; see docs/defaults.md)::

    [0:8)    magic  b"SFSHM001"
    [8:16)   uint64 header length L
    [16:16+L) JSON  {"tensors": [{"name", "dtype", "shape", "offset", "nbytes"}, ...]}
    then each tensor's raw bytes at its ``offset`` (absolute, 64-byte aligned)

``put`` writes to a hidden temp file and renames it over the key's file, so a reader sees either
the old sample or the new one, never a partial one (overwrite = last writer wins). ``get`` maps the file
copy-on-write (or, with ``read_mode = "read"``, reads it with one read into one buffer) and returns
views of it (bf16 included).
Keys may be any non-empty string: they are percent-encoded into file names.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import re
import shutil
import struct
import threading
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Optional
from urllib.parse import quote, unquote

import attrs
import torch

from specforge_core.config.fields import option

MAGIC = b"SFSHM001"
ALIGN = 64
MAX_NAME = 200  # file-name bytes (NAME_MAX is 255; leaves room for the temp prefix)
_PREFIX = struct.Struct("<8sQ")
_CHUNK = 1 << 30  # one syscall moves at most ~2 GiB on Linux; stay well under
DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
        torch.int16, torch.int8, torch.uint8, torch.bool,
    )
}


@attrs.define
class ShmOptions:
    root: str = option("/dev/shm", "Shared-memory directory; each run uses <root>/specforge-<run_id>", path=True)
    read_mode: str = option(
        "mmap",
        "How get() reads a sample: 'mmap' maps the file (copy-on-write, no copy until touched) or "
        "'read' copies it into a fresh buffer with one read",
        choices=("mmap", "read"),
    )


@dataclass(frozen=True)
class ShmHandle:
    path: str  # the run's directory; picklable, shipped to every process
    read_mode: str = "mmap"


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def key_to_filename(key: str) -> str:
    """Reversible, path-safe file name of a key; ValueError with the reason if it cannot be one."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"transfer store 'shm': key must be a non-empty string, got {key!r}")
    name = quote(key, safe="-_.:@=+,")
    if name[0] == ".":  # hidden names are reserved for temp files (and '.', '..')
        name = "%2E" + name[1:]
    if len(name) > MAX_NAME:
        raise ValueError(
            f"transfer store 'shm': key {key[:40]!r}... is too long ({len(name)} bytes encoded; "
            f"allowed: at most {MAX_NAME})"
        )
    return name


def filename_to_key(name: str) -> str:
    return unquote(name)


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        n = os.write(fd, data[:_CHUNK])
        data = data[n:]


def _as_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (after one to CPU/contiguous if needed: CUDA tensors take
    the pinned path in ``put``, other devices come through here)."""
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def encode_header(tensors: Mapping[str, torch.Tensor]) -> tuple[bytes, list[int]]:
    """Prefix+JSON header padded to ALIGN, and the data offset of each tensor."""
    metas, sizes = [], []
    for name, t in tensors.items():
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise TypeError(f"transfer store 'shm': tensor {name!r} has unsupported dtype {t.dtype}")
        sizes.append(t.numel() * t.element_size())
        metas.append({"name": name, "dtype": dtype, "shape": list(t.shape), "nbytes": sizes[-1]})
    # offsets depend on the header length, which depends on the offsets' digits: iterate to the fixed
    # point (offsets only grow, so this ends, usually after 2 passes)
    offsets = [0] * len(metas)
    while True:
        for m, off in zip(metas, offsets, strict=True):
            m["offset"] = off
        body = json.dumps({"tensors": metas}, separators=(",", ":")).encode()
        pos = _align(_PREFIX.size + len(body))
        new = []
        for size in sizes:
            new.append(pos)
            pos = _align(pos + size)
        if new == offsets:
            break
        offsets = new
    head = _PREFIX.pack(MAGIC, len(body)) + body
    return head + b"\0" * (offsets[0] - len(head) if offsets else 0), offsets


def decode(buf: torch.Tensor, origin: str) -> dict[str, torch.Tensor]:
    raw = buf.numpy()
    magic, length = _PREFIX.unpack_from(raw, 0)
    if magic != MAGIC:
        raise ValueError(f"transfer store 'shm': {origin} is not a specforge shm sample (bad magic {magic!r})")
    meta = json.loads(bytes(raw[_PREFIX.size : _PREFIX.size + length]))
    out = {}
    for m in meta["tensors"]:
        start = m["offset"]
        view = buf[start : start + m["nbytes"]].view(DTYPES[m["dtype"]])
        out[m["name"]] = view.view(m["shape"])
    return out


class ShmStore:
    def __init__(self, handle: ShmHandle):
        self.path = handle.path
        self.read_mode = handle.read_mode
        self._pinned: Optional[torch.Tensor] = None  # staging for GPU tensors (grow-only)
        self._pinned_lock = threading.Lock()

    def _gpu_image(self, header: bytes, offsets: list[int], tensors: Mapping[str, torch.Tensor]) -> memoryview:
        """The whole file image in a reusable pinned buffer: the device-to-host copies run at
        full DMA speed (a copy to pageable memory is several times slower and allocates)."""
        ts = list(tensors.values())
        total = offsets[-1] + ts[-1].numel() * ts[-1].element_size()
        if self._pinned is None or self._pinned.numel() < total:
            self._pinned = None
            self._pinned = torch.empty(total + total // 4, dtype=torch.uint8, pin_memory=True)
        buf = self._pinned
        buf[: len(header)].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
        devices = set()
        for t, off in zip(ts, offsets, strict=True):
            n = t.numel() * t.element_size()
            buf[off : off + n].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8), non_blocking=True)
            if t.is_cuda:
                devices.add(t.device)
        for d in devices:
            torch.cuda.current_stream(d).synchronize()
        return memoryview(buf[:total].numpy())

    def _file(self, key: str) -> str:
        return os.path.join(self.path, key_to_filename(key))

    def put(self, key: str, tensors: Mapping[str, torch.Tensor]) -> int:
        final = self._file(key)
        if not os.path.isdir(self.path):
            raise RuntimeError(f"transfer store 'shm': {self.path} does not exist (was the store stopped?)")
        header, offsets = encode_header(tensors)
        tmp = os.path.join(self.path, f".tmp-{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if tensors and any(t.is_cuda for t in tensors.values()):
                with self._pinned_lock:  # one write of the file image staged in pinned memory
                    _write_all(fd, self._gpu_image(header, offsets, tensors))
                payload = sum(t.numel() * t.element_size() for t in tensors.values())
            else:  # host tensors: written from their own memory, no copy
                _write_all(fd, memoryview(header))
                pos, payload = len(header), 0
                for t, off in zip(tensors.values(), offsets, strict=True):
                    if off > pos:
                        _write_all(fd, memoryview(b"\0" * (off - pos)))
                    data = _as_bytes(t)
                    _write_all(fd, data)
                    pos, payload = off + data.nbytes, payload + data.nbytes
            os.close(fd)
            fd = -1
            os.replace(tmp, final)  # atomic: readers see the whole sample or none of it
        except BaseException as exc:
            if fd >= 0:
                os.close(fd)
            if os.path.exists(tmp):
                os.unlink(tmp)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                free = shutil.disk_usage(self.path).free
                raise OSError(
                    errno.ENOSPC,
                    f"transfer store 'shm': {os.path.dirname(self.path)} is full ({free} bytes free) "
                    f"writing key {key!r}; lower transfer.max_pool_bytes or enlarge the shared memory "
                    "(e.g. docker --shm-size), or set [transfer.shm] root",
                ) from exc
            raise
        return payload

    def get(self, key: str, device: Optional[torch.device] = None) -> dict[str, torch.Tensor]:
        def into(fd: int, size: int, path: str) -> torch.Tensor:
            return self._map(fd, size) if self.read_mode == "mmap" and size else self._read(fd, size, path)

        tensors = self._load(key, into)
        if device is not None and torch.device(device).type != "cpu":
            tensors = {name: t.to(device) for name, t in tensors.items()}
        return tensors

    def get_into(self, key: str, alloc: Callable[[int], torch.Tensor]) -> dict[str, torch.Tensor]:
        """Like ``get``, read with one ``readv`` straight into ``alloc(file size)`` (a uint8 buffer
        the caller owns and may reuse, e.g. pinned memory); the tensors are views of it."""
        return self._load(key, lambda fd, size, path: self._read(fd, size, path, alloc(size)))

    def _load(self, key: str, into: Callable[[int, int, str], torch.Tensor]) -> dict[str, torch.Tensor]:
        """Open ``key``'s file, let ``into(fd, size, path)`` bring its bytes into a buffer, decode."""
        path = self._file(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise KeyError(f"transfer store 'shm' ({self.path}): no key {key!r}") from None
        try:
            buf = into(fd, os.fstat(fd).st_size, path)
        finally:
            os.close(fd)  # a mapping outlives its descriptor
        return decode(buf, path)

    @staticmethod
    def _map(fd: int, size: int) -> torch.Tensor:
        # copy-on-write: the tensors are writable without touching the shared file; the pages stay
        # valid after the key is deleted (unlinked) until the last tensor viewing them is freed
        mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        return torch.frombuffer(mm, dtype=torch.uint8)

    @staticmethod
    def _read(fd: int, size: int, path: str, buf: Optional[torch.Tensor] = None) -> torch.Tensor:
        buf = torch.empty(size, dtype=torch.uint8) if buf is None else buf
        view, done = memoryview(buf.numpy()), 0
        while done < size:  # one read for samples under 1 GiB
            n = os.readv(fd, [view[done : done + _CHUNK]])
            if n == 0:
                raise OSError(f"transfer store 'shm': {path} shrank while reading")
            done += n
        return buf

    def delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            try:
                os.unlink(self._file(key))
            except FileNotFoundError:
                pass  # idempotent: deleting a missing key is a no-op

    def keys(self) -> list[str]:
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        return [filename_to_key(n) for n in names if not n.startswith(".")]

    def count(self) -> int:
        return len(self.keys())

    def close(self) -> None:
        pass  # nothing held open between calls


OWNER_SUFFIX = ".owner"  # <root>/specforge-<run>.owner: who made the directory (pid, host, start)


def _proc_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return start is None or _proc_start(pid) in (None, start)


def sweep_dead(root: str) -> list[str]:
    """Remove the store directories under ``root`` whose owning process (on this host) is gone: a
    ``kill -9`` of a driver never reaches ``stop``. Directories of live owners, of other hosts and
    without an owner file (another version, or not ours) are left alone. Returns what was removed."""
    import socket

    removed = []
    for owner_file in sorted(glob_owner_files(root)):
        path = owner_file[: -len(OWNER_SUFFIX)]
        try:
            with open(owner_file) as f:
                owner = json.load(f)
            if owner["host"] != socket.gethostname() or _alive(int(owner["pid"]), owner.get("start")):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable or being written: not provably dead
        n = len(ShmStore(ShmHandle(path)).keys()) if os.path.isdir(path) else 0
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(owner_file)
        removed.append(f"{path} (pid {owner['pid']} on {owner['host']}, {n} keys)")
    return removed


def glob_owner_files(root: str) -> list[str]:
    try:
        names = os.listdir(root)
    except OSError:
        return []
    return [os.path.join(root, n) for n in names if n.startswith("specforge-") and n.endswith(OWNER_SUFFIX)]


class ShmStoreProvider:
    def __init__(self, options: Optional[ShmOptions] = None):
        self.options = options or ShmOptions()

    def start(self, run_id: str) -> ShmHandle:
        import socket

        root = self.options.root
        if not os.path.isdir(root):
            raise FileNotFoundError(
                f"transfer store 'shm': root {root!r} does not exist; set [transfer.shm] root to a "
                "tmpfs directory (Linux: /dev/shm)"
            )
        removed = sweep_dead(root)
        if removed:
            warnings.warn(f"transfer store 'shm': removed {len(removed)} store(s) of runs that died without "
                          f"stopping: {'; '.join(removed)}", stacklevel=2)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id) or "run"
        path = os.path.join(root, f"specforge-{safe}")
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "start": _proc_start(os.getpid())}
        with open(path + OWNER_SUFFIX, "w") as f:  # before the directory: a dir is never ownerless
            json.dump(owner, f)
        if os.path.exists(path):
            left = len(ShmStore(ShmHandle(path)).keys())
            warnings.warn(
                f"transfer store 'shm': removing {path} left by an earlier run ({left} keys)", stacklevel=2
            )
            shutil.rmtree(path)
        os.makedirs(path, mode=0o700)
        return ShmHandle(path, self.options.read_mode)

    def connect(self, handle: ShmHandle) -> ShmStore:
        return ShmStore(handle)

    def stop(self, handle: ShmHandle) -> None:
        left = ShmStore(handle).count()
        shutil.rmtree(handle.path, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(handle.path + OWNER_SUFFIX)
        if left:
            warnings.warn(
                f"transfer store 'shm': {left} keys were left at stop; removed {handle.path}", stacklevel=2
            )


def make_shm(options: Optional[ShmOptions]) -> ShmStoreProvider:
    return ShmStoreProvider(options)
