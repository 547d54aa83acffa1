"""EAGLE-3 draft training step on one GPU: numerics vs the eager reference, then time, memory and
MFU of each variant at each sequence length, in one process (one device call).

    python benchmarks/draft_step.py                       # the full table (H100: ~3 min)
    python benchmarks/draft_step.py --T 2048 --variants v3 --no-check

Llama-3.1-8B-shaped draft (hidden 4096, intermediate 14336, 32/8 heads, vocab 128256 -> 32000),
bf16 weights and features, ttt_length 7, B=1, synthetic target features on the GPU. A step is
the trainer's own micro_step (TTT unroll + forward-kl loss per step) + backward + fused AdamW.

Variants:
  sdpa         attention=sdpa, bf16 head GEMMs
  flex         v2: FlexAttention with LSE gradient, bf16 weights, no compile, target logits per step
  compile      flex + compiled step parts + fused qkv
  v3-bf16w     compile + target distribution once per micro-batch, bf16 weights
  v3           the trainer's default: v3-bf16w with fp32 master weights (LocalStrategy.prepare)
               and bf16 autocast over the forward
  v3+ckpt      v3 + activation checkpointing of the finish block in every TTT step
  v4           the trainer's default after round v4: v3 + compiled stacked diagonal merge
               (model.merge = "auto") + loss chunks of 8192 rows (forward-kl's default)
  v4-c4096     v4 with loss chunks of 4096 rows
  v4+ckpt      v4 + activation checkpointing of the finish block
  v4-pergroup  v4 with one loss autograd node per TTT step (forward-kl without weighted_groups:
               a head-sized multiply, accumulation and saved gradient per step)
  (v3 variants run with model.merge = "loop" and chunk_size = 1024, the v3 code paths)
  sdpa-amp     sdpa under fp32 masters + autocast (numerics only, by default)
  eager-ref    benchmarks/eager_reference.py (dense masks, full softmax, full logits)

MFU = FLOPs/token (formula below) * tokens/s / 790e12 (H100 SXM dense bf16).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "plugins", ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
from specforge_defaults.loss import ForwardKLLoss, ForwardKLOptions  # noqa: E402
from specforge_defaults.strategy import LocalStrategy, LocalStrategyOptions  # noqa: E402
from specforge_llama_eagle3.config import DraftConfig  # noqa: E402
from specforge_llama_eagle3.model import LlamaEagle3Draft  # noqa: E402

# The trainer's own micro-step: the llama-eagle3 algorithm's objective (needs cattrs + pluggy:
# carried as wheels to the GPU machine).
from specforge_llama_eagle3.objective import micro_step  # noqa: E402

from specforge_core.components import TargetHead  # noqa: E402
from specforge_core.training.batch import Batch  # noqa: E402

H, INTER, NH, NKV, HD, V, VD, K_TTT = 4096, 14336, 32, 8, 128, 128256, 32000, 7
PEAK = 790e12


def flops_per_token(T: int) -> float:
    kv = NKV * HD
    per_step = 2 * H * H + 2 * 2 * H * kv + H * H + 3 * H * INTER + H * VD
    return 6 * 3 * H * H + K_TTT * 6 * per_step + K_TTT * 12 * (T / 2) * H


def draft_config() -> DraftConfig:
    return DraftConfig(hidden_size=H, intermediate_size=INTER, num_attention_heads=NH, num_key_value_heads=NKV,
                       head_dim=HD, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=None,
                       max_position_embeddings=131072, vocab_size=V, draft_vocab_size=VD, target_hidden_size=H)


def make_batch(T: int, device, dtype=torch.bfloat16, seed: int = 0) -> Batch:
    g = torch.Generator(device).manual_seed(seed)
    return Batch(
        input_ids=torch.randint(0, V, (1, T), device=device, generator=g),
        loss_mask=torch.ones(1, T, dtype=torch.bool, device=device),
        attention_mask=torch.ones(1, T, dtype=torch.bool, device=device),
        aux_hidden=torch.randn(1, T, 3 * H, device=device, generator=g).to(dtype),
        final_hidden=torch.randn(1, T, H, device=device, generator=g).to(dtype),
        target_argmax=torch.randint(0, V, (1, T), device=device, generator=g),
        lengths=torch.tensor([T], device=device),
    )


def make_inputs(T: int, device, model=None):
    torch.manual_seed(0)
    if model is None:
        model = LlamaEagle3Draft(draft_config(), attention="flex").to(device, torch.bfloat16)
    head = (torch.randn(VD, H, device=device) * H**-0.5).to(torch.bfloat16)  # target lm_head rows
    t2d = torch.zeros(V, dtype=torch.bool, device=device)
    vocab = torch.randperm(V, device=device)[:VD]
    t2d[vocab] = True
    batch = make_batch(T, device)
    # Every target argmax inside the draft vocab and every token learned: all T-k-2 rows of step k
    # carry loss, the worst case for the loss and what the FLOP formula counts.
    batch.target_argmax = vocab[torch.randint(0, VD, (1, T), device=device)]
    return model, batch, head, t2d


def PerStepTargets():  # noqa: N802
    """forward-kl without precomputed targets: target logits once per TTT step (v2)."""
    return ForwardKLLoss(ForwardKLOptions(chunk_size=1024), precompute=False)


class PerGroupForwardKL(ForwardKLLoss):
    """forward-kl without the contract's weighted-groups fast path: one autograd node per TTT step
    (the v4 code before it)."""

    weighted_groups = None


def amp(variant: str) -> bool:
    """Variants run like Trainer + the local strategy's default: fp32 master weights, bf16
    autocast over the forward."""
    return variant.startswith(("v3", "v4")) and "bf16w" not in variant or variant == "sdpa-amp"


def step_loss(variant: str, model, batch, head, t2d):
    """Forward of one micro-step; returns the loss to backpropagate."""
    if variant == "eager-ref":
        from eager_reference import eager_step_loss

        return eager_step_loss(model, batch, head, t2d, K_TTT)[0]
    model.attention = "sdpa" if variant in ("sdpa", "sdpa-amp") else "flex"
    model.compile = "on" if variant.startswith(("v3", "v4", "compile")) else "off"
    model.merge = "auto" if variant.startswith("v4") else "loop"
    model.activation_checkpointing = variant.endswith("+ckpt")  # model.llama-eagle3.activation_checkpointing
    if variant == "v4-pergroup":
        loss_fn = PerGroupForwardKL()
    elif variant.startswith("v4"):
        loss_fn = ForwardKLLoss(ForwardKLOptions(chunk_size=4096) if "c4096" in variant else ForwardKLOptions())
    elif variant.startswith("v3"):
        loss_fn = ForwardKLLoss(ForwardKLOptions(chunk_size=1024))
    else:
        loss_fn = PerStepTargets()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp(variant)):
        return micro_step(model.ttt_forward, model.lm_head.weight, loss_fn, batch, target_head(head, t2d), None,
                          K_TTT)[0]


_HEADS: dict = {}


def target_head(rows: torch.Tensor, t2d: torch.Tensor) -> TargetHead:
    """The frozen target head as the trainer holds it (built once: its draft ids need a host sync)."""
    key = (id(rows), id(t2d))
    if key not in _HEADS:  # the value holds rows and t2d: their ids cannot be reused meanwhile
        _HEADS[key] = (rows, t2d, TargetHead(rows=rows, t2d=t2d, draft_ids=t2d.nonzero().squeeze(1)))
    return _HEADS[key][2]


def master_copy(model):
    """The model as Trainer's local strategy prepares it (master_weights = fp32)."""
    return LocalStrategy(LocalStrategyOptions(device="cuda"), None).prepare(copy.deepcopy(model))


def run_variant(variant, model, batch, head, t2d, T, iters=5, warmup=2, opt=None):
    opt = opt or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, fused=True)
    times = []
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        for i in range(warmup + iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step_loss(variant, model, batch, head, t2d).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            end.record()
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end) / 1e3)
    except torch.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        model.activation_checkpointing = False
        torch.cuda.empty_cache()
        return {"variant": variant, "T": T, "status": "OOM"}
    sec = sorted(times)[len(times) // 2]
    tok_s = T / sec
    return {"variant": variant, "T": T, "status": "ok", "ms": sec * 1e3, "ms_all": [t * 1e3 for t in times],
            "tok_s": tok_s, "mfu": flops_per_token(T) * tok_s / PEAK,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def grads_of(variant, model, batch, head, t2d):
    model.zero_grad(set_to_none=True)
    loss = step_loss(variant, model, batch, head, t2d)
    loss.backward()
    g = {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach().double(), g


def check_numerics(model, T=1024) -> dict:
    """Loss and every parameter gradient of each variant vs the eager reference in fp32."""
    _, batch, head, t2d = make_inputs(T, "cuda", model)
    ref_model = copy.deepcopy(model).float()
    b32 = Batch(batch.input_ids, batch.loss_mask, batch.attention_mask, batch.aux_hidden.float(),
                batch.final_hidden.float(), batch.target_argmax, batch.lengths)
    ref_loss, ref_g = grads_of("eager-ref", ref_model, b32, head.float(), t2d)
    del ref_model
    out = {"T": T, "ref_loss": float(ref_loss)}
    m32 = master_copy(model)
    for variant in NUMERICS:
        try:
            loss, g = grads_of(variant, m32 if amp(variant) else model, batch, head, t2d)
        except Exception as e:  # report and go on: one broken variant must not hide the others
            out[variant] = {"loss_rel_err": float("nan"), "grad_rel_err_max": float("nan"), "worst_param": repr(e)[:300]}
            continue
        errs = {n: float((g[n] - ref_g[n]).norm() / ref_g[n].norm().clamp(min=1e-30)) for n in ref_g}
        worst = max(errs, key=errs.get)
        out[variant] = {"loss_rel_err": float(abs(loss - ref_loss) / abs(ref_loss)),
                        "grad_rel_err_max": errs[worst], "worst_param": worst}
    model.activation_checkpointing = False
    del m32
    torch.cuda.empty_cache()
    return out


NUMERICS = ("eager-ref", "v3", "v4", "v4+ckpt")


def profile(variant, model, batch, head, t2d, path) -> str:
    """One profiled step (after the timed ones): the top CUDA kernels by total time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    with prof(activities=[ProfilerActivity.CUDA]) as p:
        step_loss(variant, model, batch, head, t2d).backward()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    table = p.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    with open(path, "w") as f:
        f.write(table)
    return table


def profile_copies(variant, model, batch, head, t2d, path) -> None:
    """Which ops launch the copies: CPU ops with input shapes, by CUDA time (written, not printed)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as p:
        step_loss(variant, model, batch, head, t2d).backward()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    with open(path, "w") as f:
        f.write(p.key_averages(group_by_input_shape=True).table(
            sort_by="cuda_time_total", row_limit=60, max_name_column_width=50, max_shapes_column_width=90))


def sync_points(variant, model, batch, head, t2d) -> list[tuple[str, int]]:
    """The host syncs of one step (``torch.cuda.set_sync_debug_mode``): where our code calls a
    synchronizing op, with counts. A sync inside the TTT loop stalls the GPU until the host has
    launched the next kernels."""
    import traceback
    import warnings

    root = str(Path(__file__).resolve().parents[1])
    seen: dict[str, int] = {}
    armed = False  # set_sync_debug_mode itself warns once

    def record(message, category, filename, lineno, file=None, line=None):
        if not armed or "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(root)]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[::-1][:3]) or f"{filename}:{lineno}"
        seen[where] = seen.get(where, 0) + 1

    with warnings.catch_warnings():  # restores the filters and showwarning on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        armed = True
        try:
            step_loss(variant, model, batch, head, t2d).backward()
        finally:
            armed = False
            torch.cuda.set_sync_debug_mode("default")
    model.zero_grad(set_to_none=True)
    return sorted(seen.items(), key=lambda kv: -kv[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--variants", nargs="+", default=["eager-ref", "v3", "v4", "v4-c4096", "v4+ckpt"])
    ap.add_argument("--longest", type=int, nargs="*", default=[65536],
                    help="extra lengths tried with --long-variant only, to find the longest that fits")
    ap.add_argument("--long-variant", default="v4+ckpt")
    ap.add_argument("--profile-T", type=int, default=8192)
    ap.add_argument("--profile-variant", default="v4")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--sync-debug", action="store_true",
                    help="after the profile: list the host syncs of one step of the profiled variant")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--flex-static", action="store_true",
                    help="compile flex with dynamic=False (one kernel per T) instead of automatic dynamic "
                         "shapes; with several --T in one process the later ones otherwise run the dynamic kernel")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "draft_step.json"))
    a = ap.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 GEMMs (the numerics reference) stay fp32
    if a.flex_static:
        from specforge_llama_eagle3 import attention

        attention.FLEX_DYNAMIC = False
    dev = torch.cuda.get_device_name()
    env = {"device": dev, "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    print(env, flush=True)
    model = LlamaEagle3Draft(draft_config(), attention="flex").to("cuda", torch.bfloat16)
    results = {"env": env, "runs": []}
    if not a.no_check:
        t0 = time.time()
        results["numerics"] = check_numerics(model)
        print("numerics vs fp32 eager reference (T=1024):", json.dumps(results["numerics"]),
              f"[{time.time() - t0:.0f} s]", flush=True)

    m32 = master_copy(model)
    opts = {id(m): torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-6, fused=True)
            for m in (model, m32)}
    plan = [(T, v) for T in a.T for v in a.variants]
    plan += [(T, a.long_variant) for T in a.longest]
    skip = set()
    for T, v in plan:
        long_only = T > 8192 and v not in ("v4", "v4+ckpt")  # the long runs: only what trains them
        if v == "eager-ref" and T > 4096 or (v, "OOM") in skip and T > 8192 or long_only:
            results["runs"].append({"variant": v, "T": T, "status": "skipped"})
            continue
        if T in a.longest and (a.long_variant, "OOM-long") in skip:
            continue
        if T > 8192 and opts[id(model)].state:  # room for the long runs: drop the bf16 model's state
            opts[id(model)].state.clear()
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        _, batch, head, t2d = make_inputs(T, "cuda", model)
        t0 = time.time()
        try:
            m = m32 if amp(v) else model
            r = run_variant(v, m, batch, head, t2d, T, iters=a.iters if T <= 32768 else 2, opt=opts[id(m)])
            if T == a.profile_T and v == a.profile_variant and r["status"] == "ok":
                out_dir = os.environ.get("OUT", ".")
                profile(v, m, batch, head, t2d, os.path.join(out_dir, "profile.txt"))
                profile_copies(v, m, batch, head, t2d, os.path.join(out_dir, "profile_shapes.txt"))
                if a.sync_debug:
                    r["syncs"] = sync_points(v, m, batch, head, t2d)
                    print(f"host syncs of one {v} step at T={T}:", flush=True)
                    for where, n in r["syncs"]:
                        print(f"  {n:3d}x {where}", flush=True)
        except Exception as e:
            for o in opts.values():
                o.zero_grad(set_to_none=True)
            r = {"variant": v, "T": T, "status": f"error {e!r}"[:300]}
        r["wall_s"] = time.time() - t0
        results["runs"].append(r)
        if r["status"] == "OOM":
            skip.add((v, "OOM-long" if T in a.longest else "OOM"))
        print(json.dumps(r), flush=True)
        del batch
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)

    print(f"\n{dev}, torch {env['torch']}, B=1, K={K_TTT}, bf16; MFU vs {PEAK / 1e12:.0f} TFLOP/s")
    print(f"{'T':>6} {'variant':10} {'ms/step':>9} {'tok/s':>8} {'MFU':>6} {'peak GiB':>9}")
    for r in results["runs"]:
        if r["status"] == "ok":
            print(f"{r['T']:>6} {r['variant']:10} {r['ms']:9.1f} {r['tok_s']:8.0f} {r['mfu'] * 100:5.1f}% "
                  f"{r['peak_gib']:9.1f}")
        else:
            print(f"{r['T']:>6} {r['variant']:10} {r['status']}")
    if "numerics" in results:
        n = results["numerics"]
        for v in NUMERICS:
            print(f"numerics bf16 {v:10} loss rel err {n[v]['loss_rel_err']:.1e}, worst grad rel err "
                  f"{n[v]['grad_rel_err_max']:.1e} ({n[v]['worst_param']})")


if __name__ == "__main__":
    main()
