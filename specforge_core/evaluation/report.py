"""``EvalReport``: the numbers of one evaluation, and how they are shown (table, JSON, plot)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import attrs

from specforge_core.evaluation.accounting import AcceptStats


@attrs.define
class PromptReport:
    sample_id: str
    category: Optional[str]
    prompt_tokens: int
    generated: int  # output tokens (prefill token included)
    stats: AcceptStats
    mismatch: Optional[str] = None  # set when speculative output != plain greedy output
    # untruncated: the last cycle's drafts accepted past EOS / max_new_tokens still count, as
    # vLLM's counters do (None: not known, e.g. the fast path)
    raw: Optional[AcceptStats] = None
    # sampling: 1 + the exact expected accepted drafts per cycle (from the target's and the
    # draft's distributions at every verified node), averaged over the prompt's cycles
    expected_tau: Optional[float] = None


@attrs.define
class EvalReport:
    draft: str
    target: str
    steps: int
    max_new_tokens: int
    mode: str  # "exact" or "fast"
    overall: AcceptStats
    categories: dict[str, AcceptStats]
    prompts: list[PromptReport]
    wall_s: float = 0.0
    engine: str = "hf"
    raw: Optional[AcceptStats] = None  # untruncated counts over all prompts (engine-comparable)
    extra: dict[str, Any] = attrs.Factory(dict)  # engine-specific facts (timings, raw counters...)

    @property
    def tau(self) -> float:
        return self.overall.tau

    @property
    def rates(self) -> list[float]:
        return self.overall.rates

    @property
    def errors(self) -> list[str]:
        """Prompts whose speculative output differed from greedy, plus engine problems."""
        return [f"{p.sample_id}: {p.mismatch}" for p in self.prompts if p.mismatch] + list(self.extra.get("errors", []))

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "draft": self.draft, "target": self.target, "steps": self.steps,
            "max_new_tokens": self.max_new_tokens, "mode": self.mode, "wall_s": self.wall_s,
            "engine": self.engine,
            "overall": self.overall.to_dict(),
            "raw": self.raw.to_dict() if self.raw else None,
            "categories": {k: v.to_dict() for k, v in self.categories.items()},
            "prompts": [
                {"sample_id": p.sample_id, "category": p.category, "prompt_tokens": p.prompt_tokens,
                 "generated": p.generated, **p.stats.to_dict(), "mismatch": p.mismatch,
                 "raw": p.raw.to_dict() if p.raw else None, "expected_tau": p.expected_tau}
                for p in self.prompts
            ],
            "errors": self.errors,
            **({"extra": self.extra} if self.extra else {}),
        }

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # NaN (no cycle) is not JSON: write null
        text = json.dumps(_nan_to_none(self.to_dict()), indent=2)
        path.write_text(text + "\n")
        return path

    # ------------------------------------------------------------------------------ terminal
    def table(self):
        from rich.table import Table

        K = self.steps
        shape = self.extra.get("shape", f"chain K={K}")
        temp = self.extra.get("temperature", 0.0)
        how = "greedy" if not temp else f"temperature {temp:g}"
        t = Table(title=f"acceptance ({self.engine}): {shape}, {how}, {self.mode} "
                        f"({len(self.prompts)} prompts, max_new_tokens {self.max_new_tokens})")
        for col in ("group", "prompts", "cycles", "tokens", "tau"):
            t.add_column(col, justify="right" if col != "group" else "left")
        for i in range(1, K + 1):
            t.add_column(f"acc>={i}", justify="right")  # P(accepted >= i)
        counts: dict[str, int] = {}
        for p in self.prompts:
            counts[p.category or ""] = counts.get(p.category or "", 0) + 1
        rows = [("all", len(self.prompts), self.overall)]
        rows += [(name, counts.get(name, 0), s) for name, s in sorted(self.categories.items())]
        for i, (name, n, s) in enumerate(rows):
            t.add_row(name, str(n), str(s.cycles), str(s.tokens), _f(s.tau), *(_f(r) for r in s.rates),
                      end_section=i == 0 and len(rows) > 1)
        return t

    def print(self, console=None) -> None:
        from rich.console import Console

        console = console or Console()
        console.print(self.table())
        console.print(f"tau = {_f(self.tau)} tokens per target verification forward "
                      f"(depth+1 = {self.steps + 1} is the ceiling); {self.wall_s:.1f} s")
        if "expected_tau" in self.extra:
            console.print(f"expected tau (exact per cycle from the target's distributions, untruncated): "
                          f"{_f(self.extra['expected_tau'])} (sampled, seed {self.extra.get('seed', 0)})")
        if self.raw is not None:
            console.print(f"untruncated (engine-comparable, vLLM's 1 + accepted/drafts): {_f(self.raw.tau)}, "
                          f"per position {' '.join(_f(r) for r in self.raw.rates)}")
        for key, value in self.extra.get("summary", {}).items():
            console.print(f"{key}: {value}")
        if "speedup" in self.extra:
            from specforge_core.evaluation.speedup import speedup_table

            console.print(speedup_table(self.extra["speedup"]))
        for e in self.errors:
            console.print(f"[bold red]error[/]: {e}")

    # ------------------------------------------------------------------------------ plot
    def plot(self, path: str | Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        xs = list(range(1, self.steps + 1))
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, self.rates, marker="o", linewidth=2, label=f"all (tau {_f(self.tau)})")
        for name, s in sorted(self.categories.items()):
            ax.plot(xs, s.rates, marker=".", alpha=0.7, label=f"{name} (tau {_f(s.tau)})")
        ax.set_xlabel("draft position i")
        ax.set_ylabel("P(accepted >= i)")
        ax.set_ylim(0, 1.02)
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
        ax.set_title(f"per-position acceptance, K={self.steps}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _f(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3f}"


def _nan_to_none(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_nan_to_none(x) for x in v]
    return v
