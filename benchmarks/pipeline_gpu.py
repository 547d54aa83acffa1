#!/usr/bin/env python
"""Ray pipeline throughput on a machine with 2 GPUs: one inference engine, one trainer.

Measures, on the same synthetic data and model:
  1. inference alone: the hf target backend on GPU 0 writing features into the shm store
     (put, then delete) -> samples/s
  2. training alone: the trainer on GPU 1 on features already in memory -> samples/s
  3. the pipeline: ``run_ray`` with both stages overlapped through the shm store -> samples/s
     (steady state: the last three quarters of the steps, after the compile warm-up)
and reports the pipeline's throughput as a fraction of the slower stage alone (goal >= 0.9).

    python benchmarks/pipeline_gpu.py --steps 100 --json out.json

Needs: 2 CUDA GPUs, ray. The target is a random Llama built locally (no download); its size is
set with --hidden/--layers so the two stages are of comparable cost.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_assets(root: Path, n: int, hidden: int, layers: int, vocab: int, seq: int) -> tuple[Path, Path]:
    """A random Llama target with a word-level tokenizer, and ``n`` conversations of ~``seq`` tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from specforge_core.testing import make_tiny_model

    words = [f"w{i}" for i in range(vocab - 16)]
    special = ["<|pad|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<unk>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(special + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|> ' + m['role'] + ' <|end_header_id|> ' "
        "+ m['content'] + ' <|eot_id|> ' }}{% endfor %}"
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|pad|>", unk_token="<unk>", chat_template=template)
    target = root / "target"
    make_tiny_model(target, vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
                    num_layers=layers, num_heads=max(1, hidden // 128), num_kv_heads=max(1, hidden // 512))
    fast.save_pretrained(str(target))
    r = random.Random(0)
    data = root / "chat.jsonl"
    with open(data, "w") as f:
        for i in range(n):
            q = " ".join(r.choice(words) for _ in range(seq // 4))
            a = " ".join(r.choice(words) for _ in range(seq - seq // 4 - 12))
            f.write(json.dumps({"id": f"c{i}", "conversations": [{"from": "human", "value": q},
                                                                  {"from": "gpt", "value": a}]}) + "\n")
    return target, data


def make_config(target: Path, data: Path, out: Path, steps: int, mbs: int, pipeline: str):
    from specforge_core.config import load_config

    return load_config(data={
        "run": {"name": "pipebench", "output_dir": str(out), "pipeline": pipeline},
        "model": {"target": str(target), "draft_vocab_size": 4096, "llama-eagle3": {"ttt_length": 7}},
        "dataset": {"path": [str(data)], "cache_dir": "", "max_seq_length": 4096},
        "training": {"max_steps": steps, "micro_batch_size": mbs, "num_gpus": 1,
                     "scheduler": "constant", "save_every": 0},
        "inference": {"num_gpus": 1, "batch_size": mbs},
        # ~30 samples of 33.5 MB at the default sizes: inference runs at most ~7 steps ahead
        "transfer": {"store": "shm", "max_pool_bytes": 1 << 30},
        "logging": {"progress": False},
    })


def inference_alone(config, n: int) -> float:
    """One inference engine (``EngineActor``, the code a pipeline engine runs, in this process) on
    GPU 0: target forward, features into the shm store (parallel puts), then delete."""
    import attrs
    import numpy as np
    import torch

    from specforge_core.build import create
    from specforge_core.data import build_samples, load_tokenizer
    from specforge_core.pipeline.ray.controller import PromptBatch
    from specforge_core.pipeline.ray.dispatch import ResultBatch
    from specforge_core.pipeline.ray.inference import EngineActor

    samples, _ = build_samples(config.dataset, load_tokenizer(config.model.target))
    cfg = attrs.evolve(config, transfer=attrs.evolve(config.transfer, store="shm"))
    provider = create(cfg, "transfer_store")
    handle = provider.start("pipebench-inf")
    engine = EngineActor(cfg, samples, handle, "pipebench-inf")
    bs = config.inference.batch_size

    def batch(start: int) -> tuple:
        idx = np.arange(start, min(start + bs, n), dtype=np.int64)
        return PromptBatch(idx, idx, np.asarray([samples[i].num_tokens for i in idx], np.int64)).wire()

    engine.store.delete(list(ResultBatch.from_wire(engine.generate(batch(0))).keys))  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    done = 0
    for start in range(0, n, bs):
        res = ResultBatch.from_wire(engine.generate(batch(start)))
        engine.store.delete(list(res.keys))
        done += res.n
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    engine.close()
    provider.stop(handle)
    return done / wall


def training_alone(config, steps: int) -> float:
    """The trainer on cuda:1 on batches already collated in its GPU's memory: the compute ceiling
    (no store, no host-to-device copy, no inference in the loop)."""
    import torch

    from specforge_core.build import create
    from specforge_core.data import build_samples, load_tokenizer
    from specforge_core.target import target_info, with_aux_layers
    from specforge_core.training.batch import collate
    from specforge_core.training.trainer import Trainer
    from specforge_core.vocab import build_vocab_mapping

    samples, _ = build_samples(config.dataset, load_tokenizer(config.model.target))
    info = target_info(config.model.target, with_aux_layers(config).model.aux_layers)
    mbs = config.training.micro_batch_size
    backend = create(config, "target_backend", config, "cuda:0")
    feats = [f for s in range(0, 4 * mbs, mbs) for f in backend.generate(samples[s : s + mbs])]
    backend.close()
    torch.cuda.set_device(1)
    vocab = build_vocab_mapping(samples, info.vocab_size, min(config.model.draft_vocab_size, info.vocab_size))
    trainer = Trainer(config, info, vocab, steps + 2)
    batches = [collate(feats[i : i + mbs], trainer.device, trainer.dtype) for i in range(0, len(feats), mbs)]
    for b in batches:  # warm-up: compiles for each batch length (they go dynamic after the first change)
        trainer.train_step([b])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(steps):
        trainer.train_step([batches[s % len(batches)]])
    torch.cuda.synchronize()
    return steps * mbs / (time.perf_counter() - t0)


def pipeline(config) -> dict[str, float]:
    """samples/s over the steady state, and where rank 0's time went in it (waiting for batches vs
    the steps). The steady state leaves out the first quarter of the steps: the first steps
    compile the draft's fused parts (once per shape until the shapes go dynamic, seconds each),
    and meanwhile inference fills the pool up to ``transfer.max_pool_bytes``; timing from there
    would credit the pipeline with samples produced while the trainer compiled."""
    from specforge_core.pipeline import run_pipeline

    res = run_pipeline(config)
    h = res.history
    mbs = config.training.micro_batch_size
    first = max(2, len(h) // 4)  # index of the first step of the window; timed from the end of the one before
    window = h[first:]
    span = h[-1]["time"] - h[first - 1]["time"]
    # inference fills the pool while the first steps compile; samples taken out of that head start
    # are not throughput, so the rate counts what inference produced within the window
    drained = h[first - 1]["buffered_samples"] - h[-1]["buffered_samples"]
    return {
        "samples_per_s": (len(window) * mbs - drained) / span,
        "trained_per_s": len(window) * mbs / span,
        "buffer_drained": drained,
        "window_steps": len(window),
        "data_wait_share": sum(m["data_wait_s"] for m in window) / span,
        "stage_s_per_step": sum(m["stage_s"] for m in window) / len(window),
        "stage_read_s_per_step": sum(m["stage_read_s"] for m in window) / len(window),
        "step_s": sum(m["tokens"] / m["tokens_per_s"] for m in window) / len(window),
        "first_steps_s": h[first - 1]["time"] - h[0]["time"] + h[0]["tokens"] / h[0]["tokens_per_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048, help="tokens per conversation")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch

    if torch.cuda.device_count() < 2:
        raise SystemExit(f"needs 2 GPUs, found {torch.cuda.device_count()}")
    root = Path(tempfile.mkdtemp(prefix="pipebench-"))
    n = (args.steps + 2) * args.micro_batch_size
    target, data = make_assets(root, n, args.hidden, args.layers, args.vocab, args.seq)
    local_cfg = make_config(target, data, root / "out-local", args.steps, args.micro_batch_size, "local")
    inf = inference_alone(local_cfg, n)
    print(f"inference alone: {inf:.2f} samples/s", flush=True)
    tr = training_alone(local_cfg, args.steps)
    print(f"training alone: {tr:.2f} samples/s", flush=True)
    pipe = pipeline(make_config(target, data, root / "out-ray", args.steps, args.micro_batch_size, "ray"))
    slower = min(inf, tr)
    row = {"inference_alone": inf, "training_alone": tr, "pipeline": pipe["samples_per_s"],
           "fraction_of_slower_stage": pipe["samples_per_s"] / slower, **{f"pipeline_{k}": v for k, v in pipe.items()},
           "steps": args.steps, "micro_batch_size": args.micro_batch_size, "seq": args.seq,
           "hidden": args.hidden, "layers": args.layers, "gpu": torch.cuda.get_device_name(0)}
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))
    print("\n| stage | samples/s |\n| --- | --- |")
    print(f"| inference alone (GPU 0, engine: hf target + parallel shm puts) | {inf:.2f} |")
    print(f"| training alone (GPU 1, batches resident on the GPU) | {tr:.2f} |")
    print(f"| pipeline (Ray, steady state: last {pipe['window_steps']} steps) | {pipe['samples_per_s']:.2f} |")
    print(f"| pipeline / slower stage | **{pipe['samples_per_s'] / slower:.2f}** (goal >= 0.9) |")
    print(f"| trained in the window (incl. {pipe['buffer_drained']} samples drained from the buffer) | "
          f"{pipe['trained_per_s']:.2f} |")
    print(f"| trainer idle waiting for batches | {pipe['data_wait_share']:.1%} of the steady state |")
    print(f"| trainer step (compute, in the pipeline) | {pipe['step_s'] * 1e3:.0f} ms |")
    print(f"| first steps (compile warm-up, not in the window) | {pipe['first_steps_s']:.1f} s |")
    print(f"| staging per step (prefetch thread) | {pipe['stage_s_per_step'] * 1e3:.0f} ms, of which "
          f"{pipe['stage_read_s_per_step'] * 1e3:.0f} ms reading the store |")

if __name__ == "__main__":
    main()
