#!/usr/bin/env bash
# The whole SAIL-VL2 recipe in one resumable command (sail_dist/stages/recipe.py, docs/recipe.md):
#
#   bash launch/recipe.sh configs/recipe/sailvl2_2b.yaml [--out-dir DIR]
#
# Stages run in order, each from the previous stage's HF export; a re-run skips finished stages and resumes the
# interrupted one from its last checkpoint. The recipe's `launcher` (python | gpu | npu) starts each stage.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
exec python3 -m sail_dist.stages.recipe "$@"
