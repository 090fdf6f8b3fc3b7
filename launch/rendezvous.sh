#!/usr/bin/env bash
# The job's rendezvous service, apart from the training nodes: any node may then be lost.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/rendezvous.sh PORT

Runs torchrun's c10d rendezvous store in the foreground until SIGTERM (or Ctrl-C), listening
on PORT on every interface. Its first line on stdout is the environment every node's
launch/elastic.sh needs, e.g.

  RDZV_BACKEND=c10d RDZV_ENDPOINT=head.example.com:29400 RDZV_CONF=is_host=false

Run it where no training node runs: a small on-demand instance (EC2), the batch host of the
allocation (SLURM), a Deployment with a Service in front (Kubernetes). It holds the
rendezvous state, the workers' heartbeats and the fence generation (docs/operations.md):
if it is lost, the job stops at the next membership change; start it again and restart the
nodes (they resume from the newest checkpoint).

Optional environment:
  RDZV_HOST   the name or address the nodes use to reach this host (default: hostname -f)
USAGE
}

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

main() {
  if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then usage; exit 0; fi
  [[ $# -eq 1 ]] || { usage >&2; die "give exactly one argument: PORT"; }
  need_int PORT "$1"
  (( $1 >= 1 && $1 <= 65535 )) || die "PORT must be 1-65535, got $1"
  run python -m resnet.rendezvous "$1" --host "${RDZV_HOST:-$(hostname -f)}"
}

main "$@"
