"""Feature throughput of the ``vllm`` backend against ``hf`` on the same target and samples.

    python benchmarks/vllm_backend_capture.py --target configs/assets/tiny-target --samples 32 --length 512

Both backends get the same random samples in batches of ``--batch``; the figure is tokens per
second of ``generate`` after one warm-up batch (vLLM's start-up is printed apart). The features
are compared as well, so a fast but wrong backend cannot look good.
"""

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

from specforge_core.config import load_config  # noqa: E402
from specforge_core.types import Sample  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--target", default="configs/assets/tiny-target")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--python", default="", help="the vLLM venv's python (default: discovery)")
    a = p.parse_args()

    cfg = load_config(data={"model": {"target": a.target},
                            "dataset": {"max_seq_length": a.length},
                            "inference": {"batch_size": a.batch, "backend": "vllm"}})
    from specforge_hf_backend.backend import HFTargetBackend
    from specforge_hf_backend.options import HFBackendOptions
    from specforge_vllm.backend import VLLMTargetBackend
    from specforge_vllm.options import VLLMBackendOptions

    t = time.perf_counter()
    vllm = VLLMTargetBackend(VLLMBackendOptions(python=a.python), cfg, "cpu")
    start = time.perf_counter() - t
    hf = HFTargetBackend(HFBackendOptions(), cfg, "cpu")
    V = hf.info.vocab_size
    g = torch.Generator().manual_seed(0)
    samples = [Sample(f"s{i}", torch.randint(0, V, (a.length,), generator=g), torch.ones(a.length, dtype=torch.uint8))
               for i in range(a.samples)]
    print(f"target {a.target}: {hf.info.num_hidden_layers} layers, hidden {hf.info.hidden_size}, vocab {V}; "
          f"{a.samples} x {a.length} tokens, batch {a.batch}, torch threads {torch.get_num_threads()}")
    print(f"vllm start-up {start:.1f} s (python {vllm.python})")
    feats = {}
    try:
        for name, backend in (("hf", hf), ("vllm", vllm)):
            backend.generate(samples[: a.batch])  # warm-up
            best = float("inf")
            for _ in range(a.iters):
                t = time.perf_counter()
                feats[name] = backend.generate(samples)
                best = min(best, time.perf_counter() - t)
            print(f"{name:5s} {best:7.2f} s  {a.samples * a.length / best:9.0f} tok/s")
    finally:
        vllm.close()
    diff = max(max((x.aux_hidden - y.aux_hidden).abs().max().item(),
                   (x.final_hidden - y.final_hidden).abs().max().item())
               for x, y in zip(feats["hf"], feats["vllm"], strict=True))
    agree = sum(int((x.target_argmax == y.target_argmax).sum()) for x, y in zip(feats["hf"], feats["vllm"], strict=True))
    print(f"max |hf - vllm| over aux/final: {diff:.2e}; argmax agreement {agree / (a.samples * a.length):.5f}")


if __name__ == "__main__":
    main()
