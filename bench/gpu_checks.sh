#!/usr/bin/env bash
# The GPU checks, in one go, for a machine with one NVIDIA GPU (figures in BENCHMARKS.md), most
# important first, each under a timeout cut to what is left of BUDGET seconds (default 540):
#  1. bench/trainer_gpu.py: the Trainer's own GPU path (bf16 autocast, fp32 weights, tokens/s, MFU)
#  2. bench/trainer_speed.py --device cuda: our step vs transformers' Llama, bf16 autocast, ~50M params
#  3. experiments/pbt_gpu.yaml, shortened: 8 members at num_gpus 0.125 packed on the one GPU by Ray,
#     with nvidia-smi's list of compute processes sampled while it runs
#  4. step 1 with train.compile
#  5. step 2 with torch.compile
# usage: bench/gpu_checks.sh OUTDIR [BUDGET]   (python3 must have torch with CUDA, transformers, ray, pydantic)
set -u
out=${1:?usage: bench/gpu_checks.sh OUTDIR [BUDGET]}
budget=${2:-540}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$SECONDS
left() { local l=$((budget - (SECONDS - start))); ((l > $1)) && l=$1; ((l < 1)) && l=1; echo $l; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
echo "== 1. trainer_gpu eager [t=$((SECONDS - start))s]"
timeout "$(left 100)" python3 bench/trainer_gpu.py 2>&1 | tee "$out/trainer_gpu.txt"
echo "== 2. trainer_speed eager [t=$((SECONDS - start))s]"
timeout "$(left 100)" python3 bench/trainer_speed.py --device cuda --steps 30 2>&1 | tee "$out/speed_eager.txt"
echo "== 3. pbt_gpu: 8 members x 0.125 GPU [t=$((SECONDS - start))s]"
( while sleep 2; do date +%T; nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader; done ) \
    > "$out/gpu_apps.txt" 2>&1 &
sampler=$!
timeout "$(left 180)" python3 -m experiments run experiments/pbt_gpu.yaml --storage /tmp/evo-runs \
    --set population.total_steps=500 --set population.interval_steps=250 --set data.max_bytes=4000000 \
    --set logging.wandb.mode=disabled --set logging.optuna=false > "$out/pbt_gpu.txt" 2>&1
echo "exit $?"; tail -25 "$out/pbt_gpu.txt"
kill $sampler
python3 -m experiments status pbt_gpu --storage /tmp/evo-runs --json > "$out/pbt_gpu_status.json" 2>&1
echo "most compute processes seen at once: $(awk '/^[0-9][0-9]:/{if(n>m)m=n;n=0;next}{n++}END{if(n>m)m=n;print m}' "$out/gpu_apps.txt")"
echo "== 4. trainer_gpu compiled [t=$((SECONDS - start))s]"
timeout "$(left 130)" python3 bench/trainer_gpu.py --compile --steps 30 2>&1 | tee "$out/trainer_gpu_compile.txt"
echo "== 5. trainer_speed compiled [t=$((SECONDS - start))s]"
timeout "$(left 150)" python3 bench/trainer_speed.py --device cuda --steps 30 --compile 2>&1 | tail -6 | tee "$out/speed_compile.txt"
echo "== done [t=$((SECONDS - start))s]"
