"""Parameter server: sharded servers, push/pull, and clocks with bounded staleness (SSP).

Ranks 0..S-1 are servers, the rest workers. The flat parameter vector (and, on the app's
side, its AdamW state) is cut into S contiguous shards by `ring.shard_bounds`; server s
owns shard s. A training step is a *clock*:

    worker w                                   server s
    pull(c): "params for clock c"       ->     replies once version >= c - k
    forward/backward on clock c's data
    push(c): header + gradient shard s  ->     adds it to clock c's sum as it arrives
                                               once every worker has pushed clock c (and
                                               the clocks before it are applied): apply
                                               clock c (the app's `apply`: clip by the
                                               global norm, AdamW), version = c + 1

`version` counts applied clocks. With staleness k = 0 a worker computes clock c on exactly
the parameters of version c: bulk-synchronous (BSP), the same update as the ring. With
k > 0 (stale synchronous parallel, Ho et al. 2013) it may compute clock c on a version as
old as c - k, so a fast worker runs up to k clocks ahead of the slowest instead of waiting
at every step; updates are still applied per clock, in order, so that AdamW (not additive,
unlike SGD) sees one gradient per step. The staleness of a gradient is c - (the version it
was computed on); with `staleness_lr` a clock's learning rate is scaled by the mean of
1 / (1 + staleness) over its pushes (scaling the gradient itself would do nothing: AdamW
divides it out). With `predict` (weight prediction, as SpecTrain and PipeMare do for
pipeline delays) a pull answered at version v for clock c > v gets the parameters moved on
by c - v times the shard's last update: the point where the gradient will be applied, as
well as one step predicts it. AdamW's steps change slowly (its momentum), so the guess is
good, and stale gradients hurt far less (README, "Parameter server").

Messages are point-to-point with tags (below): a push is a small float64 header and one
payload message (the gradient shard, or a compressor's buffer, comm/compress.py); a pull is
a request, answered by a header and the parameter shard. Servers take whatever arrives
first (Iprobe on any source), so a slow worker delays only the clocks that need it.
A push may carry a stop flag (a preemption signal on that worker): the servers then name
the clock c + k + 1 at which every worker stops. No worker can have started it yet (none
is more than k ahead of the pusher of c), and each learns of it with the pull that lets it
start that clock, so all stop at one clock without a collective at every step, which
would undo the staleness.
`sync(c)` meets every rank at clock c: once all workers asked and c clocks are applied, a
server calls `on_sync(c)`, a collective the workers join (a checkpoint of version c).
With `--balance dynamic`, server 0 also hands out a clock's micro-batches (`take`: a few
at a time, fewer as they run out), so a faster worker computes more of them; a clock is
complete once its pushes cover every micro-batch.

A worker's parameters and gradients may live on a device: staged (comm/backend.py), they
pass through host buffers; the servers hold theirs on the host.
Waiting polls and yields the core, under the watchdog: a lost worker or server aborts the
job after `timeout` instead of hanging it. comm/ knows no model: the server's update is a
callback.
"""
import os
import time

import numpy as np
from mpi4py import MPI

from comm import ring, watchdog
from comm.backend import after_transfer, receive_buffer, send_buffer

TAG_PUSH, TAG_PUSH_DATA, TAG_PULL, TAG_PARAMS, TAG_PARAMS_DATA, TAG_TAKE, TAG_GIVEN, \
    TAG_STOP, TAG_SYNC = range(700, 709)
PUSH_HEADER = 5     # clock, version used, micro-batches, loss contribution, stop flag
PARAMS_HEADER = 7   # version; loss, norm, skipped, lr of the newest applied clock; the clock
                    # at which every worker stops (-1: none) and why; then how many pushes
                    # had each staleness 0..k so far


def shard_of(n: int, servers: int, s: int):
    """[lo, hi) of the flat parameter vector that server s owns."""
    return ring.shard_bounds(n, servers, s)


# s: a waiting rank's sleeps double up to this. Waking from a sleep costs this VM about
# 0.25 ms more than the sleep: with 1 ms here a server noticed a push 1.6-1.8 ms after it was
# sent (median), with 0.2 ms 0.39-0.46 ms, and `baby`'s ps steps (1 server, 1 worker) took
# 0.6-2.5 ms less, with 3 workers on 2 cores no more.
MAX_POLL_PAUSE = 2e-4
# s: the longest sleep while a transfer already under way finishes (a parameter shard
# behind its header, a worker's own push, which a server takes as soon as it notices it):
# MPICH moves a large message in pieces, each when both ends poll, and a worker that slept
# up to 1 ms between polls took 2.3-2.7 ms to receive `baby`'s 3.4 MB (1.1 ms now; with 3
# workers on 2 cores, where a push may wait behind others, steps were no slower).
TRANSFER_POLL_PAUSE = 2e-5


def _poll(test, what, timeout, max_pause=MAX_POLL_PAUSE):
    """Waits until test() is true, yielding the core between polls (MPICH's blocking calls
    spin, and servers share cores with workers)."""
    if test():
        return
    with watchdog.waiting(what, timeout):
        pause = 0.0
        while not test():
            if pause:
                time.sleep(pause)
            else:
                os.sched_yield()
            pause = min(max(pause * 2, 1e-5), max_pause)


class Server:
    """The loop of one server. `apply(clock, grad_shard, loss, lr_scale)` is the app's
    update of the shard (it may talk to the other servers: every server applies every
    clock, in order); it returns (loss, norm, skipped, lr), which workers receive with the
    next pull."""

    def __init__(self, comm, servers: int, flat, apply, staleness=0, micro_total=None,
                 decode=None, staleness_lr=False, predict=False, start_version=0,
                 timeout=None, on_sync=None):
        self.comm, self.servers = comm, servers
        self.rank = comm.Get_rank()
        self.workers = comm.Get_size() - servers
        self.lo, self.hi = shard_of(flat.size, servers, self.rank)
        self.flat = flat  # the parameters; this server keeps [lo, hi) up to date
        self.apply, self.staleness, self.decode = apply, staleness, decode
        self.micro_total = micro_total
        self.staleness_lr, self.timeout = staleness_lr, timeout
        # weight prediction: the shard's last update, to move a stale pull on with
        self.last_update = np.zeros(self.hi - self.lo, flat.dtype) \
            if predict and staleness > 0 else None
        self.on_sync = on_sync or (lambda clock: None)
        self.syncs = {}  # clock -> workers that asked to meet there
        self.version = start_version
        self.info = np.zeros(PARAMS_HEADER + staleness + 1)  # sent with every pull
        self.info[0] = start_version
        self.info[5] = -1  # no stop named yet
        self.info[1:3] = np.nan  # loss and norm: no clock applied yet
        self.clocks = {}  # clock -> {worker: (gradient, micro-batches, loss, lr scale)}
        self.pulls = []  # (worker rank, version it needs), waiting for a new enough version
        self.given = {}  # dynamic: clock -> micro-batches handed out (server 0)
        self.stopped = 0

    def run(self):
        """Serves until every worker has said stop."""
        status = MPI.Status()
        while self.stopped < self.workers:
            _poll(lambda: self.comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG, status),
                  f"server {self.rank}: a message from a worker (version {self.version})",
                  self.timeout)
            source, tag = status.Get_source(), status.Get_tag()
            if tag == TAG_PUSH:
                self._push(source)
            elif tag == TAG_PULL:
                wanted = np.empty(2, np.int64)  # clock, and whether it must be fresh
                self.comm.Recv(wanted, source, TAG_PULL)
                need = int(wanted[0]) - (0 if wanted[1] else self.staleness)
                self.pulls.append((source, need, int(wanted[0])))
            elif tag == TAG_TAKE:
                self._take(source)
            elif tag == TAG_SYNC:
                clock = np.empty(1, np.int64)
                self.comm.Recv(clock, source, TAG_SYNC)
                self.syncs[int(clock[0])] = self.syncs.get(int(clock[0]), 0) + 1
            elif tag == TAG_STOP:
                self.comm.Recv(np.empty(0, np.int64), source, TAG_STOP)
                self.stopped += 1
            else:
                raise RuntimeError(f"server {self.rank}: unexpected tag {tag} from {source}")
            self._apply_complete_clocks()
            self._answer_pulls()
            if self.syncs.get(self.version) == self.workers:  # nobody can push beyond it
                del self.syncs[self.version]
                self.on_sync(self.version)

    def _push(self, source):
        header = np.empty(PUSH_HEADER)
        self.comm.Recv(header, source, TAG_PUSH)
        clock, used, micro, loss = int(header[0]), int(header[1]), int(header[2]), header[3]
        if header[4] and self.info[5] < 0:  # the first stop flag names the stopping clock
            self.info[5], self.info[6] = clock + self.staleness + 1, header[4]
        status = MPI.Status()
        self.comm.Probe(source, TAG_PUSH_DATA, status)
        size = self.hi - self.lo
        if self.decode is None:
            grad = np.empty(size, self.flat.dtype)
            self.comm.Recv(grad, source, TAG_PUSH_DATA)
        else:
            payload = np.empty(status.Get_count(MPI.BYTE), np.uint8)
            self.comm.Recv(payload, source, TAG_PUSH_DATA)
            grad = self.decode(payload)
        stale = clock - used
        if not 0 <= stale <= self.staleness:
            raise RuntimeError(f"server {self.rank}: clock {clock} computed on version {used}: "
                               f"staleness {stale} outside [0, {self.staleness}]")
        self.info[PARAMS_HEADER + stale] += 1
        # kept per worker and summed in rank order once all are in: the same bits whatever
        # order they arrived in, so runs and resumes are reproducible
        scale = 1 / (1 + stale) if self.staleness_lr else 1.0
        self.clocks.setdefault(clock, {})[source] = (grad, micro, loss, scale)

    def _take(self, source):
        """Guided self-scheduling: a share of what is left, half of it split among the
        workers (at least one), so that early requests take several micro-batches and the
        last ones single ones: few round trips, and the end still balanced."""
        clock = np.empty(1, np.int64)
        self.comm.Recv(clock, source, TAG_TAKE)
        c = int(clock[0])
        start = self.given.get(c, 0)
        count = max(1, (self.micro_total - start) // (2 * self.workers))
        count = min(count, self.micro_total - start)
        self.given[c] = start + count
        self.comm.Send(np.array([start, count], np.int64), source, TAG_GIVEN)

    def _apply_complete_clocks(self):
        while True:
            pushes = self.clocks.get(self.version, {})
            if len(pushes) < self.workers:
                return
            grads, micro, losses, scales = zip(*(pushes[w] for w in sorted(pushes)))
            if self.micro_total is not None and sum(micro) != self.micro_total:
                raise RuntimeError(f"server {self.rank}: clock {self.version} covers "
                                   f"{sum(micro)} micro-batches, expected {self.micro_total}")
            del self.clocks[self.version]
            grad = grads[0]
            for other in grads[1:]:
                grad += other
            shard = self.flat[self.lo:self.hi]
            if self.last_update is not None:
                self.last_update[...] = shard
            # loss, norm, skipped, lr
            self.info[1:5] = self.apply(self.version, grad, sum(losses),
                                        sum(scales) / len(scales))
            if self.last_update is not None:
                np.subtract(shard, self.last_update, out=self.last_update)
            self.given.pop(self.version, None)
            self.version += 1
            self.info[0] = self.version

    def _answer_pulls(self):
        waiting = []
        for worker, need, clock in self.pulls:
            if self.version < need:
                waiting.append((worker, need, clock))
                continue
            shard = self.flat[self.lo:self.hi]
            lag = clock - self.version
            if lag > 0 and self.last_update is not None:
                # the update this gradient will join is `lag` clocks ahead: AdamW's steps
                # change slowly (momentum), so the last one, repeated, predicts them
                shard = shard + lag * self.last_update
            self.comm.Send(self.info, worker, TAG_PARAMS)
            self.comm.Send(shard, worker, TAG_PARAMS_DATA)
        self.pulls = waiting


class Client:
    """A worker's side: pull the parameters for a clock, push its gradient, take
    micro-batches (dynamic balancing), stop."""

    def __init__(self, comm, servers: int, flat, staleness=0, encode=None, timeout=None):
        self.comm, self.servers, self.flat = comm, servers, flat
        self.encode, self.timeout = encode, timeout
        self.bounds = [shard_of(flat.size, servers, s) for s in range(servers)]
        self.version = 0
        self.info = np.zeros(PARAMS_HEADER + staleness + 1)
        self.bytes_sent = 0

    def pull(self, clock, fresh=False):
        """Fills `flat` with parameters of a version >= clock - k (>= clock if `fresh`:
        a server then waits for the clocks before it); returns the header (PARAMS_HEADER)."""
        wanted = np.array([clock, fresh], np.int64)
        requests = [self.comm.Isend(wanted, s, TAG_PULL) for s in range(self.servers)]
        headers = [np.empty_like(self.info) for _ in range(self.servers)]
        requests += [self.comm.Irecv(h, s, TAG_PARAMS) for s, h in enumerate(headers)]
        received = [(shard, receive_buffer(shard))
                    for shard in (self.flat[lo:hi] for lo, hi in self.bounds)]
        data = [self.comm.Irecv(used, s, TAG_PARAMS_DATA) for s, (_, used) in enumerate(received)]
        self._wait(requests, f"the servers' answers for clock {clock}")
        # each server sends its shard right behind its header
        self._wait(data, f"the servers' parameters for clock {clock}", TRANSFER_POLL_PAUSE)
        after_transfer(received=received)
        self.bytes_sent += wanted.nbytes * self.servers
        self.version = int(min(h[0] for h in headers))
        self.info = headers[0]
        return self.info

    def push(self, clock, grad, loss, micro, stop_flag=0):
        """Sends every server its shard of `grad` (computed on `self.version`); a nonzero
        `stop_flag` asks every worker to stop (see the module docstring)."""
        header = np.array([clock, self.version, micro, loss, stop_flag], np.float64)
        requests, sent, staged = [], 0, []
        for s, (lo, hi) in enumerate(self.bounds):
            shard = grad[lo:hi]
            payload = shard if self.encode is None else self.encode(s, shard)
            staged.append((payload, send_buffer(payload)))
            requests.append(self.comm.Isend(header, s, TAG_PUSH))
            requests.append(self.comm.Isend(staged[-1][1], s, TAG_PUSH_DATA))
            sent += header.nbytes + payload.nbytes
        self._wait(requests, f"the servers to take the gradient of clock {clock}",
                   TRANSFER_POLL_PAUSE)
        after_transfer(sent=staged)
        self.bytes_sent += sent

    def take(self, clock) -> range:
        """The next micro-batches of `clock` (server 0 counts); empty when all are taken."""
        index = np.empty(2, np.int64)
        requests = [self.comm.Isend(np.array([clock], np.int64), 0, TAG_TAKE),
                    self.comm.Irecv(index, 0, TAG_GIVEN)]
        self._wait(requests, f"server 0 to hand out a micro-batch of clock {clock}")
        return range(int(index[0]), int(index[0] + index[1]))

    def sync(self, clock):
        """Asks every server to meet at clock `clock` (see `Server.on_sync`); the caller then
        joins the collective the servers start."""
        message = np.array([clock], np.int64)
        requests = [self.comm.Isend(message, s, TAG_SYNC) for s in range(self.servers)]
        self._wait(requests, f"the servers to hear of the meeting at clock {clock}")

    def stop(self):
        requests = [self.comm.Isend(np.empty(0, np.int64), s, TAG_STOP)
                    for s in range(self.servers)]
        self._wait(requests, "the servers to hear that this worker stops")

    def reset_bytes(self) -> int:
        sent, self.bytes_sent = self.bytes_sent, 0
        return sent

    def _wait(self, requests, what, max_pause=MAX_POLL_PAUSE):
        _poll(lambda: MPI.Request.Testall(requests), what, self.timeout, max_pause)
