"""Reading ``torch.distributed.checkpoint`` (DCP) directories without running code from them.

torch's own reader unpickles ``.metadata`` with :func:`pickle.load` and its default load planner
reads non-tensor items (e.g. the optimizer's ``param_groups``) with ``torch.load(weights_only=False)``:
a checkpoint from elsewhere could run any code on ``specforge export`` or resume. Here

- ``.metadata`` is unpickled by an unpickler that resolves only DCP's metadata classes (and
  ``torch.Size``, dtypes, layouts, paths); any other global is refused before it is looked up;
- non-tensor items are read with ``torch.load(weights_only=True)`` (plain data only); tensors
  already are;
- every storage file the metadata names must be a file inside the checkpoint directory;
- torch wraps failures of a load or save in ``CheckpointException``, a ``BaseException``: the
  error it carries is re-raised (a :class:`CheckpointError` naming the file, or the ``OSError``).
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import types
from pathlib import Path
from typing import Any, Optional

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)

from specforge_core.training.checkpoint import DCP_METADATA as METADATA
from specforge_core.training.checkpoint import CheckpointError, refusal_reason

# What a DCP ``.metadata`` pickle may name (torch 2.4 .. 2.14 write only these).
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    # where older torch versions defined TensorProperties (same dataclass)
    "torch.distributed._shard.sharded_tensor.metadata": {"TensorProperties", "MEM_FORMAT_ENCODING"},
    "torch.serialization": {"_get_layout"},  # maps "torch.strided" to the layout object
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle._Unpickler):  # the Python one: its opcodes can be guarded
    """Resolves only ``_ALLOWED`` globals, and sets state (BUILD) only on instances: not on a class
    or function, which would change them for the whole process."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)):
            return getattr(torch, name)  # a value, not a callable
        raise pickle.UnpicklingError(f"{module}.{name}")

    def load_build(self) -> None:
        target = self.stack[-2]
        if isinstance(target, (type, types.ModuleType)) or callable(target):
            raise pickle.UnpicklingError(f"state set on {getattr(target, '__qualname__', type(target).__name__)}")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build


def _refused(file: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint file {file} holds {what}, which is not checkpoint data, and was refused unread "
        "(loading it could run code); use a checkpoint written by specforge, or one from a source you trust"
    )


def read_metadata(directory: str | Path) -> Metadata:
    """The DCP metadata of ``directory``, unpickled with only DCP's own classes allowed, and checked
    (every storage file a plain file name inside ``directory``)."""
    d = Path(directory)
    file = d / METADATA
    try:
        with open(file, "rb") as fh:
            md = _MetadataUnpickler(fh).load()
    except pickle.UnpicklingError as exc:
        what = str(exc) if str(exc).startswith("state set on") else f"a reference to {exc}"
        raise _refused(file, what) from None
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {d} has no {METADATA} (not a distributed checkpoint)") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint file {file} cannot be read ({type(exc).__name__}: {exc})") from None
    _check(md, d, file)
    return md


def _check(md: Any, d: Path, file: Path) -> None:
    if not isinstance(md, Metadata):
        raise _refused(file, f"a {type(md).__name__} instead of DCP metadata")
    if not isinstance(md.state_dict_metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, (TensorStorageMetadata, BytesStorageMetadata))
        for k, v in md.state_dict_metadata.items()
    ):
        raise CheckpointError(f"checkpoint file {file}: its state_dict_metadata is not DCP's")
    storage = md.storage_data if md.storage_data is not None else {}
    if not isinstance(storage, dict):
        raise CheckpointError(f"checkpoint file {file}: its storage_data is not a mapping")
    for index, info in storage.items():
        rel = getattr(info, "relative_path", None)
        if not isinstance(index, MetadataIndex) or not isinstance(rel, str):
            raise CheckpointError(f"checkpoint file {file}: a storage entry is not DCP's")
        if rel in ("", ".", "..") or Path(rel).name != rel or "\\" in rel:
            raise CheckpointError(
                f"checkpoint file {file} points {index.fqn!r} at {rel!r}, outside the checkpoint directory; refused")


class SafeReader(FileSystemReader):
    """``FileSystemReader`` whose metadata and non-tensor items are read as data only."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(str(path))
        self._directory = Path(path)
        self._metadata: Optional[Metadata] = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # rank-local metadata: specforge writes none, read none
            raise CheckpointError(f"checkpoint {self._directory} has no readable {METADATA}")
        if self._metadata is None:
            self._metadata = read_metadata(self._directory)
        if getattr(self._metadata, "storage_meta", None) is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        # file by file, so that a refused tensor item names its file
        by_file: dict[str, list] = {}
        for item in plan.items:
            by_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        fut = None
        for rel, items in by_file.items():
            try:
                fut = super().read_data(dataclasses.replace(plan, items=items), planner)
            except pickle.UnpicklingError as exc:
                raise _refused(self._directory / rel, f"objects other than tensors ({refusal_reason(exc)})") from None
        if fut is None:
            fut = super().read_data(plan, planner)
        return fut


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` reading non-tensor items with ``weights_only=True``."""

    def __init__(self, directory: str | Path) -> None:
        super().__init__()
        self._directory = Path(directory)

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError) as exc:
            rel = self.metadata.storage_data[read_item.storage_index].relative_path
            what = f"objects other than plain data in item {read_item.dest_index.fqn!r} ({refusal_reason(exc)})"
            raise _refused(self._directory / rel, what) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def unwrap(exc: BaseException) -> BaseException:
    """The error a torch ``CheckpointException`` carries (this rank's, else the first), else ``exc``."""
    failures = getattr(exc, "failures", None)
    if not isinstance(failures, dict) or not failures:
        return exc
    try:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    except Exception:  # noqa: BLE001 - no group: rank 0
        rank = 0
    found = failures.get(rank, next(iter(failures.values())))
    inner = found[0] if isinstance(found, tuple) and found else found
    return inner if isinstance(inner, BaseException) else exc


def load(state: dict[str, Any], directory: str | Path, *, no_dist: bool = False) -> None:
    """``dcp.load`` of ``directory`` into ``state`` (in place), reading only data. The metadata is
    checked first, on every rank, so a refused checkpoint fails before any collective."""
    import torch.distributed.checkpoint as dcp

    reader = SafeReader(directory)
    reader.read_metadata()
    try:
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(directory), no_dist=no_dist)
    except BaseException as exc:
        inner = unwrap(exc)
        if inner is exc:
            raise
        if isinstance(inner, (CheckpointError, OSError)):
            raise inner from None
        raise CheckpointError(f"checkpoint {directory} cannot be loaded ({type(inner).__name__}: "
                              f"{_first_line(inner)})") from None


def load_trainables(directory: str | Path, module: torch.nn.Module, prefix: str = "draft.") -> None:
    """Fill ``module``'s trainable parameters from a DCP checkpoint's ``model`` entry (keys
    ``<prefix><name>``: the trainer's wrapper; frozen parameters are not saved), in this one process
    with no process group (``specforge export``)."""
    import warnings

    names = [n for n, p in module.named_parameters() if p.requires_grad]
    state = {"model": {f"{prefix}{n}": module.get_parameter(n).detach().float().clone() for n in names}}
    with warnings.catch_warnings():  # loading in one process without a group is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load(state, directory, no_dist=True)  # a key it lacks: CheckpointError naming the key
    with torch.no_grad():
        for n in names:
            module.get_parameter(n).copy_(state["model"][f"{prefix}{n}"])
