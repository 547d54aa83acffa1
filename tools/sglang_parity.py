"""Hidden-state parity between the ``sglang`` and ``hf`` target backends on one model and prompts.

Run it on a CUDA machine with SGLang installed (``pip install 'specforge-train[sglang]'``)::

    python tools/sglang_parity.py --model Qwen/Qwen3-8B --tp-size 1
    python tools/sglang_parity.py --model /models/llama --aux-layers 2 16 29 --prompts prompts.txt

The SGLang engine runs first and is shut down before the HF model loads, so one GPU is enough.
Prints max abs / rel error per tensor (each aux layer, final hidden) and the argmax agreement,
then a pass/fail table; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from specforge_core.types import Sample, TargetFeatures

DEFAULT_PROMPTS = [
    "Explain speculative decoding in two sentences.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Translate to French: The weather is lovely today.",
]


def compare(
    test: Sequence[TargetFeatures], ref: Sequence[TargetFeatures], n_aux: int, *, rel_tol: float, argmax_min: float
) -> list[dict]:
    """Per-tensor error rows. rel = max|test - ref| / max|ref| (bf16 engines differ by kernels)."""
    rows = []

    def add(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.float(), b.float()
        abs_err = float((a - b).abs().max()) if a.numel() else 0.0
        rel_err = abs_err / max(float(b.abs().max()), 1e-12) if b.numel() else 0.0
        rows.append({"tensor": name, "max_abs": abs_err, "max_rel": rel_err, "ok": rel_err <= rel_tol})

    a_aux = torch.cat([f.aux_hidden for f in test])
    b_aux = torch.cat([f.aux_hidden for f in ref])
    for k, (x, y) in enumerate(zip(a_aux.chunk(n_aux, -1), b_aux.chunk(n_aux, -1), strict=True)):
        add(f"aux[{k}]", x, y)
    add("final", torch.cat([f.final_hidden for f in test]), torch.cat([f.final_hidden for f in ref]))
    ga = torch.cat([f.target_argmax for f in test])
    gb = torch.cat([f.target_argmax for f in ref])
    agree = float((ga == gb).float().mean()) if ga.numel() else 1.0
    rows.append({"tensor": "argmax", "max_abs": float((ga != gb).sum()), "max_rel": 1.0 - agree, "ok": agree >= argmax_min})
    return rows


def print_table(rows: list[dict], aux_layers: Sequence[int]) -> None:
    print(f"{'tensor':<14}{'max abs err':>14}{'max rel err':>14}   result")
    for r in rows:
        name = r["tensor"]
        if name.startswith("aux["):
            name += f" L{aux_layers[int(name[4:-1])]}"
        extra = "  (mismatched positions / fraction)" if r["tensor"] == "argmax" else ""
        print(f"{name:<14}{r['max_abs']:>14.4g}{r['max_rel']:>14.4g}   {'PASS' if r['ok'] else 'FAIL'}{extra}")


def make_samples(model: str, prompts: Sequence[str], trust_remote_code: bool) -> list[Sample]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    out = []
    for i, p in enumerate(prompts):
        ids = torch.tensor(tok(p)["input_ids"], dtype=torch.int64)
        out.append(Sample(f"p{i}", ids, torch.ones_like(ids, dtype=torch.uint8)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="target model directory or hub id")
    ap.add_argument("--prompts", help="text file, one prompt per line (default: built-in prompts)")
    ap.add_argument("--aux-layers", type=int, nargs="*", default=[], help="HF hidden_states ids; default 2, L//2, L-3")
    ap.add_argument("--tp-size", type=int, default=1)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--attention-backend", default="flashinfer")
    ap.add_argument("--mem-fraction-static", type=float, default=0.6)
    ap.add_argument("--rel-tol", type=float, default=0.05, help="max |sglang-hf| / max |hf| per tensor")
    ap.add_argument("--argmax-min", type=float, default=0.98, help="min fraction of positions with equal argmax")
    ap.add_argument("--trust-remote-code", action="store_true")
    args = ap.parse_args(argv)

    from specforge_core.config.schema import SpecforgeConfig
    from specforge_core.registry import get_registry

    cfg = SpecforgeConfig()
    cfg.model.target = args.model
    cfg.model.aux_layers = list(args.aux_layers)
    cfg.model.trust_remote_code = args.trust_remote_code
    cfg.inference.dtype = args.dtype
    cfg.inference.gpus_per_engine = args.tp_size
    prompts = DEFAULT_PROMPTS
    if args.prompts:
        with open(args.prompts) as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    samples = make_samples(args.model, prompts, args.trust_remote_code)

    reg = get_registry()
    sgl_opts = reg.default_options("target_backend", "sglang")
    sgl_opts.tp_size = args.tp_size
    sgl_opts.attention_backend = args.attention_backend
    sgl_opts.mem_fraction_static = args.mem_fraction_static
    cfg.inference.backend = "sglang"
    sgl = reg.create("target_backend", "sglang", sgl_opts, cfg, "cuda:0")
    try:
        test = sgl.generate(samples)
        aux_layers = sgl.info.aux_layer_ids
    finally:
        sgl.close()
    torch.cuda.empty_cache()

    cfg.inference.backend = "hf"
    hf = reg.create("target_backend", "hf", None, cfg, "cuda:0")
    try:
        ref = hf.generate(samples)
    finally:
        hf.close()

    rows = compare(test, ref, len(aux_layers), rel_tol=args.rel_tol, argmax_min=args.argmax_min)
    print(f"model {args.model}  dtype {args.dtype}  tp {args.tp_size}  prompts {len(samples)}  "
          f"tokens {sum(s.num_tokens for s in samples)}  aux layers {aux_layers}")
    print_table(rows, aux_layers)
    ok = all(r["ok"] for r in rows)
    print("PARITY PASS" if ok else "PARITY FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
