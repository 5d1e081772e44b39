"""Pipeline schedules as data, and a simulator that times them and proves them deadlock-free.

A schedule is, for each stage, a list of instructions: `RecvActivation`, `Forward`,
`SendActivation`, `RecvGrad`, `Backward`, `SendGrad` (each naming a micro-batch and a
model chunk), then `ReduceGrads` and `OptimizerStep`. Pure functions build them; one
interpreter (app/pipeline.py) will execute them on real ranks; `simulate` executes them
on paper.

Blocking semantics. The simulator treats every send as a rendezvous: it completes only
when the receiving stage has reached the matching receive. A schedule that is safe under
that rule is safe with any buffering MPI may add. Naive 1F1B is not: in its steady phase
stage s sends activation i+1 while stage s+1 sends gradient i, and both wait forever.
So here stage s receives gradient i *before* sending activation i+1 (Megatron pairs the
two as send-forward-recv-backward); the simulator checks it for every (p, m) in the tests.

Instructions carry a model chunk, and the simulator routes messages between virtual
stages (chunk c of the last stage feeds chunk c+1 of the first), ready for interleaved
1F1B. That schedule is not here yet: with wrap-around links the stages form a ring, and
rendezvous sends around a ring deadlock unless paired sends and receives become one
instruction (or alternate by stage parity).
"""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Instr:
    mb: int = -1
    chunk: int = 0

    def __str__(self):
        name = type(self).__name__
        return f"{name}({self.mb}{f'/{self.chunk}' if self.chunk else ''})" if self.mb >= 0 \
            else name


class Forward(Instr): pass          # noqa: E701
class Backward(Instr): pass         # noqa: E701
class RecvActivation(Instr): pass   # noqa: E701
class SendActivation(Instr): pass   # noqa: E701
class RecvGrad(Instr): pass         # noqa: E701
class SendGrad(Instr): pass         # noqa: E701
class ReduceGrads(Instr): pass      # noqa: E701
class OptimizerStep(Instr): pass    # noqa: E701


COMPUTE = (Forward, Backward)
SENDS = {SendActivation: (RecvActivation, +1), SendGrad: (RecvGrad, -1)}  # kind, direction


def _check(n_stages, n_micro):
    for name, value in (("n_stages", n_stages), ("n_micro", n_micro)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} = {value!r}: expected an integer >= 1")


def _forward(stage, p, mb, chunk=0, n_chunks=1):
    """Receive (unless the first virtual stage), compute, send on (unless the last)."""
    virtual, last = chunk * p + stage, n_chunks * p - 1
    return ([RecvActivation(mb, chunk)] if virtual > 0 else []) + [Forward(mb, chunk)] + \
        ([SendActivation(mb, chunk)] if virtual < last else [])


def _backward(stage, p, mb, chunk=0, n_chunks=1):
    """Receive the gradient (unless the last virtual stage), compute, send it back."""
    virtual, last = chunk * p + stage, n_chunks * p - 1
    return ([RecvGrad(mb, chunk)] if virtual < last else []) + \
        [Backward(mb, chunk)] + ([SendGrad(mb, chunk)] if virtual > 0 else [])


def _steady(stage, p, fwd_unit, bwd_unit, n_chunks=1):
    """One forward then one backward, taking the backward's gradient before passing the
    forward's activation on (the order that is safe with rendezvous sends)."""
    fwd = _forward(stage, p, *fwd_unit, n_chunks)
    bwd = _backward(stage, p, *bwd_unit, n_chunks)
    if isinstance(fwd[-1], SendActivation) and isinstance(bwd[0], RecvGrad):
        return fwd[:-1] + [bwd[0], fwd[-1]] + bwd[1:]
    return fwd + bwd


def gpipe(n_stages: int, n_micro: int) -> list[list[Instr]]:
    """All forwards, then all backwards (GPipe): m micro-batches alive at the peak."""
    _check(n_stages, n_micro)
    schedule = []
    for s in range(n_stages):
        ops = [op for mb in range(n_micro) for op in _forward(s, n_stages, mb)]
        ops += [op for mb in range(n_micro) for op in _backward(s, n_stages, mb)]
        schedule.append(ops + [ReduceGrads(), OptimizerStep()])
    return schedule


def one_f_one_b(n_stages: int, n_micro: int) -> list[list[Instr]]:
    """PipeDream-Flush: p-s-1 warm-up forwards, then one forward one backward, then the
    remaining backwards. At most p-s micro-batches alive on stage s."""
    _check(n_stages, n_micro)
    schedule = []
    for s in range(n_stages):
        warmup = min(n_stages - s - 1, n_micro)
        ops = [op for mb in range(warmup) for op in _forward(s, n_stages, mb)]
        for k in range(n_micro - warmup):  # steady: forward warmup+k, backward k
            ops += _steady(s, n_stages, (warmup + k, 0), (k, 0))
        for mb in range(n_micro - warmup, n_micro):
            ops += _backward(s, n_stages, mb)
        schedule.append(ops + [ReduceGrads(), OptimizerStep()])
    return schedule


def format_schedule(schedule) -> str:
    """One line per stage, instructions in order: a readable timeline of the program."""
    width = len(str(len(schedule) - 1))
    return "\n".join(f"stage {s:>{width}}: " + " ".join(map(str, ops))
                     for s, ops in enumerate(schedule))


# --------------------------------------------------------------------------- simulator

DEFAULT_COSTS = {Forward: 1.0, Backward: 2.0, "transfer": 0.0, ReduceGrads: 0.0,
                 OptimizerStep: 0.0}


class Deadlock(Exception):
    """No stage can move: the message names each stuck stage and the instruction it waits on."""


@dataclass
class Simulation:
    makespan: float
    busy: list                      # compute time per stage
    peak_alive: list                # most micro-batches (x chunks) alive per stage
    timeline: list = field(repr=False)  # per stage: (instruction, start, end)

    @property
    def bubble_fraction(self):
        total = self.makespan * len(self.busy)
        return (total - sum(self.busy)) / total if total else 0.0


def simulate(schedule, costs=None) -> Simulation:
    """Runs the schedule on paper with rendezvous sends; raises Deadlock if it would hang.

    costs: instruction class -> time (Forward, Backward, ReduceGrads, OptimizerStep) and
    "transfer" -> time of one message. Also checks that every send meets exactly the
    receive it expects, in order, and that a stage's backward follows its forward.
    """
    costs = {**DEFAULT_COSTS, **(costs or {})}
    p = len(schedule)
    pc = [0] * p                    # next instruction of each stage
    clock = [0.0] * p
    busy = [0.0] * p
    alive, peak = [set() for _ in range(p)], [0] * p
    timeline = [[] for _ in range(p)]
    done = lambda s: pc[s] == len(schedule[s])  # noqa: E731
    while not all(done(s) for s in range(p)):
        moved = False
        for s in range(p):
            while not done(s):
                op = schedule[s][pc[s]]
                if type(op) in SENDS or type(op) in (RecvActivation, RecvGrad):
                    if not _rendezvous(schedule, pc, clock, timeline, s, op, costs):
                        break
                else:
                    start = clock[s]
                    clock[s] += costs.get(type(op), 0.0)
                    timeline[s].append((op, start, clock[s]))
                    if type(op) in COMPUTE:
                        busy[s] += clock[s] - start
                        _track(alive[s], op, s)
                        peak[s] = max(peak[s], len(alive[s]))
                    pc[s] += 1
                moved = True
        if not moved:
            stuck = "; ".join(f"stage {s} waits at {schedule[s][pc[s]]}"
                              for s in range(p) if not done(s))
            raise Deadlock(f"no stage can move: {stuck}")
    return Simulation(max(clock), busy, peak, timeline)


def _track(alive, op, stage):
    key = (op.mb, op.chunk)
    if isinstance(op, Forward):
        alive.add(key)
    elif key not in alive:
        raise ValueError(f"stage {stage}: {op} before its forward")
    else:
        alive.discard(key)


def neighbour(stage, chunk, n_stages, step):
    """(stage, chunk) of virtual stage chunk*p + stage + step: chunk c of the last stage
    feeds chunk c+1 of the first (interleaved schedules); None past either end."""
    virtual = chunk * n_stages + stage + step
    return None if virtual < 0 else (virtual % n_stages, virtual // n_stages)


def _rendezvous(schedule, pc, clock, timeline, s, op, costs):
    """Completes the send/receive pair at the heads of two stages, if they match."""
    p = len(schedule)
    if type(op) in SENDS:
        recv_kind, step = SENDS[type(op)]
        other = neighbour(s, op.chunk, p, step)
        if other is None:
            raise ValueError(f"stage {s}: {op} has no neighbour to talk to")
        sender, receiver, expected_send = s, other[0], op
        expected_recv = recv_kind(op.mb, other[1])
    else:
        send_kind = SendActivation if isinstance(op, RecvActivation) else SendGrad
        other = neighbour(s, op.chunk, p, -SENDS[send_kind][1])
        if other is None:
            raise ValueError(f"stage {s}: {op} has no neighbour to talk to")
        sender, receiver, expected_recv = other[0], s, op
        expected_send = send_kind(op.mb, other[1])
    if pc[sender] == len(schedule[sender]) or pc[receiver] == len(schedule[receiver]):
        return False
    send_op, recv_op = schedule[sender][pc[sender]], schedule[receiver][pc[receiver]]
    if send_op != expected_send or recv_op != expected_recv:
        return False  # the partner is busy elsewhere (or expects another message)
    start = max(clock[sender], clock[receiver])
    end = start + costs["transfer"]
    for stage, instr in ((sender, send_op), (receiver, recv_op)):
        timeline[stage].append((instr, clock[stage], end))
        clock[stage] = end
        pc[stage] += 1
    return True
