#!/usr/bin/env python
"""The Ray trainer's data path alone: ``BatchStager`` turning shm keys into a collated GPU batch.

    python benchmarks/staging.py [--tokens 2048] [--hidden 2048] [--mbs 4] [--readers 1 2 4]

Puts ``2 x mbs`` samples (the pipeline benchmark's shape by default: 2048 tokens, hidden 2048,
3 aux layers, bf16 = 33.5 MB each) into a real ``shm`` store once, then stages micro-batches of
``mbs`` of them over and over (reading a tmpfs file costs the same every time) with 1..N reader
threads, and reports ms per micro-batch and GB/s, next to one thread's plain ``readv`` of the same
files into pinned memory (the read alone) and a host memcpy of the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "plugins")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--n-aux", type=int, default=3)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--readers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--root", default="/dev/shm")
    ap.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (the CPU path has no pinned ring or side stream)")

    from specforge_defaults.transfer_shm import ShmOptions, ShmStoreProvider

    from specforge_core.training.staging import BatchStager

    provider = ShmStoreProvider(ShmOptions(root=args.root))
    handle = provider.start(f"staging-bench-{os.getpid()}")
    store = provider.connect(handle)
    T, H = args.tokens, args.hidden
    keys = [f"s{i}" for i in range(2 * args.mbs)]
    for k in keys:
        store.put(k, {
            "input_ids": torch.randint(0, 32000, (T,)), "loss_mask": torch.ones(T, dtype=torch.uint8),
            "aux_hidden": torch.randn(T, args.n_aux * H, dtype=torch.bfloat16),
            "final_hidden": torch.randn(T, H, dtype=torch.bfloat16), "target_argmax": torch.randint(0, 32000, (T,)),
        })
    sample_bytes = os.path.getsize(os.path.join(handle.path, keys[0]))
    batch_bytes = sample_bytes * args.mbs
    rows = []
    try:
        # reference 1: one thread's readv of the micro-batch's files into one pinned buffer
        pinned = torch.empty(sample_bytes, dtype=torch.uint8, pin_memory=True)
        times = []
        for r in range(args.reps + 2):
            t0 = time.perf_counter()
            for k in keys[(r % 2) * args.mbs : (r % 2 + 1) * args.mbs]:
                store.get_into(k, lambda n: pinned[:n])
            times.append(time.perf_counter() - t0)
        rows.append(("readv into pinned, 1 thread", statistics.median(times[2:])))
        # reference 2: a host memcpy of the same bytes
        src = torch.empty(batch_bytes, dtype=torch.uint8).fill_(1)
        dst = torch.empty(batch_bytes, dtype=torch.uint8).fill_(0)
        times = []
        for _ in range(args.reps + 2):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        rows.append(("host memcpy (torch, all threads)", statistics.median(times[2:])))
        for n in args.readers:
            stager = BatchStager("cuda", torch.bfloat16, readers=n)
            times = []
            for r in range(args.reps + 2):  # 2 warm-up rounds: pinned buffers grow, kernels load
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                ks = keys[(r % 2) * args.mbs : (r % 2 + 1) * args.mbs]
                stager.stage(store, ks, ks).ready()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            rows.append((f"BatchStager, {n} reader thread(s)", statistics.median(times[2:])))
            stager.close()
    finally:
        store.delete(keys)
        provider.stop(handle)

    print(f"\n{args.mbs} samples x {sample_bytes / 1e6:.1f} MB per micro-batch, {torch.cuda.get_device_name(0)}")
    print("| path | ms per micro-batch | GB/s |\n| --- | --- | --- |")
    for name, s in rows:
        print(f"| {name} | {s * 1e3:.1f} | {batch_bytes / s / 1e9:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "sample_bytes": sample_bytes,
                                               "rows": [{"path": n, "s": s} for n, s in rows]}, indent=1))


if __name__ == "__main__":
    main()
