"""Per-token size of the target's hidden states at the aux layers (docs/reference-target.md, "massive
activations"): for the first conversations of a JSONL dataset, the median / p90 / max over tokens of
each token's largest |value|, the channels that hold it, and the target's mean top-1 probability.

    python tools/aux_activation_stats.py --target reference/smollm2-135m-instruct \\
        --data reference/data/sharegpt.jsonl --layers 2 15 27 30
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 15, 27, 30])
    ap.add_argument("--conversations", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=400)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.target)
    model = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    with open(args.data, encoding="utf-8") as f:
        records = [json.loads(next(f)) for _ in range(args.conversations)]
    for rec in records:
        ids = tok.apply_chat_template(rec["messages"][:2], tokenize=True, return_tensors="pt",
                                      return_dict=True)["input_ids"][:, : args.tokens]
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        for layer in args.layers:
            h = out.hidden_states[layer][0]
            top = h.abs().max(-1)
            channels = torch.bincount(top.indices).topk(3).indices.tolist()
            print(f"layer {layer}: per-token max |x| median {top.values.median():.1f} p90 "
                  f"{top.values.quantile(0.9):.1f} max {top.values.max():.1f}; channels {channels}")
        print(f"top-1 probability mean {out.logits[0].softmax(-1).max(-1).values.mean():.3f}")


if __name__ == "__main__":
    main()
