"""Transfer-store throughput: put+get of realistic EAGLE-3 samples vs a plain memcpy.

    python benchmarks/mooncake_store.py [--device cpu|cuda] [--tokens 1024 4096 16384 32768]
                                        [--stores mooncake shm] [--reps 3] [--json out.json]

Each sample is what an 8B target produces per conversation (H=4096, 3 aux layers, bf16):
aux_hidden [T, 3H] + final_hidden [T, H] bf16, input_ids / target_argmax int64, loss_mask uint8
(~32 KiB per token). For each store (looked up through the plugin registry, so any registered
store can be measured) we time put, get and delete, median of ``--reps`` after a warm-up round.

``get`` counts until the bytes are where a trainer uses them, the way the pipeline reads them:

* ``--device cpu``: in a buffer the consumer owns (``training.staging.read_into``: the ``shm``
  store reads the file straight into it; other stores ``get`` and copy). The ``memcpy`` row is one
  copy of the same bytes into a preallocated buffer.
* ``--device cuda``: tensors start on the GPU (``put`` includes the device-to-host copy) and end on
  the GPU: ``shm`` through a pinned buffer and one host-to-device copy (the trainer's stager),
  ``mooncake`` with ``get(key, device)`` (``--gpu-direct``: into registered GPU buffers). The
  ``memcpy`` row is the least any store through host memory must do: device-to-host into pinned
  memory and back.

"x memcpy" = the store's round-trip throughput (bytes / (put + get)) as a fraction of the memcpy
row's throughput for the same bytes.
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


def make_sample(tokens: int, hidden: int, n_aux: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(tokens)
    ts = {
        "input_ids": torch.randint(0, 128_000, (tokens,), generator=g),
        "loss_mask": torch.ones(tokens, dtype=torch.uint8),
        "aux_hidden": torch.randn(tokens, n_aux * hidden, generator=g).to(torch.bfloat16),
        "final_hidden": torch.randn(tokens, hidden, generator=g).to(torch.bfloat16),
        "target_argmax": torch.randint(0, 128_000, (tokens,), generator=g),
    }
    return {k: v.to(device) for k, v in ts.items()}


def nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts.values())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_memcpy(ts, reps: int, device: str) -> float:
    """One copy into a preallocated host buffer (cpu), or to pinned host memory and back (cuda)."""
    n = nbytes(ts)
    host = torch.empty(n, dtype=torch.uint8, pin_memory=device == "cuda")
    back = torch.empty(n, dtype=torch.uint8, device=device) if device == "cuda" else None
    out = []
    for _ in range(reps + 1):
        sync(device)
        t0, pos = time.perf_counter(), 0
        for t in ts.values():
            k = t.numel() * t.element_size()
            host[pos : pos + k].copy_(t.reshape(-1).view(torch.uint8))
            pos += k
        if back is not None:
            back.copy_(host, non_blocking=True)
        sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out[1:])


class Reader:
    """Gets a key to where the trainer uses it (see the module docstring)."""

    def __init__(self, store, device: str, max_bytes: int, gpu_direct: bool):
        from specforge_core.training.staging import read_into

        self.store, self.device, self.read_into = store, device, read_into
        self.buf = torch.empty(max_bytes + (1 << 20), dtype=torch.uint8, pin_memory=device == "cuda")
        self.store_to_device = device == "cuda" and not hasattr(store, "get_into")

    def get(self, key: str) -> dict[str, torch.Tensor]:
        if self.store_to_device:  # the store moves it to the GPU itself (mooncake)
            return self.store.get(key, torch.device(self.device))
        host = self.read_into(self.store, key, lambda n: self.buf[:n])
        if self.device != "cuda":
            return host
        return {k: v.to(self.device, non_blocking=True) for k, v in host.items()}


def time_store(store, reader: Reader, ts, reps: int, device: str) -> tuple[float, float]:
    puts, gets = [], []
    for i in range(reps + 1):  # the first round warms buffers up (registration, page faults)
        key = f"bench-{i}"
        sync(device)
        t0 = time.perf_counter()
        store.put(key, ts)
        sync(device)
        t1 = time.perf_counter()
        got = reader.get(key)
        sync(device)
        t2 = time.perf_counter()
        if i == 0:  # the bytes really made it (checked once, outside the timing)
            assert all(torch.equal(got[k].to(ts[k].device), ts[k]) for k in ts), "round trip changed the data"
        del got
        gc.collect()
        store.delete([key])
        if i:
            puts.append(t1 - t0)
            gets.append(t2 - t1)
    return statistics.median(puts), statistics.median(gets)


def open_store(name: str, max_bytes: int, gpu_direct: bool):
    from specforge_core.registry import get_registry

    reg = get_registry()
    options = reg.default_options("transfer_store", name)
    if name == "mooncake":
        options = type(options)(global_segment_size=2 * max_bytes + (64 << 20), sample_bytes=max_bytes + (1 << 20),
                                gpu_direct=gpu_direct)
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
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--gpu-direct", action="store_true", help="mooncake: receive into registered GPU buffers")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")

    samples = {t: make_sample(t, args.hidden, args.n_aux, args.device) for t in args.tokens}
    biggest = max(nbytes(s) for s in samples.values())
    rows = []
    memcpy = {t: time_memcpy(s, args.reps, args.device) for t, s in samples.items()}
    for t, s in samples.items():
        rows.append(dict(store="memcpy", tokens=t, mib=nbytes(s) / 2**20, put_ms=memcpy[t] * 1e3, get_ms=0.0,
                         gbps=nbytes(s) / memcpy[t] / 1e9, frac=1.0))
    for name in args.stores:
        provider, handle, store = open_store(name, biggest, args.gpu_direct)
        reader = Reader(store, args.device, biggest + (64 << 10), args.gpu_direct)
        label = name + ("+gd" if name == "mooncake" and args.gpu_direct else "")
        try:
            for t, s in samples.items():
                put, get = time_store(store, reader, s, args.reps, args.device)
                gbps = nbytes(s) / (put + get) / 1e9
                rows.append(dict(store=label, tokens=t, mib=nbytes(s) / 2**20, put_ms=put * 1e3, get_ms=get * 1e3,
                                 gbps=gbps, frac=gbps / (nbytes(s) / memcpy[t] / 1e9)))
            left = store.count()
            if left:
                raise RuntimeError(f"store {name!r} still holds {left} keys after the benchmark")
        finally:
            store.close()
            provider.stop(handle)

    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "host"
    print(f"\ndevice: {args.device} ({where}); put+get of one sample, median of {args.reps}")
    print(f"{'store':<11} {'tokens':>6} {'MiB':>7} {'put ms':>8} {'get ms':>8} {'GB/s':>6} {'x memcpy':>8}")
    for r in rows:
        print(f"{r['store']:<11} {r['tokens']:>6} {r['mib']:>7.1f} {r['put_ms']:>8.2f} {r['get_ms']:>8.2f} "
              f"{r['gbps']:>6.2f} {r['frac']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": where, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
