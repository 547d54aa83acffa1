"""Collate per-sample ``TargetFeatures`` into right-padded tensors on one device."""

from __future__ import annotations

from collections.abc import Sequence

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

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def collate(
    features: Sequence[TargetFeatures],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Batch:
    """Right-pad ``features`` to the longest sample; hidden states are cast to ``dtype``."""
    if not features:
        raise ValueError("collate: empty micro-batch")
    lengths = [f.num_tokens for f in features]
    B, T = len(features), max(lengths)
    aux_dim = features[0].aux_hidden.shape[-1]
    hid_dim = features[0].final_hidden.shape[-1]

    input_ids = torch.zeros(B, T, dtype=torch.long)
    loss_mask = torch.zeros(B, T, dtype=torch.bool)
    target_argmax = torch.zeros(B, T, dtype=torch.long)
    aux = torch.zeros(B, T, aux_dim, dtype=dtype)
    final = torch.zeros(B, T, hid_dim, dtype=dtype)
    for i, (f, n) in enumerate(zip(features, lengths, strict=True)):
        for name, t in (("aux_hidden", f.aux_hidden), ("final_hidden", f.final_hidden),
                        ("loss_mask", f.loss_mask), ("target_argmax", f.target_argmax)):
            if t.shape[0] != n:
                raise ValueError(
                    f"sample {f.sample_id!r}: {name} has {t.shape[0]} positions, input_ids has {n}"
                )
        input_ids[i, :n] = f.input_ids.long()
        loss_mask[i, :n] = f.loss_mask.bool()
        target_argmax[i, :n] = f.target_argmax.long()
        aux[i, :n] = f.aux_hidden.to(dtype)
        final[i, :n] = f.final_hidden.to(dtype)
    lengths_t = torch.tensor(lengths, dtype=torch.long)
    attention_mask = torch.arange(T)[None, :] < lengths_t[:, None]

    def dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True)

    return Batch(
        input_ids=dev(input_ids), loss_mask=dev(loss_mask), attention_mask=dev(attention_mask),
        aux_hidden=dev(aux), final_hidden=dev(final), target_argmax=dev(target_argmax),
        lengths=dev(lengths_t),
    )
