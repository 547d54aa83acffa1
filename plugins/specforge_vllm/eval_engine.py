"""``specforge eval --engine vllm``: the export measured by a real vLLM (its own process and venv).

The runner (``eval_runner.py``) serves the target at temperature 0 with the export as its EAGLE-3
draft and, for the guard, without speculation. From vLLM's own counters this module builds the
project's report:

* **raw** (``report.raw``): vLLM's acceptance length ``1 + accepted / drafts`` and per-position
  rates, from each request's per-step accepted counts (``per_request_spec_decode_metrics =
  "detailed"``), cross-checked against the engine-wide ``vllm:spec_decode_*`` counters. vLLM counts
  drafts accepted past EOS / ``max_tokens`` before it cuts the output.
* **truncated** (``report.overall``, ``report.tau``): the project's stop rule applied to the same
  per-step counts (a step commits ``min(accepted + 1, tokens left before the stop)``), so it is
  comparable with the hf engine's tau step for step.
* **guard**: speculative output must equal vLLM's plain greedy output (a mismatch is an error,
  ``specforge eval`` exits 1). Draft weights that vLLM did not load from the export (missing,
  unused, or different) are errors too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

RUNNER = Path(__file__).with_name("eval_runner.py")


def vllm_python(option: Optional[str]) -> str:
    """``option``, else ``$SPECFORGE_VLLM_PYTHON``, else this interpreter if it imports vllm, else
    the venv discovery (``venv.py``)."""
    import importlib.util

    from specforge_vllm.venv import candidates, find_vllm_python

    for where, value in (("--engine-python / eval.engine_python", option),
                         ("$SPECFORGE_VLLM_PYTHON", os.environ.get("SPECFORGE_VLLM_PYTHON"))):
        if value:
            if not Path(value).is_file():
                raise ValueError(f"{where} = {value}: no such interpreter")
            return value
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    found = find_vllm_python()
    if found is None:
        tried = ", ".join(str(c) for c in candidates()[:3])
        raise ValueError("no vLLM environment found: pass --engine-python (eval.engine_python) or set "
                         f"$SPECFORGE_VLLM_PYTHON to its python (tried {tried}, ...); `nox -s vllm` builds one")
    return found


# vLLM's speculative method for an export, from the keys its loaders read (vLLM keys the method on
# the config, not on who trained it); anything else is served as an EAGLE-3 draft
_METHOD_BY_CONFIG_KEY = (("markov_rank", "dspark"), ("dflash_config", "dflash"))  # a dspark config has both


def speculative_method(draft_dir: str | Path) -> str:
    """The ``speculative_config.method`` vLLM serves this export with."""
    path = Path(draft_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable draft export config ({exc})") from exc
    for key, method in _METHOD_BY_CONFIG_KEY:
        if key in cfg:
            return method
    return "eagle3"


def parallel_drafting(draft_dir: str | Path) -> bool:
    """Whether vLLM drafts this export's K tokens in one forward: an EAGLE-3-layout export whose
    config.json says ``parallel_drafting`` (P-EAGLE; vLLM takes the flag from the speculative config)."""
    return bool(json.loads((Path(draft_dir) / "config.json").read_text()).get("parallel_drafting"))


def run_vllm_eval(request: Any):
    """``register_eval_engines`` entry: an ``EvalRequest`` in, an ``EvalReport`` out."""
    from specforge_core.plugin_api import engine_dtype

    t0 = time.perf_counter()
    if request.aux_layers:
        raise ValueError("--engine vllm reads the aux layers from the export's config.json; re-export with "
                         "model.aux_layers instead of overriding them at eval time")
    if getattr(request, "tree", None) is not None:
        raise ValueError("--engine vllm verifies chains (num_speculative_tokens); evaluate trees with the hf engine")
    python = vllm_python(request.engine_python)
    payload = {
        "draft": str(Path(request.draft).resolve()), "target": _model_path(request.target),
        "method": speculative_method(request.draft), "parallel_drafting": parallel_drafting(request.draft),
        "steps": request.steps, "max_new_tokens": request.max_new_tokens, "eos_ids": list(request.eos_ids),
        "check": request.check, "dtype": engine_dtype(request.dtype, key="eval.dtype"), "trust_remote_code": request.trust_remote_code,
        "prompts": [{"sample_id": p.sample_id, "input_ids": p.input_ids.tolist()} for p in request.prompts],
        "temperature": float(getattr(request, "temperature", 0.0)), "seed": int(getattr(request, "seed", 0)),
        "speedup": bool(getattr(request, "speedup", False)),
        "concurrency": [c for c in (getattr(request, "concurrency", None) or []) if c >= 1],
    }
    with tempfile.TemporaryDirectory(prefix="specforge-vllm-eval-") as tmp:
        req_path, res_path = Path(tmp, "request.json"), Path(tmp, "result.json")
        req_path.write_text(json.dumps(payload))
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        proc = subprocess.run([python, str(RUNNER), str(req_path), str(res_path)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0 or not res_path.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
            raise RuntimeError(f"vLLM eval runner failed (exit {proc.returncode}, python {python}):\n{tail}")
        result = json.loads(res_path.read_text())
    return build_report(request, result, time.perf_counter() - t0, python)


def build_report(request: Any, result: dict, wall_s: float, python: str = ""):
    from specforge_core.plugin_api import (
        AcceptStats,
        EvalReport,
        PromptReport,
        first_difference,
        stats_from_cycles,
        truncate_cycle,
    )

    K = request.steps
    overall, raw_all = AcceptStats(K), AcceptStats(K)
    categories: dict[str, AcceptStats] = {}
    reports = []
    for p, r in zip(request.prompts, result["prompts"], strict=True):
        out, accepted = r["output"], r["per_step_accepted"]
        stats = AcceptStats(K)
        g = 1  # the first token comes from the prefill
        for a in accepted:
            acc, committed = truncate_cycle(a, len(out) - g)
            stats.add_cycle(acc, committed)
            g += committed
        mismatch = first_difference(out, r["reference"]) if ("reference" in r and request.check) else None
        if g != len(out) and mismatch is None:
            mismatch = f"vLLM's per-step counts commit {g} tokens but it returned {len(out)}"
        raw = stats_from_cycles(accepted, K)
        overall.merge(stats)
        raw_all.merge(raw)
        if p.category:
            categories.setdefault(p.category, AcceptStats(K)).merge(stats)
        reports.append(PromptReport(p.sample_id, p.category, len(p.input_ids), len(out), stats, mismatch, raw))

    errors = []
    c = result.get("counters", {})
    engine_raw = None
    if c.get("spec_decode_num_drafts"):
        engine_raw = 1 + c["spec_decode_num_accepted_tokens"] / c["spec_decode_num_drafts"]
        if (c["spec_decode_num_drafts"], c["spec_decode_num_accepted_tokens"]) != (raw_all.cycles, raw_all.tokens - raw_all.cycles):
            errors.append(f"vLLM's engine counters (drafts {c['spec_decode_num_drafts']}, accepted "
                          f"{c['spec_decode_num_accepted_tokens']}) disagree with its per-request counts "
                          f"({raw_all.cycles}, {raw_all.tokens - raw_all.cycles})")
    w = result.get("draft_weights", {})
    if w.get("unused") or w.get("mismatched"):
        errors.append(f"vLLM did not load these export tensors as written: unused {w.get('unused')}, "
                      f"different {w.get('mismatched')}")
    errors += [f"vLLM at load: {line}" for line in result.get("load_log", []) if line.startswith("ERROR")]
    if float(getattr(request, "temperature", 0.0)) > 0:  # sampling counts are wrong on an unpatched vLLM CPU
        errors += [f"vLLM CPU workaround {line}" for line in result.get("workarounds", []) if line.startswith("not applied")]
    t = result.get("timings", {})
    summary = {
        "vLLM raw acceptance length (1 + accepted/drafts, engine counters)": _f(engine_raw),
        "vLLM time": f"start {t.get('spec_start_s', 0):.1f} s, speculative generate {t.get('spec_generate_s', 0):.1f} s"
                     + (f", greedy generate {t['greedy_generate_s']:.1f} s" if "greedy_generate_s" in t else ""),
        "vLLM CPU workarounds applied": "; ".join(result.get("workarounds", [])) or "none",
        "draft weights vs export": ("checked, all equal" if w.get("checked") and not errors
                                    else w.get("why", "see errors")),
    }
    extra = {"python": python, "counters": c, "timings": t, "load_log": result.get("load_log", []),
             "workarounds": result.get("workarounds", []),
             "draft_weights": w, "engine_raw_tau": engine_raw, "errors": errors, "summary": summary}
    extra["temperature"] = float(getattr(request, "temperature", 0.0))
    extra["shape"] = f"chain K={K}"
    if "greedy_generate_s" in t and "spec_generate_s" in t:
        extra["wall_speedup"] = t["greedy_generate_s"] / t["spec_generate_s"]
        summary["vLLM measured speed-up (plain generate / speculative generate, wall clock)"] = f"{extra['wall_speedup']:.2f}x"
    levels = engine_levels(result)
    if levels:
        extra["engine_speedup"] = levels
        for r in levels:
            summary[f"vLLM measured at concurrency {r['concurrency']}"] = (
                f"{r['speedup']:.2f}x ({r['plain_tok_s']:.0f} -> {r['spec_tok_s']:.0f} tok/s; step "
                f"{r['plain_step_ms']:.1f} ms plain, {r['spec_step_ms']:.1f} ms speculative"
                + (f" of which drafter {r['spec_draft_ms']:.1f} ms" if "spec_draft_ms" in r else "") + "; "
                f"{r['tokens_per_spec_step']:.2f} tokens per speculative step)")
    return EvalReport(request.draft, request.target, K, request.max_new_tokens, "exact", overall, categories,
                      reports, wall_s, engine="vllm", raw=raw_all, extra=extra)


def engine_levels(result: dict) -> list[dict]:
    """Per concurrency level, from the runner's timed runs of both engines (same prompts, c at a
    time): tokens/s, time per engine step, and the measured speed-up (speculative / plain tok/s)."""
    levels = result.get("levels") or {}
    plain = {r["concurrency"]: r for r in levels.get("plain", [])}
    rows = []
    for s in levels.get("speculative", []):
        p = plain.get(s["concurrency"])
        if p is None or not (s["seconds"] > 0 and p["seconds"] > 0 and s["steps"] and p["steps"]):
            continue
        spec_tok_s, plain_tok_s = s["tokens"] / s["seconds"], p["tokens"] / p["seconds"]
        rows.append({"concurrency": s["concurrency"], "plain_tok_s": plain_tok_s, "spec_tok_s": spec_tok_s,
                     "speedup": spec_tok_s / plain_tok_s, "plain_step_ms": 1e3 * p["seconds"] / p["steps"],
                     "spec_step_ms": 1e3 * s["seconds"] / s["steps"], "plain_steps": p["steps"],
                     "spec_steps": s["steps"], "tokens_per_spec_step": s["tokens"] / s["steps"],
                     "tokens_per_plain_step": p["tokens"] / p["steps"]})
        if "drafter_seconds" in s:  # the drafter's share of a speculative step
            rows[-1]["spec_draft_ms"] = 1e3 * s["drafter_seconds"] / s["steps"]
    return rows


def _model_path(target: str) -> str:
    p = Path(target)
    return str(p.resolve()) if p.exists() else target


def _f(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"
