# Shared launcher setup (sourced by gpu_sft.sh, npu_pretrain.sh, parity.sh).
# Multi-node variables with single-node defaults; torchrun starts one process per device.
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONUNBUFFERED=1
# DeepSpeed's JIT-built ops (CPUAdam) are cached here across runs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/sail_dist/torch_extensions}"

sail_torchrun() {
  local nproc="$1"; shift
  exec torchrun --nproc_per_node "$nproc" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m sail_dist "$@"
}
