"""``specforge eval --advise``: which speculative settings to serve this draft with, on this device.

Every candidate setting (chains of several K, a few trees) is evaluated on the same prompts
(acceptance) and timed (``speedup.py``); the table ranks them by the estimated speed-up at each
concurrency level and gives the serving flags the draft algorithm's proposer names
(``Proposer.serving_flags``, optional: ``{engine: flags}``, flags None where that engine cannot
serve the setting). The ranking inherits the speed-up estimate's limits (docs/evaluation.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import attrs

from specforge_core.evaluation.evaluate import run_eval

DEFAULT_CANDIDATES: tuple[tuple[int, Optional[str]], ...] = (
    (1, None), (2, None), (3, None), (5, None),
    (0, "topk=4,depth=4,tokens=16"), (0, "topk=8,depth=6,tokens=32"), (0, "topk=8,depth=6,tokens=64"),
)


def advise(base: Any, candidates: Sequence[tuple[int, Optional[str]]] = DEFAULT_CANDIDATES, *,
           proposer: Any = None) -> list[dict]:
    """One row per candidate ``(K, tree)``: tau, speed-up per concurrency, serving flags; best first
    (by the speed-up at the lowest concurrency)."""
    rows = []
    for steps, tree in candidates:
        s = attrs.evolve(base, steps=steps or base.steps, tree=tree, speedup=True, fast=False, progress=False)
        report = run_eval(s, proposer=proposer)
        sp = report.extra["speedup"]["rows"]
        flags = report.extra.get("serving_flags") or {}
        rows.append({"setting": s.shape, "tau": report.tau,
                     "speedup": {r["concurrency"]: r["speedup"] for r in sp}, "flags": dict(flags)})
    first = min(base.concurrency)
    rows.sort(key=lambda r: -r["speedup"][first])
    return rows


def advice_table(rows: list[dict], device: str):
    from rich.table import Table

    levels = list(rows[0]["speedup"]) if rows else []
    engines = list(dict.fromkeys(e for r in rows for e in r["flags"]))
    t = Table(title=f"settings for this draft and target on {device}, best first (estimated speed-up)")
    for col in ("setting", "tau", *[f"c={c}" for c in levels]):
        t.add_column(col, justify="left" if col == "setting" else "right")
    for e in engines:
        t.add_column(f"{e} flags", justify="left")
    for r in rows:
        t.add_row(r["setting"], f"{r['tau']:.3f}", *[f"{r['speedup'][c]:.2f}x" for c in levels],
                  *[r["flags"].get(e) or "-" for e in engines])
    return t
