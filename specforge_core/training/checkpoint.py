"""Step checkpoints under ``<output_dir>/checkpoints/step-NNNNNN/`` and exact resume.

The strategy writes model + optimizer + ``extra`` atomically and marks a finished directory with a
``COMPLETE`` file that lists every file with its size (and sha256 for small files); a checkpoint
counts as complete only when those files are all there and match, so a run killed while saving, or
a damaged newest checkpoint, resumes from the previous complete one.

Nothing in a checkpoint is executed when it is read: ``extra`` (step, scheduler, RNG, data
position, config, vocab mapping, run id) is stored as data, ``extra.json`` plus ``extra.safetensors``
for its tensors. Old checkpoints with a pickled ``extra.pt`` are read with ``weights_only=True``
(plain data only); anything else in them is refused with :class:`CheckpointError`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from specforge_core import provenance
from specforge_core.files import carried_error, file_sha256, fsync_path

COMPLETE = "COMPLETE"  # every strategy writes it last into a finished checkpoint directory
EXTRA_JSON = "extra.json"
EXTRA_TENSORS = "extra.safetensors"
LEGACY_EXTRA = "extra.pt"
OPTIMIZER_FILES = ("optimizer.pt",)  # what export can do without
DCP_METADATA = ".metadata"  # a sharded (torch.distributed.checkpoint) checkpoint's index
HASH_LIMIT = 64 << 20  # files up to this size are also pinned by sha256 in the marker
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot (or must not) be loaded; the message names it and what to do."""


class CheckpointWarning(UserWarning):
    pass


# ------------------------------------------------------------------------------ extra as data
def encode_extra(extra: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Split ``extra`` into JSON-able data and a flat dict of tensors (for safetensors)."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, where: str) -> Any:
        if isinstance(x, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = x.detach().to("cpu", copy=True).contiguous()
            return {"__tensor__": key}
        if isinstance(x, bool) or x is None or isinstance(x, (int, float, str)):
            return x
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{where}[{i}]") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{where}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v, f"{where}.{k}") for k, v in x.items()}
            return {"__items__": [[enc(k, where), enc(v, f"{where}[{k!r}]")] for k, v in x.items()]}
        raise TypeError(f"checkpoint extra: {where} is a {type(x).__name__}; only data "
                        "(numbers, strings, lists, tuples, dicts, tensors) can be stored")

    return {k: enc(v, k) for k, v in extra.items()}, tensors


def decode_extra(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(data, list):
        return [decode_extra(v, tensors) for v in data]
    if isinstance(data, dict):
        if "__tensor__" in data:
            return tensors[data["__tensor__"]]
        if "__tuple__" in data:
            return tuple(decode_extra(v, tensors) for v in data["__tuple__"])
        if "__items__" in data:
            return {_hashable(decode_extra(k, tensors)): decode_extra(v, tensors) for k, v in data["__items__"]}
        return {k: decode_extra(v, tensors) for k, v in data.items()}
    return data


def _hashable(x: Any) -> Any:
    return tuple(_hashable(v) for v in x) if isinstance(x, (list, tuple)) else x


def write_extra(directory: str | Path, extra: dict[str, Any]) -> list[str]:
    """Write ``extra`` as data into ``directory``; returns the file names written (fsynced)."""
    from safetensors.torch import save_file

    data, tensors = encode_extra(extra)
    d = Path(directory)
    (d / EXTRA_JSON).write_text(json.dumps(data))
    save_file(tensors, str(d / EXTRA_TENSORS))
    for name in (EXTRA_JSON, EXTRA_TENSORS):
        fsync_path(d / name)
    return [EXTRA_JSON, EXTRA_TENSORS]


def read_extra(directory: str | Path) -> dict[str, Any]:
    """The checkpoint's ``extra``, read as data (never unpickles code)."""
    d = Path(directory)
    if (d / EXTRA_JSON).is_file():
        from safetensors.torch import load_file

        try:
            data = json.loads((d / EXTRA_JSON).read_text())
            tensors = load_file(str(d / EXTRA_TENSORS)) if (d / EXTRA_TENSORS).is_file() else {}
            return decode_extra(data, tensors)
        except (ValueError, KeyError, OSError) as exc:
            raise CheckpointError(f"checkpoint {d}: cannot read {EXTRA_JSON}/{EXTRA_TENSORS} ({exc})") from exc
    if (d / LEGACY_EXTRA).is_file():
        import pickle

        try:  # an older specforge pickled extra; plain data loads, anything else is refused
            return torch.load(d / LEGACY_EXTRA, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint {d}: {LEGACY_EXTRA} holds objects other than plain data ({refusal_reason(exc)}) "
                "and was refused unread (loading it could run code). Use a checkpoint written by this "
                "specforge, or one from a source you trust re-saved as data"
            ) from None
    raise CheckpointError(f"checkpoint {d} has no {EXTRA_JSON} (nor a legacy {LEGACY_EXTRA})")


def load_optimizer_state(path: str | Path) -> dict[str, Any]:
    """``optimizer.pt`` with ``weights_only=True`` (tensors and plain data only)."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint file {path} holds objects other than plain optimizer state ({refusal_reason(exc)}) "
            "and was refused unread (loading it could run code); use a checkpoint written by specforge, "
            "or one from a source you trust") from None


def refusal_reason(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, without torch's advice to retry with
    ``weights_only=False`` (that would run the code the refusal just stopped)."""
    text = str(exc)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        return f"it refers to {m.group(1)}"
    m = re.search(r"WeightsUnpickler error: ([^\n]*?)(?:\.?\s*Please use|\n|$)", text)
    if m and m.group(1).strip():
        return m.group(1).strip()
    lines = [ln for ln in text.splitlines() if ln.strip() and "weights_only" not in ln]
    return lines[0].strip() if lines else type(exc).__name__


def load_model_weights(model: torch.nn.Module, file: str | Path) -> None:
    """Load a checkpoint's ``model.safetensors`` into ``model``; only frozen params (the target's,
    reloaded from it when the draft is built) may be absent from the file."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(file))
    except Exception as exc:  # truncated or not safetensors
        raise CheckpointError(f"{file}: cannot read the model weights ({exc})") from exc
    missing, unexpected = model.load_state_dict(state, strict=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    missing = [k for k in missing if k not in frozen]
    if missing or unexpected:
        raise CheckpointError(f"{file} does not fit this draft (missing {missing[:5]}, unexpected {unexpected[:5]})")


# -------------------------------------------------------------------------- complete / verify
def write_complete(directory: str | Path) -> None:
    """Write the ``COMPLETE`` marker listing every file under ``directory`` (call it last)."""
    import time

    d = Path(directory)
    files = {}
    for f in sorted(p for p in d.rglob("*") if p.is_file() and p.name != COMPLETE):
        entry: dict[str, Any] = {"size": f.stat().st_size}
        if entry["size"] <= HASH_LIMIT:
            entry["sha256"] = file_sha256(f)
        files[f.relative_to(d).as_posix()] = entry
    with open(d / COMPLETE, "w") as fh:
        json.dump({"files": files, "time": time.time()}, fh)
        fh.flush()
        os.fsync(fh.fileno())


def problems(path: str | Path, ignore: Iterable[str] = ()) -> list[str]:
    """What is wrong with the checkpoint directory ``path`` (empty: it is complete and intact).
    Files named in ``ignore`` may be missing or damaged (export does not read the optimizer)."""
    d = Path(path)
    marker = d / COMPLETE
    if not marker.is_file():
        return [f"no {COMPLETE} marker (interrupted while being written)"]
    try:
        listed = json.loads(marker.read_text()).get("files")
    except (ValueError, AttributeError):
        listed = None  # an older marker ("ok"): nothing to verify beyond its presence
    if isinstance(listed, list):  # an older marker: names only
        listed = {name: {} for name in listed}
    out = []
    for name, want in (listed or {}).items():
        if Path(name).name in ignore:
            continue
        f = d / name
        if not f.is_file():
            out.append(f"{name} is missing")
        elif "size" in want and f.stat().st_size != want["size"]:
            out.append(f"{name} has {f.stat().st_size} bytes, the marker says {want['size']}")
        elif "sha256" in want and file_sha256(f) != want["sha256"]:
            out.append(f"{name} does not match its sha256 in the marker")
    return out


def is_complete(path: str | Path, ignore: Iterable[str] = ()) -> bool:
    """``path`` is a finished checkpoint directory whose listed files are all present and intact."""
    return not problems(path, ignore)


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoint_root(output_dir) / f"step-{step:06d}"


def step_dirs(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Every ``step-N`` directory (complete or not), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d))
    return sorted(found)


def _complete_checkpoints(output_dir: str | Path, ignore: Iterable[str] = ()) -> list[tuple[int, Path]]:
    return [(s, d) for s, d in step_dirs(output_dir) if is_complete(d, ignore)]


def latest_checkpoint(output_dir: str | Path, ignore: Iterable[str] = (),
                      report: Optional[Callable[[str], None]] = None) -> Optional[Path]:
    """The newest complete, intact checkpoint directory, or None. Each newer one that is skipped
    (damaged, or without its marker) is named in one line (``report``, default ``warnings.warn``)."""
    ignore = tuple(ignore)
    for _, d in reversed(step_dirs(output_dir)):
        bad = problems(d, ignore)
        if not bad:
            return d
        if (d / COMPLETE).is_file():  # finished once, damaged since
            msg = f"checkpoint {d} is damaged ({'; '.join(bad)}); falling back to an earlier one"
        else:  # a save never finishes under this name (it writes a .tmp dir): copied or edited by hand
            msg = (f"checkpoint {d} has no {COMPLETE} marker (not a finished checkpoint); skipped, "
                   "falling back to an earlier one")
        if report is not None:
            report(msg)
        else:
            warnings.warn(msg, CheckpointWarning, stacklevel=2)
    return None


# ---------------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]  # JSON stores the tuple's inner tuple as a list
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------ save / load
def save(
    trainer: Any,  # Trainer
    output_dir: str | Path,
    *,
    data_position: dict[str, int],
    config_toml: str,
    vocab_path: str,
    keep: int,
) -> Path:
    """Checkpoint ``trainer`` at its current step; prune this run's checkpoints to the ``keep``
    newest (another run's are never touched: a fresh run refuses a directory that holds them)."""
    from specforge_core.vocab import VocabMapping

    path = checkpoint_dir(output_dir, trainer.step)
    vocab = VocabMapping.load(vocab_path)
    run_id = provenance.run_id(output_dir)
    extra = {
        **trainer.state(),
        "data_position": dict(data_position),
        "rng": rng_state(),
        "config_toml": config_toml,
        "vocab_mapping": str(vocab_path),
        # the mapping these weights were trained with travels with them (export uses it)
        "vocab": {"d2t": vocab.d2t, "t2d": vocab.t2d},
        "run_id": run_id,
        # what resume compares the data files with (cached: hashed once per process)
        "data_files": provenance.data_fingerprint(_data_paths(config_toml)),
    }
    write_checkpoint(trainer.strategy, path, trainer.model, trainer.optimizer, extra)
    if trainer.strategy.rank == 0 and keep > 0:
        mine = [d for _, d in _complete_checkpoints(output_dir) if _run_id_of(d) == run_id]
        for old in mine[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    trainer.strategy.barrier()
    return path


def write_checkpoint(strategy: Any, path: str | Path, model: torch.nn.Module, optimizer: Any,
                     extra: dict[str, Any]) -> None:
    """``strategy.save_checkpoint`` with a failed write reported as an ``OSError`` that names the
    checkpoint and the cause (a full disk: ``no space left on the device``) and says that the
    previous checkpoint is intact. Strategies write into a temp dir and rename, so it is."""
    path = Path(path)
    try:
        strategy.save_checkpoint(str(path), model, optimizer, extra)
    except (KeyboardInterrupt, SystemExit, CheckpointError):
        raise
    except BaseException as exc:  # noqa: BLE001 - torch wraps write errors in a BaseException
        failure = save_failure(exc, path, model, optimizer)
        if failure is None:
            raise
        raise failure from exc


# How writers that do not raise OSError report a failed write (torch's zip writer, safetensors)
_WRITE_FAILURE = re.compile(r"unexpected pos|PytorchStreamWriter failed|file write failed|I/O error|"
                            r"No space left|os error \d+", re.IGNORECASE)


def save_failure(exc: BaseException, path: Path, model: Any = None, optimizer: Any = None) -> Optional[OSError]:
    """The ``OSError`` to raise for ``exc``, a failure while saving checkpoint ``path`` (None: not
    a write failure, re-raise ``exc`` as it is)."""
    import errno as errno_mod

    inner = carried_error(exc)
    code, cause = None, None
    for e in _chain(inner):
        if isinstance(e, OSError) and e.errno:
            code, cause = e.errno, e
            break
        m = re.search(r"os error (\d+)", str(e))
        if m:
            code, cause = int(m.group(1)), e
            break
        if "No space left" in str(e):
            code, cause = errno_mod.ENOSPC, e
            break
        if _WRITE_FAILURE.search(str(e)) and cause is None:
            cause = e
    if cause is None:
        return None
    previous = _previous_checkpoint(path)
    needed = _checkpoint_bytes(previous, model, optimizer)
    free = _free_bytes(path)
    if code is None and needed and free is not None and free < needed:
        code = errno_mod.ENOSPC  # torch's writer says only "unexpected pos": the space says why
    if code == errno_mod.ENOSPC:
        what = "no space left on the device"
        if free is not None and needed:
            what += f" ({_mib(free)} free there, a checkpoint takes about {_mib(needed)})"
    else:
        what = (os.strerror(code) if code else "writing failed") + f" ({_first_line(cause)})"
    kept = f"; the previous checkpoint {previous.name} is intact" if previous is not None else ""
    return OSError(code or errno_mod.EIO, f"{what} while saving the checkpoint{kept}", str(path))


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _previous_checkpoint(path: Path) -> Optional[Path]:
    older = [d for s, d in step_dirs(path.parent.parent) if d != path and is_complete(d)]
    return older[-1] if older else None


def _checkpoint_bytes(previous: Optional[Path], model: Any, optimizer: Any) -> int:
    """About how many bytes a checkpoint takes: the previous one's files, else the state's tensors."""
    if previous is not None:
        return sum(f.stat().st_size for f in previous.rglob("*") if f.is_file())
    total = 0
    try:
        tensors = [p for p in model.parameters() if p.requires_grad] if model is not None else []
        if optimizer is not None:
            tensors += [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        total = sum(t.numel() * t.element_size() for t in tensors)
    except Exception:  # noqa: BLE001 - only an estimate for the message
        return 0
    return total


def _free_bytes(path: Path) -> Optional[int]:
    for d in (path.parent, *path.parents):
        if d.exists():
            try:
                return shutil.disk_usage(d).free
            except OSError:
                return None
    return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _data_paths(config_toml: str) -> list[str]:
    import tomllib

    return list(tomllib.loads(config_toml).get("dataset", {}).get("path", []))


def _run_id_of(directory: Path) -> Optional[str]:
    try:
        return json.loads((directory / EXTRA_JSON).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def load(trainer: Any, path: str | Path) -> dict[str, Any]:
    """Restore model, optimizer, scheduler, step and RNG; returns the checkpoint's ``extra``."""
    extra = trainer.strategy.load_checkpoint(str(path), trainer.model, trainer.optimizer)
    trainer.load_state(extra)
    set_rng_state(extra["rng"])
    return extra


def checkpoint_vocab(extra: dict[str, Any]) -> Any:
    """The VocabMapping a checkpoint was trained with (None for checkpoints older than that)."""
    from specforge_core.vocab import VocabMapping

    v = extra.get("vocab")
    return VocabMapping(d2t=v["d2t"], t2d=v["t2d"]) if v else None
