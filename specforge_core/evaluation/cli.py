"""``specforge eval``: flags, or a run's config (+ overrides) with flags on top.

    specforge eval --draft runs/x/export --target MODEL --data prompts.jsonl [--steps 3]
    specforge eval configs/quickstart.toml eval.steps=4 [--json out.json] [--plot acc.png]

Exit status: 0 ok, 1 the speculative output differed from greedy decoding on some prompt, 2 bad
input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16", "fp64"),
                   help="target and draft dtype (fp32: greedy ties resolve like the reference)")
    p.add_argument("--chat-template", help="'auto' or a named template (default: dataset.chat_template)")
    p.add_argument("--aux-layers", help="comma-separated HF hidden_states indices (default: the "
                   "layers the export names, else the draft algorithm's default; with a config: model.aux_layers)")
    p.add_argument("--aux-ids-convention", choices=("sglang", "vllm"),
                   help="numbering of an old export's eagle_config ids (exports written before the "
                   "top-level eagle_aux_hidden_state_layer_ids; default: sglang)")
    p.add_argument("--engine", help="who runs the speculation: 'hf' (in-process, default) or an "
                   "installed engine plugin such as 'vllm' (default: eval.engine)")
    p.add_argument("--engine-python", help="python of the engine's own environment (default: "
                   "eval.engine_python, else the engine's discovery, e.g. $SPECFORGE_VLLM_PYTHON)")
    p.add_argument("--batch-size", type=int, help="prompts per target forward, hf engine (default: eval.batch_size = 16)")
    p.add_argument("--algorithm", help="draft algorithm whose proposer drafts (default: model.draft, "
                   "else found from the export's architectures)")


def _settings(args: argparse.Namespace) -> dict:
    """Merge a run config (if given) with the flags; flags win."""
    s: dict = {"steps": 3, "max_new_tokens": 128, "data": None, "max_prompts": None, "draft": None,
               "target": None, "chat_template": "auto", "max_seq_length": 2048, "aux_layers": None,
               "fast": False, "trust_remote_code": False, "engine": "hf", "engine_python": None,
               "batch_size": 16, "algorithm": None, "reasoning": "keep"}
    if args.config:
        from specforge_core.cli import _load

        cfg = _load(args)
        e = cfg.eval
        s.update(steps=e.steps, max_new_tokens=e.max_new_tokens, max_prompts=e.max_prompts,
                 data=list(e.data) or list(cfg.dataset.path), draft=str(Path(cfg.output_dir) / "export"),
                 target=cfg.model.target, chat_template=cfg.dataset.chat_template,
                 max_seq_length=cfg.dataset.max_seq_length, trust_remote_code=cfg.model.trust_remote_code,
                 aux_layers=list(cfg.model.aux_layers) or None, fast=getattr(e, "fast", False),
                 engine=getattr(e, "engine", "hf"), engine_python=getattr(e, "engine_python", None),
                 batch_size=getattr(e, "batch_size", 16), algorithm=cfg.model.draft,
                 reasoning=cfg.dataset.reasoning)
    for key in ("steps", "max_new_tokens", "max_prompts", "data", "draft", "target", "chat_template", "fast",
                "engine", "engine_python", "batch_size", "algorithm"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    if args.aux_layers:
        try:
            s["aux_layers"] = [int(x) for x in args.aux_layers.split(",")]
        except ValueError:
            raise SystemExit(f"--aux-layers {args.aux_layers!r}: expected comma-separated integers") from None
    missing = [f"--{k}" for k in ("draft", "target", "data") if not s[k]]
    if missing:
        raise ValueError(f"specforge eval: missing {', '.join(missing)} (give them as flags or pass a run config)")
    if not Path(s["draft"], "config.json").is_file():
        raise FileNotFoundError(f"--draft {s['draft']}: no config.json there (export the draft first: specforge export)")
    return s


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from specforge_core.evaluation.evaluate import evaluate

    console = Console(stderr=False)
    try:
        s = _settings(args)
        report = evaluate(
            s["draft"], s["target"], s["data"], s["steps"], s["max_new_tokens"], fast=bool(s["fast"]),
            check=not args.no_check, aux_layers=s["aux_layers"], aux_ids_convention=args.aux_ids_convention,
            device=args.device, dtype=args.dtype, chat_template=s["chat_template"],
            max_seq_length=s["max_seq_length"], reasoning=s["reasoning"], max_prompts=s["max_prompts"],
            trust_remote_code=s["trust_remote_code"], progress=True, batch_size=s["batch_size"],
            algorithm=s["algorithm"], engine=s["engine"], engine_python=s["engine_python"] or None,
        )
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
