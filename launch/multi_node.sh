#!/usr/bin/env bash
# Train on several machines with accelerate launch: run this once on every machine.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/multi_node.sh CONFIG [key=value ...]

Run the same command on every machine, each with its own MACHINE_RANK (0 on the machine at
MAIN_ADDR). run.dir must be on storage every machine sees (NFS, EFS, FSx for Lustre).

Required environment:
  NUM_MACHINES        how many machines take part
  MACHINE_RANK        this machine's rank, 0 .. NUM_MACHINES-1
  MAIN_ADDR           address of machine 0, reachable from all machines

Optional environment:
  MAIN_PORT           rendezvous port on MAIN_ADDR (default: 29500)
  GPUS_PER_NODE       processes per machine (default: the GPUs nvidia-smi lists)
  ACCELERATE_CONFIG   accelerate config file (default: configs/accelerate/multi_node.yaml)
  DRY_RUN=1           print the command instead of running it

Example (machine 1 of 2):
  NUM_MACHINES=2 MACHINE_RANK=1 MAIN_ADDR=10.0.0.1 launch/multi_node.sh configs/imagenet1k.yaml
USAGE
}

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

main() {
  check_args "$@"
  local config=$1; shift
  need NUM_MACHINES MACHINE_RANK MAIN_ADDR
  need_int NUM_MACHINES "$NUM_MACHINES"
  need_int MACHINE_RANK "$MACHINE_RANK"
  (( MACHINE_RANK < NUM_MACHINES )) || die "MACHINE_RANK=$MACHINE_RANK is not below NUM_MACHINES=$NUM_MACHINES"

  local repo accelerate_config gpus port
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  accelerate_config=${ACCELERATE_CONFIG:-$repo/configs/accelerate/multi_node.yaml}
  [[ -f "$accelerate_config" ]] || die "accelerate config not found: $accelerate_config"
  gpus=${GPUS_PER_NODE:-$(count_gpus GPUS_PER_NODE)}
  need_int GPUS_PER_NODE "$gpus"
  port=${MAIN_PORT:-29500}

  # accelerate wants the total process count across machines.
  run accelerate launch --config_file "$accelerate_config" \
    --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK" \
    --main_process_ip "$MAIN_ADDR" --main_process_port "$port" \
    --num_processes "$(( NUM_MACHINES * gpus ))" \
    -m resnet.cli train --config "$config" "$@"
}

main "$@"
