#!/usr/bin/env bash
# Issues 5 and 11's GPU check, in one prepared script: images/s and exact resume on one GPU.
#
#   bash benchmarks/gpu_check.sh prepare     # HERE (with a package index), once: fills .whl
#   bash benchmarks/gpu_check.sh             # on the GPU machine (8 minutes at most)
#   GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh   # the same steps on a CPU, tiny sizes
#
# Steps: (1) generate ~5,000 ImageNet-like JPEGs (500x375) on local disk and pack them with
# `resnet pack`; (2) `resnet bench train`: the model step on synthetic tensors per
# configuration (fp32, bf16, bf16 channels_last, DDP, DeepSpeed ZeRO-0) and end to end from the
# shards (data.decode cpu and device); (3) train ResNet-50 at 224 px with the default (GPU)
# config for 120 steps under `torchrun --nproc-per-node 1 --max-restarts 1` with the audit on,
# uninterrupted (run A) and with the worker killed mid-epoch by the trainer's fault hook
# (run B, tests/fault_shim; torchrun restarts it and it resumes from its checkpoint);
# (4) benchmarks/compare_runs.py: same samples from the resumed step on and bitwise equal
# final weights -> "resume exact: yes/no"; (5) `resnet bench train` of the compiled
# configurations (bf16 channels_last and DeepSpeed ZeRO-0, torch.compile: a minute or more of
# compiling each) with what is left of the budget; (6) a summary with the img/s figures.
# Both runs use benchmarks/deterministic_train.py (deterministic cuDNN) so that bitwise
# equality means something on a GPU; their end-to-end img/s is therefore a lower bound.
#
# The GPU machine has torch, torchvision, accelerate and transformers but no deepspeed,
# webdataset, wandb, pydantic or omegaconf, and no package index: `prepare` puts their wheels
# in .whl (the wheelhouse script $WHEELHOUSE plus omegaconf: docs/gpu.md, "Running the
# check"), and this script sources .whl/env.sh when it exists. Send .whl along (run's carry: [".whl"]). W&B is disabled.
#
# Output: everything small (logs, figures, metrics.jsonl, comparison) under $OUT (default
# runs/gpu_check); images, shards and checkpoints under $GPU_CHECK_WORK (default
# ${TMPDIR:-/tmp}/gpu_check, local disk). A failing step does not stop the later ones; the
# exit status is 1 if any failed. Sizes: GPU_CHECK_IMAGES, GPU_CHECK_STEPS, GPU_CHECK_FAULT_STEP,
# GPU_CHECK_CKPT_EVERY, GPU_CHECK_WORKERS, GPU_CHECK_BENCH_CONFIGS, GPU_CHECK_COMPILE=0 (skip
# the compiled configurations), GPU_CHECK_BUDGET_S (default 480: every phase ends by then).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

if [[ "${1:-}" == prepare ]]; then
  set -e
  wheelhouse=${WHEELHOUSE:-../shared/device/wheelhouse.sh}
  if [[ ! -f "$wheelhouse" ]]; then
    echo "gpu_check: $wheelhouse not found (set WHEELHOUSE)" >&2
    exit 2
  fi
  bash "$wheelhouse" .whl
  # Not in the wheelhouse list, but `resnet.config` needs them.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d .whl \
    "omegaconf==2.4.0" "antlr4-python3-runtime==4.13.2"
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qxF /.whl/ "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
  ls .whl
  exit 0
fi
if [[ $# -gt 0 ]]; then
  echo "usage: bash benchmarks/gpu_check.sh [prepare]   (sizes through GPU_CHECK_* variables)" >&2
  exit 2
fi

if [[ -f .whl/env.sh ]]; then
  # shellcheck source=/dev/null
  . .whl/env.sh || { echo "gpu_check: installing the wheels in .whl failed" >&2; exit 2; }
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the repo itself, installed or not
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

OUT=${OUT:-runs/gpu_check}
WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/gpu_check}
mkdir -p "$OUT" "$WORK"
rm -rf "$WORK/src" "$WORK/data" "$WORK/train_a" "$WORK/train_b"  # only what this script makes
cores=$(nproc)
if [[ "${GPU_CHECK_TINY:-0}" == 1 ]]; then
  # The same steps on a CPU in a minute or two: proves the script, measures nothing.
  IMAGES=${GPU_CHECK_IMAGES:-120}; CLASSES=4; SIZE=64x48; SHARD=32
  STEPS=${GPU_CHECK_STEPS:-10}; FAULT_STEP=${GPU_CHECK_FAULT_STEP:-6}
  CKPT_EVERY=${GPU_CHECK_CKPT_EVERY:-4}; LOG_EVERY=2; WORKERS=${GPU_CHECK_WORKERS:-1}
  BENCH=(--arch resnet18 --batch-size 8 --image-size 32 --steps 2 --warmup 1 --repeats 2
         --workers "$WORKERS" --timeout 200)
  BENCH_CONFIGS=${GPU_CHECK_BENCH_CONFIGS:-fp32,deepspeed_zero0}
  COMPILED=(--configs deepspeed_zero0_compile --compile-backend eager)
  MODEL=(model.arch=resnet18 data.image_size=32 train.batch_size=8)
  T_BENCH=300; T_TRAIN=300; export OMP_NUM_THREADS=1
else
  IMAGES=${GPU_CHECK_IMAGES:-5000}; CLASSES=100; SIZE=500x375; SHARD=250
  STEPS=${GPU_CHECK_STEPS:-120}; FAULT_STEP=${GPU_CHECK_FAULT_STEP:-70}
  CKPT_EVERY=${GPU_CHECK_CKPT_EVERY:-30}; LOG_EVERY=10
  WORKERS=${GPU_CHECK_WORKERS:-$(( cores > 3 ? cores - 2 : 1 ))}
  # Warm-up excluded (cuDNN autotuning, the loader's first prefetch, compiling); median of 3.
  BENCH=(--arch resnet50 --batch-size 256 --image-size 224 --steps 10 --warmup 8 --repeats 3
         --workers "$WORKERS" --timeout 120)
  BENCH_CONFIGS=${GPU_CHECK_BENCH_CONFIGS:-fp32,bf16,bf16_cl,accelerate_ddp,deepspeed_zero0}
  COMPILED=(--configs bf16_cl_compile,deepspeed_zero0_compile --timeout 150)
  MODEL=()  # the defaults are the GPU recipe: resnet50, 224 px, batch 256, bf16, ZeRO-0
  T_BENCH=230; T_TRAIN=130
fi

failed=()
t_start=$SECONDS
# One run on a lent machine may last 600 s: every phase ends before this many seconds, so the
# summary and the files in $OUT always come back, whatever hangs.
BUDGET=${GPU_CHECK_BUDGET_S:-480}
# phase NAME TIMEOUT_S CMD...: run CMD with its output in $OUT/NAME.log; note a failure, go on.
phase() {
  local name=$1 limit=$2 t0=$SECONDS rc left
  shift 2
  left=$(( BUDGET - (SECONDS - t_start) - 15 ))
  if (( left < 20 )); then
    echo "== $name: skipped, the time budget ($BUDGET s) is spent"
    failed+=("$name(skipped)")
    return 124
  fi
  (( limit > left )) && limit=$left
  echo "== $name (at most $limit s): $*" | cut -c1-300
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "   $name: exit $rc after $(( SECONDS - t0 )) s (log: $OUT/$name.log)"
  if [[ $rc -ne 0 ]]; then
    failed+=("$name(exit $rc)")
    tail -n 15 "$OUT/$name.log" | sed 's/^/   | /'
  fi
  return $rc
}

{ nvidia-smi 2>&1 || echo "nvidia-smi: not available"; } > "$OUT/nvidia-smi.txt"
"$PY" -m resnet env > "$OUT/env.txt" 2>&1
echo "== gpu_check $(date -u +%FT%TZ) on $(hostname), $cores cores; tiny=${GPU_CHECK_TINY:-0}"
sed 's/^/   /' "$OUT/env.txt"
# Everything this script needs, checked before any minute of work is spent.
phase imports 90 "$PY" -c "import omegaconf, deepspeed, safetensors, accelerate, \
transformers, resnet.train.trainer; print('imports ok')"

DATA=$WORK/data
phase generate 150 "$PY" benchmarks/gen_images.py "$WORK/src" --images "$IMAGES" \
  --classes "$CLASSES" --size "$SIZE" --workers "$cores" \
  && phase pack 120 "$PY" -m resnet pack "$WORK/src" "$DATA" --layout imagefolder \
    --samples-per-shard "$SHARD" --quiet
grep -h "gen_images\|^packed" "$OUT/generate.log" "$OUT/pack.log" 2>/dev/null | sed 's/^/   /'

phase bench_train "$T_BENCH" "$PY" -m resnet bench train --data "$DATA" "${BENCH[@]}" \
  --configs "$BENCH_CONFIGS" --e2e cpu,device --json "$OUT/bench_train.json"
grep '^|' "$OUT/bench_train.log" 2>/dev/null | sed 's/^/   /'

TRAIN=(data.train="$DATA" data.val="$DATA" train.epochs=1000 train.max_steps="$STEPS"
       data.workers="$WORKERS" audit.sample_keys=true checkpoint.every_steps="$CKPT_EVERY"
       checkpoint.every_minutes=0 train.log_every_steps="$LOG_EVERY" wandb.mode=disabled
       "${MODEL[@]}")
train_run() {  # train_run NAME: one torchrun with 1 worker and 1 allowed restart
  phase "$1" "$T_TRAIN" "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 \
    --max-restarts 1 benchmarks/deterministic_train.py "${TRAIN[@]}" run.dir="$WORK/$1"
  for f in metrics.jsonl config.yaml; do
    [[ -f "$WORK/$1/$f" ]] && cp "$WORK/$1/$f" "$OUT/$1.$f"
  done
}
train_run train_a
# Run B: the worker SIGKILLs itself after step FAULT_STEP (first attempt only); torchrun
# restarts it and it resumes from the newest checkpoint before that step. The fault comes from
# the tests' shim (tests/fault_shim/sitecustomize.py), never from the product.
PYTHONPATH=$PWD/tests/fault_shim:$PYTHONPATH RESNET_TEST_FAULT_AFTER_STEP=$FAULT_STEP \
  RESNET_TEST_FAULT_RANK=0 train_run train_b
grep -h "resumed from" "$OUT/train_b.log" 2>/dev/null | sed 's/^/   /'

phase compare 60 "$PY" benchmarks/compare_runs.py "$WORK/train_a" "$WORK/train_b"
sed 's/^/   /' "$OUT/compare.log" 2>/dev/null

# Last: the compiled configurations (a minute or more of compiling each on a GPU), in what is
# left of the budget; the rows print as they finish, so a cut-short phase still reports some.
if [[ "${GPU_CHECK_COMPILE:-1}" == 1 ]]; then
  phase bench_compiled 400 "$PY" -m resnet bench train --data "$DATA" "${BENCH[@]}" \
    "${COMPILED[@]}" --e2e "" --json "$OUT/bench_compiled.json"
  grep '^|' "$OUT/bench_compiled.log" 2>/dev/null | sed 's/^/   /'
fi

# End-to-end img/s from run A's metrics.jsonl, past the first fifth of the steps (warm-up).
"$PY" - "$OUT/train_a.metrics.jsonl" "$STEPS" > "$OUT/end_to_end.txt" 2>&1 <<'EOF'
import json, statistics, sys
path, steps = sys.argv[1], int(sys.argv[2])
try:
    lines = [json.loads(l) for l in open(path)]
except OSError as exc:
    sys.exit(f"end-to-end: no metrics ({exc})")
rows = [l for l in lines if "img_per_s" in l and l["step"] > steps // 5]
if not rows:
    sys.exit("end-to-end: no logged training steps past the warm-up")
rate = statistics.median(r["img_per_s"] for r in rows)
wait = statistics.median(r["data_wait_frac"] for r in rows)
print(f"end-to-end from shards (run A, deterministic cuDNN, steps {rows[0]['step']}.."
      f"{rows[-1]['step']}, median of {len(rows)} log windows): {rate:,.0f} img/s, "
      f"data wait {wait:.0%} of step time")
EOF

{
  echo "gpu_check summary ($(date -u +%FT%TZ), $(( SECONDS - t_start )) s," \
    "tiny=${GPU_CHECK_TINY:-0})"
  grep '^# \(device\|CPU\|python\|resnet\)' "$OUT/bench_train.log" 2>/dev/null
  echo "resnet bench train (synthetic tensors, then end to end from the shards):"
  grep '^|' "$OUT/bench_train.log" 2>/dev/null
  grep '^|' "$OUT/bench_compiled.log" 2>/dev/null | grep -v '^| config \|^|---'
  cat "$OUT/end_to_end.txt"
  grep "^resume exact" "$OUT/compare.log" 2>/dev/null || echo "resume exact: not determined"
  if [[ ${#failed[@]} -gt 0 ]]; then
    echo "FAILED steps: ${failed[*]}"
  else
    echo "all steps passed"
  fi
} > "$OUT/summary.txt"
echo "== summary ($OUT/summary.txt)"
cat "$OUT/summary.txt"
[[ ${#failed[@]} -eq 0 ]]
