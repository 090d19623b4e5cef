#!/usr/bin/env bash
# Every GPU benchmark the issues ask for, in one go: JSON and logs land in $OUT.
#   on the GPU machine:  bash benchmarks/run_gpu.sh            (OUT is set by the device tool)
#   dry run on a CPU:    TINY=1 OUT=/tmp/gpu-dry bash benchmarks/run_gpu.sh
set -u
OUT=${OUT:-benchmarks/results/local}
mkdir -p "$OUT"
if [ -d .whl ]; then  # bitsandbytes is not on the GPU image: it travels as a wheel
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ "${TINY:-0}" = 1 ]; then
  DEVICE=cpu; SERVE_BASE=builtin:tiny-llama; SERVE_SHAPE=(--batch 4 --new-tokens 4 --prompt-len 32)
  SEED_MODEL=(--set model.name=builtin:tiny-mt5); TRICKS_MODEL=(--set model.name=builtin:tiny-llama --set data.max_length=64)
  STEPS=(--steps 2 --warmup 1 --eval-batches 1)
else
  DEVICE=cuda; SERVE_BASE=random:TinyLlama/TinyLlama-1.1B-Chat-v1.0; SERVE_SHAPE=(--batch 32)
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

run bench_serve 240 python3 -m adapterhub bench serve --device "$DEVICE" --base "$SERVE_BASE" --adapters 8 \
  "${SERVE_SHAPE[@]}" --json
run bench_train_seed 240 python3 -m adapterhub bench train recipes/seed/*.yaml --random --baseline \
  "${SEED_MODEL[@]}" "${STEPS[@]}" --json
run bench_train_tricks 180 python3 -m adapterhub bench train benchmarks/recipes/tricks/*.yaml --random \
  "${TRICKS_MODEL[@]}" "${STEPS[@]}" --json
