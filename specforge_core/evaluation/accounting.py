"""Acceptance accounting: how verification cycles turn into tau and per-position rates.

A *cycle* is one target verification forward. With K draft tokens, the target accepts the longest
prefix of m <= K drafts that equals its own greedy tokens and adds one bonus token, so a cycle
commits up to m + 1 tokens. Generation stops at EOS (kept) or after ``max_new_tokens``; a cycle
that crosses the stop commits only the tokens before it, like SGLang truncates a request's
accepted tokens at its finish point. We record per cycle:

    committed = tokens the cycle added to the output (1..K+1)
    accepted  = committed - 1 (drafts kept; the last token of a cycle is the target's own)

    tau          = sum(committed) / cycles      (bonus included; SGLang "accept length")
    rate[i]      = #cycles with accepted >= i / cycles,  i = 1..K

The first output token comes from the prefill forward, not from a verification, so it is in
neither count (SGLang's server metric counts the same way).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs


def truncate_cycle(matched: int, remaining: int) -> tuple[int, int]:
    """A cycle whose drafts matched ``matched`` target tokens, with ``remaining`` tokens left
    before the stop (max_new_tokens, or EOS inclusive): returns ``(accepted, committed)``."""
    if remaining < 1:
        raise ValueError(f"a cycle needs at least one token of budget left, got {remaining}")
    committed = min(matched + 1, remaining)
    return committed - 1, committed


@attrs.define
class AcceptStats:
    """Counts of one prompt, a category, or everything."""

    steps: int  # K
    cycles: int = 0  # target verification forwards
    tokens: int = 0  # tokens committed by those cycles (bonus included)
    at_least: list[int] = attrs.field(factory=list)  # at_least[i-1] = #cycles with accepted >= i

    def __attrs_post_init__(self) -> None:
        if not self.at_least:
            self.at_least = [0] * self.steps

    def add_cycle(self, accepted: int, committed: int) -> None:
        if not 0 <= accepted <= self.steps or committed != accepted + 1:
            raise ValueError(f"bad cycle: accepted={accepted}, committed={committed}, K={self.steps}")
        self.cycles += 1
        self.tokens += committed
        for i in range(accepted):
            self.at_least[i] += 1

    def merge(self, other: AcceptStats) -> None:
        if other.steps != self.steps:
            raise ValueError(f"cannot merge stats of K={other.steps} into K={self.steps}")
        self.cycles += other.cycles
        self.tokens += other.tokens
        self.at_least = [a + b for a, b in zip(self.at_least, other.at_least, strict=True)]

    @property
    def tau(self) -> float:
        """Mean tokens per verification forward (NaN with no cycle)."""
        return self.tokens / self.cycles if self.cycles else float("nan")

    @property
    def rates(self) -> list[float]:
        """P(accepted >= i) for i = 1..K."""
        return [a / self.cycles if self.cycles else float("nan") for a in self.at_least]

    def to_dict(self) -> dict:
        return {"cycles": self.cycles, "tokens": self.tokens, "tau": self.tau, "accept_rates": self.rates}


def stats_from_cycles(accepted: Sequence[int], steps: int) -> AcceptStats:
    """Stats of a run of cycles given their accepted counts (committed = accepted + 1)."""
    s = AcceptStats(steps)
    for a in accepted:
        s.add_cycle(a, a + 1)
    return s
