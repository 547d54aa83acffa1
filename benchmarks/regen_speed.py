"""Regeneration speed: the target's greedy answers to the same prompts through HF ``generate`` with
its default dynamic KV cache (what ``benchmarks/quality.py`` used: 612k tokens in 282 s on an H200
at batch 1024) and with a static KV cache (``cache_implementation="static"``: transformers compiles
the decode step on CUDA), side by side in one process, with prompts padded to a length bucket so
the compiled graph is reused across batches.

Printed per path: answer tokens, seconds (the first batch, which holds the compilation, shown
apart), answer tokens/s, answers identical to the first path's, degenerate answers (an answer
whose tail repeats one short period: ``specforge_core.data.regenerate.loop_length``).

    # GPU (the reference target, converted from the data folder's GGUF parts when not there yet)
    python benchmarks/regen_speed.py --data .carry/quality --model reference/smollm2-135m-instruct \\
        --prompts .carry/quality/prompts.jsonl.gz --n 4096 --batch-size 1024 --max-new-tokens 256 \\
        --out benchmarks/results/regen_speed_h200.json

    # CPU smoke test: a tiny random target (tests/test_regen_speed.py)
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout
from specforge_core.data.regenerate import loop_length  # noqa: E402

PATHS = ("dynamic", "static", "static-eager")


def read_prompts(path: Path, n: int) -> list[str]:
    """The first ``n`` prompts of a ``{"id", "prompt"}`` JSONL (gzip if it ends in .gz)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line)["prompt"])
            if len(out) >= n:
                break
    return out


def generate_kwargs(path: str) -> dict[str, Any]:
    """``generate``'s arguments of a path: 'dynamic' (HF's default cache), 'static' (a static KV
    cache; transformers compiles the decode step on CUDA), 'static-eager' (the static cache, not
    compiled: what the cache alone is worth)."""
    if path == "dynamic":
        return {}
    if path == "static":
        import torch._dynamo

        # one compiled graph per (batch, padded prompt length) shape: more than dynamo's default 8
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        return {"cache_implementation": "static"}
    if path == "static-eager":
        return {"cache_implementation": "static", "disable_compile": True}
    raise ValueError(f"unknown path {path!r} (one of {', '.join(PATHS)})")


def generate(model: Any, tok: Any, prompts: list[str], path: str, batch_size: int, max_new_tokens: int,
             bucket: int = 128) -> dict[str, Any]:
    """Greedy answers (token ids up to the first EOS) of every prompt, in prompt order, and the timing.
    ``path``: see ``generate_kwargs``.
    Prompts are sorted by length and left-padded to a multiple of ``bucket`` (one compiled shape
    per bucket); both paths see the same padded batches, so their greedy answers are comparable."""
    import torch

    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(tok(texts[i], add_special_tokens=False)["input_ids"]))
    answers: list[Optional[list[int]]] = [None] * len(texts)
    kwargs = generate_kwargs(path)
    eos = tok.eos_token_id
    batch_s: list[float] = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False,
                      pad_to_multiple_of=bucket).to(device)
            t0 = time.perf_counter()
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=eos, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            batch_s.append(time.perf_counter() - t0)
            for i, row in zip(idx, gen[:, enc["input_ids"].shape[1] :].tolist(), strict=True):
                answers[i] = row[: row.index(eos)] if eos in row else row
    tokens = sum(len(a or []) for a in answers)
    wall = sum(batch_s)
    rest = sum(batch_s[1:])
    rest_tokens = sum(len(answers[i] or []) for i in order[batch_size:])
    return {"path": path, "answers": answers, "tokens": tokens, "seconds": wall, "first_batch_s": batch_s[0],
            "tokens_per_s": tokens / max(wall, 1e-9),
            "tokens_per_s_after_first": rest_tokens / rest if rest > 0 else None}


def compare(model: Any, tok: Any, prompts: list[str], paths: list[str], batch_size: int, max_new_tokens: int,
            loop_tokens: int = 64, bucket: int = 128) -> list[dict[str, Any]]:
    """Every path on the same prompts; rows without the answers, each with ``identical`` (answers
    equal to the first path's) and ``degenerate`` (answers ending in a loop of >= loop_tokens)."""
    runs = [generate(model, tok, prompts, p, batch_size, max_new_tokens, bucket) for p in paths]
    first = runs[0]["answers"]
    rows = []
    for r in runs:
        answers = r.pop("answers")
        r["answers"] = len(answers)
        r["identical"] = sum(a == b for a, b in zip(answers, first, strict=True))
        r["degenerate"] = sum(loop_length(a or [])[1] >= loop_tokens for a in answers) if loop_tokens else 0
        rows.append(r)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = "| path | answers | tokens | s | first batch s | tok/s | tok/s after first | identical | degenerate |"
    out = [head, "|" + "---|" * 9]
    for r in rows:
        after = f"{r['tokens_per_s_after_first']:.0f}" if r["tokens_per_s_after_first"] else "-"
        out.append(f"| {r['path']} | {r['answers']} | {r['tokens']} | {r['seconds']:.1f} | {r['first_batch_s']:.1f} | "
                   f"{r['tokens_per_s']:.0f} | {after} | {r['identical']}/{r['answers']} | {r['degenerate']} |")
    return "\n".join(out)


def convert_target(data: Path, model: Path) -> None:
    """The HF folder from the data folder's GGUF (or its ``gguf.part*`` pieces), when not there yet
    (``quality.py run`` uses this too)."""
    if (model / "config.json").is_file():
        return
    t0 = time.time()
    gguf = data / "SmolLM2-135M-Instruct.Q4_1.gguf"
    parts = sorted(data.glob("gguf.part*"))
    if parts and not gguf.is_file():
        with open(gguf, "wb") as f:
            for p in parts:
                f.write(p.read_bytes())
    from specforge_core.reference import convert_gguf

    convert_gguf(gguf, model)
    print(f"converted {gguf.name} -> {model} in {time.time() - t0:.0f}s", flush=True)


def load(model_dir: Path, device: str, dtype: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:  # the GGUF's tokenizer names none; padding is masked anyway
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    return model, tok


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF model folder of the target")
    ap.add_argument("--data", default="", help="a quality.py prepare folder: convert its GGUF into --model if needed")
    ap.add_argument("--prompts", required=True, help='JSONL(.gz) of {"id", "prompt"} (quality.py prepare)')
    ap.add_argument("--n", type=int, default=4096, help="prompts")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--paths", nargs="+", default=["dynamic", "static"], choices=PATHS,
                    help="the first is the reference of the identical column")
    ap.add_argument("--bucket", type=int, default=128, help="prompts are left-padded to a multiple of this")
    ap.add_argument("--loop-tokens", type=int, default=64, help="an answer whose tail loops this long is degenerate")
    ap.add_argument("--device", default="")
    ap.add_argument("--dtype", default="", help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--out", default="", help="write the rows as JSON here")
    args = ap.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    if args.data:
        convert_target(Path(args.data), Path(args.model))
    model, tok = load(Path(args.model), device, dtype)
    prompts = read_prompts(Path(args.prompts), args.n)
    print(f"regen_speed: {len(prompts)} prompts, batch {args.batch_size}, {args.max_new_tokens} new tokens, "
          f"{device} {dtype}, torch {torch.__version__}", flush=True)
    rows = compare(model, tok, prompts, args.paths, args.batch_size, args.max_new_tokens, args.loop_tokens,
                   args.bucket)
    print(table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "device": torch.cuda.get_device_name()
                                              if device == "cuda" else "cpu", "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
