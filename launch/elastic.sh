#!/usr/bin/env bash
# Elastic, fault-tolerant training with torchrun: nodes may join, leave or fail and come back.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/elastic.sh CONFIG [key=value ...]

Run on every node. torchrun's c10d rendezvous at RDZV_ENDPOINT gathers between MIN_NODES and
MAX_NODES nodes; when a worker or a node fails, or a node joins, all workers restart (a failure
counts against MAX_RESTARTS, a join does not) and training resumes from the newest checkpoint:
in run.dir on storage every node sees (NFS, EFS, FSx), or with checkpoint.mirror=s3://... on
each node's own disk, restored from the mirror. `accelerate launch` cannot express MIN:MAX,
so this calls torchrun directly; `resnet train` sets up DeepSpeed itself.
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 is set for torchrun: without it, torch 2.14's agents
cannot admit a node that joins a running job (docs/operations.md).

Required environment:
  MIN_NODES           fewest nodes to train with
  RDZV_ENDPOINT       HOST:PORT of the rendezvous store, a host every node reaches. Best:
                      launch/rendezvous.sh PORT on a host apart from the training nodes
                      (its first line sets RDZV_BACKEND, RDZV_ENDPOINT and RDZV_CONF); then
                      any node may be lost. Without it, the node started on that host
                      hosts the store and must not be lost.

Optional environment:
  MAX_NODES           most nodes (default: MIN_NODES)
  NPROC_PER_NODE      workers per node (default: the GPUs nvidia-smi lists)
  MAX_RESTARTS        restarts of the worker group before giving up (default: 3)
  RDZV_ID             job id shared by all nodes (default: resnet)
  RDZV_BACKEND        torchrun's rendezvous backend (default: c10d). With c10d the workers
                      also keep their heartbeat and fence generation in that store
                      (RESNET_JOB_STORE); with another backend, in the group's own store
  LOCAL_ADDR          this node's address for the others (torchrun --local-addr; default:
                      its host name), for hosts whose name does not resolve to that address
  RDZV_CONF           torchrun --rdzv-conf, e.g. last_call_timeout=10,join_timeout=900
                      (torch's defaults: 30 s of last call after MIN_NODES are there, a
                      600 s join timeout)
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

  local backend=${RDZV_BACKEND:-c10d} job_store=()
  [[ "$backend" =~ ^[a-z0-9-]+$ ]] || die "RDZV_BACKEND must be a torchrun backend name (c10d, etcd-v2), got '$backend'"
  [[ "$backend" == c10d ]] && job_store=(RESNET_JOB_STORE="$RDZV_ENDPOINT")

  run env TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "${job_store[@]}" \
    torchrun --nnodes "$MIN_NODES:$max_nodes" --nproc-per-node "$nproc" \
    --max-restarts "$restarts" --rdzv-backend "$backend" --rdzv-endpoint "$RDZV_ENDPOINT" \
    --rdzv-id "${RDZV_ID:-resnet}" ${RDZV_CONF:+--rdzv-conf "$RDZV_CONF"} \
    ${LOCAL_ADDR:+--local-addr "$LOCAL_ADDR"} \
    -m resnet.cli train --config "$config" "$@"
}

main "$@"
