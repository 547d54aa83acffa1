"""EAGLE-3 training step on real sequence lengths: tokens/s, recompiles and memory of each way of
batching variable-length data, side by side in one process (one device call).

    python benchmarks/varlen_step.py                       # H200: ~4-5 min, table printed last
    python benchmarks/varlen_step.py --steps 30 --variants fixed dynamic packed
    python benchmarks/varlen_step.py --device cpu --tiny   # the harness on CPU (tiny draft, seconds)

Llama-3.1-8B-shaped draft as in ``draft_step.py`` (the trainer's default path: fp32 masters, bf16
autocast, compiled step parts, forward-kl with targets precomputed once per micro-batch), ttt 7.
Sample lengths are drawn (seeded) from ``benchmarks/data/sharegpt_lengths.json`` (ShareGPT V3 in
SmolLM2 ChatML tokens), capped at ``--max-len``; an optimizer step is ``--accum`` micro-batches of
``--micro`` samples (gradient accumulation), timed as a whole.

Variants:
  fixed        B=1 at one fixed T = the mean real tokens of a micro-batch (rounded to 128): the
               figure the others are compared with (same tokens per step, no length variation)
  before       pad to the longest sample, flex compiled with dynamic=False (the code before
               issue 17: one kernel per length, then the recompile limit)
  dynamic      pad to the longest sample rounded up to 128, flex with automatic dynamic shapes
  bucketed     dynamic + micro-batches of similar lengths (sorted inside windows of 32 samples x
               micro, then shuffled)
  packed       the step's samples packed into rows of exactly --max-len positions, regrouped into
               micro-batches of --micro rows (training/packing.py pack_step, what the trainer does
               with training.pack_tokens): document-masked attention, one shape every micro-step
  packed-tight packed, fullest rows together, each micro-batch as long as its fullest row (to 128),
               no empty rows (pack_step(tight=True)): less padding, a few shapes
  packed-row   the step's samples packed into single rows of --row positions (default --micro x
               --max-len; pack_step with one row per micro-batch: training.micro_batch_size 1 +
               pack_tokens = --row): one shape, no empty rows, the number of micro-batches varies
  budget       token budget: every step is the same number of micro-batches of one row of --row
               positions (as many as the mean real tokens of a step fill), filled from the sample
               stream (oldest first, then longest); what does not fit waits for the next step
               (training/packing.py TokenBudgetPacker): one shape, the same tokens every step,
               padding only at row ends (ShareGPT <= 4096 in rows of 8192: ~2.5% padding)

tokens/s counts real tokens only (budget steps carry a different number of samples: their own
count), over the mean step; "median" is the same over the median step (one slow step moves the
mean of 12 by several percent: ``ms_all`` in the JSON has every step). recompiles = torch.compile frames compiled after the warm-up
steps (0 is the goal); peak GiB is the max over measured steps, and "flat" is min/max of the
per-step peaks.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "plugins", ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import draft_step  # noqa: E402
import torch  # noqa: E402
from draft_step import K_TTT, PEAK, draft_config, flops_per_token, master_copy  # noqa: E402
from specforge_defaults.loss import ForwardKLLoss, ForwardKLOptions  # noqa: E402
from specforge_llama_eagle3 import attention as attn_mod  # noqa: E402
from specforge_llama_eagle3.config import DraftConfig  # noqa: E402
from specforge_llama_eagle3.model import LlamaEagle3Draft  # noqa: E402
from specforge_llama_eagle3.objective import micro_step  # noqa: E402

from specforge_core.training.batch import collate  # noqa: E402
from specforge_core.training.packing import TokenBudgetPacker, pack_step  # noqa: E402
from specforge_core.types import TargetFeatures  # noqa: E402

H, V, VD = draft_step.H, draft_step.V, draft_step.VD  # --tiny replaces them (tiny_config)


def tiny_config() -> DraftConfig:
    """A small draft for the CPU harness run (8 x 64 heads-dims, vocab 512)."""
    global H, V, VD
    H, V, VD = 64, 512, 128
    return DraftConfig(hidden_size=H, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
                       max_position_embeddings=4096, vocab_size=V, draft_vocab_size=VD, target_hidden_size=H)


def real_lengths(path: Path, n: int, max_len: int, seed: int, scale: float = 1.0) -> list[int]:
    lengths = [int(x) for x in json.loads(path.read_text())["lengths"] if int(x) >= 8]
    rng = random.Random(seed)
    return [max(4, min(int(rng.choice(lengths) * scale), max_len)) for _ in range(n)]


def features(n: int, device, vocab: torch.Tensor, g: torch.Generator, dtype=torch.bfloat16) -> TargetFeatures:
    return TargetFeatures(
        sample_id="s", input_ids=torch.randint(0, V, (n,), device=device, generator=g),
        loss_mask=torch.ones(n, dtype=torch.bool, device=device),
        aux_hidden=torch.randn(n, 3 * H, device=device, generator=g, dtype=dtype),
        final_hidden=torch.randn(n, H, device=device, generator=g, dtype=dtype),
        target_argmax=vocab[torch.randint(0, VD, (n,), device=device, generator=g)])


def micro_batches(variant: str, lengths: list[int], micro: int, max_len: int, seed: int) -> list[list[int]]:
    groups = [lengths[i : i + micro] for i in range(0, len(lengths) - micro + 1, micro)]
    if variant == "bucketed":
        window = 32 * micro
        groups = []
        for s in range(0, len(lengths) - window + 1, window):
            w = sorted(lengths[s : s + window])
            groups += [w[i : i + micro] for i in range(0, window, micro)]
        random.Random(seed).shuffle(groups)
    if variant == "fixed":
        mean = sum(lengths) / len(groups)
        T = max(128, int(round(mean / 128)) * 128)
        groups = [[T] for _ in groups]
    return groups


def frames_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def step_batches(variant: str, i: int, groups, stream, packer, args, dev, dtype, vocab, g):
    """The optimizer step's micro-batches and its real tokens."""
    if variant == "budget":
        # pull samples until the buffer holds the step's capacity plus a look-ahead of one row, so
        # first-fit can fill every row (leftovers wait: the stream is consumed at the fill rate)
        new, have = [], packer.pending_tokens()
        while have < packer.capacity + packer.row_tokens:
            n = next(stream)
            new.append(features(n, dev, vocab, g, dtype))
            have += n
        batches = packer.step(new, dev, dtype)
        return batches, sum(b.num_tokens for b in batches)
    step_groups = [groups[(i * args.accum + j) % len(groups)] for j in range(args.accum)]
    feats = [[features(n, dev, vocab, g, dtype) for n in group] for group in step_groups]
    real = sum(sum(group) for group in step_groups)
    if variant.startswith("packed"):
        flat = [f for fs in feats for f in fs]
        if variant == "packed-row":
            return pack_step(flat, args.row, 1, dev, dtype), real
        return pack_step(flat, args.max_len, args.micro, dev, dtype, tight=variant == "packed-tight"), real
    pad = 1 if variant in ("before", "fixed") or dev == "cpu" else 128
    return [collate(fs, dev, dtype, pad_multiple=pad) for fs in feats], real


def run(variant: str, groups, lengths, args, model, head, t2d, vocab) -> dict:
    dev = args.device
    cuda = dev == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    # each variant as its own run: no compiled graphs, automatic-dynamic shapes or cached blocks
    # of the previous variant (the "before" variant leaves ~45 GiB of odd-sized blocks)
    torch._dynamo.reset()
    attn_mod._FLEX.clear()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    attn_mod.FLEX_DYNAMIC = False if variant == "before" else None
    loss_fn = ForwardKLLoss(ForwardKLOptions())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, fused=cuda)
    g = torch.Generator(dev).manual_seed(0)
    stream = iter(lengths * 4)
    # as many rows of --row positions as the others' mean real tokens per step fill
    n_micro = max(1, round(sum(lengths) / len(lengths) * args.micro * args.accum / args.row))
    packer = TokenBudgetPacker(args.row, 1, n_micro)
    steps = args.warmup + args.steps
    times, peaks, real, padded, shapes = [], [], 0, 0, set()
    compiled_at_warm = None
    t_wall = time.time()
    for i in range(steps):
        # one optimizer step (the trainer's train_step: gradient accumulation over micro-batches)
        batches, step_real = step_batches(variant, i, groups, stream, packer, args, dev, dtype, vocab, g)
        if i == args.warmup:
            compiled_at_warm = frames_compiled()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for batch in batches:
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
                loss, _ = micro_step(model.ttt_forward, model.lm_head.weight, loss_fn, batch, head, t2d, K_TTT)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(dt)
            peaks.append(torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)
            real += step_real
            padded += sum(b.input_ids.numel() for b in batches)
            shapes |= {tuple(b.input_ids.shape) for b in batches}
    sec = sum(times)
    tok_s = real / sec
    mean_T = real / len(times) / args.accum  # real tokens per micro-batch
    return {"variant": variant, "status": "ok", "steps": len(times), "tok_s": tok_s,
            "mfu": flops_per_token(mean_T) * tok_s / PEAK, "ms_per_step": 1e3 * sec / len(times),
            "ms_all": [round(1e3 * t, 1) for t in times],
            "tok_s_median_step": real / len(times) / sorted(times)[len(times) // 2],
            "tokens_per_step": real / len(times), "pad_frac": 1 - real / padded, "shapes": len(shapes),
            "recompiles_after_warmup": frames_compiled() - compiled_at_warm,
            "compiles_total": frames_compiled(), "peak_gib": max(peaks),
            "flat": min(peaks) / max(peaks) if max(peaks) else 1.0,
            "carried": len(packer.pending), "wall_s": time.time() - t_wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+",
                    default=["fixed", "dynamic", "packed", "packed-tight", "packed-row", "budget"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--row", type=int, default=0,
                    help="positions of a packed-row/budget row (default --micro x --max-len)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="small draft, lengths / 8, max-len 512 (CPU harness)")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "varlen_step.json"))
    a = ap.parse_args()
    dev = a.device
    scale = 1.0
    cfg = draft_config()
    if a.tiny:
        cfg, scale, a.max_len = tiny_config(), 1 / 8, min(a.max_len, 512)
    env = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__}
    print(env, flush=True)
    a.row = a.row or a.micro * a.max_len
    lengths = real_lengths(ROOT / "benchmarks" / "data" / "sharegpt_lengths.json",
                           (a.warmup + a.steps) * a.micro * a.accum * 2, a.max_len, a.seed, scale)
    torch.manual_seed(0)
    if dev == "cuda":
        model = master_copy(LlamaEagle3Draft(cfg, attention="flex").to("cuda", torch.bfloat16))
    else:  # fp32, eager: the harness, not a CPU speed figure
        model = LlamaEagle3Draft(cfg, attention="eager", compile="off")
    wdtype = torch.bfloat16 if dev == "cuda" else torch.float32
    head = (torch.randn(VD, H, device=dev) * H**-0.5).to(wdtype)
    vocab = torch.randperm(V, device=dev)[:VD]
    t2d = torch.zeros(V, dtype=torch.bool, device=dev)
    t2d[vocab] = True
    results = {"env": env, "args": vars(a), "runs": []}
    for v in a.variants:
        groups = micro_batches(v, lengths, a.micro, a.max_len, a.seed)
        try:
            r = run(v, groups, lengths, a, model, head, t2d, vocab)
        except Exception as e:  # one broken variant must not hide the others
            r = {"variant": v, "status": f"error {e!r}"[:300]}
        results["runs"].append(r)
        print(json.dumps(r), flush=True)
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    fixed = next((r for r in results["runs"] if r["variant"] == "fixed" and r["status"] == "ok"), None)
    print(f"\n{env['device']}, torch {env['torch']}, step {a.accum} x {a.micro} ShareGPT samples <= {a.max_len} tokens, "
          f"K={K_TTT}, {a.steps} steps after {a.warmup} warm-up; packed-row/budget rows of {a.row}")
    print(f"{'variant':12} {'tok/s':>8} {'vs fixed':>8} {'MFU':>6} {'median':>8} {'tok/step':>8} {'pad':>5} "
          f"{'shapes':>6} {'recomp':>6} {'peak GiB':>8} {'flat':>5}")
    for r in results["runs"]:
        if r["status"] != "ok":
            print(f"{r['variant']:12} {r['status']}")
            continue
        rel = r["tok_s"] / fixed["tok_s"] if fixed else float("nan")
        print(f"{r['variant']:12} {r['tok_s']:8.0f} {rel:8.2f} {r['mfu'] * 100:5.1f}% {r['tok_s_median_step']:8.0f} "
              f"{r['tokens_per_step']:8.0f} "
              f"{r['pad_frac'] * 100:4.0f}% {r['shapes']:6d} {r['recompiles_after_warmup']:6d} {r['peak_gib']:8.1f} "
              f"{r['flat']:5.2f}")


if __name__ == "__main__":
    main()
