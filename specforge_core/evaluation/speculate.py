"""Exact greedy chain speculation (SGLang topk=1, num_draft_tokens=K+1), one prompt at a time.

Two roles, so tree drafting can slot in later (see docs/evaluation.md):

* ``ChainProposer`` owns the draft and its cache. ``extend`` feeds it the newly verified tokens
  with their target features; ``propose`` returns K draft tokens (target ids).
* ``GreedyVerifier`` owns the target and its KV cache. ``verify`` runs the last committed token
  plus the drafts in one forward and returns the target's greedy token at each of those K+1
  positions and their aux features.

Indexing: committed tokens x[0..n]; the target has run x[0..n-1] (features f[0..n-1]); the draft
cache has one entry per position p < n (entry p reads x[p+1] with hidden fc(f[p])), so the last
entry predicts x[n+1].
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from specforge_core.evaluation.accounting import truncate_cycle
from specforge_core.evaluation.target import TargetModel


@attrs.define
class SpecResult:
    output: list[int]  # generated tokens (first one from the prefill)
    cycles: list[tuple[int, int]]  # (accepted, committed) per verification forward
    matched: list[int]  # untruncated accepted count per cycle (diagnostics)


class ChainProposer:
    """Chain drafting with a ``LlamaEagle3Draft`` (its cached-inference API)."""

    def __init__(self, draft, d2t: torch.Tensor | None, device):
        from specforge_llama_eagle3.model import DraftCache

        self.draft, self.device = draft, device
        vd = draft.config.draft_vocab_size
        d2t = torch.zeros(vd, dtype=torch.int64) if d2t is None else d2t.to(torch.int64)
        self.draft_to_target = (torch.arange(vd) + d2t).to(device)
        self.cache = DraftCache()
        self._normed = self._out = None  # last entry's outputs (position n-1)

    def reset(self) -> None:
        self.cache.crop(0)
        self._normed = self._out = None

    @torch.no_grad()
    def extend(self, tokens: Sequence[int], features: torch.Tensor, start: int) -> None:
        """Add entries for positions start..start+S-1: entry p reads tokens[p-start] (= x[p+1])
        with hidden fc(features[p-start]) (= f[p]). Drops any chain entries past ``start``."""
        self.cache.crop(start)
        ids = torch.as_tensor(tokens, dtype=torch.int64, device=self.device)[None]
        hidden = self.draft.fuse(features.to(self.draft.fc.weight.dtype)[None])
        pos = torch.arange(start, start + ids.shape[1], device=self.device)
        normed, out = self.draft.forward_cached(ids, hidden, pos, self.cache)
        self._normed, self._out = normed[:, -1:], out[:, -1:]

    @torch.no_grad()
    def propose(self, k: int) -> list[int]:
        """K greedy draft tokens after the last entry (target ids); the chain entries stay in the
        cache until the next ``extend`` crops them."""
        n = len(self.cache)
        normed, out = self._normed, self._out
        drafts: list[int] = []
        for j in range(1, k + 1):
            tok = self.draft_to_target[self.draft.logits(normed)[0, -1].argmax()]
            drafts.append(int(tok))
            if j == k:
                break
            pos = torch.tensor([n - 1 + j], device=self.device)
            normed, out = self.draft.forward_cached(tok.view(1, 1), out, pos, self.cache)
        return drafts


class GreedyVerifier:
    """Greedy (temperature 0) verification against the HF target with a KV cache."""

    def __init__(self, target: TargetModel):
        self.target = target
        self.cache = None

    def prefill(self, prompt: Sequence[int]) -> tuple[int, torch.Tensor]:
        """Run the prompt; returns (first generated token, features f[0..P-1])."""
        self.cache = self.target.new_cache()
        nxt, aux = self.target.forward(prompt, self.cache)
        return int(nxt[-1]), aux

    def verify(self, last: int, drafts: Sequence[int]) -> tuple[list[int], torch.Tensor]:
        """One forward over [last, d_1..d_K]: target tokens at those K+1 positions and features."""
        nxt, aux = self.target.forward([last, *drafts], self.cache)
        return nxt.tolist(), aux

    def rollback(self, length: int) -> None:
        """Keep the first ``length`` positions of the KV cache."""
        extra = self.cache.get_seq_length() - length
        if extra < 0:
            raise ValueError(f"rollback to {length}: the cache holds only {length + extra} positions")
        if extra:
            self.cache.crop(-extra)  # transformers 5: a negative count removes that many


def accepted_prefix(drafts: Sequence[int], target_tokens: Sequence[int]) -> int:
    """Number of leading drafts equal to the target's tokens at the same positions."""
    m = 0
    while m < len(drafts) and m < len(target_tokens) and drafts[m] == target_tokens[m]:
        m += 1
    return m


def speculate(prompt: Sequence[int], proposer: ChainProposer, verifier: GreedyVerifier, steps: int,
              max_new_tokens: int, eos_ids: Sequence[int] = ()) -> SpecResult:
    """Greedy chain speculation for one prompt: prefill, then draft K / verify / roll back until
    EOS or ``max_new_tokens``."""
    prompt = list(prompt)
    P = len(prompt)
    first, feats = verifier.prefill(prompt)
    proposer.reset()
    proposer.extend(prompt[1:] + [first], feats, 0)
    out = [first]
    cycles: list[tuple[int, int]] = []
    matched: list[int] = []
    eos = set(eos_ids)
    while len(out) < max_new_tokens and out[-1] not in eos:
        n = P + len(out) - 1  # index of the last committed token x[n]
        drafts = proposer.propose(steps)
        target_tokens, feats = verifier.verify(out[-1], drafts)
        m = accepted_prefix(drafts, target_tokens)
        new = target_tokens[: m + 1]  # accepted drafts (== target tokens) + the bonus
        # stop inside this cycle: after EOS (kept) or at the token budget
        remaining = max_new_tokens - len(out)
        for i, t in enumerate(new):
            if t in eos:
                remaining = min(remaining, i + 1)
                break
        accepted, committed = truncate_cycle(m, remaining)
        cycles.append((accepted, committed))
        matched.append(m)
        out.extend(new[:committed])
        # keep target positions x[n..n+m] (inputs that were accepted), drop the rest
        verifier.rollback(n + m + 1)
        # draft: real entries for positions n..n+committed-1 with their target features
        proposer.extend(new[:committed], feats[:committed], n)
    return SpecResult(out, cycles, matched)
