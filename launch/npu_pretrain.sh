#!/usr/bin/env bash
# Launch sail_dist on Ascend NPUs (NPU backend: Megatron-core + MindSpeed + torch_npu fused ops) with torchrun:
# one node or many.
#
#   bash launch/npu_pretrain.sh [--stage NAME] [CONFIG] [key.sub=value ...]
#
# --stage picks a stage of the SAIL-VL2 recipe (`python -m sail_dist --list-stages`; docs/recipe.md).
#
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT on every node (same values except NODE_RANK); on
# clusters with several NICs also HCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME. NPUs per node are detected with
# npu-smi (override with NPROC_PER_NODE; ASCEND_RT_VISIBLE_DEVICES selects devices). With no NPU the same
# script runs the same backend on CPU (gloo + the emulated torch_npu ops), PP x EP x DP processes from the
# config (parallel.dp=0 counts as 1 there), which is how CI tests this script.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/common.sh"

sail_parse_args configs/demo/npu_tiny_moe.yaml "$@"

# ---- Ascend environment (CANN toolkit, then the ATB/NNAL libraries when present) ------------------------
for f in /usr/local/Ascend/ascend-toolkit/set_env.sh /usr/local/Ascend/cann/set_env.sh; do
  if [ -f "$f" ]; then
    set +u; source "$f"; set -u  # CANN's scripts read unset variables
    break
  fi
done
if [ -f /usr/local/Ascend/nnal/atb/set_env.sh ]; then
  set +u; source /usr/local/Ascend/nnal/atb/set_env.sh; set -u
fi

npus=0
if command -v npu-smi >/dev/null 2>&1; then
  # `npu-smi info -l` lists each card ("NPU ID : n") with its "Chip Count" (1 on A2 / 910B, 2 on A3 cards):
  # one process per chip.
  npus=$(npu-smi info -l 2>/dev/null | awk -F: '/NPU ID/ {cards++} /Chip Count/ {chips += $2}
                                               END {print (chips > 0 ? chips : cards + 0)}' || echo 0)
fi

if [ "$npus" -gt 0 ]; then
  if [ -n "${ASCEND_RT_VISIBLE_DEVICES:-}" ]; then
    npus=$(echo "$ASCEND_RT_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
  else
    export ASCEND_RT_VISIBLE_DEVICES="$(seq -s, 0 $((npus - 1)))"
  fi
  detected="$npus"
  # HCCL: generous timeouts for first-step graph compilation and large jobs; per-communicator buffer (MB).
  export HCCL_CONNECT_TIMEOUT="${HCCL_CONNECT_TIMEOUT:-1800}"
  export HCCL_EXEC_TIMEOUT="${HCCL_EXEC_TIMEOUT:-3600}"
  export HCCL_BUFFSIZE="${HCCL_BUFFSIZE:-400}"
  export HCCL_WHITELIST_DISABLE="${HCCL_WHITELIST_DISABLE:-1}"
  # Runtime: expandable segments against fragmentation, the async task queue, NUMA-aware CPU binding.
  export PYTORCH_NPU_ALLOC_CONF="${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}"
  export TASK_QUEUE_ENABLE="${TASK_QUEUE_ENABLE:-2}"
  export CPU_AFFINITY_CONF="${CPU_AFFINITY_CONF:-1}"
  export COMBINED_ENABLE="${COMBINED_ENABLE:-1}"
  export ASCEND_LAUNCH_BLOCKING="${ASCEND_LAUNCH_BLOCKING:-0}"
  # Megatron checks it; meaningless on NPU (MindSpeed-MM sets it too).
  export CUDA_DEVICE_MAX_CONNECTIONS=1
else
  # No NPU: the whole parallel layout of the config on this machine, over gloo.
  detected=$(python3 - "$CONFIG" "${STAGE_ARGS[1]:-}" ${ARGS[@]+"${ARGS[@]}"} <<'PY'
import sys
from sail_dist.config import ConfigError, load_config
try:
    cfg = load_config(sys.argv[1], [a for a in sys.argv[3:] if "=" in a], stage=sys.argv[2] or None)
except ConfigError as e:
    print(f"sail-train: {e}", file=sys.stderr)
    sys.exit(2)
p = cfg.parallel
print(p.pp * max(p.dp, p.ep, 1))
PY
)
  echo "npu_pretrain.sh: no Ascend NPU found; running the NPU backend on CPU (gloo, emulated torch_npu ops) with" \
       "$detected processes" >&2
fi
NPROC_PER_NODE="${NPROC_PER_NODE:-$detected}"

sail_torchrun "$NPROC_PER_NODE" ${STAGE_ARGS[@]+"${STAGE_ARGS[@]}"} --config "$CONFIG" backend.name=npu \
  ${ARGS[@]+"${ARGS[@]}"}
