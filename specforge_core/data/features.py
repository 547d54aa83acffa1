"""``specforge data features``: run the target once over the dataset and keep its features in files.

Training then reads them for any number of epochs without a target (a transfer store that sets
``supplies_features``, see ``components.TransferStoreProvider``). The core owns the cache layout and
its crash safety; the store plugin owns the storage codec (``encode`` / ``decode``: e.g. bf16 or
fp8 with per-row scales).

Layout of the cache directory::

    index.json                 fingerprint, target facts, format, shard list (see ``write_features``)
    shard-00000.safetensors    per feature: the shard's samples' rows concatenated (after encoding),
    shard-00001.safetensors    plus ``offsets`` int64 [n+1]: sample j is rows offsets[j]:offsets[j+1]

Samples are the run's trainable samples in dataset order (same tokenization, cache and filtering as
``specforge run``), ``shard_samples`` per shard, so shard i always holds the same samples.

Crash safety: a shard is written to a hidden temp name, fsync'd and renamed; only then is the index
rewritten (temp, fsync, rename) to list it. A rerun keeps the shards the index lists, deletes temp
leftovers and unlisted shards, and resumes at the first missing one: nothing is lost, nothing is
written twice, and the shards are byte-identical to an uninterrupted run's. A cache written for
another target, aux layers, data or storage format, or another tokenization (tokenizer, template,
reasoning, data format, sequence length, ...) is refused (the fingerprint).

Nothing read back is trusted: the index lists every shard's size and sha256. A run refuses a
missing or truncated shard or index before it starts (one line naming the file), checks a shard's
sha256 when it first opens it, and compares every sample's cached token ids with its own
tokenization; a ``data features`` rerun re-hashes the shards it finds and writes the bad ones again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import attrs
import torch

from specforge_core.components import capability
from specforge_core.data.formats import DataError
from specforge_core.data.identity import data_sha256
from specforge_core.dtypes import resolve as resolve_dtype
from specforge_core.files import file_sha256, fsync_path
from specforge_core.types import FEATURE_KEYS, Sample, TargetFeatures, TargetInfo

INDEX = "index.json"
VERSION = 2  # 2: per-shard sha256 and the whole tokenization in the fingerprint
_INT_DTYPES = {"input_ids": torch.int64, "loss_mask": torch.uint8, "target_argmax": torch.int64}


class FeatureCacheError(DataError):
    """The cache cannot serve this config (missing, incomplete, corrupt, written for other settings);
    a ``DataError``: the command line prints it as one line, exit 2."""


# ------------------------------------------------------------------------------------ identity
def feature_names(spec: Any) -> list[str]:
    """Tensors the cache keeps: ids and masks always, the rest as the algorithm's FeatureSpec says."""
    return [k for k in FEATURE_KEYS if k in ("input_ids", "loss_mask") or getattr(spec, k, True)]


def data_hash(paths: Sequence[str]) -> str:
    """One sha256 over the data files' hashes, in order (each file hashed once per process)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(data_sha256(p).encode())
    return h.hexdigest()


def fingerprint(config: Any, names: Sequence[str], fmt: str, tokenizer: Any = None) -> dict[str, Any]:
    """What the cached features depend on (``config`` with its aux layers resolved): the target,
    the storage, and every input of tokenization -- the tokenizer itself (its vocabulary, merges
    and chat template), the data bytes and each ``[dataset]`` setting that changes a sample's
    tokens or which samples there are. ``tokenizer``: the target's (loaded when not given)."""
    from specforge_core.data.build import CACHE_VERSION, tokenizer_identity

    if tokenizer is None:
        from specforge_core.data.build import load_tokenizer

        tokenizer = load_tokenizer(config.model.target, config.model.trust_remote_code)
    ds = config.dataset
    return {
        "target": str(config.model.target), "aux_layers": [int(i) for i in config.model.aux_layers],
        "tokenizer": tokenizer_identity(tokenizer)[:16], "tokenization_version": CACHE_VERSION,
        "chat_template": ds.chat_template, "reasoning": ds.reasoning, "data_format": ds.format,
        "on_error": ds.on_error, "max_seq_length": ds.max_seq_length, "max_samples": ds.max_samples,
        "data_sha256": data_hash(ds.path), "inference_dtype": config.inference.dtype,
        "features": list(names), "format": fmt,
    }


def check_fingerprint(cache_dir: Path, stored: dict, wanted: dict) -> None:
    diff = [f"{k}: cache {stored.get(k)!r}, config {wanted.get(k)!r}" for k in wanted if stored.get(k) != wanted[k]]
    if diff:
        raise FeatureCacheError(
            f"feature cache {cache_dir} was written for other settings ({'; '.join(diff)}); point the store's "
            "dir elsewhere or delete the cache and run `specforge data features` again"
        )


# ------------------------------------------------------------------------------------ index I/O
def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def read_index(cache_dir: Path) -> Optional[dict]:
    """The cache's index (None: there is none). A file that is not a whole index of this version
    raises ``FeatureCacheError`` naming it."""
    p = Path(cache_dir) / INDEX
    if not p.exists():
        return None
    fix = "delete the cache directory or run `specforge data features CONFIG` again (it starts over)"
    try:
        index = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FeatureCacheError(f"{p}: not a valid index (truncated or corrupt: {e}); {fix}") from None
    if not isinstance(index, dict) or index.get("version") != VERSION:
        got = index.get("version") if isinstance(index, dict) else None
        raise FeatureCacheError(f"{p}: index version {got!r}, this specforge reads version {VERSION} "
                                f"(shard checksums); {fix}")
    missing = [k for k in ("fingerprint", "info", "features", "shards", "complete") if k not in index]
    bad = [i for i, e in enumerate(index.get("shards") or [])
           if not isinstance(e, dict) or not {"file", "sample_ids", "tokens", "bytes", "sha256"} <= set(e)]
    if missing or bad or not isinstance(index.get("shards"), list):
        raise FeatureCacheError(f"{p}: not a valid index (missing {missing or f'fields of shard entries {bad}'}); {fix}")
    return index


def check_shard_files(cache_dir: Path, index: dict) -> None:
    """Every shard the index lists is there with the size the index gives (cheap: no reading);
    raises ``FeatureCacheError`` naming the first file that is not."""
    for e in index["shards"]:
        f = Path(cache_dir) / e["file"]
        if not f.is_file():
            raise FeatureCacheError(f"{f}: shard missing (listed in {INDEX}); run `specforge data features CONFIG` "
                                    "again to write it")
        size = f.stat().st_size
        if size != e["bytes"]:
            raise FeatureCacheError(f"{f}: {size:,} bytes, {INDEX} lists {e['bytes']:,} (truncated or replaced); "
                                    "run `specforge data features CONFIG` again to rewrite it")


def verify_shard(cache_dir: Path, entry: dict) -> None:
    """The shard's bytes hash to the sha256 the index lists; raises naming the shard."""
    f = Path(cache_dir) / entry["file"]
    got = file_sha256(f)
    if got != entry["sha256"]:
        raise FeatureCacheError(f"{f}: sha256 {got[:12]}... differs from {INDEX}'s {entry['sha256'][:12]}... "
                                "(the file changed on disk since it was written); run `specforge data features "
                                "CONFIG` again to rewrite it")


def write_index(cache_dir: Path, index: dict) -> None:
    data = json.dumps(index, indent=1).encode()
    _atomic_write(Path(cache_dir) / INDEX, lambda f: f.write(data))


# ------------------------------------------------------------------------------------ sizing
def bytes_per_token(encode: Any, hidden_size: int, n_aux: int, names: Sequence[str]) -> int:
    """Stored bytes of one token: one encoded row of each cached tensor (exact for the codec)."""
    one = {"input_ids": torch.zeros(1, dtype=torch.int64), "loss_mask": torch.zeros(1, dtype=torch.uint8),
           "aux_hidden": torch.ones(1, n_aux * hidden_size), "final_hidden": torch.ones(1, hidden_size),
           "target_argmax": torch.zeros(1, dtype=torch.int64)}
    return sum(t.numel() * t.element_size() for t in encode({k: one[k] for k in names}).values())


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


# ------------------------------------------------------------------------------------ writing
def _encode_shard(feats: list[TargetFeatures], names: Sequence[str], encode: Any) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {}
    offsets = [0]
    for f in feats:
        tensors = f.tensors()
        for k, t in encode({n: tensors[n] for n in names}).items():
            parts.setdefault(k, []).append(t)
        offsets.append(offsets[-1] + f.num_tokens)
    out = {k: torch.cat(v, 0).contiguous() for k, v in parts.items()}
    out["offsets"] = torch.tensor(offsets, dtype=torch.int64)
    return out


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> tuple[int, str]:
    """Writes the shard durably; returns its size and sha256 (for the index)."""
    from safetensors.torch import save

    data = save(tensors)  # deterministic bytes: reruns write identical shards
    _atomic_write(path, lambda f: f.write(data))
    return len(data), hashlib.sha256(data).hexdigest()


def _shard_number(name: str) -> Optional[int]:
    m = re.fullmatch(r"shard-(\d{5})\.safetensors", str(name))
    return int(m.group(1)) if m else None


def _good_shards(cache: Path, index: Optional[dict], groups: Sequence[Sequence[Sample]], tick: Any = None
                 ) -> tuple[dict[int, dict], list[str]]:
    """The shards the index lists that hold exactly the samples (ids and token counts) shard i must
    hold, with the listed size and sha256; and why each other listed shard is written again."""
    good: dict[int, dict] = {}
    redo: list[str] = []
    for entry in index["shards"] if index else []:
        if tick is not None:
            tick()
        i = _shard_number(entry["file"])
        if i is None or i >= len(groups) or i in good:
            redo.append(f"{entry['file']} (not a shard of this data)")
            continue
        if entry["sample_ids"] != [s.sample_id for s in groups[i]] or \
                entry["tokens"] != [s.num_tokens for s in groups[i]]:
            redo.append(f"{entry['file']} (other samples or token counts than this run's)")
            continue
        try:
            check_shard_files(cache, {"shards": [entry]})
            verify_shard(cache, entry)
        except FeatureCacheError as e:
            redo.append(f"{entry['file']} ({str(e).split(';')[0].split(': ', 1)[1]})")
            continue
        good[i] = entry
    return good, redo


@attrs.define
class FeaturesSummary:
    cache_dir: Path
    shards: int
    samples: int
    tokens: int
    bytes: int
    written_shards: int  # by this call (the rest were there already)
    bytes_per_token: float
    wall_s: float


def store_provider(config: Any, registry: Any = None) -> Any:
    from specforge_core.build import create

    provider = create(config, "transfer_store", registry=registry)
    if not capability(provider, "TransferStoreProvider.supplies_features"):
        raise FeatureCacheError(
            f"transfer.store = {config.transfer.store!r} does not supply features (it keeps none in files); "
            "`specforge data features` writes the cache of a store that supplies features (`specforge plugins` "
            "lists the transfer stores)"
        )
    return provider


def write_features(config: Any, *, backend: Any = None, provider: Any = None, console: Any = None,
                   registry: Any = None, stop_after_shards: Optional[int] = None) -> FeaturesSummary:
    """Write (or complete) the feature cache of ``config``'s transfer store; see the module doc."""
    from specforge_core.build import algorithm, create
    from specforge_core.data.build import load_tokenizer
    from specforge_core.data.usable import load_training_samples
    from specforge_core.target import with_aux_layers

    t0 = time.perf_counter()
    log = console.print if console is not None else (lambda *a, **k: None)
    provider = provider if provider is not None else store_provider(config, registry)
    config = with_aux_layers(config, registry)
    names = feature_names(algorithm(config, registry).features)
    cache = Path(provider.dir)
    cache.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(config, names, provider.format,
                     load_tokenizer(config.model.target, config.model.trust_remote_code))
    try:
        index = read_index(cache)
    except FeatureCacheError as e:  # a torn or foreign index: its shards cannot be trusted
        log(f"features: {str(e).split('; ')[0]}: starting over")
        index = None
    if index is not None:
        check_fingerprint(cache, index["fingerprint"], fp)

    _samples, usable, _stats, _skipped = load_training_samples(config, console or _Quiet())
    n = provider.shard_samples
    groups = [usable[i : i + n] for i in range(0, len(usable), n)]
    total_tokens = sum(s.num_tokens for s in usable)

    # keep the listed shards that are whole and right (re-hashed); drop everything else
    listed = len(index["shards"]) if index else 0
    if listed:
        log(f"features: checking the {listed} shards {INDEX} lists (sizes, sha256)")
    check_bar = (_Progress(console, listed, 0, "verify") if listed and console is not None and config.logging.progress
                 else None)
    try:
        good, redo = _good_shards(cache, index, groups, (lambda: check_bar.update(1, "")) if check_bar else None)
    finally:
        if check_bar:
            check_bar.close()
    for why in redo:
        log(f"features: {why}: writing it again")
    keep = {INDEX} | {e["file"] for e in good.values()}
    for f in cache.iterdir():
        if f.name not in keep and (f.name.startswith(".tmp-") or f.name.startswith("shard-")):
            f.unlink()
    todo = [i for i in range(len(groups)) if i not in good]

    own = backend is None
    if own and todo:
        backend = create(config, "target_backend", config, None, registry=registry)
    try:
        info = attrs.asdict(backend.info) if backend is not None else index["info"]
        index = {"version": VERSION, "fingerprint": fp, "info": info, "format": provider.format,
                 "features": names, "shard_samples": n, "total_samples": len(usable),
                 "total_tokens": total_tokens, "shards": [good[i] for i in sorted(good)],
                 "complete": not todo}
        per_tok = bytes_per_token(provider.encode, int(info["hidden_size"]), len(config.model.aux_layers), names)
        log(f"features: {len(usable)} samples, {total_tokens:,} tokens in {len(groups)} shards of {n}; "
            f"{provider.format} {per_tok} B/token -> about {per_tok * total_tokens / 2**20:.1f} MiB in {cache}"
            + (f" ({len(good)} shards already there, sizes and sha256 verified; {len(todo)} to write)"
               if good else ""))
        written = 0
        done_before = sum(len(e["sample_ids"]) for e in good.values())
        progress = (_Progress(console, len(usable), done_before)
                    if console is not None and config.logging.progress else None)
        t_write = time.perf_counter()
        new_bytes = new_samples = 0
        try:
            for i in todo:
                if stop_after_shards is not None and written >= stop_after_shards:
                    break
                feats: list[TargetFeatures] = []
                bs = config.inference.batch_size
                for s in range(0, len(groups[i]), bs):
                    feats.extend(backend.generate(groups[i][s : s + bs]))
                if written == 0 and "aux_hidden" in names:
                    enc = provider.encode({"aux_hidden": feats[0].aux_hidden[:1]})["aux_hidden"]
                    if enc.dtype != feats[0].aux_hidden.dtype:
                        log(f"features: the target produces {feats[0].aux_hidden.dtype}, stored as {enc.dtype} "
                            f"({provider.format}): training from the cache is close to, not equal to, online")
                nbytes, digest = _write_shard(cache / shard_name(i), _encode_shard(feats, names, provider.encode))
                good[i] = {"file": shard_name(i), "sample_ids": [f.sample_id for f in feats],
                           "tokens": [f.num_tokens for f in feats], "bytes": nbytes, "sha256": digest}
                index["shards"] = [good[k] for k in sorted(good)]
                index["complete"] = len(good) == len(groups)
                write_index(cache, index)  # after the shard is durable: the index never lists a torn one
                written += 1
                new_bytes += nbytes
                new_samples += len(feats)
                if progress:
                    dt = max(time.perf_counter() - t_write, 1e-9)
                    progress.update(len(feats), f"{new_samples / dt:.1f} samples/s, "
                                    f"{new_bytes / 2**20:.1f} MiB written")
        finally:
            if progress:
                progress.close()
        if not written:
            write_index(cache, index)  # nothing new: the index still records this fingerprint
    finally:
        if own and backend is not None:
            backend.close()
    total_bytes = sum(e["bytes"] for e in index["shards"])
    tokens = sum(sum(e["tokens"]) for e in index["shards"])
    return FeaturesSummary(cache, len(index["shards"]), sum(len(e["sample_ids"]) for e in index["shards"]),
                           tokens, total_bytes, written, total_bytes / max(tokens, 1), time.perf_counter() - t0)


class _Quiet:
    def print(self, *a: Any, **k: Any) -> None:
        pass


class _Progress:
    """A rich progress bar: samples done of all, time left, samples/s and bytes written."""

    def __init__(self, console: Any, total: int, done: int, label: str = "features"):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          TextColumn("{task.fields[rate]}"), console=console)
        self.task = self.p.add_task("features", total=total, completed=done, rate="")
        self.p.start()

    def update(self, n: int, rate: str) -> None:
        self.p.update(self.task, advance=n, rate=rate)

    def close(self) -> None:
        self.p.stop()


# ------------------------------------------------------------------------------------ reading
class FeatureCache:
    """Reads one sample's stored tensors from a complete cache (shards opened lazily, kept open).

    Opening checks the index and every shard's presence and size (a missing or truncated file is
    refused before a run starts); a shard's sha256 is checked when it is first opened."""

    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir)
        index = read_index(self.dir)
        if index is None:
            raise FeatureCacheError(f"feature cache {self.dir}: no {INDEX}; run `specforge data features CONFIG` "
                                    "with this config first")
        if not index.get("complete"):
            raise FeatureCacheError(
                f"feature cache {self.dir} is incomplete ({len(index['shards'])} shards written); rerun "
                "`specforge data features CONFIG` to finish it")
        check_shard_files(self.dir, index)
        self.index = index
        self.where = {sid: (j, k) for j, e in enumerate(index["shards"]) for k, sid in enumerate(e["sample_ids"])}
        self._open: dict[int, Any] = {}

    def _shard(self, j: int) -> Any:
        from safetensors import safe_open

        if j not in self._open:
            entry = self.index["shards"][j]
            verify_shard(self.dir, entry)  # once per shard and process, before any of it is used
            h = safe_open(str(self.dir / entry["file"]), framework="pt")
            offsets = h.get_tensor("offsets").tolist()
            if [b - a for a, b in zip(offsets, offsets[1:], strict=False)] != entry["tokens"]:
                raise FeatureCacheError(f"{self.dir / entry['file']}: its offsets disagree with {INDEX}'s token "
                                        "counts; run `specforge data features CONFIG` again")
            self._open[j] = (h, offsets, [k for k in h.keys() if k != "offsets"])
        return self._open[j]

    def get(self, sample_id: str) -> dict[str, torch.Tensor]:
        try:
            j, k = self.where[sample_id]
        except KeyError:
            raise FeatureCacheError(f"feature cache {self.dir} has no sample {sample_id!r}: it was written for "
                                    "other data; rerun `specforge data features CONFIG`") from None
        h, offsets, keys = self._shard(j)
        a, b = offsets[k], offsets[k + 1]
        return {name: h.get_slice(name)[a:b] for name in keys}

    def close(self) -> None:
        self._open.clear()


def check_sample(cache_dir: Path, sample: Sample, stored: dict[str, torch.Tensor]) -> None:
    """The cached features are of this very sample: same token ids and loss mask as the run's own
    tokenization (the fingerprint's second line of defence: it cannot see every way tokens change)."""
    ids, mask = stored["input_ids"], stored["loss_mask"]
    if ids.numel() != sample.num_tokens:
        raise FeatureCacheError(
            f"feature cache {cache_dir}: sample {sample.sample_id!r} has {ids.numel()} tokens there but "
            f"{sample.num_tokens} in this run's tokenization: the cache was written with other data or "
            "tokenization settings; run `specforge data features CONFIG` with this config")
    if not torch.equal(ids.to(torch.int64), sample.input_ids) or \
            not torch.equal(mask.to(torch.uint8), sample.loss_mask.to(torch.uint8)):
        raise FeatureCacheError(
            f"feature cache {cache_dir}: sample {sample.sample_id!r} has other token ids or loss mask there "
            "than in this run's tokenization; run `specforge data features CONFIG` with this config")


def check_cache(config: Any, provider: Any, registry: Any = None) -> None:
    """What a run from ``provider``'s cache checks before it starts (``config validate`` too): the
    index, every shard's presence and size, and the fingerprint, including the features the
    configured draft algorithm reads (another algorithm may need others). Raises ``FeatureCacheError``."""
    from specforge_core.build import algorithm
    from specforge_core.target import with_aux_layers

    cache = FeatureCache(provider.dir)
    config = with_aux_layers(config, registry)
    names = feature_names(algorithm(config, registry).features)
    check_fingerprint(cache.dir, cache.index["fingerprint"], fingerprint(config, names, provider.format))


class CacheBackend:
    """A ``TargetBackend`` that serves features from the cache: no target is loaded or run."""

    def __init__(self, cache_dir: str | Path, config: Any, decode: Any, fmt: str):
        self.cache = FeatureCache(cache_dir)
        names = self.cache.index["features"]
        check_fingerprint(self.cache.dir, self.cache.index["fingerprint"], fingerprint(config, names, fmt))
        self.info = TargetInfo(**self.cache.index["info"])
        self.decode = decode
        self.dtype = _float_dtype(config)

    def generate(self, samples: Sequence[Sample]) -> list[TargetFeatures]:
        out = []
        for s in samples:
            stored = self.cache.get(s.sample_id)
            check_sample(self.cache.dir, s, stored)
            t = self.decode(stored, self.dtype)
            T = s.num_tokens
            # fields the algorithm does not read are not stored: empty placeholders keep the record whole
            t.setdefault("aux_hidden", torch.empty(T, 0, dtype=self.dtype))
            t.setdefault("final_hidden", torch.empty(T, 0, dtype=self.dtype))
            t.setdefault("target_argmax", torch.full((T,), -1, dtype=torch.int64))
            out.append(TargetFeatures.from_tensors(s.sample_id, t, s.category))
        return out

    def close(self) -> None:
        self.cache.close()


def _float_dtype(config: Any) -> torch.dtype:
    """The dtype the online target would have produced (``inference.dtype``; auto: bf16 on GPU)."""
    return resolve_dtype(config.inference.dtype, None, "inference.dtype")
