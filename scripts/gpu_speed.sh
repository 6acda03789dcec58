#!/usr/bin/env bash
# Issue 18's GPU figures in one short run (about 8 minutes on one H100; every step has its own time limit, so a slow
# step loses only its own output). Random-weight LLaVA-1.5-7B architecture (configs/arch), float16, offline:
#   1. scoring overhead, CLIP-L/336 at batch 1 in float16, and the selection alone before vs after (item 5)
#      -> results/efficiency/scoring_overhead_clip-l-336_cuda_issue18.json
#   2. prefill and generated tokens/s at batch 1 / 8 / 32 next to the roofline bound (item 3)
#      -> results/efficiency/llava15_7b-cuda-float16-b{1,8,32}/ and llava15_7b-cuda-float16-batches/tokens_per_s.md
#   3. lmms-eval throughput, eager vs compile=true, none vs hiprune 192 / 64, answers forced to POPE / GQA / MME
#      lengths, batch 1 / 8 / 32 (item 2) -> results/efficiency/eval_throughput_llava15_7b-cuda-float16.{json,md}
#   4. issue 19's rows at real shapes on a GPU: eval.bench on Qwen3-VL-8B, LLaVA-OneVision-7B and InternVL3-8B
#      (bfloat16, the default 384 x 768 image; none, hiprune, random, divprune, fastv at 0.334 / 0.112)
#      -> results/efficiency/{qwen3vl_8b,llava_onevision_7b,internvl3_8b}-cuda-bfloat16/ (not part of the default STEPS)
# Needs the offline assets the tools read (git-ignored, so carried to the device machine): assets/tiny-llava (the
# tokenizer and processor of the random-weight model) and assets/scene_tasks (600 scene images and prompts).
#   bash scripts/gpu_speed.sh                 # everything, ~8 min
#   STEPS="1 2" bash scripts/gpu_speed.sh     # some steps
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
STEPS=${STEPS:-"1 2 3"}
OUT=results/efficiency
status=0
step() {  # step <seconds> <command...>: run with a time limit, report, go on
  local limit=$1; shift
  echo "[gpu_speed] $(date -u +%H:%M:%S) (limit ${limit}s): $*"
  timeout --signal=INT --kill-after=15 "$limit" "$@"
  local rc=$?
  echo "[gpu_speed] $(date -u +%H:%M:%S) exit $rc"
  [ $rc -eq 0 ] || status=$rc
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for s in $STEPS; do
  case $s in
    1) step 90 "$PY" -m eval.efficiency.scoring --device cuda --dtype float16 --shape clip-l-336 --repeats 20 \
         --warmup 5 --no-memory --selection-repeats 300 --json "$OUT/scoring_overhead_clip-l-336_cuda_issue18.json" ;;
    2) step 210 "$PY" -m eval.efficiency.bench model=llava15_7b bench_profile=gpu "batch_sizes=[1,8,32]" \
         "only=[none,hiprune]" "budgets=[192,64]" repeats=5 new_tokens=16 flops_measured=false \
         include_registered=false ;;
    3) step 200 "$PY" -m eval.efficiency.throughput --model llava15_7b --device cuda --batch-sizes 1 8 32 \
         --limit 64 --eval-task hiprune_scene_pope --modes eager compiled --methods none hiprune:192 hiprune:64 \
         --tasks pope gqa mme --time-budget 150 ;;
    4) for m in qwen3vl_8b llava_onevision_7b internvl3_8b; do
         step 150 "$PY" -m eval.efficiency.bench model=$m bench_profile=gpu model.dtype=bfloat16 \
           "only=[none,hiprune,random,divprune,fastv]" "budgets=[0.334,0.112]" repeats=5 new_tokens=16 \
           cuda_graphs=false include_registered=false "+method@methods.fastv=fastv" \
           "+method@methods.divprune=divprune" methods.fastv.options.budget_mode=keep_after
       done ;;
    *) echo "[gpu_speed] unknown step $s"; status=2 ;;
  esac
done
exit $status
