#!/usr/bin/env bash
# Every GPU figure of the project, on a bare GPU machine with this repository.
#
#   bash bench/gpu.sh                 # all parts: smoke, rollout, update, real
#   bash bench/gpu.sh smoke real      # some of them
#
# Time (one H200, 2026-11-26): smoke's stages 1-5 took 3 min 40 s and stage 6 26 s; rollout 3 min 41 s; update
# 20 s; real's three settings need over 5 min. All parts do not fit one 10-minute device call: run
# `bash bench/gpu.sh real update` and `bash bench/gpu.sh smoke rollout` as two calls.
#
# Parts:
#   smoke    every stage on CUDA with the embedded default: a short stage 1, stages 2-4, a short GRPO run, the
#            CRM of its rollouts (the paper's recipe), short CORA and sum runs, the guard, LoRA, stage 6.
#   rollout  bench/bench_rollout.py at the Qwen2-VL-2B shape, GRPO's group setting: ours-fast, ours-fast with
#            transformers' attention (heads repeated, batch 64), generate, generate static (batch 64); a profile.
#   update   bench/bench_update.py at the Qwen2-VL-2B shape: the update's forward + backward with each prompt run
#            once per group against once per row.
#   real     bench/real_size.py: two GRPO steps at the Qwen2.5-VL-3B and -7B shapes (random weights) with the
#            memory plan's recommended flags: peak memory next to the plan, seconds per step, and the bf16
#            gap between the sampler's log-probs and the update's.
#
# Python packages: the GPU image has torch but not `datasets`, and another transformers than requirements.txt.
# Wheels in .whl/ (made on a machine with pip: see bench/gpu_wheels.sh) are installed to /tmp/site first.
# Logs go to $OUT when it is set (the device tool's output folder), else to runs/gpu/.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=${OUT:-runs/gpu}
mkdir -p "$LOGS"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5
PARTS=${*:-smoke rollout update real}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 - <<'EOF' 2>&1 | tee "$LOGS/versions.txt"
import torch, transformers, datasets, peft
print("torch", torch.__version__, "transformers", transformers.__version__, "datasets", datasets.__version__,
      "peft", peft.__version__, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
EOF

part() {  # part NAME COMMAND...: run one part, time it, keep going if it fails
  local name=$1; shift
  echo "== $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee "$LOGS/$name.log" | grep -vE "it/s\]|s/it\]|Loading weights|Writing model" | tail -n 40
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

for p in $PARTS; do
  case $p in
    smoke)
      R="--runs-dir runs/gpu_smoke"
      part smoke_stage1 python3 01_sft_rm.py $R --sft-steps 150 --crm-steps 400 --crm-rollout-prompts 200
      part smoke_stages2to4 bash -c "python3 02_rollout.py $R && python3 03_rewards.py $R && python3 04_hras.py $R"
      part smoke_stage5_grpo python3 05_grpo_train.py $R --advantage grpo --steps 10 --prompts-per-step 16 --overwrite
      # the paper's recipe: the CRM of the GRPO run's rollouts (crm_rl), which CORA and sum then take
      part smoke_stage1_crm_rl python3 01_sft_rm.py $R --crm-rollouts runs/gpu_smoke/default/grpo_seed0/rollouts.jsonl \
        --crm-steps 400
      for m in hras sum; do
        part "smoke_stage5_$m" python3 05_grpo_train.py $R --advantage $m --steps 10 --prompts-per-step 16 --overwrite
      done
      # the guard on CUDA: --drift-warn 0 refreshes the CRM at every disagreement (an fp32 CRM trained in the loop)
      part smoke_stage5_guard python3 05_grpo_train.py $R --advantage hras --steps 5 --crm-refresh --drift-warn 0 \
        --name guard_seed0 --overwrite
      part smoke_stage5_lora python3 05_grpo_train.py $R --advantage hras --steps 5 --lora-rank 8 --kl-beta 0.05 \
        --name lora_seed0 --overwrite
      part smoke_stage6 python3 06_eval.py $R --n 200
      ;;
    rollout)
      part rollout python3 bench/bench_rollout.py --shape 2b --new-tokens 256 --quick --settings group \
        --columns fast,repeat,generate,static --static-batches 64 --repeat-batches 64 --profile
      ;;
    update)
      part update python3 bench/bench_update.py --shape 2b --prompts 2 --new-tokens 512
      ;;
    real)
      part real python3 bench/real_size.py
      ;;
    *) echo "unknown part $p (smoke, rollout, update, real)"; exit 2 ;;
  esac
done
