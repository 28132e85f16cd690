#!/usr/bin/env bash
# Backend parity for every stage of the recipe: `launch/parity.sh STEPS CONFIG --stage NAME` for each registered
# stage (or the ones named), on the tiny MoE demo model (GPU backend ZeRO-2 DP 2 vs NPU backend PP 2 x EP 2 x DP 2,
# fp32 on CPU), each stage on its data of the demo recipe (the `data:` section of its config in
# configs/recipe/demo.yaml, on python -m sail_dist.data.demo_recipe's records: LongCoT and Think-Fusion records, SFT
# phase 4's image:video 1:1 mix; the demo set for the others; the demo counting prompts for the RL stages). Then one table (stage, steps, max loss and gradient-tensor differences, PASS/FAIL) and one JSON
# line; exit status 1 when any stage disagrees beyond parity.sh's tolerances (1e-5).
#
#   bash launch/parity_stages.sh [STEPS] [STAGE ...]          (default 3 steps, every stage)
#
# lr 1e-3 for every stage (the report's 1e-6..2e-4 would leave later steps nearly equal to the first), batches in
# micro-batches (train.global_batch_samples=0), and pretrain_basic with an AdaLRS window of 3 over 9 steps, so that
# a trial (and its keep or rollback) happens inside the compared steps. OUT_DIR keeps each stage's runs.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
STEPS="${1:-3}"
shift || true
CONFIG=configs/demo/npu_tiny_moe.yaml
OUT_DIR="${OUT_DIR:-$(mktemp -d -t sail_parity_stages.XXXXXX)}"
mkdir -p "$OUT_DIR"
DEMO="${DEMO_DIR:-.cache/sail_dist_demo}"
DATA="${RECIPE_DATA:-.cache/sail_dist_demo_recipe}"
stages=("$@")
[ ${#stages[@]} -gt 0 ] || mapfile -t stages < <(python3 -m sail_dist.cli --list-stages | awk '{print $1}')
python3 -m sail_dist.data.demo_recipe "$DATA" "$DEMO" >/dev/null || { echo "parity_stages.sh: could not write $DATA" >&2; exit 1; }
own_data() {  # the stage's data section of the demo recipe (configs/recipe/demo.yaml's per-stage configs) as overrides
  python3 - "$1" "$DATA" "$DEMO" <<'PY'
import sys

import yaml

from sail_dist.stages.recipe import load_recipe

stage, data_dir, demo_dir = sys.argv[1:]
recipe = load_recipe("configs/recipe/demo.yaml")
for s in recipe.stages:
    if s.stage == stage and s.config != recipe.config:
        with open(s.config) as f:
            data = (yaml.safe_load(f) or {}).get("data", {})
        for key, value in data.items():
            text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).split("\n...")[0].strip()
            text = text.replace(".cache/sail_dist_demo_recipe", data_dir).replace(".cache/sail_dist_demo", demo_dir)
            print(f"data.{key}={text}")
PY
}
rows=()
fail=0
for s in "${stages[@]}"; do
  n="$STEPS"
  extra=(train.lr=1e-3 train.min_lr=1e-3 train.warmup_steps=0 train.global_batch_samples=0 train.epochs=0
         "data.demo_dir=$DEMO")
  [ "$s" = pretrain_basic ] && { n=9; extra+=(train.adalrs.window=3); }
  while IFS= read -r kv; do extra+=("$kv"); done < <(own_data "$s")
  echo "=== $s ($n steps) ===" >&2
  OUT_DIR="$OUT_DIR/$s" bash "$here/parity.sh" "$n" "$CONFIG" --stage "$s" "${extra[@]}" >"$OUT_DIR/$s.out" 2>"$OUT_DIR/$s.err"
  rc=$?
  last="$(tail -1 "$OUT_DIR/$s.out")"
  if [ $rc -ne 0 ] && ! echo "$last" | grep -q '^{'; then
    last="{\"ok\": false, \"error\": \"exit $rc: see $OUT_DIR/$s.err\"}"
  fi
  [ $rc -eq 0 ] || fail=1
  rows+=("{\"stage\": \"$s\", \"summary\": $last}")
  echo "$last" | cut -c1-160 >&2
done
printf '%s\n' "${rows[@]}" > "$OUT_DIR/stages.jsonl"
python3 - "$OUT_DIR/stages.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'stage':<20}{'steps':>6}{'max loss rel':>14}{'max grad rel':>14}  result")
for r in rows:
    s = r["summary"]
    f = lambda k: f"{s[k]:>14.2e}" if isinstance(s.get(k), float) else f"{'-':>14}"
    print(f"{r['stage']:<20}{s.get('steps', '-'):>6}{f('max_loss_rel')}{f('max_grad_rel')}  "
          f"{'PASS' if s.get('ok') else 'FAIL ' + s.get('error', '')}")
print(json.dumps({"stages": {r["stage"]: {k: r["summary"].get(k) for k in ("ok", "steps", "max_loss_rel", "max_grad_rel")}
                             for r in rows}, "all_ok": all(r["summary"].get("ok") for r in rows)}))
PY
exit $fail
