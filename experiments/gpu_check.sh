#!/usr/bin/env bash
# GPU check, ready to run on a CUDA machine (<= 8 minutes): the tests with a CUDA path, the quick start on the
# GPU (decoder_backend torch) in 16-mixed and bf16-mixed precision, and train_throughput.py on the GPU.
# Writes a summary (Markdown) with each step's exit code, time and key figures.
#
#   bash experiments/gpu_check.sh                       # on the GPU machine, from the repository root
#   bash experiments/gpu_check.sh --dry-run             # anywhere: list what it would run, run nothing
#   bash experiments/gpu_check.sh --prepare BUNDLE      # on a machine with network: build the offline bundle
#   bash experiments/gpu_check.sh --bundle BUNDLE       # GPU machine without network: install from it first
#
# Offline bundle (what travels; the GPU image already has torch, lightning, timm, torch-geometric,
# torchmetrics, onnxruntime, peft): wheels of segment-anything, mobilesam-mirror, omegaconf (+ antlr4 runtime,
# built into a wheel), jsonargparse (+ docstring-parser, typeshed-client), wandb (+ its small pure-Python
# dependencies) ~ 25 MB, and MobileSAM's weights cast to fp16 (~20 MB instead of 40 MB) -- together with
# the repository (~2 MB) under the 64 MiB limit. DINOv2-S/14 (88 MB fp32) does not fit: the check uses the
# random tiny DINOv2 (dino_name: tiny); MobileSAM (encoder for the cache, decoder in the environment) is real.
#
# Options: --out DIR (default runs/gpu_check), --python PY (default python3), --budget SECONDS (default 470).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=runs/gpu_check
BUNDLE=""
PREPARE=""
PY="${PPD_PYTHON:-python3}"
BUDGET=470
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT="$2"; shift ;;
        --bundle) BUNDLE="$2"; shift ;;
        --prepare) PREPARE="$2"; shift ;;
        --python) PY="$2"; shift ;;
        --budget) BUDGET="$2"; shift ;;
        *) echo "gpu_check.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    esac
    shift
done

WHEELS=(segment-anything==1.0 mobilesam-mirror==1.0.0 omegaconf jsonargparse docstring-parser typeshed-client
        wandb sentry-sdk gitpython gitdb smmap click platformdirs protobuf pydantic pydantic-core
        annotated-types typing-inspection)

if [[ -n "$PREPARE" ]]; then
    mkdir -p "$PREPARE/wheels"
    "$PY" -m pip download --no-deps -d "$PREPARE/wheels" "${WHEELS[@]}" || exit 1
    "$PY" -m pip wheel --no-deps -w "$PREPARE/wheels" antlr4-python3-runtime==4.9.3 || exit 1
    PYTHONPATH="$PWD" "$PY" - "$PREPARE/mobile_sam_fp16.pt" <<'PY' || exit 1
import sys, torch
from ppd.weights import resolve
sd = torch.load(resolve("mobile_sam"), map_location="cpu", weights_only=True)
sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
torch.save(sd, sys.argv[1])
PY
    du -sh "$PREPARE"
    exit 0
fi

mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
T0=$SECONDS
SAM_CKPT="${PPD_SAM_CHECKPOINT:-${BUNDLE:+$BUNDLE/mobile_sam_fp16.pt}}"
# real MobileSAM (fp16 weights from the bundle, else the default resolver), random tiny DINOv2
ENC=(--data.init_args.cache.dino_name=tiny --data.init_args.cache.dino_resolution=112
     --data.init_args.cache.device=cuda)
if [[ -n "$SAM_CKPT" ]]; then ENC+=("--data.init_args.cache.sam_checkpoint=$SAM_CKPT"); fi
GPU_FIT=(--trainer.accelerator=gpu --trainer.devices=1 --data.init_args.decoder_backend=torch
         --trainer.max_epochs=2 --trainer.check_val_every_n_epoch=1)

STEPS=()
step() {  # step NAME TIMEOUT_S CMD...: run with a timeout, log to $OUT/NAME.log, one summary row
    local name="$1" limit="$2"; shift 2
    STEPS+=("$name")
    if [[ $DRY -eq 1 ]]; then
        printf '[dry-run] %-22s (timeout %ss): %s\n' "$name" "$limit" "$*"
        echo "| $name | dry run | - | \`$*\` |" >> "$SUMMARY"
        return 0
    fi
    local left=$(( BUDGET - (SECONDS - T0) ))
    if [[ $left -lt 20 ]]; then
        echo "| $name | skipped: time budget spent | - | |" >> "$SUMMARY"
        return 0
    fi
    [[ $limit -gt $left ]] && limit=$left
    local t=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local figures
    figures=$(grep -E "passed|failed|transitions/s|training steps in|ms per training step|total  |Trainer.fit. stopped|CUDA|device" "$OUT/$name.log" | tail -4 | tr '\n' ' ' | tr '|' '/')
    echo "| $name | rc $rc | $((SECONDS - t)) s | ${figures} |" >> "$SUMMARY"
    echo "$name: rc $rc in $((SECONDS - t)) s"
    return 0
}

{
    echo "# GPU check ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    echo
    if [[ $DRY -eq 1 ]]; then echo "Dry run: nothing executed."; fi
    echo
    echo "| step | result | time | figures |"
    echo "|---|---|---|---|"
} > "$SUMMARY"

if [[ $DRY -eq 0 ]]; then
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu_check.sh: no CUDA device visible to $PY (torch.cuda.is_available() is False); nothing run" >&2
        echo "| cuda | no CUDA device | - | |" >> "$SUMMARY"
        exit 3
    fi
fi

export WANDB_MODE=offline PPD_OFFLINE=1 OMP_NUM_THREADS=4 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PPD_RUNS="$OUT/runs" PPD_CACHE="${PPD_CACHE:-$OUT/cache}"

if [[ -n "$BUNDLE" ]]; then
    step install 120 "$PY" -m pip install --no-index --find-links "$BUNDLE/wheels" \
        segment-anything mobilesam-mirror omegaconf "jsonargparse[signatures]" wandb
fi
step device 30 "$PY" -c "import torch; print('CUDA', torch.version.cuda, torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0), 'bf16', torch.cuda.is_bf16_supported())"
# the tests that have a CUDA path (parametrised over the devices present: -k cuda selects the GPU cases;
# pytest exits 5 when none was collected, i.e. CUDA not seen)
step tests_cuda 150 "$PY" -m pytest -q -p no:cacheprovider -k cuda tests/unit/test_devices.py tests/integration/test_fit_devices.py
for prec in 16-mixed bf16-mixed; do
    step "quickstart_${prec}" 120 "$PY" -m ppd.fit --config configs/quickstart.yaml "${GPU_FIT[@]}" \
        "--trainer.precision=$prec" "--run_name=gpu_$prec" "${ENC[@]}"
done
step throughput_gpu 90 "$PY" experiments/benchmarks/train_throughput.py --accelerator gpu --precision 16-mixed \
    --steps 48 -- --data.init_args.decoder_backend=torch "${ENC[@]}"
step throughput_cpu_ref 60 "$PY" experiments/benchmarks/train_throughput.py --accelerator cpu --steps 16 \
    -- --data.init_args.cache.dino_name=tiny --data.init_args.cache.dino_resolution=112

echo >> "$SUMMARY"
echo "Total: $((SECONDS - T0)) s for ${#STEPS[@]} steps (${STEPS[*]}). Logs: $OUT/<step>.log" >> "$SUMMARY"
cat "$SUMMARY"
