# Shared launcher setup (sourced by gpu_sft.sh, npu_pretrain.sh, parity.sh).
# Multi-node variables with single-node defaults; torchrun starts one process per device.
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
sail_free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }
MASTER_PORT="${MASTER_PORT:-$(sail_free_port)}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONUNBUFFERED=1
# DeepSpeed's JIT-built ops (CPUAdam) are cached here across runs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/sail_dist/torch_extensions}"

sail_torchrun() {
  local nproc="$1"; shift
  exec torchrun --nproc_per_node "$nproc" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m sail_dist "$@"
}

# NVIDIA GPUs visible? Sets NGPU and the CUDA environment (NVLink multicast off: it can take a shared host's
# GPUs out of service), or NGPU=0 and DeepSpeed's CPU accelerator. Returns 0 when GPUs are there.
sail_detect_gpus() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NGPU=$(nvidia-smi -L | wc -l)
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    return 0
  fi
  NGPU=0
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
  return 1
}
