#!/usr/bin/env bash
# The GPU measurements recorded in BENCHMARKS.md, in one go (GPU backend: issue 4 and 6 figures).
#
#   bash launch/gpu_benchmarks.sh [OUT_DIR]
#
# 1 GPU: the 2B shape (full ViT, all 28 LLM layers) with ZeRO-2, eager and with train.compile=true, and at 8
# micro-batches per step without and with CPU offload (DeepSpeedCPUAdam); all GPUs of the host (when more
# than one): that pair again with DP = #GPUs, for the scaling efficiency against the 1-GPU pair; 1 GPU: the
# reduced A3B shape (4 MoE layers, real widths) end to end with loop / grouped_mm / triton experts. PARTS picks
# parts (default 2b,compile,offload,scale,a3b; also offload_ds = the offload run on DeepSpeed's own host step,
# offload_ratio = the offload run with part of the optimizer kept on the device,
# recipe = the offload pair at 16 micro-batches, profile /
# a3b_profile = profiled 2B / reduced-A3B steps with the idle time's sources, eager_torch = the 2b run with
# backend.kernels.elementwise=false, coldstart = the compiled first step on an empty and then a warm compile cache,
# parts = one micro-batch's forward + backward by part, bench.model_parts, for the 2B and the reduced A3B shapes,
# host_wait = the 2b and a3b runs with every other step on DeepSpeed's own end of backward, --ab-host-wait);
# BENCH_EXTRA is appended to every run (e.g. BENCH_EXTRA=train.compile=true).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/common.sh"
OUT_DIR="${1:-${OUT:-/tmp/sail_gpu_bench}}"
mkdir -p "$OUT_DIR"
sail_detect_gpus || { echo "gpu_benchmarks.sh: no NVIDIA GPU found" >&2; exit 1; }
ngpu=$NGPU
PARTS="${PARTS:-2b,compile,offload,scale,a3b}"
part() { [[ ",$PARTS," == *",$1,"* ]]; }  # PARTS names whole parts: "profile" does not select "a3b_profile"
bench() {  # bench NAME NPROC args...
  local name="$1" n="$2"; shift 2
  echo "=== $name ($n GPU) ===" >&2
  timeout "${BENCH_TIMEOUT:-420}" torchrun --nproc_per_node "$n" --master_port "$(sail_free_port)" \
    -m sail_dist.bench.train_step --label "$name" "$@" ${BENCH_EXTRA:-} 2>"$OUT_DIR/$name.err" | tee "$OUT_DIR/$name.out" | tail -2
  tail -3 "$OUT_DIR/$name.err" | grep -iE "error|Traceback" >&2 || true
}
TWO_B=(--model configs/model/sailvl2_2b.yaml --seq 8192 --sample-len 2048 --tiles-per-sample 2 --steps 8 --warmup 3)
if part 2b; then bench 2b_zero2 1 "${TWO_B[@]}" --micro-batches 4; fi
# eager_torch: the 2b run with the norms / RoPE / SwiGLU as torch ops instead of the Triton kernels (the anchor)
if part eager_torch; then bench 2b_zero2_torch_elementwise 1 "${TWO_B[@]}" --micro-batches 4 backend.kernels.elementwise=false; fi
if part compile; then bench 2b_zero2_compile 1 "${TWO_B[@]}" --micro-batches 4 train.compile=true; fi
if part offload; then
  # 8 micro-batches per step (64k tokens per GPU) for both, so the host optimizer step is amortised alike
  bench 2b_zero2_mb8 1 "${TWO_B[@]}" --micro-batches 8 --steps 6 --warmup 2
  bench 2b_zero2_offload_mb8 1 "${TWO_B[@]}" --micro-batches 8 --steps 6 --warmup 2 --offload cpu; fi
# offload_ds: the offload run with DeepSpeed's own host step (backend.offload_chunk=0), the chunked step's anchor
if part offload_ds; then
  bench 2b_zero2_offload_mb8_deepspeed_step 1 "${TWO_B[@]}" --micro-batches 8 --steps 6 --warmup 2 --offload cpu \
    backend.offload_chunk=0; fi
# offload_ratio: the offload run with 1 - r of each optimizer partition kept and updated on the device
# (backend.offload_ratio=r; OFFLOAD_RATIOS, default 0.5 0.3: the figures in BENCHMARKS.md), the speed / device-memory trade-off against the pair above
if part offload_ratio; then for r in ${OFFLOAD_RATIOS:-0.5 0.3}; do
  bench "2b_zero2_offload_mb8_ratio$r" 1 "${TWO_B[@]}" --micro-batches 8 --steps 6 --warmup 2 --offload cpu \
    "backend.offload_ratio=$r"; done; fi
if part recipe; then
  # 16 micro-batches per GPU per step: SAIL-VL2's pretraining batch (2048 x 8192 tokens) on 128 GPUs
  bench 2b_zero2_mb16 1 "${TWO_B[@]}" --micro-batches 16 --steps 5 --warmup 2
  bench 2b_zero2_offload_mb16 1 "${TWO_B[@]}" --micro-batches 16 --steps 5 --warmup 2 --offload cpu; fi
if part scale; then if [ "$ngpu" -ge 2 ]; then
  # the offload part's pair on every GPU: same micro-batches per GPU, so tokens/s per GPU compare directly
  bench "2b_zero2_mb8_dp$ngpu" "$ngpu" "${TWO_B[@]}" --micro-batches 8 --steps 6 --warmup 2
  bench "2b_zero2_offload_mb8_dp$ngpu" "$ngpu" "${TWO_B[@]}" --micro-batches 8 --steps 6 --warmup 2 --offload cpu
fi; fi
A3B=(--model configs/model/sailvl2_a3b.yaml --llm-layers 4 --seq 8192 --sample-len 2048 --tiles-per-sample 1 --steps 6
     --warmup 2 --micro-batches 2 model.vit.num_layers=2)
if part a3b; then
  for impl in loop grouped_mm triton; do bench "a3b4_$impl" 1 "${A3B[@]}" "backend.moe_impl=$impl"; done; fi
if part host_wait; then
  bench 2b_zero2_ab_host_wait 1 "${TWO_B[@]}" --micro-batches 4 --ab-host-wait
  bench a3b4_triton_ab_host_wait 1 "${A3B[@]}" --steps 8 backend.moe_impl=triton --ab-host-wait; fi
if part coldstart; then
  # the first step of train.compile=true on an empty compile cache, then again on the cache the first run filled
  rm -rf "$OUT_DIR/compile_cache"
  for run in cold warm; do
    bench "2b_compile_$run" 1 "${TWO_B[@]}" --micro-batches 4 --steps 3 --warmup 1 train.compile=true \
      "train.compile_cache=$OUT_DIR/compile_cache"
  done; fi
# profile / a3b_profile: the last of 5 steps profiled (bench.train_step --profile; the median of steps 3-5 stays a
# fair step time), the trace beside
if part profile; then
  bench 2b_profile 1 "${TWO_B[@]}" --micro-batches 2 --steps 5 --warmup 2 --profile --trace "$OUT_DIR/2b_trace.json.gz"; fi
if part a3b_profile; then
  bench a3b4_profile 1 "${A3B[@]}" --steps 5 --profile --trace "$OUT_DIR/a3b_trace.json.gz"; fi
if part parts; then
  for shape in 2b a3b; do
    echo "=== parts_$shape (1 GPU) ===" >&2
    if [ "$shape" = 2b ]; then args=(--model configs/model/sailvl2_2b.yaml --tiles-per-sample 2); else
      args=(--model configs/model/sailvl2_a3b.yaml --llm-layers 4 --tiles-per-sample 1 model.vit.num_layers=2); fi
    timeout "${BENCH_TIMEOUT:-420}" python3 -m sail_dist.bench.model_parts --label "parts_$shape" "${args[@]}" \
      ${BENCH_EXTRA:-} 2>"$OUT_DIR/parts_$shape.err" | tee "$OUT_DIR/parts_$shape.parts" | grep -v '^{' >&2
  done; fi
echo "=== summary ===" >&2
cat "$OUT_DIR"/*.out 2>/dev/null | grep '^{"label"' > "$OUT_DIR/all.jsonl"
cat "$OUT_DIR"/*.parts 2>/dev/null | grep '^{"label"' > "$OUT_DIR/parts.jsonl"
python3 - "$OUT_DIR/all.jsonl" "$OUT_DIR/parts.jsonl" <<'PY'
import json, sys
rows = {r["label"]: r for r in map(json.loads, open(sys.argv[1]))}
parts = {r["label"]: {p["part"]: p["of_peak"] for p in r["parts"]} for r in map(json.loads, open(sys.argv[2]))}
print(f"{'run':<22}{'GPUs':>5}{'step s':>9}{'tok/s/GPU':>11}{'MFU':>7}{'mem GiB':>9}")
for k, r in rows.items():
    print(f"{k:<22}{r['world_size']:>5}{r['step_s']:>9.3f}{r['tokens_per_s_per_device']:>11.0f}{100*r['mfu']:>6.1f}%{r['peak_mem_gib']:>9.1f}")
fig = {}
if "2b_zero2_mb8" in rows and "2b_zero2_offload_mb8" in rows:
    fig["offload_slowdown"] = rows["2b_zero2_offload_mb8"]["step_s"] / rows["2b_zero2_mb8"]["step_s"]
for k, r in rows.items():  # each offload ratio against the no-offload run: slowdown and device memory saved
    if k.startswith("2b_zero2_offload_mb8_ratio") and "2b_zero2_mb8" in rows:
        base = rows["2b_zero2_mb8"]
        fig[f"offload_slowdown_{k.rsplit('_', 1)[1]}"] = r["step_s"] / base["step_s"]
        fig[f"offload_mem_saved_gib_{k.rsplit('_', 1)[1]}"] = base["peak_mem_gib"] - r["peak_mem_gib"]
if "2b_zero2_offload_mb8" in rows and "2b_zero2_offload_mb8_deepspeed_step" in rows:
    fig["offload_chunked_step_speedup"] = (rows["2b_zero2_offload_mb8_deepspeed_step"]["step_s"]
                                           / rows["2b_zero2_offload_mb8"]["step_s"])
if "2b_zero2_mb16" in rows and "2b_zero2_offload_mb16" in rows:
    fig["offload_slowdown_mb16"] = rows["2b_zero2_offload_mb16"]["step_s"] / rows["2b_zero2_mb16"]["step_s"]
for k, r in rows.items():  # DP = N against the same run on one GPU
    base = k.rsplit("_dp", 1)[0]
    if "_dp" in k and base in rows:
        fig[f"scaling_efficiency_{base}_{r['world_size']}gpu"] = (
            r["tokens_per_s_per_device"] / rows[base]["tokens_per_s_per_device"])
if "a3b4_loop" in rows and "a3b4_triton" in rows:
    fig["a3b_e2e_speedup_triton_vs_loop"] = rows["a3b4_loop"]["step_s"] / rows["a3b4_triton"]["step_s"]
for run in ("cold", "warm"):
    if f"2b_compile_{run}" in rows:
        fig[f"first_step_s_{run}_cache"] = rows[f"2b_compile_{run}"]["first_step_s"]
        fig[f"build_s_{run}_cache"] = rows[f"2b_compile_{run}"].get("build_s")
if "2b_zero2" in rows and "2b_zero2_torch_elementwise" in rows:
    fig["eager_speedup_triton_elementwise"] = rows["2b_zero2_torch_elementwise"]["step_s"] / rows["2b_zero2"]["step_s"]
if "a3b4_grouped_mm" in rows and "a3b4_triton" in rows:
    fig["a3b_e2e_speedup_triton_vs_grouped_mm"] = rows["a3b4_grouped_mm"]["step_s"] / rows["a3b4_triton"]["step_s"]
if parts:
    fig["parts_of_peak"] = parts  # per shape, each part's share of the device's peak (bench.model_parts)
print(json.dumps({"runs": rows, **fig}))
PY
