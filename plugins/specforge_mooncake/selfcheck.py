"""Smoke check of the mooncake store on a real machine (used for the GPU run; no pytest needed).

    python -m specforge_mooncake.selfcheck [--tokens 4096] [--gpu-direct]

Starts a master, connects a store, round-trips an 8B-sized sample (host and, if CUDA is present,
GPU tensors), prints put/get times, checks deletion, stops.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("MC_TCP_BIND_ADDRESS", "127.0.0.1")


def main() -> None:
    from specforge_mooncake.options import MooncakeOptions
    from specforge_mooncake.provider import MooncakeProvider

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--gpu-direct", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    provider = MooncakeProvider(MooncakeOptions(gpu_direct=args.gpu_direct))
    provider.configure(hidden_size=4096, n_aux=3, max_seq_length=args.tokens, max_pool_bytes=2 << 30)
    handle = provider.start("selfcheck")
    store = provider.connect(handle)
    try:
        T = args.tokens
        ts = {
            "input_ids": torch.randint(0, 128_000, (T,), device=dev),
            "aux_hidden": torch.randn(T, 3 * 4096, device=dev).bfloat16(),
            "final_hidden": torch.randn(T, 4096, device=dev).bfloat16(),
        }
        mib = sum(t.numel() * t.element_size() for t in ts.values()) / 2**20
        for i in range(4):
            t0 = time.perf_counter()
            store.put(f"s{i}", ts)
            t1 = time.perf_counter()
            got = store.get(f"s{i}", device=dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            ok = all(torch.equal(got[k], ts[k]) for k in ts)
            print(f"{dev.type} gpu_direct={args.gpu_direct} {mib:.0f} MiB: put {1e3 * (t1 - t0):.1f} ms, "
                  f"get {1e3 * (t2 - t1):.1f} ms, equal={ok}", flush=True)
            assert ok
            del got
            store.delete([f"s{i}"])
        assert store.count() == 0
        print("selfcheck OK")
    finally:
        store.close()
        provider.stop(handle)


if __name__ == "__main__":
    main()
