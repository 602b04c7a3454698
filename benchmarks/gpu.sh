#!/usr/bin/env bash
# The GPU run anyone can repeat (docs/performance.md, "GPU run"): random real-size weights, synthetic images,
# no network. On one H100/H200-class GPU it is meant to take under 8 minutes.
#
#   bash benchmarks/gpu.sh                     # full run: writes benchmarks/results/gpu.json and gpu.md
#   bash benchmarks/gpu.sh --smoke             # tiny sizes, runs on CPU in about a minute (CI checks this)
#   OUT_DIR=/tmp/x bash benchmarks/gpu.sh ...  # write elsewhere; extra arguments go to gpu_run.py
#
# Parts: captioning throughput at batch 64 and 256 in fp32 / bf16 / fp16, greedy and beam 5; fp32 greedy
# captions on the GPU vs the CPU on a fixed set; static cache + torch.compile vs eager (greedy, bf16);
# time to caption 5,000 images with beam 5; a few hundred bf16 mixed-precision training steps through
# `accelerate launch` (step time, peak memory). Each part's failure is recorded and the others still run.
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
PYTHON="${PYTHON:-python}"
OUT_DIR="${OUT_DIR:-benchmarks/results}"
SMOKE=0
for arg in "$@"; do [ "$arg" = "--smoke" ] && SMOKE=1; done
NAME=gpu
[ "$SMOKE" = 1 ] && NAME=gpu_smoke
mkdir -p "$OUT_DIR"
started=$(date +%s)

# 1. training: bf16 mixed precision through accelerate launch (one process, the first GPU or the CPU)
TRAIN_JSON="$OUT_DIR/${NAME}_training.json"
rm -f "$TRAIN_JSON"
LAUNCH=(-m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision bf16
        --dynamo_backend no)
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  LAUNCH+=(--cpu)
fi
TRAIN_ARGS=(--out "$TRAIN_JSON")
[ "$SMOKE" = 1 ] && TRAIN_ARGS+=(--smoke)
echo "== training: accelerate launch ${LAUNCH[*]:2} benchmarks/gpu_train.py ${TRAIN_ARGS[*]}"
"$PYTHON" "${LAUNCH[@]}" benchmarks/gpu_train.py "${TRAIN_ARGS[@]}"
train_rc=$?

# 2. captioning parts (throughput, CPU agreement, compiled decoding, COCO-size beam 5), JSON + table
COMPILE=()
[ "$SMOKE" = 0 ] && COMPILE=(--compile)  # compiling takes a minute on a CPU: not in the smoke run
echo "== captioning: gpu_run.py $*"
"$PYTHON" benchmarks/gpu_run.py --out_dir "$OUT_DIR" --name "$NAME" --training_json "$TRAIN_JSON" \
  "${COMPILE[@]}" "$@"
run_rc=$?

echo "gpu.sh: $(( $(date +%s) - started )) s in all; training exit $train_rc, captioning exit $run_rc"
[ "$train_rc" = 0 ] && [ "$run_rc" = 0 ]
