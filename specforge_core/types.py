"""Plain data records that flow between components.

Keep these free of heavy imports: they cross process boundaries (Ray) and plugin boundaries.
"""

from __future__ import annotations

from typing import Optional

import attrs
import torch


@attrs.define
class Sample:
    """One tokenized conversation, ready for target inference.

    ``loss_mask[j]`` is 1 where token ``j`` is an assistant token that the draft learns to predict
    (every assistant turn, including its end-of-turn token).
    """

    sample_id: str
    input_ids: torch.Tensor  # int64 [T]
    loss_mask: torch.Tensor  # uint8 [T]
    category: Optional[str] = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


# Names of the tensors a target backend produces per sample; the transfer store moves exactly these.
FEATURE_KEYS = ("input_ids", "loss_mask", "aux_hidden", "final_hidden", "target_argmax")


@attrs.define
class TargetFeatures:
    """What target inference produces for one sample (what crosses the transfer store).

    - ``aux_hidden``: [T, n_aux * H], the residual stream entering the configured aux layers
      (HF ``hidden_states[i]`` convention), concatenated low -> high.
    - ``final_hidden``: [T, H], the target's last hidden state *after* its final norm.
    - ``target_argmax``: int64 [T], argmax of the target's full-vocab logits at each position, so
      trainers can mask positions whose target token is outside the draft vocab without holding
      the full lm_head.
    """

    sample_id: str
    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    aux_hidden: torch.Tensor
    final_hidden: torch.Tensor
    target_argmax: torch.Tensor
    category: Optional[str] = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in FEATURE_KEYS}

    @classmethod
    def from_tensors(
        cls, sample_id: str, tensors: dict[str, torch.Tensor], category: Optional[str] = None
    ) -> TargetFeatures:
        return cls(sample_id=sample_id, category=category, **{k: tensors[k] for k in FEATURE_KEYS})

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


@attrs.define
class TargetInfo:
    """Static facts about the target that trainers and exporters need (no weights)."""

    model_path: str
    hf_config: dict  # the target's config.json as a dict
    aux_layer_ids: list[int]  # HF hidden_states indices captured, e.g. [2, L//2, L-3]
    hidden_size: int
    vocab_size: int
    num_hidden_layers: int
