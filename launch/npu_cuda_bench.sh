#!/usr/bin/env bash
# The NPU backend's Megatron path (PP 2, then EP 2) against the GPU backend (ZeRO-2, DP 2) on 2 devices: a reduced
# SAIL-VL2-A3B (real widths, few layers), the same synthetic global batches, bf16 on CUDA. Prints loss-curve gaps
# and tokens/s, then one JSON line (sail_dist/bench/npu_cuda.py).
#
#   bash launch/npu_cuda_bench.sh [STEPS=50] [SIZE=a3b] [extra args for `npu_cuda run`, e.g. --npu-opset gpu]
#
# Without CUDA it runs the same three layouts on CPU over gloo (use SIZE=tiny there). OUT_DIR keeps the JSONs.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/common.sh"

STEPS="${1:-50}"
SIZE="${2:-a3b}"
shift 2 || shift $# || true
OUT_DIR="${OUT_DIR:-$(mktemp -d -t sail_npu_cuda.XXXXXX)}"
mkdir -p "$OUT_DIR"
sail_detect_gpus || true

for layout in gpu pp2 ep2; do
  echo "npu_cuda_bench.sh: $layout ..." >&2
  torchrun --nproc_per_node 2 --nnodes 1 --master_addr 127.0.0.1 \
    --master_port "$(sail_free_port)" \
    -m sail_dist.bench.npu_cuda run "$OUT_DIR/$layout.json" --layout "$layout" --size "$SIZE" --steps "$STEPS" "$@"
done
python3 -m sail_dist.bench.npu_cuda report "$OUT_DIR/gpu.json" "$OUT_DIR/pp2.json" "$OUT_DIR/ep2.json"
