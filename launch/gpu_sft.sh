#!/usr/bin/env bash
# Launch sail_dist on NVIDIA GPUs (DeepSpeed ZeRO-2 backend) with torchrun: one node or many.
#
#   bash launch/gpu_sft.sh [--stage NAME] [CONFIG] [key.sub=value ...]
#
# --stage picks a stage of the SAIL-VL2 recipe (`python -m sail_dist --list-stages`; docs/recipe.md).
#
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT on every node (same values except NODE_RANK).
# GPUs per node are detected (override with NPROC_PER_NODE). With no GPU the same script runs the
# same backend on CPU (DeepSpeed's CPU accelerator + gloo), 2 processes by default. On GPUs train.compile=true is
# the default (later key=value arguments override it).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/common.sh"

sail_parse_args configs/demo/demo.yaml "$@"

defaults=()
if sail_detect_gpus; then
  detected=$NGPU
  defaults=(train.compile=true)  # per-block torch.compile: 1.6x tokens/s at 2B (BENCHMARKS.md); train.compile=false to skip
else
  detected="${CPU_RANKS:-2}"
  echo "gpu_sft.sh: no NVIDIA GPU found; running the GPU backend on CPU (gloo) with $detected processes" >&2
fi
NPROC_PER_NODE="${NPROC_PER_NODE:-$detected}"

sail_torchrun "$NPROC_PER_NODE" ${STAGE_ARGS[@]+"${STAGE_ARGS[@]}"} --config "$CONFIG" backend.name=gpu \
  ${defaults[@]+"${defaults[@]}"} ${ARGS[@]+"${ARGS[@]}"}
