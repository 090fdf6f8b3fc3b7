#!/usr/bin/env bash
# Train on one machine with all its GPUs: accelerate launch with DeepSpeed.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/single_node.sh CONFIG [key=value ...]

Train on this machine's GPUs with `accelerate launch` (DeepSpeed through Accelerate).
Overrides are passed to `resnet train` as they are, e.g. train.epochs=10 run.dir=runs/r50.

Environment:
  NUM_GPUS            processes to start (default: the GPUs nvidia-smi lists)
  ACCELERATE_CONFIG   accelerate config file (default: configs/accelerate/deepspeed_single_node.yaml)
  MAIN_PORT           local rendezvous port (default: 29500)
  DRY_RUN=1           print the command instead of running it

Example:
  launch/single_node.sh configs/imagenet1k.yaml train.epochs=10
USAGE
}

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

main() {
  check_args "$@"
  local config=$1; shift

  local repo accelerate_config num_gpus port
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  accelerate_config=${ACCELERATE_CONFIG:-$repo/configs/accelerate/deepspeed_single_node.yaml}
  [[ -f "$accelerate_config" ]] || die "accelerate config not found: $accelerate_config"
  num_gpus=${NUM_GPUS:-$(count_gpus NUM_GPUS)}
  [[ "$num_gpus" =~ ^[1-9][0-9]*$ ]] || die "NUM_GPUS must be a positive integer, got '$num_gpus'"
  port=${MAIN_PORT:-29500}

  run accelerate launch --config_file "$accelerate_config" \
    --num_machines 1 --num_processes "$num_gpus" --main_process_port "$port" \
    -m resnet.cli train --config "$config" "$@"
}

main "$@"
