"""The DSpark draft: DFlash's block backbone (``specforge_dflash.model``, the DFlash family's shared
backbone) plus the two heads DSpark adds (DeepSeek, arXiv 2607.05147; vLLM's ``Qwen3DSparkModel``):

* ``markov_head``: a low-rank previous-token logit bias ``markov_w2(markov_w1[prev])``
  (``markov_w1`` [V, r] indexes the *target* vocabulary, ``markov_w2`` [Vd, r] projects to the
  draft vocabulary). Slot k's logits are ``lm_head(h_k) + markov_w2(markov_w1[prev_k])`` where
  prev_k is the token before the one slot k predicts: the anchor for slot 0, then the token drafted
  (serving) or the true token (training) at the previous slot. The backbone stays one parallel
  forward; only this bias is sequential.
* ``confidence_head``: ``proj`` [1, H (+ r)] with bias: a logit of the probability that slot k's
  draft is accepted, from h_k (and the Markov embedding when ``confidence_head_with_markov``).

DSpark's block layout is vLLM's default ``sample_from_anchor``: a block of N slots
[x[n], MASK x (N-1)] at positions n..n+N-1 drafts N tokens, slot k predicting x[n+k+1] (the anchor
slot predicts too), where DFlash's 1+K slots draft K tokens at the mask slots.
"""

from __future__ import annotations

import attrs
import torch
from specforge_dflash.model import DFlashConfig, DFlashDraft
from torch import nn


@attrs.define
class DSparkHeads:
    markov_rank: int
    confidence_head: bool = True
    confidence_head_with_markov: bool = True


class MarkovHead(nn.Module):
    def __init__(self, vocab_size: int, draft_vocab_size: int, rank: int):
        super().__init__()
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, draft_vocab_size, bias=False)


class ConfidenceHead(nn.Module):
    def __init__(self, input_dim: int):
        super().__init__()
        self.proj = nn.Linear(input_dim, 1, bias=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features.to(self.proj.weight.dtype)).squeeze(-1)


class DSparkDraft(DFlashDraft):
    def __init__(self, c: DFlashConfig, heads: DSparkHeads):
        super().__init__(c)
        self.heads = heads
        self.markov_head = MarkovHead(c.vocab_size, c.draft_vocab_size, heads.markov_rank)
        with torch.no_grad():  # start as plain DFlash: a zero bias until training moves it
            self.markov_head.markov_w2.weight.zero_()
        self.confidence_head = None
        if heads.confidence_head:
            width = c.hidden_size + (heads.markov_rank if heads.confidence_head_with_markov else 0)
            self.confidence_head = ConfidenceHead(width)

    def markov_embed(self, prev_target_ids: torch.Tensor) -> torch.Tensor:
        """[...] previous tokens (target ids) -> [..., r]."""
        return self.markov_head.markov_w1(prev_target_ids).to(self.fc.weight.dtype)

    def logits(self, hidden: torch.Tensor, markov: torch.Tensor) -> torch.Tensor:
        """Markov-corrected draft-vocab logits of normed hidden [..., H] with embeddings [..., r]."""
        return self.lm_head(hidden) + self.markov_head.markov_w2(markov)

    def confidence(self, hidden: torch.Tensor, markov: torch.Tensor) -> torch.Tensor:
        """Acceptance logits [...] (sigmoid: the probability)."""
        assert self.confidence_head is not None
        x = torch.cat([hidden, markov], -1) if self.heads.confidence_head_with_markov else hidden
        return self.confidence_head(x)
