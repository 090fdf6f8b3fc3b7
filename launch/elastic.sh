#!/usr/bin/env bash
# Elastic, fault-tolerant training with torchrun: nodes may join, leave or fail and come back.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/elastic.sh CONFIG [key=value ...]

Run on every node. torchrun's c10d rendezvous at RDZV_ENDPOINT gathers between MIN_NODES and
MAX_NODES nodes; when a worker or a node fails, all workers restart (up to MAX_RESTARTS times)
and training resumes from the newest checkpoint in run.dir, which must be on storage every
node sees (NFS, EFS, FSx). `accelerate launch` cannot express MIN:MAX,
so this calls torchrun directly; `resnet train` sets up DeepSpeed itself.

Required environment:
  MIN_NODES           fewest nodes to train with
  RDZV_ENDPOINT       HOST:PORT of the rendezvous store (a host every node reaches; the
                      first node started there hosts it)

Optional environment:
  MAX_NODES           most nodes (default: MIN_NODES)
  NPROC_PER_NODE      workers per node (default: the GPUs nvidia-smi lists)
  MAX_RESTARTS        restarts of the worker group before giving up (default: 3)
  RDZV_ID             job id shared by all nodes (default: resnet)
  DRY_RUN=1           print the command instead of running it

Example:
  MIN_NODES=2 MAX_NODES=4 RDZV_ENDPOINT=10.0.0.1:29400 launch/elastic.sh configs/imagenet1k.yaml
USAGE
}

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

main() {
  check_args "$@"
  local config=$1; shift
  need MIN_NODES RDZV_ENDPOINT
  [[ "$RDZV_ENDPOINT" =~ ^[^:]+:[0-9]+$ ]] || die "RDZV_ENDPOINT must be HOST:PORT, got '$RDZV_ENDPOINT'"

  local max_nodes nproc restarts
  max_nodes=${MAX_NODES:-$MIN_NODES}
  need_int MIN_NODES "$MIN_NODES"
  need_int MAX_NODES "$max_nodes"
  (( MIN_NODES >= 1 && MIN_NODES <= max_nodes )) || die "need 1 <= MIN_NODES <= MAX_NODES, got $MIN_NODES:$max_nodes"
  nproc=${NPROC_PER_NODE:-$(count_gpus NPROC_PER_NODE)}
  need_int NPROC_PER_NODE "$nproc"
  restarts=${MAX_RESTARTS:-3}
  need_int MAX_RESTARTS "$restarts"

  run torchrun --nnodes "$MIN_NODES:$max_nodes" --nproc-per-node "$nproc" \
    --max-restarts "$restarts" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" \
    --rdzv-id "${RDZV_ID:-resnet}" \
    -m resnet.cli train --config "$config" "$@"
}

main "$@"
