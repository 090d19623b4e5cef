#!/usr/bin/env bash
# The GPU benchmarks the issues ask for: JSON and logs land in $OUT.
#   on the GPU machine:  bash benchmarks/run_gpu.sh [serve] [many] [seed] [cudagraphs] [tricks]   (default: all)
#   dry run on a CPU:    TINY=1 OUT=/tmp/gpu-dry bash benchmarks/run_gpu.sh seed
set -u
OUT=${OUT:-benchmarks/results/local}
SUITES=" ${*:-serve many seed cudagraphs tricks} "
mkdir -p "$OUT"
if [ -d .whl ]; then  # bitsandbytes is not on the GPU image: it travels as a wheel
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ "${TINY:-0}" = 1 ]; then
  DEVICE=cpu; SERVE_BASE=builtin:tiny-llama; SERVE_SHAPE=(--batch 4 --new-tokens 4 --prompt-len 32)
  DISTINCT_SHAPE=(--distinct 4 --batch 4 --new-tokens 4 --prompt-len 32 --rounds 2)
  ZIPF_SHAPE=(--distinct 2 --registered 16 --slots 4 --batch 4 --new-tokens 4 --prompt-len 32 --rounds 4)
  SEED_MODEL=(--set model.name=builtin:tiny-mt5); TRICKS_MODEL=(--set model.name=builtin:tiny-llama --set data.max_length=64)
  STEPS=(--steps 2 --warmup 1 --eval-batches 1)
else
  DEVICE=cuda; SERVE_BASE=random:TinyLlama/TinyLlama-1.1B-Chat-v1.0; SERVE_SHAPE=(--batch 32)
  # Issue 17's GPU workloads: 64 distinct LoRAs (r=16, all seven projections) in one batch, and
  # 1,000 registered q/v LoRAs under Zipf traffic through 64 device slots.
  DISTINCT_SHAPE=(--distinct 64 --batch 64 --rounds 2)
  ZIPF_SHAPE=(--distinct 8 --registered 1000 --slots 64 --batch 8 --rounds 24)
  SEED_MODEL=(); TRICKS_MODEL=(); STEPS=(--steps 20 --warmup 3 --eval-batches 10)
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)"
} > "$OUT/env.txt" 2>&1

run() {  # name, time limit, command...
  local name=$1 limit=$2; shift 2
  local started=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
  echo "$name: exit $? in $((SECONDS - started))s" | tee -a "$OUT/env.txt"
}

if [[ $SUITES == *" serve "* ]]; then
  run bench_serve 240 python3 -m adapterhub bench serve --device "$DEVICE" --base "$SERVE_BASE" --adapters 8 \
    "${SERVE_SHAPE[@]}" --json
fi
if [[ $SUITES == *" many "* ]]; then
  run bench_serve_distinct 240 python3 -m adapterhub bench serve --device "$DEVICE" --base "$SERVE_BASE" \
    "${DISTINCT_SHAPE[@]}" --json
  run bench_serve_registered 300 python3 -m adapterhub bench serve --device "$DEVICE" --base "$SERVE_BASE" \
    "${ZIPF_SHAPE[@]}" --skew zipf --targets q_proj,v_proj --rank 8 --json
fi
if [[ $SUITES == *" seed "* || $SUITES == *" cudagraphs "* ]]; then
  # The seed recipes compile mt0-large, which takes minutes per recipe. Compile all five at once first,
  # one process each, to fill the inductor cache; the timed runs below then load cached kernels.
  started=$SECONDS
  for recipe in recipes/seed/*.yaml; do
    timeout 240 python3 -m adapterhub bench train "$recipe" --random "${SEED_MODEL[@]}" \
      --steps 1 --warmup 1 --eval-batches 1 --json > /dev/null 2>> "$OUT/bench_train_seed_warm.log" &
  done
  wait
  echo "seed compile warm-up: $((SECONDS - started))s" | tee -a "$OUT/env.txt"
fi
if [[ $SUITES == *" seed "* ]]; then
  run bench_train_seed 300 python3 -m adapterhub bench train recipes/seed/*.yaml --random --baseline \
    "${SEED_MODEL[@]}" "${STEPS[@]}" --json
fi
if [[ $SUITES == *" cudagraphs "* ]]; then  # the same step replayed as CUDA graphs
  run bench_train_seed_cudagraphs 240 python3 -m adapterhub bench train recipes/seed/*.yaml --random \
    --set training.compile_mode=reduce-overhead "${SEED_MODEL[@]}" "${STEPS[@]}" --json
fi
if [[ $SUITES == *" tricks "* ]]; then
  run bench_train_tricks 180 python3 -m adapterhub bench train benchmarks/recipes/tricks/*.yaml --random \
    "${TRICKS_MODEL[@]}" "${STEPS[@]}" --json
fi
