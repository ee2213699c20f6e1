#!/usr/bin/env bash
# Issue 24: every evaluation behind experiments/results/fm_*.md, in the order they were run (dev first: the
# default FM variant is chosen on dev, before the val tables are looked at). Each step resumes from its
# result cache. G = 32 needs DINOv2 tokens at 448 px, computed into the feature cache on first use
# (~3-8 s per image on one CPU core).
#   bash experiments/fm_variants.sh [STEP ...]      # steps: dev16 devceil16 dev32 val16 gfsam16 ceil16 val32
set -euo pipefail
cd "$(dirname "$0")/.."
export DATA_ROOT=${DATA_ROOT:-../shared/data}
PY=${PY:-.venv/bin/python}
G32=(env.grid=32 env.dino_resolution=448)
# G = 32 rows without gf_sam (up to 128 SAM decodes per image) and without the ceilings (too slow here)
ROWS32='methods=[feature_matching,fm_paper,fm_mutual,fm_gfsam,"oracle_label(feature_matching)","oracle_label(fm_paper)","oracle_label(fm_mutual)","oracle_label(fm_gfsam)"]'
run() { echo "== $* ($(date -u +%H:%M:%S))"; "$PY" -m ppd.evaluate "$@"; }
steps=("$@")
[ "${#steps[@]}" -gt 0 ] || steps=(dev16 devceil16 dev32 val16 gfsam16 ceil16 val32)
for step in "${steps[@]}"; do
  case $step in
    dev16) run --config configs/eval/fm_dev.yaml ;;
    devceil16) run --config configs/eval/fm_dev_ceiling.yaml ;;
    dev32) run --config configs/eval/fm_dev.yaml "${G32[@]}" "$ROWS32" output_dir=experiments/results/fm_dev_g32 ;;
    val16) run --config configs/eval/fm_val.yaml ;;
    gfsam16) run --config configs/eval/fm_val.yaml 'methods=[persam,gf_sam]' 'paired=[[gf_sam,persam]]' output_dir=experiments/results/fm_val_gfsam_g16 ;;
    ceil16) run --config configs/eval/fm_val_ceiling.yaml ;;
    val32) run --config configs/eval/fm_val.yaml "${G32[@]}" "$ROWS32" defender=null output_dir=experiments/results/fm_val_g32 ;;
    *) echo "unknown step $step (expected dev16 devceil16 dev32 val16 gfsam16 ceil16 val32)" >&2; exit 2 ;;
  esac
done
