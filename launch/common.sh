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

# torchrun's own failure report (its agent's traceback and the ChildFailedError table) repeats what the failing
# rank already said in one line (sail-train writes the full traceback to <out_dir>/logs/rank<R>.err): drop it, and
# drop the same one-line error from further ranks (a deterministic error fails every rank alike).
sail_filter_stderr() {
  awk '
    /^E[0-9]+ .*elastic\/multiprocessing\/api\.py.*failed \(exitcode/ { next }
    /^W[0-9]+ .*elastic\/multiprocessing\/api\.py.*(Sending process|Closing process)/ { next }
    drop { if ($0 ~ /^=+$/ && ++bars == 2) drop = 0; next }
    held != "" { if ($0 ~ /bin\/torchrun/) { drop = 1; bars = 0; held = ""; next } print held; held = "" }
    /^Traceback \(most recent call last\):$/ { held = $0; next }
    /^sail-train: rank [0-9]+: / {
      key = $0; sub(/^sail-train: rank [0-9]+: /, "", key); sub(/ \(traceback: [^)]*\)$/, "", key)
      if (key in seen) next; seen[key] = 1
    }
    { print; fflush() }
    END { if (held != "") print held }'
}

sail_torchrun() {
  local nproc="$1"; shift
  local rc=0
  # A bad config fails here, once, with sail-train's one-line message and exit status 2 (not once per rank).
  python3 -m sail_dist --print-config "$@" > /dev/null || return $?
  torchrun --nproc_per_node "$nproc" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m sail_dist "$@" 2> >(sail_filter_stderr >&2) || rc=$?
  wait  # for the filter to flush
  if [ "$rc" -ne 0 ]; then
    echo "$(basename "$0"): training stopped (exit status $rc): the error is above; the failing rank's traceback" \
         "is in <train.out_dir>/logs/rank<R>.err" >&2
  fi
  return "$rc"
}

# NVIDIA GPUs visible? Sets NGPU and the CUDA environment (NVLink multicast off: it can take a shared host's
# GPUs out of service), or NGPU=0 and DeepSpeed's CPU accelerator. Returns 0 when GPUs are there.
sail_detect_gpus() {
  # The GPUs this job may use: nvidia-smi lists every GPU of the node, so CUDA_VISIBLE_DEVICES, where set, narrows
  # them (empty or -1: none, the CPU path; "0,1": two ranks, not one per GPU of the node).
  NGPU=0
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NGPU=$(nvidia-smi -L | grep -c "^GPU ")
    if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
      local visible="${CUDA_VISIBLE_DEVICES// /}" ids
      case "$visible" in
        "" | -1*) NGPU=0 ;;
        *) IFS=, read -ra ids <<< "$visible"; NGPU=${#ids[@]} ;;
      esac
    fi
  fi
  if [ "$NGPU" -gt 0 ]; then
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    return 0
  fi
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
  return 1
}

# Arguments of the launch scripts: [--stage NAME] [CONFIG] [key.sub=value ...] in any order. Sets CONFIG (the first
# argument that is neither an option nor key=value; $1 default), STAGE_ARGS (--stage NAME) and ARGS (the rest).
sail_parse_args() {
  CONFIG="$1"; shift
  STAGE_ARGS=(); ARGS=()
  local seen_config=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --stage) STAGE_ARGS=(--stage "$2"); shift 2 ;;
      --stage=*) STAGE_ARGS=(--stage "${1#--stage=}"); shift ;;
      *=*|-*) ARGS+=("$1"); shift ;;
      *) if [ "$seen_config" = 0 ]; then CONFIG="$1"; seen_config=1; else ARGS+=("$1"); fi; shift ;;
    esac
  done
}
