"""GPU check + measurement of the TTT unroll: ``python benchmarks/llama_eagle3_attention.py [--T 2048]``.

Checks the fused (sdpa) causal part against the explicit one on CUDA, then reports time and peak
memory of ttt_forward + backward for a Llama-3.1-8B-shaped draft with both kernels."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "plugins"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
from specforge_llama_eagle3.attention import (  # noqa: E402
    causal_attention_with_lse,
    sdpa_causal_attention_with_lse,
    ttt_attention,
)
from specforge_llama_eagle3.config import DraftConfig  # noqa: E402
from specforge_llama_eagle3.model import LlamaEagle3Draft  # noqa: E402


def check_kernels(device: str, dtype: torch.dtype, T: int = 512) -> dict[str, float]:
    """Worst relative error (over output and every gradient) of each kernel vs an fp64 reference."""
    g = torch.Generator(device).manual_seed(0)
    shapes = [32, 8, 8] + [8] * 6
    base = [torch.randn(2, h, T, 128, device=device, generator=g).to(dtype) for h in shapes]

    def run(fn, dt):
        leaves = [b.to(dt).requires_grad_() for b in base]
        q, k0, v0, *rest = leaves
        out = ttt_attention(q, k0, v0, rest[:3], rest[3:], None, 128 ** -0.5, causal=fn)
        weight = torch.linspace(-1, 1, out.shape[-1], device=device, dtype=torch.float64)
        grads = torch.autograd.grad((out.double() * weight).sum(), leaves)
        return [out, *grads]

    ref = run(causal_attention_with_lse, torch.float64)
    errors = {}
    for name, fn in (("eager", causal_attention_with_lse), ("sdpa", sdpa_causal_attention_with_lse)):
        got = run(fn, dtype)
        errors[name] = max(((a.double() - b).abs().max() / b.abs().max()).item()
                           for a, b in zip(got, ref, strict=True))
    return errors


def measure(attention: str, T: int, K: int, device: str = "cuda") -> tuple[float, float]:
    cfg = DraftConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=None,
                      max_position_embeddings=131072, vocab_size=128256, draft_vocab_size=32000,
                      target_hidden_size=4096)
    model = LlamaEagle3Draft(cfg, attention=attention).to(device, torch.bfloat16)
    ids = torch.randint(0, 128256, (1, T), device=device)
    aux = torch.randn(1, T, 3 * 4096, device=device, dtype=torch.bfloat16)
    mask = torch.ones(1, T, dtype=torch.bool, device=device)
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        loss = sum(0.8 ** k * model.logits(h).float().logsumexp(-1).mean()
                   for k, h in enumerate(model.ttt_forward(ids, aux, mask, K)))
        loss.backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return min(times[1:]), torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--K", type=int, default=7)
    args = ap.parse_args()
    for dtype in (torch.float32, torch.bfloat16):
        errs = check_kernels("cuda", dtype)
        print(f"cuda {dtype}: max rel error vs fp64 (output + grads): "
              + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    for T in args.T:
        for attention in ("eager", "sdpa"):
            try:
                sec, gib = measure(attention, T, args.K)
                print(f"T={T} K={args.K} {attention:5s}: fwd+bwd {sec * 1000:.0f} ms, peak {gib:.1f} GiB")
            except torch.OutOfMemoryError:
                print(f"T={T} K={args.K} {attention:5s}: out of memory")
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
