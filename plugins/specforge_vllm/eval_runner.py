"""Runs inside the vLLM environment (its own venv): ``python eval_runner.py REQUEST.json RESULT.json``.

Self-contained on purpose (stdlib + vLLM only): the vLLM venv does not have specforge installed.
It serves the target twice with the same token-id prompts (temperature 0, or the request's
temperature with one seed per request): once with the export
as its draft (``speculative_config = {"method": "eagle3" | "dflash" | "dspark", ...}`` from the export's
config, per-request
``detailed`` spec-decode metrics), once plainly (the greedy reference). It writes what vLLM
itself reports: output token ids of both runs, each request's per-step accepted/drafted counts,
the engine-wide ``vllm:spec_decode_*`` counters, the draft-load log lines, and timings (with
``speedup``: both engines' wall clock and step counts at each ``concurrency`` level).
The caller (``eval_engine.py``) does the accounting.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time


class _Collect(logging.Handler):
    """Warnings and errors vLLM logs while loading (a missing/unexpected draft weight shows here)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(f"{record.levelname}: {record.getMessage()}")


def _model_impl(req: dict):
    """None (vLLM's own class), or "transformers" when the target's native vLLM class lacks the
    EAGLE-3 interface (aux hidden states: EAGLE-3, DFlash, DSpark) and vLLM's Transformers backend,
    which has it, must serve the target (Gemma 3). Both runs use it, so greedy compares like with like."""
    if os.environ.get("SPECFORGE_VLLM_MODEL_IMPL"):
        return os.environ["SPECFORGE_VLLM_MODEL_IMPL"]
    if req.get("method", "eagle3") not in ("eagle3", "dflash", "dspark"):
        return None
    try:
        from vllm.model_executor.models import ModelRegistry
        from vllm.model_executor.models.interfaces import supports_eagle3

        with open(os.path.join(req["target"], "config.json")) as f:
            archs = json.load(f).get("architectures") or []
        classes = [ModelRegistry._try_load_model_cls(a) for a in archs]
    except (OSError, ValueError, ImportError, AttributeError):
        return None  # a hub id or another vLLM: let vLLM decide
    native = [c for c in classes if c is not None]
    return "transformers" if native and not any(supports_eagle3(c) for c in native) else None


def _engine(req: dict, speculative: bool):
    from vllm import LLM

    kw = dict(model=req["target"], dtype=req.get("dtype", "float32"), max_model_len=req.get("max_model_len", 2048),
              enforce_eager=True, seed=0, disable_log_stats=False, trust_remote_code=req.get("trust_remote_code", False))
    impl = _model_impl(req)
    if impl:
        kw["model_impl"] = impl
    if speculative:
        kw["speculative_config"] = {"method": req.get("method", "eagle3"), "model": req["draft"],
                                    "num_speculative_tokens": req["steps"]}
        if req.get("parallel_drafting"):  # P-EAGLE: all K drafts from one forward (mask slots)
            kw["speculative_config"]["parallel_drafting"] = True
        kw["per_request_spec_decode_metrics"] = "detailed"
    return LLM(**kw)


def _generate(llm, req: dict, rows: range | None = None):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    # ignore_eos + explicit stop ids: vLLM stops exactly at the project's stop tokens (kept);
    # temperature > 0: vLLM's speculative sampling, one seed per request (reproducible runs)
    T = float(req.get("temperature", 0.0))
    rows = range(len(req["prompts"])) if rows is None else rows
    params = [SamplingParams(temperature=T, max_tokens=req["max_new_tokens"], ignore_eos=True,
                             stop_token_ids=req["eos_ids"] or None, detokenize=False,
                             seed=(req.get("seed", 0) * 100003 + i) if T > 0 else None)
              for i in rows]
    prompts = [TokensPrompt(prompt_token_ids=req["prompts"][i]["input_ids"]) for i in rows]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return outs, time.perf_counter() - t0


def _step_counter(llm) -> list[int]:
    """Counts engine steps (one scheduler iteration: a batch forward, plus the drafter's when
    speculating) by wrapping this engine object's ``step``; ``[n]``, updated in place."""
    engine, n = llm.llm_engine, [0]
    step = engine.step

    def counted(*args, **kwargs):
        n[0] += 1
        return step(*args, **kwargs)

    engine.step = counted
    return n


def _drafter_clock(llm) -> list[float]:
    """Seconds spent in the model runner's ``propose_draft_token_ids`` (the drafter's whole step:
    input preparation, its K forwards, sampling), ``[s]`` updated in place; ``[]`` where the runner
    is not reachable in this process (vLLM internals, best effort)."""
    try:
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
        propose = runner.propose_draft_token_ids
    except AttributeError:
        return []
    spent = [0.0]

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return propose(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t0

    runner.propose_draft_token_ids = timed
    return spent


def _timed_levels(llm, req: dict, steps: list[int], drafter: list[float] | None = None) -> list[dict]:
    """Wall clock at each concurrency level c: all prompts, c at a time (one ``generate`` per wave
    of c, so at most c requests are in flight), warm engine. Per level: seconds, engine steps and
    output tokens."""
    n = len(req["prompts"])
    out = []
    for c in req.get("concurrency") or [n]:
        seconds, tokens, before, draft_before = 0.0, 0, steps[0], drafter[0] if drafter else 0.0
        for start in range(0, n, c):
            outs, dt = _generate(llm, req, range(start, min(n, start + c)))
            seconds += dt
            tokens += sum(len(o.outputs[0].token_ids) for o in outs)
        out.append({"concurrency": c, "seconds": seconds, "steps": steps[0] - before, "tokens": tokens})
        if drafter:
            out[-1]["drafter_seconds"] = drafter[0] - draft_before
    return out


def _counters(llm) -> dict:
    """Engine-wide spec-decode counters (``LLM.get_metrics``): drafts, draft tokens, accepted
    tokens, accepted per position."""
    out: dict = {}
    for m in llm.get_metrics():
        name = m.name.replace("vllm:", "")
        if not name.startswith("spec_decode"):
            continue
        if hasattr(m, "values"):  # a vector (per position)
            out[name] = list(m.values)
        elif hasattr(m, "value"):
            out[name] = m.value
    return out


def _draft_weight_check(llm, draft_dir: str) -> dict:
    """Compare the drafter's loaded parameters with the export's tensors (best effort: only where
    the engine runs in this process)."""
    try:
        from safetensors.torch import load_file

        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
        model = runner.drafter.model
    except Exception as exc:  # the layout of vLLM's internals is not an API
        return {"checked": False, "why": f"{type(exc).__name__}: {exc}"}
    tensors = load_file(os.path.join(draft_dir, "model.safetensors"))
    params = dict(model.named_parameters())
    params.update(model.named_buffers())  # P-EAGLE's mask_hidden is a buffer of the top-level model
    mismatched, unused = [], []
    for key, t in tensors.items():
        if key in ("d2t", "t2d"):
            continue
        name = key.replace("midlayer.", "layers.0.")
        name = name if name.startswith("lm_head") else "model." + name
        candidates = [name, name.replace("layers.0.", "midlayer."), key]
        # vLLM fuses q/k/v and gate/up: compare those by slicing is engine-internal; check presence
        found = [c for c in candidates if c in params]
        if not found:
            fused = any(f in name for f in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
            if not fused:
                unused.append(key)
            continue
        p = params[found[0]]
        if tuple(p.shape) == tuple(t.shape) and not bool((p.detach().float().cpu() == t.float()).all()):
            mismatched.append(key)
    return {"checked": True, "tensors": len(tensors), "unused": unused, "mismatched": mismatched}


def main(request_path: str, result_path: str) -> int:
    with open(request_path) as f:
        req = json.load(f)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # logs and internals in this process
    collect = _Collect()
    logging.getLogger("vllm").addHandler(collect)
    result: dict = {"prompts": [], "timings": {}}

    t0 = time.perf_counter()
    llm = _engine(req, speculative=True)
    result["timings"]["spec_start_s"] = time.perf_counter() - t0
    # known CPU-build defects that change what vLLM computes (T > 0 sampling), patched only when present
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import cpu_workarounds

    result["workarounds"] = cpu_workarounds.apply()
    result["load_log"] = [line for line in collect.lines if "weight" in line.lower() or "ERROR" in line]
    result["draft_weights"] = _draft_weight_check(llm, req["draft"])
    steps, drafter = _step_counter(llm), _drafter_clock(llm)
    outs, result["timings"]["spec_generate_s"] = _generate(llm, req)
    result["counters"] = _counters(llm)  # before the timed runs add to them
    if req.get("speedup", False):
        result["levels"] = {"speculative": _timed_levels(llm, req, steps, drafter)}
    for p, o in zip(req["prompts"], outs, strict=True):
        c = o.outputs[0]
        m = getattr(c, "spec_decode_metrics", None) or getattr(o, "spec_decode_metrics", None)
        d = m.to_dict() if m is not None else {}
        result["prompts"].append({
            "sample_id": p["sample_id"], "output": list(c.token_ids), "finish_reason": c.finish_reason,
            "per_step_accepted": d.get("per_step_accepted", list(getattr(m, "per_step_accepted", []) or [])),
            "per_step_drafted": d.get("per_step_drafted", list(getattr(m, "per_step_drafted", []) or [])),
        })
    del llm
    import gc

    gc.collect()
    if req.get("check", True) or req.get("speedup", False):  # the greedy reference, or the plain run's clock
        t0 = time.perf_counter()
        ref = _engine(req, speculative=False)
        result["timings"]["greedy_start_s"] = time.perf_counter() - t0
        steps = _step_counter(ref)
        outs, result["timings"]["greedy_generate_s"] = _generate(ref, req)
        for entry, o in zip(result["prompts"], outs, strict=True):
            entry["reference"] = list(o.outputs[0].token_ids)
        if req.get("speedup", False):
            result["levels"]["plain"] = _timed_levels(ref, req, steps)
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
