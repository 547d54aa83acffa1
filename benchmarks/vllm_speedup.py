"""``specforge eval --speedup``'s estimate against vLLM's measured speed-up, side by side, per concurrency.

    python benchmarks/vllm_speedup.py --draft EXPORT --target TARGET --data PROMPTS.jsonl \\
        --max-prompts 8 --max-new-tokens 32 --steps 3 --concurrency 1,4,8 [--json out.json]

Runs the same prompts (greedy, chain K = --steps) twice:

* ``hf`` with ``speedup``: tau, and per concurrency c the HF forward costs on this device
  (target 1 token, draft K tokens, verify K + 1 tokens; ``specforge_core/evaluation/speedup.py``)
  and the estimate ``tau t_1 / (t_draft + t_verify)``;
* ``vllm`` with ``speedup``: per c, both engines (with the export as EAGLE-3 draft, and plain)
  generate all prompts c at a time; tokens/s, engine steps, time per step, measured speed-up.

The table puts them next to each other, each speed-up split into the same two factors, so the gap
shows where it comes from: tokens per step (the estimate: tau; vLLM: tokens per speculative step /
tokens per plain step, which also counts prefill steps and requests of a wave that finished
early) and cost ratio (a speculative cycle / a plain step: HF forwards, or vLLM's measured step
times). speed-up = tokens ratio / cost ratio. The last column adds vLLM's measured per-step
overhead to the estimate (``with_engine_overhead``). ``--show out.json`` reprints a saved table.
Needs a vLLM environment (``SPECFORGE_VLLM_PYTHON`` or ``nox -s vllm``).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def print_table(rows: list[dict], tau: float) -> None:
    """Markdown: the estimate's factors (tau, cost ratio) next to vLLM's (tokens per step ratio,
    cost ratio); speed-up = tokens-per-step ratio / cost ratio on both sides."""
    head = ("| c | HF t_1 / draft / verify (ms) | estimate: tau / cost ratio / speed-up "
            "| vLLM step plain / spec (ms) | vLLM: tokens per step ratio / cost ratio / speed-up "
            "| estimate + engine overhead |")
    print(head)
    print("|" + "---|" * (head.count(" | ") + 1))
    for r in rows:
        line = (f"| {r['concurrency']} | {r['t_1_ms']:.1f} / {r['t_draft_ms']:.1f} / {r['t_verify_ms']:.1f} "
                f"| {tau:.2f} / {r['est_cost_ratio']:.2f} / **{r['estimate']:.2f}x** ")
        if "measured" in r:
            ratio = r["vllm_tokens_per_spec_step"] / r["vllm_tokens_per_plain_step"]
            drafter = f" (drafter {r['vllm_spec_draft_ms']:.1f})" if "vllm_spec_draft_ms" in r else ""
            line += (f"| {r['vllm_plain_step_ms']:.1f} / {r['vllm_spec_step_ms']:.1f}{drafter} "
                     f"| {ratio:.2f} / {r['vllm_cost_ratio']:.2f} / **{r['measured']:.2f}x** "
                     f"| {r['estimate_with_overhead']:.2f}x |")
        else:
            line += "| - | - | - |"
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draft")
    ap.add_argument("--target")
    ap.add_argument("--data", nargs="+")
    ap.add_argument("--max-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--batch-size", type=int, default=16, help="hf engine: prompts per forward (tau only)")
    ap.add_argument("--engine-python", default=os.environ.get("SPECFORGE_VLLM_PYTHON"))
    ap.add_argument("--json", help="write both reports' numbers here")
    ap.add_argument("--show", metavar="JSON", help="only print the table of an earlier --json")
    args = ap.parse_args()
    if args.show:
        with open(args.show) as f:
            saved = json.load(f)
        return print_table(saved["rows"], saved["tau_hf"])
    if not (args.draft and args.target and args.data):
        ap.error("--draft, --target and --data are required (or --show)")

    from specforge_core.evaluation import evaluate
    from specforge_core.evaluation.speedup import with_engine_overhead

    cs = [int(c) for c in args.concurrency.split(",")]
    kw = dict(steps=args.steps, max_new_tokens=args.max_new_tokens, max_prompts=args.max_prompts, speedup=True,
              concurrency=cs)
    t0 = time.perf_counter()
    hf = evaluate(args.draft, args.target, args.data, batch_size=args.batch_size, **kw)
    t_hf = time.perf_counter() - t0
    t0 = time.perf_counter()
    vl = evaluate(args.draft, args.target, args.data, engine="vllm", engine_python=args.engine_python, **kw)
    t_vl = time.perf_counter() - t0
    if not (hf.ok and vl.ok):
        raise SystemExit(f"an engine's speculative output differed from greedy: {hf.errors or vl.errors}")

    est = {r["concurrency"]: r for r in hf.extra["speedup"]["rows"]}
    meas = {r["concurrency"]: r for r in vl.extra.get("engine_speedup", [])}
    rows = []
    for c in cs:
        e, m = est[c], meas.get(c)
        row = {"concurrency": c, "t_1_ms": 1e3 * e["target_1"], "t_draft_ms": 1e3 * e["draft"],
               "t_verify_ms": 1e3 * e["target_verify"], "est_cost_ratio": (e["draft"] + e["target_verify"]) / e["target_1"],
               "estimate": e["speedup"]}
        if m is not None:
            row.update({"vllm_plain_step_ms": m["plain_step_ms"], "vllm_spec_step_ms": m["spec_step_ms"],
                        "vllm_cost_ratio": m["spec_step_ms"] / m["plain_step_ms"],
                        "vllm_tokens_per_spec_step": m["tokens_per_spec_step"],
                        "vllm_tokens_per_plain_step": m["tokens_per_plain_step"], "measured": m["speedup"],
                        "estimate_with_overhead": with_engine_overhead(e, hf.tau, m["plain_step_ms"] / 1e3)})
            if "spec_draft_ms" in m:
                row["vllm_spec_draft_ms"] = m["spec_draft_ms"]
        rows.append(row)

    print(f"\ntau: hf {hf.tau:.3f} (vLLM same prompts: {vl.tau:.3f}); K = {args.steps}; "
          f"{len(hf.prompts)} prompts x {args.max_new_tokens} new tokens; hf {t_hf:.0f} s, vllm {t_vl:.0f} s")
    print_table(rows, hf.tau)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "tau_hf": hf.tau, "tau_vllm": vl.tau, "rows": rows,
                       "vllm_workarounds": vl.extra.get("workarounds")}, f, indent=2)


if __name__ == "__main__":
    main()
