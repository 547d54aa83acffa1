"""EAGLE-3 training step on real sequence lengths: tokens/s, recompiles and memory of each way of
batching variable-length data, side by side in one process (one device call).

    python benchmarks/varlen_step.py                       # H200: ~4 min
    python benchmarks/varlen_step.py --steps 30 --variants fixed dynamic packed

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

tokens/s counts real tokens only. recompiles = torch.compile frames compiled after the warm-up
steps (0 is the goal); peak GiB is the max over measured steps, and "flat" is min/max of the
per-step peaks.
"""

from __future__ import annotations

import argparse
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

import torch  # noqa: E402
from draft_step import K_TTT, PEAK, VD, H, V, draft_config, flops_per_token, master_copy  # noqa: E402
from specforge_defaults.loss import ForwardKLLoss, ForwardKLOptions  # noqa: E402
from specforge_llama_eagle3 import attention as attn_mod  # noqa: E402
from specforge_llama_eagle3.model import LlamaEagle3Draft  # noqa: E402
from specforge_llama_eagle3.objective import micro_step  # noqa: E402

from specforge_core.training.batch import collate  # noqa: E402
from specforge_core.training.packing import pack_step  # noqa: E402
from specforge_core.types import TargetFeatures  # noqa: E402


def real_lengths(path: Path, n: int, max_len: int, seed: int) -> list[int]:
    lengths = [int(x) for x in json.loads(path.read_text())["lengths"] if int(x) >= 8]
    rng = random.Random(seed)
    return [min(rng.choice(lengths), max_len) for _ in range(n)]


def features(n: int, device, vocab: torch.Tensor, g: torch.Generator) -> TargetFeatures:
    return TargetFeatures(
        sample_id="s", input_ids=torch.randint(0, V, (n,), device=device, generator=g),
        loss_mask=torch.ones(n, dtype=torch.bool, device=device),
        aux_hidden=torch.randn(n, 3 * H, device=device, generator=g, dtype=torch.bfloat16),
        final_hidden=torch.randn(n, H, device=device, generator=g, dtype=torch.bfloat16),
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


def run(variant: str, groups, args, model, head, t2d, vocab) -> dict:
    torch._dynamo.reset()
    attn_mod._FLEX.clear()
    attn_mod.FLEX_DYNAMIC = False if variant == "before" else None
    loss_fn = ForwardKLLoss(ForwardKLOptions())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, fused=True)
    g = torch.Generator("cuda").manual_seed(0)
    pad = 1 if variant in ("before", "fixed") else 128
    steps = args.warmup + args.steps
    times, peaks, real, padded = [], [], 0, 0
    compiled_at_warm = None
    t_wall = time.time()
    for i in range(steps):
        # one optimizer step: --accum micro-batches of --micro samples (the trainer's train_step)
        step_groups = [groups[(i * args.accum + j) % len(groups)] for j in range(args.accum)]
        feats = [[features(n, "cuda", vocab, g) for n in group] for group in step_groups]
        if variant.startswith("packed"):
            batches = pack_step([f for fs in feats for f in fs], args.max_len, args.micro, "cuda", torch.bfloat16,
                                tight=variant == "packed-tight")
        else:
            batches = [collate(fs, "cuda", torch.bfloat16, pad_multiple=pad) for fs in feats]
        if i == args.warmup:
            compiled_at_warm = frames_compiled()
            torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for batch in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = micro_step(model.ttt_forward, model.lm_head.weight, loss_fn, batch, head, t2d, K_TTT)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        end.record()
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(start.elapsed_time(end) / 1e3)
            peaks.append(torch.cuda.max_memory_allocated() / 2**30)
            real += sum(sum(group) for group in step_groups)
            padded += sum(b.input_ids.numel() for b in batches)
    sec = sum(times)
    tok_s = real / sec
    mean_T = real / len(times) / args.accum  # real tokens per micro-batch
    return {"variant": variant, "status": "ok", "steps": len(times), "tok_s": tok_s,
            "mfu": flops_per_token(mean_T) * tok_s / PEAK, "ms_per_step": 1e3 * sec / len(times),
            "pad_frac": 1 - real / padded, "recompiles_after_warmup": frames_compiled() - compiled_at_warm,
            "compiles_total": frames_compiled(), "peak_gib": max(peaks), "flat": min(peaks) / max(peaks),
            "wall_s": time.time() - t_wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=["fixed", "before", "dynamic", "bucketed", "packed"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=12)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "varlen_step.json"))
    a = ap.parse_args()
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(env, flush=True)
    lengths = real_lengths(ROOT / "benchmarks" / "data" / "sharegpt_lengths.json",
                           (a.warmup + a.steps) * a.micro * a.accum * 2, a.max_len, a.seed)
    torch.manual_seed(0)
    model = master_copy(LlamaEagle3Draft(draft_config(), attention="flex").to("cuda", torch.bfloat16))
    head = (torch.randn(VD, H, device="cuda") * H**-0.5).to(torch.bfloat16)
    vocab = torch.randperm(V, device="cuda")[:VD]
    t2d = torch.zeros(V, dtype=torch.bool, device="cuda")
    t2d[vocab] = True
    results = {"env": env, "args": vars(a), "runs": []}
    for v in a.variants:
        groups = micro_batches(v, lengths, a.micro, a.max_len, a.seed)
        try:
            r = run(v, groups, a, model, head, t2d, vocab)
        except Exception as e:  # one broken variant must not hide the others
            r = {"variant": v, "status": f"error {e!r}"[:300]}
        results["runs"].append(r)
        print(json.dumps(r), flush=True)
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    fixed = next((r for r in results["runs"] if r["variant"] == "fixed" and r["status"] == "ok"), None)
    print(f"\n{env['device']}, torch {env['torch']}, step {a.accum} x {a.micro} ShareGPT samples <= {a.max_len} tokens, "
          f"K={K_TTT}, {a.steps} steps after {a.warmup} warm-up")
    print(f"{'variant':9} {'tok/s':>8} {'vs fixed':>8} {'MFU':>6} {'pad':>5} {'recomp':>6} {'peak GiB':>8} {'flat':>5}")
    for r in results["runs"]:
        if r["status"] != "ok":
            print(f"{r['variant']:9} {r['status']}")
            continue
        rel = r["tok_s"] / fixed["tok_s"] if fixed else float("nan")
        print(f"{r['variant']:9} {r['tok_s']:8.0f} {rel:8.2f} {r['mfu'] * 100:5.1f}% {r['pad_frac'] * 100:4.0f}% "
              f"{r['recompiles_after_warmup']:6d} {r['peak_gib']:8.1f} {r['flat']:5.2f}")


if __name__ == "__main__":
    main()
