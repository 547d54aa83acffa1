"""forward-kl's per-chunk softmax math (``_chunk_math_pre``) compiled, as written now vs the scalar-sum
form it replaced: ms per call and effective bandwidth over the [C, Vd] fp32 logits, one process.

    python benchmarks/chunk_math.py --C 2048 8192
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]

import torch  # noqa: E402
from specforge_defaults.loss import _chunk_math_pre  # noqa: E402


def scalar_sum(d, p_t, t_argmax, scale, out_dtype):
    """The form before: the loss summed straight to a scalar over [C, Vd]."""
    correct = (d.argmax(-1) == t_argmax).sum()
    p = p_t.to(d.dtype)
    lse = torch.logsumexp(d, dim=-1)
    loss = (p * (lse[:, None] - d)).sum()
    g = (torch.exp(d - lse[:, None]) - p) * scale
    return loss, correct, g.to(out_dtype)


def time_ms(fn, *args, iters=20) -> float:
    for _ in range(3):
        fn(*args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn(*args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--C", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--vocab", type=int, default=32000)
    a = ap.parse_args()
    variants = {"row-sums (now)": torch.compile(_chunk_math_pre), "scalar-sum": torch.compile(scalar_sum)}
    print(f"{'C':>6} {'variant':16} {'ms':>7} {'GB/s':>7} {'loss':>14}")
    for C in a.C:
        g = torch.Generator("cuda").manual_seed(0)
        d = torch.randn(C, a.vocab, device="cuda", generator=g) * 3
        p = torch.softmax(torch.randn(C, a.vocab, device="cuda", generator=g) * 3, -1).half()
        arg = torch.randint(0, a.vocab, (C,), device="cuda", generator=g)
        scale = torch.tensor(1.0, device="cuda")
        ideal = C * a.vocab * (4 + 2 + 2)  # read d (fp32) and p (fp16), write g (bf16) once
        for name, fn in variants.items():
            ms = time_ms(fn, d, p, arg, scale, torch.bfloat16)
            loss = float(fn(d, p, arg, scale, torch.bfloat16)[0])
            print(f"{C:>6} {name:16} {ms:7.3f} {ideal / ms / 1e6:7.0f} {loss:14.6e}")


if __name__ == "__main__":
    main()
