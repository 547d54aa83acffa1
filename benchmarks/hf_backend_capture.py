"""Throughput and peak memory of the hf backend vs the naive capture (output_hidden_states=True and
full [B, T, V] logits), on a random model of a real-ish shape.

    python benchmarks/hf_backend_capture.py --layers 16 --hidden 2048 --vocab 128256 --batch 8 --seq 2048
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "plugins"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
from specforge_hf_backend.backend import HFTargetBackend  # noqa: E402
from specforge_hf_backend.options import HFBackendOptions  # noqa: E402

from specforge_core.config.schema import SpecforgeConfig  # noqa: E402
from specforge_core.testing import make_tiny_model  # noqa: E402
from specforge_core.types import Sample  # noqa: E402


def naive(backend: HFTargetBackend, samples: list[Sample]) -> tuple[list[torch.Tensor], ...]:
    """What a peer does: all hidden states + full logits, then pick."""
    ids = torch.stack([s.input_ids for s in samples]).to(backend.device)
    with torch.no_grad():
        out = backend.model(ids, output_hidden_states=True)
        aux = torch.cat([out.hidden_states[i] for i in backend.info.aux_layer_ids], -1)
        argmax = out.logits.argmax(-1)
        final = out.hidden_states[-1].cpu()  # move the same bytes to the host as the backend does
    return list(aux.cpu()), list(argmax.cpu()), list(final)


def timed(fn, device) -> tuple[float, float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    res = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return time.perf_counter() - t, peak, res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--iters", type=int, default=3)
    a = p.parse_args()

    with tempfile.TemporaryDirectory() as d:
        make_tiny_model(
            d, "llama", num_layers=a.layers, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
            num_heads=a.hidden // 128, num_kv_heads=max(1, a.hidden // 512), vocab_size=a.vocab,
        )
        cfg = SpecforgeConfig()
        cfg.model.target, cfg.inference.batch_size = d, a.batch
        cfg.transfer.store = "local"  # as the local pipeline: features stay on the device (output_device auto)
        backend = HFTargetBackend(HFBackendOptions(), cfg, None)
    dev = backend.device
    g = torch.Generator().manual_seed(0)
    samples = [
        Sample(f"s{i}", torch.randint(3, a.vocab, (a.seq,), generator=g), torch.ones(a.seq, dtype=torch.uint8))
        for i in range(a.batch)
    ]
    weights_gib = torch.cuda.memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
    print(f"device={dev} dtype={backend.dtype} weights={weights_gib:.2f} GiB B={a.batch} T={a.seq} V={a.vocab}")
    backend.generate(samples[:1])  # warm-up
    naive(backend, samples[:1])
    for name, fn in [("hf-backend", lambda: backend.generate(samples)), ("naive", lambda: naive(backend, samples))]:
        best, peak, res = min((timed(fn, dev) for _ in range(a.iters)), key=lambda r: r[0])
        tok_s = a.batch * a.seq / best
        print(f"{name:10s} {best * 1e3:8.1f} ms  {tok_s:10.0f} tok/s  peak {peak:.2f} GiB")
        if name == "hf-backend":
            feats = res
        else:
            aux, argmax, _final = res
            same_aux = all(torch.equal(f.aux_hidden, x) for f, x in zip(feats, aux, strict=True))
            agree = sum(int((f.target_argmax == y).sum()) for f, y in zip(feats, argmax, strict=True))
            print(f"aux bit-identical to output_hidden_states: {same_aux}; "
                  f"argmax agreement {agree / (a.batch * a.seq):.5f}")


if __name__ == "__main__":
    main()
