"""``local`` transfer store: an in-process dict, for the one-process local pipeline.

``put`` keeps references (zero copy): the producer must not modify tensors after handing them over.
Overwriting a key replaces its tensors; deleting a missing key is a no-op.
"""

from __future__ import annotations

import threading
import uuid
import warnings
from collections.abc import Mapping, Sequence
from typing import Optional

import torch

# handle -> store, so that every ``connect`` in this process gets the same object
_STORES: dict[str, LocalStore] = {}
_LOCK = threading.Lock()


def payload_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class LocalStore:
    def __init__(self, name: str):
        self.name = name
        self._data: dict[str, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()  # the local pipeline may produce and consume on threads

    def put(self, key: str, tensors: Mapping[str, torch.Tensor]) -> int:
        if not isinstance(key, str) or not key:
            raise ValueError(f"transfer store 'local': key must be a non-empty string, got {key!r}")
        stored = {name: t.detach() for name, t in tensors.items()}
        with self._lock:
            self._data[key] = stored
        return payload_bytes(stored)

    def get(self, key: str, device: Optional[torch.device] = None) -> dict[str, torch.Tensor]:
        with self._lock:
            try:
                tensors = self._data[key]
            except KeyError:
                raise KeyError(f"transfer store 'local' ({self.name}): no key {key!r}") from None
        if device is None:
            return dict(tensors)
        return {name: t.to(device) for name, t in tensors.items()}

    def delete(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                self._data.pop(key, None)

    def count(self) -> int:
        with self._lock:
            return len(self._data)

    def close(self) -> None:
        pass  # the provider owns the data; stop() frees it


class LocalStoreProvider:
    def __init__(self, options: None = None):
        self.options = options

    def start(self, run_id: str) -> str:
        handle = f"local:{run_id}:{uuid.uuid4().hex[:8]}"
        with _LOCK:
            _STORES[handle] = LocalStore(handle)
        return handle

    def connect(self, handle: str) -> LocalStore:
        with _LOCK:
            try:
                return _STORES[handle]
            except KeyError:
                raise RuntimeError(
                    f"transfer store 'local': no store {handle!r} in this process; the 'local' store only "
                    "works inside one process (use 'shm' or 'mooncake' across processes)"
                ) from None

    def stop(self, handle: str) -> None:
        with _LOCK:
            store = _STORES.pop(handle, None)
        if store is not None and store.count():
            warnings.warn(f"transfer store 'local': {store.count()} keys were left at stop ({handle})", stacklevel=2)


def make_local(options: None) -> LocalStoreProvider:
    return LocalStoreProvider(options)
