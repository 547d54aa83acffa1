"""``specforge eval``: flags, or a run's config (+ overrides) with flags on top.

    specforge eval --draft runs/x/export --target MODEL --data prompts.jsonl [--steps 3]
    specforge eval configs/quickstart.toml eval.steps=4 [--json out.json] [--plot acc.png]
    specforge eval configs/quickstart.toml --tree topk=8,depth=6,tokens=64 --temperature 0.7 [--speedup]

Exit status: 0 ok, 1 the speculative output differed from greedy decoding on some prompt, 2 bad
input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specforge_core.evaluation.settings import EvalSettings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="*", help="run config files and section.field=value overrides (optional)")
    p.add_argument("--draft", help="exported draft dir (default with a config: <output_dir>/export)")
    p.add_argument("--target", help="target model dir or hub id (default: model.target)")
    p.add_argument("--data", nargs="+", help="prompt files, conversation formats (default: eval.data, else dataset.path)")
    p.add_argument("--steps", type=int, help="draft tokens per cycle K (default: eval.steps = 3)")
    p.add_argument("--max-new-tokens", type=int, help="tokens generated per prompt (default: eval.max_new_tokens)")
    p.add_argument("--max-prompts", type=int, help="evaluate at most this many prompts")
    p.add_argument("--fast", action="store_true", default=None,
                   help="teacher-forced counts (same numbers; skips the greedy-equality guard)")
    p.add_argument("--no-check", action="store_true", help="skip the plain-greedy comparison (exact mode)")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of per-position acceptance")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16", "fp64"),
                   help="target and draft dtype (default fp32: greedy ties resolve like the reference)")
    p.add_argument("--chat-template", help="'auto' or a named template (default: dataset.chat_template)")
    p.add_argument("--aux-layers", help="comma-separated HF hidden_states indices (default: the "
                   "layers the export names, else the draft algorithm's default; with a config: model.aux_layers)")
    p.add_argument("--engine", help="who runs the speculation: 'hf' (in-process, default) or an "
                   "installed engine plugin such as 'vllm' (default: eval.engine)")
    p.add_argument("--engine-python", help="python of the engine's own environment (default: "
                   "eval.engine_python, else the engine's discovery, e.g. $SPECFORGE_VLLM_PYTHON)")
    p.add_argument("--batch-size", type=int, help="prompts per target forward, hf engine (default: eval.batch_size = 16)")
    p.add_argument("--algorithm", help="draft algorithm whose proposer drafts (default: model.draft, "
                   "else found from the export's architectures)")
    p.add_argument("--tree", metavar="topk=K,depth=D,tokens=N",
                   help="verify a dynamic draft tree instead of a chain (EAGLE-2/3, SGLang topk > 1; default: eval.tree)")
    p.add_argument("--temperature", type=float, help="sampling temperature: 0 greedy (guarded), > 0 speculative "
                   "sampling (default: eval.temperature = 0)")
    p.add_argument("--seed", type=int, help="seed of sampled evaluation (default: eval.seed = 0)")
    p.add_argument("--speedup", action="store_true", default=None,
                   help="also measure the draft's and target's forward costs on this device and estimate tokens/s "
                   "per concurrency level (and rank settings)")
    p.add_argument("--advise", action="store_true",
                   help="evaluate and time several chain and tree settings and rank them (with SGLang / vLLM flags)")
    p.add_argument("--concurrency", help="comma-separated concurrency levels for --speedup (default 1,8,32)")


def _settings(args: argparse.Namespace) -> EvalSettings:
    """A run config's settings (if given) with the flags on top."""
    import attrs

    if args.config:
        from specforge_core.cli import _load

        s = EvalSettings.from_config(_load(args))
    else:
        missing = [f"--{k}" for k in ("draft", "target", "data") if not getattr(args, k)]
        if missing:
            raise ValueError(f"specforge eval: missing {', '.join(missing)} (give them as flags or pass a run config)")
        s = EvalSettings(draft=args.draft, target=args.target, prompts=args.data)
    flags = {"steps": args.steps, "max_new_tokens": args.max_new_tokens, "max_prompts": args.max_prompts,
             "prompts": args.data, "draft": args.draft, "target": args.target, "chat_template": args.chat_template,
             "fast": args.fast, "engine": args.engine, "engine_python": args.engine_python,
             "batch_size": args.batch_size, "algorithm": args.algorithm, "tree": args.tree,
             "temperature": args.temperature, "seed": args.seed, "speedup": args.speedup,
             "device": args.device, "dtype": args.dtype}
    changes = {k: v for k, v in flags.items() if v is not None}
    if args.no_check:
        changes["check"] = False
    if args.aux_layers:
        changes["aux_layers"] = _ints("--aux-layers", args.aux_layers)
    if args.concurrency:
        changes["concurrency"] = _ints("--concurrency", args.concurrency)
    s = attrs.evolve(s, **changes)
    if not Path(s.draft, "config.json").is_file():
        raise FileNotFoundError(f"--draft {s.draft}: no config.json there (export the draft first: specforge export)")
    return s


def _ints(flag: str, text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated integers") from None


def main(args: argparse.Namespace) -> int:
    import attrs
    from rich.console import Console

    from specforge_core.evaluation.evaluate import run_eval

    console = Console(stderr=False)
    try:
        s = attrs.evolve(_settings(args), progress=True)
        if args.advise:
            from specforge_core.evaluation.advice import advice_table, advise

            rows = advise(s)
            console.print(advice_table(rows, s.device or "the default device"))
            return 0
        report = run_eval(s)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report.print(console)
    if args.json:
        console.print(f"wrote {report.write_json(args.json)}")
    if args.plot:
        console.print(f"wrote {report.plot(args.plot)}")
    if not report.ok:
        print(f"error: {len(report.errors)} problem(s): speculative output differing from plain greedy "
              "decoding, or the engine not loading the draft as exported (see above); the acceptance "
              "numbers are not trustworthy", file=sys.stderr)
        return 1
    return 0
