#!/usr/bin/env bash
# The GPU test run (issue 19 item 7), on a CUDA machine: the GPU-only tests (every tests/ file with a
# `pytest.mark.gpu` test) and the multi-rank backend tests, with the GPU visible to their child processes
# (SAIL_TEST_GPU=1, tests/conftest.py): a torchrun launch that fits the GPUs runs there (NCCL, device bf16, pinned
# batches); one of more ranks than GPUs, and a launcher script's ranks on a machine of fewer than 4 GPUs, run on
# CPU over gloo as in CI (ranks cannot share a GPU under NCCL).
#
#   bash launch/gpu_tests.sh [extra pytest args]      # e.g. -x, -k zero2
#   bash launch/gpu_tests.sh --all [extra pytest args] # the whole suite (tests/), the CPU tests included
#
# Installs nothing. Where the machine lacks deepspeed / megatron-core, carry them as wheels in .whl/
# (bash ../shared/tools/device_wheels.sh): they are unpacked to /tmp/site and put on PYTHONPATH.
# Env: SAIL_TEST_WORKERS (pytest-xdist workers, default 6 when xdist is there), SAIL_TEST_LOG (junit xml path).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_tests.sh: installing the carried wheels (.whl/) failed" >&2; exit 2; }
  export PYTHONPATH="$PWD:$PWD/.whl/pure:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# NVLink multicast stays off (a program using it can take a shared host's GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export SAIL_TEST_GPU=1 PYTHONUNBUFFERED=1
# The tests' own single-process references run in every pytest worker: a few threads each, not every core each
# (the first H200 run, at torch's default of all 16 threads in 12 workers, ran four of them past 240 s).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

python3 - <<'EOF' || exit 2
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_tests.sh: no CUDA GPU visible (this run is for a CUDA machine; CI covers the CPU paths)")
print(f"gpu_tests.sh: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
for name in ("deepspeed", "megatron.core", "transformers", "triton"):
    try:
        mod = __import__(name, fromlist=["_"])
        print(f"  {name} {getattr(mod, '__version__', '?')}")
    except ImportError as e:
        print(f"  {name} missing ({e}): its tests skip")
EOF

if [ "${1:-}" = "--all" ]; then
  shift
  files=tests
else
  gpu_files=$(grep -l "mark\.gpu" tests/test_*.py)
  backend_files="tests/test_gpu_backend.py tests/test_npu_backend.py tests/test_objective_seam.py tests/test_trainer.py"
  files=$(printf '%s\n' $gpu_files $backend_files | sort -u)
fi
workers=()
if python3 -c "import xdist" 2> /dev/null; then workers=(-n "${SAIL_TEST_WORKERS:-6}"); fi
log=()
if [ -n "${SAIL_TEST_LOG:-}" ]; then log=(--junitxml "$SAIL_TEST_LOG"); fi
echo "gpu_tests.sh: pytest ${workers[*]} over:" $files
# -rfEs: the summary lists every failure, error and skip with its reason.
python3 -m pytest -q -rfEs "${workers[@]}" "${log[@]}" $files "$@"
