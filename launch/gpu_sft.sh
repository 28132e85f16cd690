#!/usr/bin/env bash
# Launch sail_dist on NVIDIA GPUs (DeepSpeed ZeRO-2 backend) with torchrun: one node or many.
#
#   bash launch/gpu_sft.sh [--stage NAME] [CONFIG] [key.sub=value ...]
#
# --stage picks a stage of the SAIL-VL2 recipe (`python -m sail_dist --list-stages`; docs/recipe.md).
#
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT on every node (same values except NODE_RANK).
# GPUs per node are detected (override with NPROC_PER_NODE). With no GPU the same script runs the
# same backend on CPU (DeepSpeed's CPU accelerator + gloo), 2 processes by default. train.compile stays as the config
# has it (default false): with the GPU OpSet's Triton RMSNorm / RoPE / SwiGLU the eager 2B step measured as fast as
# the compiled one on an H200, without the compile's ~20 s first step (BENCHMARKS.md, "Second round, session 3").
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/common.sh"

sail_parse_args configs/demo/demo.yaml "$@"

if sail_detect_gpus; then
  detected=$NGPU
else
  detected="${CPU_RANKS:-2}"
  echo "gpu_sft.sh: no NVIDIA GPU found; running the GPU backend on CPU (gloo) with $detected processes" >&2
fi
NPROC_PER_NODE="${NPROC_PER_NODE:-$detected}"

sail_torchrun "$NPROC_PER_NODE" ${STAGE_ARGS[@]+"${STAGE_ARGS[@]}"} --config "$CONFIG" backend.name=gpu \
  ${ARGS[@]+"${ARGS[@]}"}
