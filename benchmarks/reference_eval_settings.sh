#!/usr/bin/env bash
# Every evaluation setting of docs/evaluation.md on the reference target (SmolLM2-135M-Instruct), on
# the CPU: a short-trained draft (30 steps of 240 ShareGPT conversations cut to 512 tokens), then
# the greedy chain, a dynamic tree, a sampled chain (T = 0.7) and a sampled tree (T = 1.0) on 8
# MT-bench prompts x 64 tokens. Needs `specforge reference fetch`; about 10 minutes on 2 cores.
set -eux
C="configs/smollm2-sharegpt.toml run.output_dir=${OUT_DIR:-/tmp/refdraft} training.max_steps=30
   dataset.max_samples=240 dataset.max_seq_length=512 training.dtype=fp32 inference.dtype=fp32
   model.llama-eagle3.compile=off logging.progress=false training.log_every=10"
specforge run $C
specforge eval $C --max-prompts 8 --max-new-tokens 64
specforge eval $C --max-prompts 8 --max-new-tokens 64 --tree topk=8,depth=6,tokens=64
specforge eval $C --max-prompts 8 --max-new-tokens 64 --temperature 0.7
specforge eval $C --max-prompts 8 --max-new-tokens 64 --tree topk=4,depth=4,tokens=16 --temperature 1.0
