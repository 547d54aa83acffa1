"""Transfer-store throughput and latency for realistic EAGLE-3 samples, against a plain memcpy.

One sample of T tokens is what a target backend produces: aux_hidden [T, 3H] bf16, final_hidden
[T, H] bf16, input_ids / target_argmax int64 [T], loss_mask uint8 [T]. For each store and T we time
``put`` and ``get`` + consume (median over repeats, each on a fresh key) and compare with ``torch`` copying the
same bytes once (``dst.copy_(src)``), the floor for a store that must move data at least once.

    python benchmarks/transfer_stores.py --tokens 1024,4096 --json out.json          # ~20 s here
    python benchmarks/transfer_stores.py --stores local,shm,shm:read_mode=read,mooncake

Stores are built by name through the plugin registry, so any installed store plugin can be added.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import uuid

import attrs
import torch


def make_provider(spec: str):
    """A TransferStoreProvider from ``name`` or ``name:option=value:option=value`` (e.g.
    ``shm:read_mode=read``), built through the plugin registry like the pipeline does."""
    name, *pairs = spec.split(":")
    factory, config_class = _lookup(name)
    options = config_class() if config_class is not None else None
    if pairs:
        if options is None:
            raise SystemExit(f"store {name!r} has no options (got {spec!r})")
        changes = {}
        for pair in pairs:
            key, _, value = pair.partition("=")
            current = getattr(options, key)  # AttributeError names the bad option
            changes[key] = type(current)(value) if not isinstance(current, bool) else value == "true"
        options = attrs.evolve(options, **changes)
    return factory(options)


def _lookup(name: str):
    """(factory, options class) of a store: the registry, or the bundled ones where the package is
    on sys.path but not installed (no entry points)."""
    from specforge_core.registry import RegistryError, get_registry

    try:
        comp = get_registry().get("transfer_store", name)
        return comp.factory, comp.config_class
    except RegistryError:
        from specforge_defaults.transfer_local import make_local
        from specforge_defaults.transfer_shm import ShmOptions, make_shm

        bundled = {"local": (make_local, None), "shm": (make_shm, ShmOptions)}
        if name not in bundled:
            raise
        return bundled[name]


def make_sample(tokens: int, hidden: int, n_aux: int = 3) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.randint(0, 128_000, (tokens,)),
        "loss_mask": torch.ones(tokens, dtype=torch.uint8),
        "aux_hidden": torch.randn(tokens, n_aux * hidden, dtype=torch.bfloat16),
        "final_hidden": torch.randn(tokens, hidden, dtype=torch.bfloat16),
        "target_argmax": torch.randint(0, 128_000, (tokens,)),
    }


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def memcpy_seconds(size: int, repeat: int) -> float:
    src = torch.randint(0, 255, (size,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in once
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_store(store, sample, repeat: int) -> tuple[float, float]:
    """Median seconds of put and of get+consume: every byte got is copied into a preallocated
    buffer (as ``.to(device)`` would), so zero-copy and lazy (mmap) stores pay for reading in full."""
    dst = {name: torch.empty_like(t) for name, t in sample.items()}
    for name, t in sample.items():
        dst[name].copy_(t)  # fault the destination pages in once
    puts, gets = [], []
    for i in range(repeat + 1):  # first round is warm-up
        key = f"bench-{i}-{uuid.uuid4().hex[:6]}"
        t0 = time.perf_counter()
        store.put(key, sample)
        t1 = time.perf_counter()
        got = store.get(key)
        for name, t in got.items():
            dst[name].copy_(t)
        t2 = time.perf_counter()
        store.delete([key])
        del got
        if i:
            puts.append(t1 - t0)
            gets.append(t2 - t1)
    return statistics.median(puts), statistics.median(gets)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stores", default="local,shm", help="comma-separated stores: name[:option=value...]")
    ap.add_argument("--tokens", default="1024,4096,8192,32768", help="comma-separated sample lengths T")
    ap.add_argument("--hidden", type=int, default=4096, help="target hidden size H")
    ap.add_argument("--repeat", type=int, default=5, help="timed repeats per point")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    sizes = [int(t) for t in args.tokens.split(",")]
    rows = []
    header = f"{'store':<18} {'T':>6} {'MiB':>8} {'put ms':>9} {'get ms':>9} {'put GB/s':>9} {'get GB/s':>9} {'put/memcpy':>10} {'get/memcpy':>10}"
    print(header)
    print("-" * len(header))
    for tokens in sizes:
        sample = make_sample(tokens, args.hidden)
        size = nbytes(sample)
        mc = memcpy_seconds(size, args.repeat)
        rows.append({"store": "memcpy", "tokens": tokens, "bytes": size, "put_s": mc, "get_s": mc})
        print(f"{'memcpy':<18} {tokens:>6} {size / 2**20:>8.1f} {mc * 1e3:>9.2f} {mc * 1e3:>9.2f} "
              f"{size / mc / 1e9:>9.2f} {size / mc / 1e9:>9.2f} {1:>10.2f} {1:>10.2f}")
        for name in stores:
            provider = make_provider(name)
            handle = provider.start(f"bench-{uuid.uuid4().hex[:8]}")
            try:
                store = provider.connect(handle)
                put_s, get_s = bench_store(store, sample, args.repeat)
                store.close()
            finally:
                provider.stop(handle)
            rows.append({"store": name, "tokens": tokens, "bytes": size, "put_s": put_s, "get_s": get_s,
                         "put_frac_memcpy": mc / put_s, "get_frac_memcpy": mc / get_s})
            print(f"{name:<18} {tokens:>6} {size / 2**20:>8.1f} {put_s * 1e3:>9.2f} {get_s * 1e3:>9.2f} "
                  f"{size / put_s / 1e9:>9.2f} {size / get_s / 1e9:>9.2f} {mc / put_s:>10.2f} {mc / get_s:>10.2f}")
        del sample
    if args.json:
        meta = {"hidden": args.hidden, "repeat": args.repeat, "machine": platform.node(),
                "torch": torch.__version__, "threads": torch.get_num_threads()}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
