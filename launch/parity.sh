#!/usr/bin/env bash
# Backend parity: the same tiny MoE VLM on the same demo data for N steps on the GPU backend (DeepSpeed ZeRO-2,
# DP 2: 2 processes) and on the NPU backend (Megatron PP 2 x EP 2, DP 2: 4 processes), then a table of per-step
# losses and every parameter's gradient at step 1 compared tensor by tensor (max |npu - gpu| / max |gpu|, per
# layer; norms side by side as the summary), and one JSON line. Exit status 1 when the backends disagree beyond
# the tolerances (loss 1e-5, gradient tensors 1e-5, relative; fp32).
#
#   bash launch/parity.sh [STEPS] [CONFIG] [--stage NAME] [key.sub=value ...]
#
# --stage NAME compares that stage of the recipe (its trainable modules, objective and data rules) on both backends;
# an RL stage (rl_verifiable, rl_mixed) one episode of STEPS policy updates (sail_dist/bench/parity.py).
#
# Runs on CPU (gloo; emulated torch_npu ops on the NPU side), which is what CI checks. OUT_DIR (default: a
# temporary directory) keeps the two runs' JSON files.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/common.sh"

STEPS="${1:-6}"
CONFIG="${2:-configs/demo/npu_tiny_moe.yaml}"
shift 2 || shift $# || true
extra=()
STAGE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --stage) STAGE="$2"; extra+=("train.stage=$2"); shift 2 ;;
    --stage=*) STAGE="${1#--stage=}"; extra+=("train.stage=$STAGE"); shift ;;
    *) extra+=("$1"); shift ;;
  esac
done
set -- ${extra[@]+"${extra[@]}"}
OUT_DIR="${OUT_DIR:-$(mktemp -d -t sail_parity.XXXXXX)}"
mkdir -p "$OUT_DIR"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
# fp32 everywhere, no evaluation, the same data and seed for both runs.
COMMON=(train.steps="$STEPS" train.precision=fp32 train.eval_samples=0 train.out_dir="$OUT_DIR/run" data.demo=true "$@")
case "$STAGE" in rl_*)
  # one episode of STEPS updates on the demo counting prompts (written here first), short generations
  prompts="$OUT_DIR/rl_prompts/train.jsonl"
  COMMON=("rl.prompts=[{path: $prompts}]" rl.eval_prompts=[] rl.episodes=1 rl.prompts_per_episode=4 rl.group_size=4
          rl.ppo_updates="$STEPS" rl.sampling.max_new_tokens=12 rl.sampling.max_context=512 rl.save_every=0
          rl.rollout_batch=16 train.export_hf=false train.micro_batches=1 "${COMMON[@]}")
  python3 -m sail_dist.rl.demo_task --prompts-only --config "$CONFIG" "${COMMON[@]}" >&2 ;;
esac

run() {  # run NPROC OUT overrides...
  local nproc="$1" out="$2"; shift 2
  torchrun --nproc_per_node "$nproc" --nnodes 1 --master_addr 127.0.0.1 \
    --master_port "$(sail_free_port)" \
    -m sail_dist.bench.parity run "$out" "$CONFIG" "${COMMON[@]}" "$@"
}

echo "parity.sh: GPU backend (ZeRO-2, DP 2) ..." >&2
run 2 "$OUT_DIR/gpu.json" backend.name=gpu backend.opset=auto parallel.pp=1 parallel.ep=1 parallel.vpp=1
echo "parity.sh: NPU backend (PP 2 x EP 2) ..." >&2
run 4 "$OUT_DIR/npu.json" backend.name=npu backend.opset=auto parallel.pp=2 parallel.ep=2 parallel.vpp=1
python3 -m sail_dist.bench.parity compare "$OUT_DIR/gpu.json" "$OUT_DIR/npu.json"
