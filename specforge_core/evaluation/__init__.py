"""``specforge eval``: a draft's acceptance length measured offline with the HF target.

    from specforge_core.evaluation import evaluate
    report = evaluate("runs/x/export", "path/to/target", "prompts.jsonl", steps=3, max_new_tokens=64)
    report.tau, report.rates, report.ok

See docs/evaluation.md for the metric and how it relates to SGLang's and vLLM's numbers.
"""

from specforge_core.evaluation.accounting import AcceptStats, stats_from_cycles, truncate_cycle
from specforge_core.evaluation.evaluate import evaluate
from specforge_core.evaluation.report import EvalReport, PromptReport

__all__ = ["AcceptStats", "EvalReport", "PromptReport", "evaluate", "stats_from_cycles", "truncate_cycle"]
