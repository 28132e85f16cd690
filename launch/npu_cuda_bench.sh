#!/usr/bin/env bash
# The NPU backend's Megatron path against the GPU backend (ZeRO-2, DP = NPROC) on NPROC devices: a reduced
# SAIL-VL2-A3B (real widths, few layers), the same synthetic global batches, bf16 on CUDA. Prints loss-curve gaps,
# tokens/s and the pipeline idle share against the 1F1B theory, then one JSON line (sail_dist/bench/npu_cuda.py).
#   NPROC=2: PP 2, EP 2 (4 micro-batches per step)
#   NPROC=4: PP 2 x EP 2 and its no-pipeline reference EP 2 (8 micro-batches per step)
#   NPROC=8: PP 4 x EP 2, PP 2 x EP 4 and their references EP 2, EP 4 (16 micro-batches per step)
#
#   [NPROC=2] bash launch/npu_cuda_bench.sh [STEPS=50] [SIZE=a3b] [extra args for `npu_cuda run`, e.g. --npu-opset gpu]
#
# Without CUDA it runs the same layouts on CPU over gloo (use SIZE=tiny there). OUT_DIR keeps the JSONs.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/common.sh"

STEPS="${1:-50}"
SIZE="${2:-a3b}"
shift 2 || shift $# || true
OUT_DIR="${OUT_DIR:-$(mktemp -d -t sail_npu_cuda.XXXXXX)}"
mkdir -p "$OUT_DIR"
sail_detect_gpus || true

NPROC="${NPROC:-2}"
case "$NPROC" in
  2) layouts=(gpu pp2 ep2) G=4 ;;
  4) layouts=(gpu ep2 pp2ep2) G=8 ;;
  8) layouts=(gpu ep2 ep4 pp4ep2 pp2ep4) G=16 ;;
  *) echo "npu_cuda_bench.sh: NPROC must be 2, 4 or 8 (got $NPROC)" >&2; exit 2 ;;
esac
for layout in "${layouts[@]}"; do
  echo "npu_cuda_bench.sh: $layout on $NPROC devices ..." >&2
  torchrun --nproc_per_node "$NPROC" --nnodes 1 --master_addr 127.0.0.1 \
    --master_port "$(sail_free_port)" \
    -m sail_dist.bench.npu_cuda run "$OUT_DIR/$layout.json" --layout "$layout" --size "$SIZE" --steps "$STEPS" \
    --global-micro-batches "$G" "$@"
done
python3 -m sail_dist.bench.npu_cuda report $(printf "$OUT_DIR/%s.json " "${layouts[@]}")
