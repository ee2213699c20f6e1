#!/usr/bin/env bash
# Ablation runs of the counterfactual defender (issue 23), all on the tables of configs/ppd_defender_cf.yaml
# (generate them first: python -m ppd.counterfactual --config configs/ppd_defender_cf.yaml [--worker i/2]).
#   [EPOCHS=12] bash experiments/defender_ablation.sh NAME [NAME ...]      # e.g. no_sam no_rank seed1
# Each run: fit (same tables, same data seed) -> export the dev-selected checkpoint -> FM and FM + PPD on
# CVC val and PH2 val (configs/eval/defender_val.yaml, two rows) -> experiments/results/defender_ablation/NAME.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${PPD_RUNS:-runs}/ablation
OUT=experiments/results/defender_ablation
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
declare -A ARGS=(
  [full]=""
  [no_sam]="--data.init_args.sam_inputs=false"
  [no_rank]="--model.init_args.ranking_weight=0"
  [no_sam_no_rank]="--data.init_args.sam_inputs=false --model.init_args.ranking_weight=0"
  [rank_only]="--model.init_args.regression_weight=0"
  [margin]="--model.init_args.label_margin_weight=1.0"
  [states500]="--data.init_args.max_states=500"
  [states1000]="--data.init_args.max_states=1000"
  [seed1]="--seed_everything=1 --data.init_args.seed=0"
  [seed2]="--seed_everything=2 --data.init_args.seed=0"
  [no_ph2]="--data.init_args.fit_datasets=[0]"
  [no_cvc]="--data.init_args.fit_datasets=[1]"
)
for name in "$@"; do
  [ -n "${ARGS[$name]+x}" ] || { echo "unknown run $name (one of ${!ARGS[*]})" >&2; exit 2; }
  t0=$(date +%s)
  # shellcheck disable=SC2086
  # (a --run_name override does not reach the config's interpolated paths: each run gets its own PPD_RUNS)
  run="$RUNS/$name/ppd_defender_cf"
  PPD_RUNS="$RUNS/$name" $PY -m ppd.fit --config configs/ppd_defender_cf.yaml --overwrite true \
    --data.init_args.generate_missing=false --trainer.enable_progress_bar=false \
    --trainer.max_epochs="${EPOCHS:-20}" ${ARGS[$name]}
  best=$(ls "$run"/checkpoints/best-*.ckpt | head -1)
  mkdir -p "$OUT/$name"
  $PY -m ppd.export "$best" "$OUT/$name/defender.pt" --overwrite
  cp "$run"/csv/version_0/metrics.csv "$OUT/$name/metrics.csv"
  echo "fit+export wall s: $(( $(date +%s) - t0 ))" > "$OUT/$name/walltime.txt"
  $PY -m ppd.evaluate --config configs/eval/defender_val.yaml --quiet \
    "defender=$OUT/$name/defender.pt" "output_dir=$OUT/$name/val" \
    "methods=[feature_matching,feature_matching+ppd]" "paired=[[feature_matching+ppd,feature_matching]]"
done
