"""The frozen target weights a draft trains against, read lazily from the target's files."""

from __future__ import annotations

from typing import Any, Optional

import torch


class TargetWeights:
    """Lazy, cached reads of the target's token embedding and lm_head (fp32, CPU).

    ``head_rows()`` are the lm_head rows of the draft vocab in draft order; ``full_head()`` the
    whole [V, H] lm_head (only losses that need the full-vocab distribution ask for it)."""

    def __init__(self, model_path: str, vocab: Any):
        self.model_path, self.vocab = model_path, vocab
        self._embed: Optional[torch.Tensor] = None
        self._rows: Optional[torch.Tensor] = None
        self._full: Optional[torch.Tensor] = None

    def _load_rows(self) -> None:
        from specforge_core.target import load_target_head_and_embedding

        self._embed, self._rows = load_target_head_and_embedding(
            self.model_path, row_ids=self.vocab.draft_to_target_ids, dtype=torch.float32)

    def embedding(self) -> torch.Tensor:
        if self._embed is None:
            self._load_rows()
        return self._embed

    def head_rows(self) -> torch.Tensor:
        if self._rows is None:
            self._load_rows()
        return self._rows

    def full_head(self) -> torch.Tensor:
        if self._full is None:
            from specforge_core.target import load_target_head_and_embedding

            _, self._full = load_target_head_and_embedding(self.model_path, dtype=torch.float32)
        return self._full

    def release(self) -> None:
        """Drop the CPU copies once they are on the device."""
        self._embed = self._rows = None
