"""Collate per-sample ``TargetFeatures`` into right-padded tensors on one device."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import attrs
import torch

from specforge_core.types import TargetFeatures


@attrs.define
class Batch:
    input_ids: torch.Tensor  # int64 [B, T], 0 on padding
    loss_mask: torch.Tensor  # bool [B, T], False on padding
    attention_mask: torch.Tensor  # bool [B, T], True on real tokens
    aux_hidden: torch.Tensor  # [B, T, n_aux*H]
    final_hidden: torch.Tensor  # [B, T, H]
    target_argmax: torch.Tensor  # int64 [B, T], 0 on padding
    lengths: torch.Tensor  # int64 [B]
    # Packed rows only (training/packing.py): document index inside the row (-1 on padding) and
    # the position inside the document. None for ordinary right-padded batches.
    doc_ids: Optional[torch.Tensor] = None  # int32 [B, T]
    position_ids: Optional[torch.Tensor] = None  # int64 [B, T]

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def collate(
    features: Sequence[TargetFeatures],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    pad_multiple: int = 1,
) -> Batch:
    """Right-pad ``features`` to the longest sample, rounded up to ``pad_multiple`` (GPU: 128, so
    compiled kernels see few distinct lengths); hidden states are cast to ``dtype``."""
    if not features:
        raise ValueError("collate: empty micro-batch")
    lengths = [f.num_tokens for f in features]
    B, T = len(features), max(lengths)
    T += -T % pad_multiple
    aux_dim = features[0].aux_hidden.shape[-1]
    hid_dim = features[0].final_hidden.shape[-1]

    device = torch.device(device)
    # Built on ``device`` directly: each sample's tensors cross to the device in their stored dtype
    # (bf16 hidden states: half the bytes of fp32) and are cast there. From pinned host memory the
    # copies are asynchronous (the prefetch stager's case); from pageable memory they block.
    input_ids = torch.zeros(B, T, dtype=torch.long, device=device)
    loss_mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    target_argmax = torch.zeros(B, T, dtype=torch.long, device=device)
    aux = torch.zeros(B, T, aux_dim, dtype=dtype, device=device)
    final = torch.zeros(B, T, hid_dim, dtype=dtype, device=device)
    for i, (f, n) in enumerate(zip(features, lengths, strict=True)):
        for name, t in (("aux_hidden", f.aux_hidden), ("final_hidden", f.final_hidden),
                        ("loss_mask", f.loss_mask), ("target_argmax", f.target_argmax)):
            if t.shape[0] != n:
                raise ValueError(
                    f"sample {f.sample_id!r}: {name} has {t.shape[0]} positions, input_ids has {n}"
                )
        input_ids[i, :n] = _on(f.input_ids, device)
        loss_mask[i, :n] = _on(f.loss_mask, device)
        target_argmax[i, :n] = _on(f.target_argmax, device)
        aux[i, :n] = _on(f.aux_hidden, device)
        final[i, :n] = _on(f.final_hidden, device)
    lengths_t = torch.tensor(lengths, dtype=torch.long).to(device, non_blocking=True)
    attention_mask = torch.arange(T, device=device)[None, :] < lengths_t[:, None]
    return Batch(
        input_ids=input_ids, loss_mask=loss_mask, attention_mask=attention_mask, aux_hidden=aux,
        final_hidden=final, target_argmax=target_argmax, lengths=lengths_t,
    )


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` in its own dtype (the assignment into the batch casts)."""
    return t if t.device == device else t.to(device, non_blocking=True)
