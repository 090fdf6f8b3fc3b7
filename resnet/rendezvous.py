"""The job's rendezvous store, run apart from the training nodes (launch/rendezvous.sh).

torchrun's c10d rendezvous keeps its state in a TCPStore that, by default, the first agent
hosts: losing that node ends the job. Held here instead, in a process of its own, every
training node is expendable; agents reach it as clients (`--rdzv-conf is_host=false`). The
workers reach it too (RESNET_JOB_STORE): the heartbeat and the fence generation live there.
"""
from __future__ import annotations

import argparse
import signal
import socket

import torch.distributed as dist


def serve(port: int, host: str) -> None:
    # multi_tenant: one server per port in this process, shared by every job id (RDZV_ID).
    store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False,
                          multi_tenant=True)
    # The first line is the environment the agents need (launch/elastic.sh reads these).
    print(f"RDZV_BACKEND=c10d RDZV_ENDPOINT={host}:{port} RDZV_CONF=is_host=false", flush=True)
    print(f"rendezvous store listening on port {port}; SIGTERM or Ctrl-C ends it", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    del store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--host", default=socket.getfqdn(),
                        help="the name or address the agents use to reach this host")
    args = parser.parse_args()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    serve(args.port, args.host)


if __name__ == "__main__":
    main()
