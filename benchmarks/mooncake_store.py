"""Transfer-store throughput: put+get of realistic EAGLE-3 samples vs a plain memcpy.

    python benchmarks/mooncake_store.py [--tokens 1024 4096 16384 32768] [--reps 3] [--json out.json]

Each sample is what an 8B target produces per conversation (H=4096, 3 aux layers, bf16):
aux_hidden [T, 3H] + final_hidden [T, H] bf16, input_ids / target_argmax int64, loss_mask uint8
(~32 KiB per token). For each store (looked up through the plugin registry, so any registered
store can be measured) we time put, get (tensors readable on the host) and delete; "memcpy" is
one copy of the same bytes into a preallocated buffer. "x memcpy" = store round-trip throughput
(bytes / (put + get)) as a fraction of the memcpy throughput.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch

os.environ.setdefault("MC_TCP_BIND_ADDRESS", "127.0.0.1")


def make_sample(tokens: int, hidden: int, n_aux: int) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.randint(0, 128_000, (tokens,)),
        "loss_mask": torch.ones(tokens, dtype=torch.uint8),
        "aux_hidden": torch.randn(tokens, n_aux * hidden).to(torch.bfloat16),
        "final_hidden": torch.randn(tokens, hidden).to(torch.bfloat16),
        "target_argmax": torch.randint(0, 128_000, (tokens,)),
    }


def nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts.values())


def time_memcpy(ts, reps: int) -> float:
    dst = torch.empty(nbytes(ts), dtype=torch.uint8)
    out = []
    for _ in range(reps + 1):
        t0, pos = time.perf_counter(), 0
        for t in ts.values():
            n = t.numel() * t.element_size()
            dst[pos : pos + n].copy_(t.reshape(-1).view(torch.uint8))
            pos += n
        out.append(time.perf_counter() - t0)
    return statistics.median(out[1:])


def time_store(store, ts, reps: int) -> tuple[float, float]:
    puts, gets = [], []
    for i in range(reps + 1):  # the first round warms buffers up (registration, page faults)
        key = f"bench-{i}"
        t0 = time.perf_counter()
        store.put(key, ts)
        t1 = time.perf_counter()
        got = store.get(key)
        _ = [float(v.reshape(-1)[-1]) for v in got.values()]  # the bytes are really there
        t2 = time.perf_counter()
        del got
        gc.collect()
        store.delete([key])
        if i:
            puts.append(t1 - t0)
            gets.append(t2 - t1)
    return statistics.median(puts), statistics.median(gets)


def open_store(name: str, max_bytes: int):
    from specforge_core.registry import get_registry

    reg = get_registry()
    options = reg.default_options("transfer_store", name)
    if name == "mooncake":
        options = type(options)(global_segment_size=2 * max_bytes + (64 << 20), sample_bytes=max_bytes + (1 << 20))
    provider = reg.create("transfer_store", name, options)
    handle = provider.start(f"bench-{name}-{os.getpid()}")
    return provider, handle, provider.connect(handle)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--n-aux", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--stores", nargs="+", default=["mooncake", "shm"])
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()

    torch.manual_seed(0)
    samples = {t: make_sample(t, args.hidden, args.n_aux) for t in args.tokens}
    biggest = max(nbytes(s) for s in samples.values())
    rows = []
    memcpy = {t: time_memcpy(s, args.reps) for t, s in samples.items()}
    for t, s in samples.items():
        rows.append(dict(store="memcpy", tokens=t, mib=nbytes(s) / 2**20, put_ms=memcpy[t] * 1e3, get_ms=0.0,
                         gbps=nbytes(s) / memcpy[t] / 1e9, frac=1.0))
    for name in args.stores:
        provider, handle, store = open_store(name, biggest)
        try:
            for t, s in samples.items():
                put, get = time_store(store, s, args.reps)
                gbps = nbytes(s) / (put + get) / 1e9
                rows.append(dict(store=name, tokens=t, mib=nbytes(s) / 2**20, put_ms=put * 1e3, get_ms=get * 1e3,
                                 gbps=gbps, frac=gbps / (nbytes(s) / memcpy[t] / 1e9)))
            assert store.count() == 0
        finally:
            store.close()
            provider.stop(handle)

    print(f"{'store':<9} {'tokens':>6} {'MiB':>7} {'put ms':>8} {'get ms':>8} {'GB/s':>6} {'x memcpy':>8}")
    for r in rows:
        print(f"{r['store']:<9} {r['tokens']:>6} {r['mib']:>7.1f} {r['put_ms']:>8.2f} {r['get_ms']:>8.2f} "
              f"{r['gbps']:>6.2f} {r['frac']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
