#!/usr/bin/env bash
# The quality measurements of docs/quality.md and docs/gemma3.md in one GPU session on the lent
# device machine (benchmarks/README.md): started in the background by the first call whose chunks
# hold the SmolLM2 GGUF (tools/carry.py), it waits for each input as later calls bring it.
#
#   1. regeneration speed, HF generate dynamic vs static cache (same prompts, one process)
#   2. the target's answers regenerated for 45 s with the faster path
#   3. the SmolLM2 curve run (regenerated answers + all of ShareGPT, checkpoints timed) beside
#      Gemma 3 270M's EAGLE-3 and DFlash trainings (quality.py), on the same GPU
#   4. exports of the curve checkpoints nearest 3, 6 and 10 minutes, MT-bench at K = 3, 7; Gemma's evals
#
# Usage (on the device, repo root): setsid bash benchmarks/gpu_session_quality.sh STAGE RESULTS &
# Budgets (seconds, environment): CURVE_DEADLINE, CURVE_EVAL_DEADLINE, GEMMA_TRAIN_DEADLINE,
# GEMMA_EVAL_DEADLINE, REGEN_SECONDS; CURVE_STEPS and GEMMA_STEPS set the LR schedules.
# GEMMA_SITE: a --target folder with transformers >= 5.18 for Gemma's steps (the image's 5.17 builds
# Gemma 3's GGUF tokenizer as Unigram without its merges; convert_gguf refuses that).
set -u
STAGE=${1:-/tmp/stage}
RESULTS=${2:-/tmp/results}
CURVE_STEPS=${CURVE_STEPS:-2000}
GEMMA_STEPS=${GEMMA_STEPS:-300}
CURVE_DEADLINE=${CURVE_DEADLINE:-540}
CURVE_EVAL_DEADLINE=${CURVE_EVAL_DEADLINE:-400}
GEMMA_TRAIN_DEADLINE=${GEMMA_TRAIN_DEADLINE:-480}
GEMMA_EVAL_DEADLINE=${GEMMA_EVAL_DEADLINE:-300}
REGEN_SECONDS=${REGEN_SECONDS:-45}
GEMMA=(--data /tmp/q/quality --model /tmp/gemma --recipe configs/gemma3-270m-sharegpt.toml --chat-template gemma
       --work /tmp/qgemma --variants all-lr1e-3,all-dflash --set training.max_steps="$GEMMA_STEPS"
       --eval-parallel 4 --ks 3,7 --out "$RESULTS/quality_gemma3.json")
F=$STAGE/files
Q=/tmp/q/quality
mkdir -p "$RESULTS" /tmp/q
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
wait_for() { while [ ! -f "$1" ]; do sleep 2; done; }
stamp() { echo "=== $(date +%T) $*"; }

wait_for "$F/quality.tar"
wait_for "$F/SmolLM2-135M-Instruct.Q4_1.gguf"
tar -xf "$F/quality.tar" -C /tmp/q
ln -sf "$F/SmolLM2-135M-Instruct.Q4_1.gguf" "$Q/"
curve() { python3 benchmarks/quality_curve.py "$@" --data "$Q" --model /tmp/smollm2 --work /tmp/curve \
  --sharegpt /tmp/curve/sharegpt-all.jsonl --runs best --steps "$CURVE_STEPS" --save-every 200; }

stamp bench; curve bench --bench-prompts 512 --bench-batch 256
cp /tmp/curve/bench.json "$RESULTS/regen_speed.json"
# SKIP_CURVE=1: the regeneration bench and Gemma only (a session short of device time)
[ "${SKIP_CURVE:-0}" = 1 ] || { stamp regen; curve regen --regen-seconds "$REGEN_SECONDS" --regen-batch 512; }
wait_for "$F/sharegpt.jsonl.xz"
python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('$F/sharegpt.jsonl.xz'), open('/tmp/curve/sharegpt-all.jsonl', 'wb'))"
# Gemma's target, converted on the CPU while the curve trains
gemma_env() { [ -n "${GEMMA_SITE:-}" ] && export PYTHONPATH="$GEMMA_SITE${PYTHONPATH:+:$PYTHONPATH}"; true; }
( wait_for "$F/gemma-3-270m-q4_k_m.gguf"; gemma_env
  nice -n 19 python3 -c "from pathlib import Path; from specforge_core.reference import convert_gguf; \
convert_gguf(Path('$F/gemma-3-270m-q4_k_m.gguf'), Path('/tmp/gemma'))" > /tmp/gemma-convert.log 2>&1 \
    || { stamp "gemma conversion refused:"; tail -n 3 /tmp/gemma-convert.log; }
  gzip -1 -c /tmp/curve/sharegpt-all.jsonl > "$Q/sharegpt-all.jsonl.gz"
  touch /tmp/gemma.ready ) &
# The curve run and Gemma's two trainings share the GPU (device time is short): the curve's GPU time
# is counted as its wall time (a lower bound on what it gets alone), Gemma's as quality.py's shares.
( wait_for /tmp/gemma.ready; gemma_env; stamp gemma train
  python3 benchmarks/quality.py run --stage train "${GEMMA[@]}" --train-deadline "$GEMMA_TRAIN_DEADLINE" > /tmp/gemma.log 2>&1
  stamp gemma eval; python3 benchmarks/quality.py run --stage eval "${GEMMA[@]}" --eval-deadline "$GEMMA_EVAL_DEADLINE" >> /tmp/gemma.log 2>&1
  stamp gemma done ) &
if [ "${SKIP_CURVE:-0}" != 1 ]; then
  stamp train; curve train --train-deadline "$CURVE_DEADLINE"
  stamp eval; curve eval --minutes 3,6,10 --ks 3,7 --eval-parallel 4 --eval-deadline "$CURVE_EVAL_DEADLINE" --out "$RESULTS/quality_curve.json" --plot "$RESULTS/quality_curve.png"
fi
wait
stamp all done
