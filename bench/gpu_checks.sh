#!/usr/bin/env bash
# The GPU checks, in one go, for a machine with one NVIDIA GPU (figures in BENCHMARKS.md):
#  1. bench/trainer_speed.py --device cuda: our step vs transformers' Llama, bf16 autocast, ~50M params
#  2. bench/trainer_gpu.py: the Trainer's own GPU path (bf16 autocast, fp32 weights, tokens/s, MFU)
#  3. experiments/pbt_gpu.yaml, shortened: 8 members at num_gpus 0.125 packed on the one GPU by Ray,
#     with nvidia-smi's list of compute processes sampled while it runs
#  4. step 1 with torch.compile
# usage: bench/gpu_checks.sh OUTDIR     (python3 must have torch with CUDA, transformers, ray, deap)
set -u
out=${1:?usage: bench/gpu_checks.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
echo "== 1. trainer_speed eager"
timeout 120 python3 bench/trainer_speed.py --device cuda --steps 30 2>&1 | tee "$out/speed_eager.txt"
timeout 60 python3 bench/trainer_speed.py --device cuda --steps 20 --hidden 768 --layers 8 --heads 12 \
    --kv-heads 4 --ffn 2048 --vocab 1024 --batch 64 --seq-len 1024 2>&1 | tee -a "$out/speed_eager.txt"
echo "== 2. trainer_gpu"
timeout 120 python3 bench/trainer_gpu.py 2>&1 | tee "$out/trainer_gpu.txt"
echo "== 3. pbt_gpu: 8 members x 0.125 GPU"
( while sleep 2; do date +%T; nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader; done ) \
    > "$out/gpu_apps.txt" 2>&1 &
sampler=$!
timeout 200 python3 -m experiments run experiments/pbt_gpu.yaml --storage /tmp/evo-runs \
    --set population.total_steps=500 --set population.interval_steps=250 --set data.max_bytes=4000000 \
    --set logging.wandb.mode=disabled --set logging.optuna=false 2>&1 | tail -40 | tee "$out/pbt_gpu.txt"
echo "exit ${PIPESTATUS[0]}"
kill $sampler
python3 -m experiments status pbt_gpu --storage /tmp/evo-runs --json > "$out/pbt_gpu_status.json" 2>&1
echo "most compute processes seen at once: $(awk '/^[0-9][0-9]:/{if(n>m)m=n;n=0;next}{n++}END{if(n>m)m=n;print m}' "$out/gpu_apps.txt")"
echo "== 4. trainer_speed compiled"
timeout 150 python3 bench/trainer_speed.py --device cuda --steps 30 --compile 2>&1 | tail -6 | tee "$out/speed_compile.txt"
