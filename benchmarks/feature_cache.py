"""Offline feature cache: bytes, write/read speed, final loss and acceptance per storage format.

Trains the same draft three ways on the same samples and order: online (target in the loop,
``local`` store), from a ``bf16`` cache and from an ``fp8`` cache (``disk`` store, written by
``specforge data features``), then measures each export with ``specforge eval`` (tau = acceptance
length) and prints one table. CPU (quickstart target) or GPU (any config, e.g. the reference recipe)::

    python benchmarks/feature_cache.py --samples 64 --epochs 2
    python benchmarks/feature_cache.py --config configs/smollm2-sharegpt.toml --samples 2000 --max-prompts 80

``--set`` passes extra config overrides. Exits 1 if the bf16 cache's losses differ from the online ones.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _eval(config: str, overrides: list[str], out: Path, args: argparse.Namespace) -> float:
    cmd = [sys.executable, "-m", "specforge_core.cli", "eval", config, *overrides, "--json", str(out), "--fast",
           "--steps", str(args.steps), "--max-new-tokens", str(args.max_new_tokens)]
    if args.max_prompts:
        cmd += ["--max-prompts", str(args.max_prompts)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return float(json.loads(out.read_text())["overall"]["tau"])


def _read_speed(config) -> float:
    """Tokens/s of reading and decoding every cached sample once (what a training epoch reads)."""
    from specforge_core.build import create
    from specforge_core.data.features import FeatureCache

    provider = create(config, "transfer_store")
    cache = FeatureCache(provider.dir)
    dtype = __import__("torch").bfloat16
    ids = list(cache.where)
    t0 = time.perf_counter()
    tokens = 0
    for sid in ids:
        t = provider.decode(cache.get(sid), dtype)
        tokens += int(t["input_ids"].numel())
    return tokens / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "quickstart.toml"))
    p.add_argument("--work", default="/tmp/feature_cache_bench", help="run dirs and caches")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="eval draft steps K")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-prompts", type=int, default=0, help="eval prompts (0 = all of eval.data)")
    p.add_argument("--dtype", default="bf16", help="inference.dtype (bf16: the bf16 cache is lossless)")
    p.add_argument("--infer-batch", type=int, default=1, help="inference.batch_size (1: no padding, so the "
                   "online and cached features are the same bits)")
    p.add_argument("--set", nargs="*", default=[], help="extra section.field=value overrides")
    args = p.parse_args()

    from specforge_core.config import load_config
    from specforge_core.data.features import write_features
    from specforge_core.pipeline.local import run_local

    work = Path(args.work)
    base = [f"dataset.max_samples={args.samples}", f"training.num_epochs={args.epochs}", "training.save_every=0",
            f"inference.dtype={args.dtype}",
            f"inference.batch_size={args.infer_batch}", "logging.progress=false", *args.set]
    rows = []
    losses = {}
    for name in ("online", "bf16", "fp8"):
        ov = base + [f"run.output_dir={work / name}"]
        if name != "online":
            ov += ["transfer.store=disk", f"transfer.disk.dir={work / ('cache-' + name)}", f"transfer.disk.format={name}"]
        else:
            ov += ["transfer.store=local"]
        cfg = load_config([args.config], overrides=ov)
        row = {"format": name, "bytes_per_token": "-", "write_tok_s": "-", "read_tok_s": "-"}
        if name != "online":
            s = write_features(cfg)
            row.update(bytes_per_token=f"{s.bytes_per_token:.0f}", write_tok_s=f"{s.tokens / s.wall_s:,.0f}",
                       read_tok_s=f"{_read_speed(cfg):,.0f}")
        t0 = time.perf_counter()
        res = run_local(cfg)
        losses[name] = [m["loss"] for m in res.history]
        row["train_s"] = f"{time.perf_counter() - t0:.1f}"
        row["final_loss"] = f"{res.history[-1]['loss']:.4f}"
        row["tau"] = f"{_eval(args.config, ov, work / f'{name}.eval.json', args):.3f}"
        rows.append(row)
        print(f"done {name}: {row}", flush=True)

    cols = ["format", "bytes_per_token", "write_tok_s", "read_tok_s", "train_s", "final_loss", "tau"]
    print("\n| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    exact = losses["bf16"] == losses["online"]
    rel = abs(losses["fp8"][-1] - losses["bf16"][-1]) / losses["bf16"][-1]
    print(f"\nbf16 cache losses == online losses at every step: {exact}; fp8 final loss vs bf16: {rel:.2%}")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
