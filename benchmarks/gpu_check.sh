#!/usr/bin/env bash
# Issues 5 and 11's GPU check, in one prepared script: images/s and exact resume on one GPU.
#
#   bash benchmarks/gpu_check.sh prepare     # HERE (with a package index), once: fills .whl
#   bash benchmarks/gpu_check.sh             # on the GPU machine (8 minutes at most)
#   GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh   # the same steps on a CPU, tiny sizes
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh    # print the phases and their caps, run none
#
# Steps: (1) generate 4,200 ImageNet-like JPEGs (500x375) on local disk and pack them with
# `resnet pack`; (2) crops: device-decoded training crops against the CPU path's on the same
# samples (benchmarks/crop_check.py: mean |difference| at most 6 uint8 levels); (3) syncs:
# a few steady DeepSpeed ZeRO-1 steps counting every host-device and device-wide sync
# (benchmarks/sync_check.py): none allowed; (4) `resnet bench train`: the plain compiled
# step (bf16 channels_last, torch.compile) and the DeepSpeed ZeRO-0 step `resnet train` runs,
# on synthetic tensors, and end to end from the shards (data.decode cpu and device), every
# timed batch inside one epoch of the loader (steady state: no worker restart); (5) train
# ResNet-50 at 224 px with the default (GPU) config for 60 steps under `torchrun
# --nproc-per-node 1 --max-restarts 1` with the audit on, uninterrupted (run A) and with the
# worker killed mid-epoch by the trainer's fault hook (run B, tests/fault_shim; torchrun
# restarts it and it resumes from its checkpoint); (6) benchmarks/compare_runs.py: same
# samples from the resumed step on and bitwise equal final weights -> "resume exact: yes/no";
# (7) a summary whose first line is the headline: the DeepSpeed step's img/s as a fraction of
# the plain compiled step's. Both runs use benchmarks/deterministic_train.py (deterministic
# cuDNN) so that bitwise equality means something on a GPU; their img/s is a lower bound.
# Dropped to fit 8 minutes (caps add up to 430 s of the 480 s budget): the fp32, bf16 and
# accelerate_ddp rows and the compiled DeepSpeed row (add them with GPU_CHECK_BENCH_CONFIGS on
# a second call), and half of the training steps.
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
# GPU_CHECK_CKPT_EVERY, GPU_CHECK_WORKERS, GPU_CHECK_BENCH_CONFIGS, GPU_CHECK_BUDGET_S (default
# 480: every phase ends by then).
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
DRY=${GPU_CHECK_DRY:-0}
if [[ $DRY != 1 ]]; then
  mkdir -p "$OUT" "$WORK"
  # only what this script makes
  rm -rf "$WORK/src" "$WORK/data" "$WORK/syncs" "$WORK/train_a" "$WORK/train_b"
fi
cores=$(nproc)
if [[ "${GPU_CHECK_TINY:-0}" == 1 ]]; then
  # The same steps on a CPU in a few minutes: proves the script, measures nothing.
  IMAGES=${GPU_CHECK_IMAGES:-120}; CLASSES=4; SIZE=64x48; SHARD=32; GEN=(--plain)
  STEPS=${GPU_CHECK_STEPS:-10}; FAULT_STEP=${GPU_CHECK_FAULT_STEP:-6}
  CKPT_EVERY=${GPU_CHECK_CKPT_EVERY:-4}; LOG_EVERY=2; WORKERS=${GPU_CHECK_WORKERS:-1}
  BATCH=8; WARMUP=1; TIMED=2; REPEATS=2
  BENCH=(--arch resnet18 --image-size 32 --compile-backend eager --timeout 400)
  CROPS=(--batches 2 --batch-size 8 --image-size 32 --bound 12)
  SYNC_MODEL=(data.image_size=32)
  MODEL=(model.arch=resnet18 data.image_size=32 train.batch_size=8)
  # Hang guards, not a plan: the test suite runs this on a busy 2-core machine (beside
  # another copy of itself, each phase takes several times its ~10-40 s on a quiet one).
  CAPS=(imports=240 generate=120 pack=120 crops=240 syncs=400 bench_train=800 train_a=400
        train_b=500 compare=120)
  BUDGET=${GPU_CHECK_BUDGET_S:-3000}; export OMP_NUM_THREADS=1
else
  IMAGES=${GPU_CHECK_IMAGES:-4200}; CLASSES=100; SIZE=500x375; SHARD=250; GEN=()
  STEPS=${GPU_CHECK_STEPS:-60}; FAULT_STEP=${GPU_CHECK_FAULT_STEP:-35}
  CKPT_EVERY=${GPU_CHECK_CKPT_EVERY:-15}; LOG_EVERY=10
  WORKERS=${GPU_CHECK_WORKERS:-$(( cores > 3 ? cores - 2 : 1 ))}
  # Warm-up excluded (cuDNN autotuning, the loader's first prefetch, compiling); median of 3.
  BATCH=256; WARMUP=5; TIMED=3; REPEATS=3
  BENCH=(--arch resnet50 --image-size 224 --timeout 120)
  CROPS=(--batches 2 --batch-size 64 --image-size 224 --bound 6)
  SYNC_MODEL=(data.image_size=64)
  MODEL=()  # the defaults are the GPU recipe: resnet50, 224 px, batch 256, bf16, ZeRO-0
  # Expected on one H100 (16 cores), not yet measured: imports 10 s, generate 15, pack 10,
  # crops 15, syncs 25, bench_train 110 (70 of them compiling), train_a 35, train_b 50,
  # compare 5.
  CAPS=(imports=30 generate=40 pack=25 crops=30 syncs=35 bench_train=140 train_a=50
        train_b=65 compare=15)
  BUDGET=${GPU_CHECK_BUDGET_S:-480}
fi
BENCH+=(--batch-size "$BATCH" --warmup "$WARMUP" --steps "$TIMED" --repeats "$REPEATS"
        --workers "$WORKERS")
BENCH_CONFIGS=${GPU_CHECK_BENCH_CONFIGS:-bf16_cl_compile,deepspeed_zero0}
# Steady state end to end: every warm-up and timed batch of a row inside one epoch (a new
# epoch starts the loader's workers again). Train images: 90 % of IMAGES (gen_images' val-frac).
per_epoch=$(( IMAGES * 9 / 10 / BATCH ))
if (( WARMUP + TIMED * REPEATS > per_epoch )); then
  echo "gpu_check: $(( WARMUP + TIMED * REPEATS )) batches per end-to-end row, but one epoch" \
    "of $IMAGES images has $per_epoch: raise GPU_CHECK_IMAGES" >&2
  exit 2
fi
cap_sum=0
for c in "${CAPS[@]}"; do cap_sum=$(( cap_sum + ${c#*=} )); done
# Margin: besides the 15 s each phase leaves for the summary, this much for slow starts.
if (( cap_sum > BUDGET - 45 )); then
  echo "gpu_check: the phase caps add up to $cap_sum s, more than the budget ($BUDGET s) less" \
    "45 s of margin" >&2
  exit 2
fi
cap() {  # cap NAME: the phase's time cap in seconds
  local c
  for c in "${CAPS[@]}"; do [[ ${c%%=*} == "$1" ]] && echo "${c#*=}" && return 0; done
  echo "gpu_check: no cap for phase $1" >&2
  return 2
}

failed=()
t_start=$SECONDS
# One run on a lent machine may last 600 s: every phase ends before BUDGET seconds, so the
# summary and the files in $OUT always come back, whatever hangs.
# phase NAME CMD...: run CMD with its output in $OUT/NAME.log, for at most the phase's cap
# (and what is left of the budget); note a failure, go on. Dry run: print it, run nothing.
phase() {
  local name=$1 limit t0=$SECONDS rc left
  limit=$(cap "$name") || exit 2
  shift
  if [[ $DRY == 1 ]]; then
    echo "== $name (at most $limit s): $*"
    return 0
  fi
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

echo "== gpu_check $(date -u +%FT%TZ) on $(hostname), $cores cores; tiny=${GPU_CHECK_TINY:-0}" \
  "dry=$DRY; phase caps $cap_sum s of a $BUDGET s budget"
if [[ $DRY != 1 ]]; then
  { nvidia-smi 2>&1 || echo "nvidia-smi: not available"; } > "$OUT/nvidia-smi.txt"
  "$PY" -m resnet env > "$OUT/env.txt" 2>&1
  sed 's/^/   /' "$OUT/env.txt"
fi
# Everything this script needs, checked before any minute of work is spent.
phase imports "$PY" -c "import omegaconf, deepspeed, safetensors, accelerate, \
transformers, resnet.train.trainer; print('imports ok')"

DATA=$WORK/data
phase generate "$PY" benchmarks/gen_images.py "$WORK/src" --images "$IMAGES" \
  --classes "$CLASSES" --size "$SIZE" --workers "$cores" "${GEN[@]}" \
  && phase pack "$PY" -m resnet pack "$WORK/src" "$DATA" --layout imagefolder \
    --samples-per-shard "$SHARD" --quiet
grep -h "gen_images\|^packed" "$OUT/generate.log" "$OUT/pack.log" 2>/dev/null | sed 's/^/   /'

phase crops "$PY" benchmarks/crop_check.py "$DATA" "${CROPS[@]}"
grep -h "^crop check" "$OUT/crops.log" 2>/dev/null | sed 's/^/   /'

# A few steady DeepSpeed ZeRO-1 steps (resnet18): any sync fails the phase.
phase syncs "$PY" benchmarks/sync_check.py "$WORK/syncs" data.train="$DATA" data.val= \
  model.arch=resnet18 "${SYNC_MODEL[@]}" data.workers=0 train.batch_size=8 \
  train.global_batch_size=16 train.max_steps=8 train.log_every_steps=6 \
  checkpoint.every_steps=0 checkpoint.every_minutes=0 wandb.mode=disabled \
  deepspeed.engine=deepspeed deepspeed.zero_stage=1 train.precision=bf16
grep -h "^steady-state syncs" "$OUT/syncs.log" 2>/dev/null | sed 's/^/   /'

phase bench_train "$PY" -m resnet bench train --data "$DATA" "${BENCH[@]}" \
  --configs "$BENCH_CONFIGS" --e2e cpu,device --json "$OUT/bench_train.json"
grep '^|' "$OUT/bench_train.log" 2>/dev/null | sed 's/^/   /'

TRAIN=(data.train="$DATA" data.val="$DATA" train.epochs=1000 train.max_steps="$STEPS"
       data.workers="$WORKERS" audit.sample_keys=true checkpoint.every_steps="$CKPT_EVERY"
       checkpoint.every_minutes=0 train.log_every_steps="$LOG_EVERY" wandb.mode=disabled
       "${MODEL[@]}")
train_run() {  # train_run NAME: one torchrun with 1 worker and 1 allowed restart
  phase "$1" "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 \
    --max-restarts 1 benchmarks/deterministic_train.py "${TRAIN[@]}" run.dir="$WORK/$1"
  [[ $DRY == 1 ]] && return
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

phase compare "$PY" benchmarks/compare_runs.py "$WORK/train_a" "$WORK/train_b"
sed 's/^/   /' "$OUT/compare.log" 2>/dev/null

if [[ $DRY == 1 ]]; then
  echo "dry run: ${#CAPS[@]} phases, caps $cap_sum s of the $BUDGET s budget"
  exit 0
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

# The headline: the DeepSpeed step resnet train runs against the plain compiled step.
"$PY" - "$OUT/bench_train.json" > "$OUT/headline.txt" 2>&1 <<'EOF' || failed+=("headline")
import json, sys
try:
    rows = {r["config"]: r for r in json.load(open(sys.argv[1]))["results"] if "error" not in r}
except (OSError, ValueError) as exc:
    sys.exit(f"headline: no bench results ({exc})")
plain = rows.get("bf16_cl_compile")
if not plain:
    sys.exit("headline: no bf16_cl_compile row")
for name in ("deepspeed_zero0", "deepspeed_zero0_compile"):
    if name in rows:
        ratio = rows[name]["img_per_s"] / plain["img_per_s"]
        print(f"headline: {name} {rows[name]['img_per_s']:,.0f} img/s = {ratio:.2f} x the plain "
              f"compiled step (bf16_cl_compile, {plain['img_per_s']:,.0f} img/s)")
EOF

{
  cat "$OUT/headline.txt"
  echo "gpu_check summary ($(date -u +%FT%TZ), $(( SECONDS - t_start )) s," \
    "tiny=${GPU_CHECK_TINY:-0})"
  grep '^# \(device\|CPU\|python\|resnet\)' "$OUT/bench_train.log" 2>/dev/null
  echo "resnet bench train (synthetic tensors, then end to end from the shards):"
  grep '^|' "$OUT/bench_train.log" 2>/dev/null
  cat "$OUT/end_to_end.txt"
  grep -h "^crop check" "$OUT/crops.log" 2>/dev/null || echo "crop check: not determined"
  grep -h "^steady-state syncs" "$OUT/syncs.log" 2>/dev/null ||
    echo "steady-state syncs: not determined"
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
