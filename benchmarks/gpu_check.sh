#!/usr/bin/env bash
# A short GPU check of the training stages at GPU scale (configs/gpu.yaml shapes: GPT-2 small, 124M, seq 1024,
# bf16): pretrain -> label -> reward -> dpo -> ppo, each for a few steps, recorded by benchmarks/gpu_check.py
# (wall time, steps, throughput, final loss, TFLOP/s where reported, peak GPU memory, the autocast dtypes and model
# devices the stage actually used, tracebacks). Results: $OUT/results.jsonl, $OUT/gpu_check.md, $OUT/smi.csv.
#
#   benchmarks/gpu_check.sh            # GPU scale (a CUDA machine; ~3-5 min on one H100/H200)
#   benchmarks/gpu_check.sh --tiny     # the same flow with toy shapes (a CPU dry run of the script)
#
# Environment: OUT (results folder; default .tmp/gpu_check), PYTHON (default: python3, or .venv/bin/python when
# present), GPU_CHECK_DATA (a data/ folder or a .tar.gz of one; default .gpucheck/data.tar.gz, else data/, else
# `alignpipe data build` into a temp folder), GPU_CHECK_WHEELS (default .whl). Wheels there (missing packages carried to a bare machine) are
# installed into a temp --target folder first. MLflow logs to a sqlite file in the temp folder.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TINY=0
[ "${1:-}" = "--tiny" ] && TINY=1
OUT=${OUT:-$ROOT/.tmp/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d -t gpu_check.XXXXXX)
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 MLFLOW_TRACKING_URI="sqlite:///$WORK/mlflow.db" MLFLOW_DISABLE_TELEMETRY=true
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DVC_NO_ANALYTICS=1 ALIGNPIPE_EXPERIMENT=gpu_check
T0=$(date +%s)
log() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }

WHEELS=${GPU_CHECK_WHEELS:-.whl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  log "installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels from $WHEELS into $WORK/site-packages"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site-packages" \
    "$WHEELS"/*.whl || { echo "gpu_check: wheel install failed"; exit 1; }
  export PYTHONPATH="$WORK/site-packages:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
fi

log "environment"
uname -m; nproc
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PYTHON" - <<'EOF'
import sys, torch, transformers, trl, datasets, mlflow, pycodestyle, peft, accelerate
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "",
      "| bf16", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
print("transformers", transformers.__version__, "| trl", trl.__version__, "| datasets", datasets.__version__,
      "| mlflow", mlflow.__version__, "| peft", peft.__version__, "| accelerate", accelerate.__version__,
      "| pycodestyle", pycodestyle.__version__)
EOF
[ $? -eq 0 ] || { echo "gpu_check: imports failed"; exit 1; }

SMI_PID=""
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu,power.draw --format=csv,noheader -lms 1000 \
    > "$OUT/smi.csv" 2>/dev/null &
  SMI_PID=$!
fi
cleanup() { [ -n "$SMI_PID" ] && kill "$SMI_PID" 2>/dev/null; }
trap cleanup EXIT

DATA_SRC=${GPU_CHECK_DATA:-}
[ -z "$DATA_SRC" ] && [ -f .gpucheck/data.tar.gz ] && DATA_SRC=.gpucheck/data.tar.gz
[ -z "$DATA_SRC" ] && [ -d data ] && DATA_SRC=data
if [ -z "$DATA_SRC" ]; then
  log "building data (no data given)"
  "$PYTHON" -m alignpipe data build --out "$WORK/data" || exit 1
  DATA=$WORK/data
elif [ -f "$DATA_SRC" ]; then
  mkdir -p "$WORK/data" && tar -xzf "$DATA_SRC" -C "$WORK/data" --strip-components=1 || exit 1
  DATA=$WORK/data
else
  DATA=$(cd "$DATA_SRC" && pwd)
fi
log "data: $DATA ($(du -sh "$DATA" | cut -f1))"

A=$WORK/artifacts
C=$WORK/ckpt
R=$OUT/results.jsonl
: > "$R"
# Stages run in $WORK, so MLflow's default artifact root (./mlruns) and any stray output land there, not here.
ALIGNPIPE_GIT_COMMIT=${ALIGNPIPE_GIT_COMMIT:-$("$PYTHON" -c 'from alignpipe.tracking.runs import git_commit; print(git_commit())' 2>/dev/null || echo unknown)}
ALIGNPIPE_DATA_VERSION=${ALIGNPIPE_DATA_VERSION:-$("$PYTHON" -c 'from alignpipe.tracking.runs import data_version; print(data_version())' 2>/dev/null || echo unknown)}
export ALIGNPIPE_GIT_COMMIT ALIGNPIPE_DATA_VERSION
stage() { (cd "$WORK" && "$PYTHON" "$ROOT/benchmarks/gpu_check.py" run "$R" -- "$@"); }

if [ "$TINY" = 1 ]; then
  PT=(--set pretrain.vocab_size=512 --set pretrain.n_embd=64 --set pretrain.n_layer=2 --set pretrain.n_head=2
      --set pretrain.seq_len=128 --set pretrain.batch_size=8 --set pretrain.max_steps=60 --set pretrain.learning_rate=0.003
      --set pretrain.n_eval_prompts=32 --set pretrain.logging_steps=10)
  LB=(--set label.n_prompts=96 --set label.sampling.max_new_tokens=32 --set label.sampling.batch_size=128)
  RW=(--set reward.max_steps=3 --set reward.batch_size=4 --set reward.max_length=256 --set reward.logging_steps=1)
  DP=(--set dpo.max_steps=3 --set dpo.batch_size=4 --set dpo.logging_steps=1 --set dpo.n_eval_prompts=16)
  PP=(--set ppo.max_steps=2 --set ppo.rollout_batch_size=16 --set ppo.minibatch_size=8 --set ppo.n_eval_prompts=16)
else  # configs/gpu.yaml shapes and batches, short budgets, smaller evaluations
  PT=(--set pretrain.max_steps=${PT_STEPS:-150} --set pretrain.logging_steps=10 --set pretrain.n_eval_prompts=256)
  LB=(--set label.n_prompts=768)
  RW=(--set reward.max_steps=${RW_STEPS:-20} --set reward.logging_steps=5)
  DP=(--set dpo.max_steps=${DPO_STEPS:-20} --set dpo.logging_steps=5 --set dpo.n_eval_prompts=256)
  PP=(--set ppo.max_steps=${PPO_STEPS:-3} --set ppo.n_eval_prompts=256)
fi
G=(--params "$ROOT/configs/gpu.yaml")

log "pretrain"
stage pretrain "${G[@]}" --data "$DATA" --out "$A/pretrain" "${PT[@]}" --set pretrain.eval_val_chars=200000 \
  --set pretrain.save_steps=100000 --set pretrain.checkpoint_dir="$C/pretrain"
PT_RC=$?
if [ $PT_RC -eq 0 ]; then
  log "label"
  stage label "${G[@]}" --data "$DATA" --policy "$A/pretrain" --out "$A/label" "${LB[@]}" --set label.heldout_frac=0.1
  LB_RC=$?
else
  LB_RC=1
fi
if [ $LB_RC -eq 0 ]; then
  log "reward"
  stage reward "${G[@]}" --prefs "$A/label" --policy "$A/pretrain" --out "$A/reward" "${RW[@]}" \
    --set reward.save_steps=0 --set reward.checkpoint_dir="$C/reward"
  RW_RC=$?
  log "dpo"
  stage dpo "${G[@]}" --data "$DATA" --policy "$A/pretrain" --prefs "$A/label" --out "$A/dpo" "${DP[@]}" \
    --set dpo.save_steps=100000 --set dpo.checkpoint_dir="$C/dpo"
else
  RW_RC=1
fi
if [ $RW_RC -eq 0 ]; then
  log "ppo"
  stage ppo "${G[@]}" --data "$DATA" --policy "$A/pretrain" --reward-model "$A/reward" --out "$A/ppo" "${PP[@]}" \
    --set ppo.save_steps=100000 --set ppo.checkpoint_dir="$C/ppo"
fi

log "report"
"$PYTHON" benchmarks/gpu_check.py report "$R" > "$OUT/gpu_check.md"
cat "$OUT/gpu_check.md"
[ -f "$OUT/smi.csv" ] && echo "nvidia-smi peak memory.used: $(cut -d, -f2 "$OUT/smi.csv" | sort -n | tail -1)"
log "done"
rm -rf "$WORK"
