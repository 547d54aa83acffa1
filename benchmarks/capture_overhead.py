"""Hidden-state capture cost of the hf backend on an 8B-shaped target (random weights).

    python benchmarks/capture_overhead.py [--layers 32] [--batch 4] [--seq 2048]

Builds a Llama-3.1-8B-shaped ``LlamaForCausalLM`` (hidden 4096, 32 layers, vocab 128256) in bf16
straight on the GPU from a LlamaConfig (no checkpoint on disk), wraps it in ``HFTargetBackend``
and times, per prefill of B x T tokens (median of 5, after a warm-up):

  bare-base     model.model(ids): the decoder stack alone, no hooks
  bare-causallm model(ids): the usual forward with full-vocab logits
  capture-gpu   the backend's forward (hooks, aux concat, final hidden, chunked full-vocab argmax)
                without the host copies
  generate      backend.generate(samples): everything, pinned host copies of the features included
  generate-same the same with output_device = "same" (features stay on the GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "plugins"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
from specforge_hf_backend.backend import (  # noqa: E402
    HFTargetBackend,
    capture_hidden_states,
    chunked_argmax,
    find_decoder_layers,
)
from specforge_hf_backend.options import HFBackendOptions  # noqa: E402
from specforge_llama_eagle3.config import default_aux_layer_ids  # noqa: E402

from specforge_core.types import Sample  # noqa: E402


def build_backend(layers: int, batch: int) -> HFTargetBackend:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                      rope_theta=500000.0, torch_dtype="bfloat16", attn_implementation="sdpa")
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.eval().requires_grad_(False)
    # HFTargetBackend.__init__ loads from a path; fill the same fields from the in-memory model.
    b = HFTargetBackend.__new__(HFTargetBackend)
    b.options, b.device, b.dtype, b.batch_size = HFBackendOptions(), torch.device("cuda"), torch.bfloat16, batch
    b.info = types.SimpleNamespace(aux_layer_ids=default_aux_layer_ids(layers), vocab_size=cfg.vocab_size)
    b.max_positions = cfg.max_position_embeddings
    b.model, b.base = model, model.get_decoder()
    b.layers = find_decoder_layers(b.base, layers)
    b.lm_head, b.pad_id = model.get_output_embeddings(), 0
    return b


def generate_same(b, samples):
    """generate() with [inference.hf] output_device = "same": the features stay on the GPU."""
    host = b.options
    b.options = HFBackendOptions(output_device="same")
    try:
        return b.generate(samples)
    finally:
        b.options = host


def median_time(fn, iters=5) -> float:
    fn()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "capture_overhead.json"))
    a = ap.parse_args()
    b = build_backend(a.layers, a.batch)
    g = torch.Generator().manual_seed(0)
    samples = [Sample(f"s{i}", torch.randint(3, 128256, (a.seq,), generator=g), torch.ones(a.seq, dtype=torch.uint8))
               for i in range(a.batch)]
    ids = torch.stack([s.input_ids for s in samples]).cuda()
    mask = torch.ones_like(ids)

    @torch.no_grad()
    def capture_gpu():
        with capture_hidden_states(b.layers, b.info.aux_layer_ids) as captured:
            out = b.base(input_ids=ids, attention_mask=mask, use_cache=False)
        aux = torch.cat([captured[i] for i in b.info.aux_layer_ids], dim=-1)
        return aux, chunked_argmax(out[0].flatten(0, 1), b.lm_head, b.options.argmax_chunk_size)

    variants = {
        "bare-base": torch.no_grad()(lambda: b.base(input_ids=ids, attention_mask=mask, use_cache=False)),
        "bare-causallm": torch.no_grad()(lambda: b.model(input_ids=ids, attention_mask=mask, use_cache=False)),
        "capture-gpu": capture_gpu,
        "generate": lambda: b.generate(samples),
        "generate-same": lambda: generate_same(b, samples),
    }
    tokens = a.batch * a.seq
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": a.layers,
           "batch": a.batch, "seq": a.seq, "runs": {}}
    for name, fn in variants.items():
        torch.cuda.reset_peak_memory_stats()
        sec = median_time(fn)
        res["runs"][name] = {"ms": sec * 1e3, "tok_s": tokens / sec,
                             "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    # agreement: the captured aux equals output_hidden_states of a plain forward
    with torch.no_grad():
        hs = b.model(input_ids=ids[:1], attention_mask=mask[:1], use_cache=False, output_hidden_states=True).hidden_states
    feats = b.generate(samples[:1])
    res["aux_matches_output_hidden_states"] = bool(torch.equal(
        feats[0].aux_hidden, torch.cat([hs[i] for i in b.info.aux_layer_ids], -1)[0].cpu()))
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1)
    base = res["runs"]["bare-base"]["ms"]
    lm = res["runs"]["bare-causallm"]["ms"]
    print(f"\n{res['device']}, torch {res['torch']}, {a.layers} layers, B={a.batch} T={a.seq} ({tokens} tokens)")
    print(f"{'variant':14} {'ms':>8} {'tok/s':>8} {'vs base':>8} {'vs causallm':>11} {'peak GiB':>9}")
    for name, r in res["runs"].items():
        print(f"{name:14} {r['ms']:8.1f} {r['tok_s']:8.0f} {r['ms'] / base - 1:+8.1%} {r['ms'] / lm - 1:+11.1%} "
              f"{r['peak_gib']:9.1f}")
    print("aux bit-identical to output_hidden_states:", res["aux_matches_output_hidden_states"])


if __name__ == "__main__":
    main()
