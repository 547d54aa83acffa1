"""``disk`` transfer store: the target's features read from an offline cache on disk.

``specforge data features CONFIG`` runs the target once and writes the cache into ``dir``
(``specforge_core.data.features``: safetensors shards + index.json); a run with this store then
trains from it for any number of epochs and never builds the target backend (the provider sets
``supplies_features``). Within a run, features hand over in process, as with ``local``.

Storage formats (``fp8.py``): ``bf16`` (lossless for a bf16 target) and ``fp8`` (float8_e4m3fn with
one fp32 scale per token per tensor; about half the bytes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from specforge_core.components import PlanNotes
from specforge_core.config.fields import option, positive
from specforge_defaults import fp8
from specforge_defaults.transfer_local import LocalStoreProvider


@attrs.define
class DiskOptions:
    dir: str = option("", "Feature cache directory (`specforge data features` writes it; required)", path=True)
    format: str = option("bf16", "Storage of hidden states: 'bf16' or 'fp8' (e4m3, one fp32 scale per token "
                         "per tensor; ids and masks stay integers)", choices=fp8.FORMATS)
    shard_samples: int = option(16, "Samples per shard file (the unit a killed `data features` redoes; "
                                "one shard's features are held in memory while written)", validator=positive)

    def plan_notes(self, config: Any, plan: dict) -> PlanNotes:
        """``specforge plan``: the cache's bytes per token and its size for full-length samples."""
        from specforge_core.plugin_api import bytes_per_token, feature_names

        names = feature_names(_algorithm_spec(config))
        per_tok = bytes_per_token(lambda t: fp8.encode(t, self.format), int(plan["target"]["hidden_size"]),
                                  plan["n_aux"], names)
        T = config.dataset.max_seq_length
        lines = [f"feature cache ({self.format}, {self.dir or 'transfer.disk.dir unset'}): {per_tok:,} B/token, "
                 f"{per_tok * T / 2**20:.1f} MiB per full-length sample"]
        if config.dataset.max_samples:
            n = config.dataset.max_samples
            lines.append(f"  at most {n} samples x {T} tokens: {per_tok * T * n / 2**30:.2f} GiB")
        problems = [] if self.dir else [("error", "transfer.disk.dir", "the disk store needs its cache directory")]
        return PlanNotes(facts={"bytes_per_token": per_tok}, lines=lines, problems=problems)


def _algorithm_spec(config: Any) -> Any:
    from specforge_core.plugin_api import draft_algorithm

    return draft_algorithm(config).features


class DiskStoreProvider(LocalStoreProvider):
    supplies_features = True  # components.TransferStoreProvider: pipelines build no target backend

    def __init__(self, options: DiskOptions):
        super().__init__(None)
        if not options.dir:
            raise ValueError("transfer.disk.dir is empty: the disk store needs the feature cache directory "
                             "(`specforge data features CONFIG` writes it)")
        self.dir, self.format, self.shard_samples = options.dir, options.format, options.shard_samples

    def connect(self, handle: str) -> Any:
        try:
            return super().connect(handle)
        except RuntimeError:
            raise RuntimeError("transfer store 'disk': its in-process hand-off lives in one process; other processes "
                               "read the cache through feature_source (the Ray trainers do)") from None

    def encode(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return fp8.encode(tensors, self.format)

    def decode(self, stored: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return fp8.decode(stored, self.format, dtype)

    def feature_source(self, config: Any) -> Any:
        """A TargetBackend that reads the cache (checked against ``config``'s fingerprint)."""
        from specforge_core.plugin_api import CacheBackend

        return CacheBackend(self.dir, config, self.decode, self.format)


def make_disk(options: DiskOptions) -> DiskStoreProvider:
    return DiskStoreProvider(options)
