"""Silent-node detection and fencing, apart from the collectives.

A node that loses power, panics or is cut off closes no socket: its peers sit in a gloo/NCCL
collective until the process group's timeout (dist.collective_timeout_s). So every rank runs
a heartbeat through the job's store (a TCPStore every node reaches: launch/elastic.sh passes the
rendezvous store as RESNET_JOB_STORE, else the group's own store at MASTER_ADDR:MASTER_PORT):

- a *beat* thread adds 1 to this rank's counter and reads the counter of the rank after it
  (rank r watches r + 1 mod W: any silent set of ranks has a live rank just before it, and the
  store serves 3 small requests per rank per period, not W^2);
- a *watchdog* thread, which never touches the network (a TCPStore request to a frozen host
  blocks for ever, its timeout notwithstanding: measured with torch 2.14), leaves when the
  watched rank's counter or the store itself has not moved for dist.heartbeat_timeout_s.

Leaving = log which rank and host went silent and for how long, dump this process's thread
stacks (faulthandler), raise the job's *generation* in the store, and exit LEFT_EXIT_CODE
without cleanup (the main thread is stuck in a collective): torchrun restarts the group
without the silent node. The generation fences the old group: each group takes a new one when
it starts, and a rank writes a checkpoint, `latest`, `final/`, metrics or a mirror upload only
after `Membership.check` saw its own generation still current and its peers heard within the
timeout. A frozen node that thaws (or a partitioned one whose link comes back) therefore
finds itself fenced and leaves; its torchrun agent then joins the running job as a new node.
"""
from __future__ import annotations

import atexit
import faulthandler
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch.distributed as dist

from resnet.config import DistConfig
from resnet.logs import write_unlocked

LEFT_EXIT_CODE = 75  # a rank that left a group with a silent member, or found itself fenced
STORE = -1  # the rank number PeerWatch gives the store itself
DONE = -(2 ** 62)  # a counter set to this: the rank finished normally, stop watching it


@dataclass(frozen=True)
class Silence:
    rank: int  # STORE: the store itself
    seconds: float


class PeerWatch:
    """What the beats showed, judged against a clock the caller passes (monotonic time in
    production, a fake one in tests): the watched ranks and the store must each show progress
    within `timeout_s`."""

    def __init__(self, watched: list[int], timeout_s: float, now: float) -> None:
        self.timeout_s = timeout_s
        self._value: dict[int, int | None] = dict.fromkeys(watched)
        self._moved: dict[int, float] = dict.fromkeys([STORE, *watched], now)
        self._lock = threading.Lock()

    def store_answered(self, now: float) -> None:
        with self._lock:
            self._moved[STORE] = now

    def saw(self, rank: int, value: int, now: float) -> None:
        with self._lock:
            if value == DONE:
                self._value.pop(rank, None)
                self._moved.pop(rank, None)
            elif rank in self._value and value != self._value[rank]:
                self._value[rank] = value
                self._moved[rank] = now

    def silent(self, now: float, within: float | None = None) -> Silence | None:
        """The longest-silent of the store and the watched ranks, if silent over the limit
        (`within`, default the timeout)."""
        limit = self.timeout_s if within is None else within
        with self._lock:
            rank, moved = min(self._moved.items(), key=lambda kv: kv[1])
        return Silence(rank, now - moved) if now - moved > limit else None


def _key(run_id: str, *parts: object) -> str:
    return "/".join(["resnet/liveness", run_id, *map(str, parts)])


def _store_address() -> tuple[str, int, str]:
    """(host, port, what it is): the job's rendezvous store if the launcher named it."""
    job = os.environ.get("RESNET_JOB_STORE", "")
    if job:
        host, _, port = job.rpartition(":")
        return host, int(port), f"the job store {job}"
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    return host, port, f"the group's store {host}:{port} (on rank 0's host)"


def _client(host: str, port: int) -> dist.TCPStore:
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=60))


class Membership:
    """This rank's place in the current group: the heartbeat, the watchdog and the fence."""

    def __init__(self, cfg: DistConfig, rank: int, hosts: list[str], generation: int,
                 store_factory: Callable[[], dist.TCPStore], store_name: str,
                 run_id: str) -> None:
        self.cfg, self.rank, self.hosts = cfg, rank, hosts
        self.generation, self.store_name, self.run_id = generation, store_name, run_id
        world = len(hosts)
        self.watched = (rank + 1) % world
        self.watch = PeerWatch([self.watched], cfg.heartbeat_timeout_s, time.monotonic())
        self._beat_store, self._fence_store = store_factory(), store_factory()
        self._beat = 0
        self._stopped = threading.Event()

    @property
    def generation_key(self) -> str:
        return _key(self.run_id, "generation")

    def _beat_key(self, rank: int) -> str:
        return _key(self.run_id, f"g{self.generation}", "beat", rank)

    def start(self) -> None:
        for target, name in ((self._beat_loop, "heartbeat"), (self._watchdog, "watchdog")):
            threading.Thread(target=target, name=f"liveness-{name}", daemon=True).start()
        atexit.register(self.finish)

    def finish(self) -> None:
        """A normal exit: the rank watching this one must not take it for a lost node."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._bounded(lambda: self._fence_store.set(self._beat_key(self.rank), str(DONE)))

    def _bounded(self, request: Callable[[], object]) -> None:
        """A store request that may not hold this process longer than a heartbeat period (a
        frozen store never answers); failures are ignored (nobody is left to tell)."""
        def attempt() -> None:
            try:
                request()
            except Exception:  # noqa: BLE001
                pass

        thread = threading.Thread(target=attempt, daemon=True)
        thread.start()
        thread.join(timeout=self.cfg.heartbeat_period_s)

    # -- the fence (training thread, and the mirror's upload thread) -----------------------
    def check(self, what: str) -> None:
        """Return only if this rank still belongs to the current group; else leave."""
        # A rank that was frozen sees its last beats as old at once, without the network.
        silence = self.watch.silent(time.monotonic(), within=self._lease_s())
        if silence:
            self.leave(f"before {what}: {self._describe(silence)}")
        current = self._fence_store.add(self.generation_key, 0)
        if current != self.generation:
            self.leave(f"before {what}: this group (generation {self.generation}) was "
                       f"replaced by generation {current} while this rank was away; "
                       f"leaving without writing")

    def _lease_s(self) -> float:
        # Shorter than the peers' timeout by two periods: a peer that left because of us
        # (its last view of our beats up to a period older than ours of its) is never still
        # within our lease.
        return self.cfg.heartbeat_timeout_s - 2 * self.cfg.heartbeat_period_s

    # -- the threads ------------------------------------------------------------------------
    def _beat_loop(self) -> None:
        store, period = self._beat_store, self.cfg.heartbeat_period_s
        while not self._stopped.is_set():
            try:
                self._beat += 1
                store.set(self._beat_key(self.rank), str(self._beat))
                value = int(store.add(self._beat_key(self.watched), 0) or 0)
                current = store.add(self.generation_key, 0)
                now = time.monotonic()
                self.watch.store_answered(now)
                self.watch.saw(self.watched, value, now)
                if current != self.generation and not self._stopped.is_set():
                    self.leave(f"this group (generation {self.generation}) was replaced by "
                               f"generation {current}")
            except Exception:  # noqa: BLE001  (a refused or reset store: the watchdog judges)
                pass
            self._stopped.wait(period)

    def _watchdog(self) -> None:
        while not self._stopped.wait(self.cfg.heartbeat_period_s):
            silence = self.watch.silent(time.monotonic())
            if silence:
                self.leave(self._describe(silence))

    def _describe(self, silence: Silence) -> str:
        if silence.rank == STORE:
            return f"{self.store_name} has not answered for {silence.seconds:.0f} s"
        return (f"rank {silence.rank} (host {self.hosts[silence.rank]}) has been silent for "
                f"{silence.seconds:.0f} s (dist.heartbeat_timeout_s="
                f"{self.cfg.heartbeat_timeout_s:g})")

    def leave(self, reason: str) -> None:
        """Log, dump the stacks, fence the old group, exit. Never returns."""
        # Lock-free (logs.write_unlocked): the stuck main thread may hold a logging lock.
        write_unlocked(self.rank, "ERROR", f"rank {self.rank} (host {self.hosts[self.rank]}): "
                       f"{reason}; leaving the group (exit {LEFT_EXIT_CODE}) so that torchrun "
                       f"forms a new one. This process's threads:")
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        self._stopped.set()
        # Unreachable: the next group raises it anyway when it starts.
        self._bounded(lambda: self._fence_store.add(self.generation_key, 1))
        os._exit(LEFT_EXIT_CODE)


def join(cfg: DistConfig, rank: int, world: int, group) -> Membership | None:
    """Every rank of a new group calls this once (a collective): the group takes the next
    generation and starts its heartbeat. None for a single process."""
    if world < 2:
        return None
    host, port, name = _store_address()
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    generation = _client(host, port).add(_key(run_id, "generation"), 1) if rank == 0 else 0
    views: list = [None] * world
    dist.all_gather_object(views, (socket.gethostname(), generation), group=group)
    membership = Membership(cfg, rank, [v[0] for v in views], views[0][1],
                            lambda: _client(host, port), name, run_id)
    membership.start()
    return membership
