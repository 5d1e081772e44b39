"""Pipeline schedules as data, and a simulator that times them and proves them deadlock-free.

A schedule is, for each stage, a list of instructions: `RecvActivation`, `Forward`,
`SendActivation`, `RecvGrad`, `Backward`, `SendGrad` (each naming a micro-batch and a
model chunk), then `ReduceGrads` and `OptimizerStep`. Pure functions build them (GPipe,
1F1B, interleaved 1F1B); one interpreter (app/parallel/interpreter.py) executes them on real
ranks; `simulate` executes them on paper.

Communication semantics, the same on paper and on ranks: a send is a rendezvous (it
completes only once the matching receive is posted), and a run of consecutive transfer
instructions is posted together and then waited for together (Isend/Irecv + Waitall).
Each schedule is built from blocks (receive inputs, compute, send outputs), so one block's
sends sit next to the next block's receives: Megatron's send-forward-recv-backward pairs.
Send-then-receive one at a time would deadlock 1F1B's steady phase (stage s sends
activation i+1 while stage s+1 sends gradient i) and interleaving's wrap-around ring;
the simulator checks every (p, m, chunks) in the tests.
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
TRANSFERS = (SendActivation, SendGrad, RecvActivation, RecvGrad)


def _check(n_stages, n_micro):
    for name, value in (("n_stages", n_stages), ("n_micro", n_micro)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} = {value!r}: expected an integer >= 1")


def gpipe(n_stages: int, n_micro: int) -> list[list[Instr]]:
    """All forwards, then all backwards (GPipe): m micro-batches alive at the peak."""
    _check(n_stages, n_micro)
    blocks = [[(Forward, mb, 0)] for mb in range(n_micro)]
    blocks += [[(Backward, mb, 0)] for mb in range(n_micro)]
    return [_program(s, n_stages, 1, blocks) for s in range(n_stages)]


def one_f_one_b(n_stages: int, n_micro: int) -> list[list[Instr]]:
    """PipeDream-Flush: p-s-1 warm-up forwards, then one forward one backward, then the
    remaining backwards. At most p-s micro-batches alive on stage s."""
    _check(n_stages, n_micro)
    units = [(mb, 0) for mb in range(n_micro)]
    return [_program(s, n_stages, 1, _one_f_one_b_blocks(units, units,
                                                           min(n_stages - s - 1, n_micro)))
            for s in range(n_stages)]


def interleaved_1f1b(n_stages: int, n_micro: int, n_chunks: int) -> list[list[Instr]]:
    """Megatron's interleaved 1F1B: each stage holds `n_chunks` model chunks (virtual stage
    chunk*p + stage), and micro-batches go through the chunks in groups of p, which cuts
    the bubble from (p-1)/(m+p-1) to (p-1)/(v*m+p-1). Needs n_micro a multiple of p."""
    _check(n_stages, n_micro)
    if not isinstance(n_chunks, int) or n_chunks < 1:
        raise ValueError(f"n_chunks = {n_chunks!r}: expected an integer >= 1")
    if n_chunks == 1:
        return one_f_one_b(n_stages, n_micro)
    if n_micro % n_stages:
        raise ValueError(f"n_micro = {n_micro}: interleaving needs a multiple of n_stages = "
                         f"{n_stages}")
    p, v, total = n_stages, n_chunks, n_micro * n_chunks
    # a stage's k-th forward: p micro-batches through one chunk, then the next chunk
    forwards = [((k // (p * v)) * p + k % p, (k // p) % v) for k in range(total)]
    backwards = [(mb, v - 1 - chunk) for mb, chunk in forwards]  # chunks in reverse
    return [_program(s, p, v, _one_f_one_b_blocks(
                forwards, backwards, min((p - s - 1) * 2 + (v - 1) * p, total), paired=True))
            for s in range(p)]


def _one_f_one_b_blocks(forwards, backwards, warmup, paired=False):
    """Warm-up forwards, then one forward and one backward in turn, then the remaining
    backwards.

    Unpaired (1F1B), each is its own block: a forward's send and the next backward's
    receive are posted together (send-forward-recv-backward), and so on. Paired
    (interleaved), a forward and a backward compute back to back and exchange all four
    messages at once, as Megatron does: with chunks chasing each other around the ring,
    the pairwise exchange can leave two stages each waiting for the other's next group."""
    steady = len(forwards) - warmup
    blocks = [[(Forward, *u)] for u in forwards[:warmup]]
    for f, b in zip(forwards[warmup:], backwards):
        blocks += [[(Forward, *f), (Backward, *b)]] if paired else [[(Forward, *f)],
                                                                     [(Backward, *b)]]
    return blocks + [[(Backward, *u)] for u in backwards[steady:]]


def _program(stage, p, n_chunks, blocks):
    """A stage's instructions: each block receives its inputs, computes, sends its outputs;
    then the gradients are reduced and the optimizer steps.

    A block's sends and the next block's receives stand next to each other, so they are
    posted together (Megatron's batched send/recv). That is what keeps neighbours, and
    the wrap-around ring of interleaved stages, from each waiting for the other to
    receive first."""
    last = n_chunks * p - 1
    ops = []
    for block in blocks:
        for kind, mb, chunk in block:
            virtual = chunk * p + stage
            if kind is Forward and virtual > 0:
                ops.append(RecvActivation(mb, chunk))
            elif kind is Backward and virtual < last:
                ops.append(RecvGrad(mb, chunk))
        ops += [kind(mb, chunk) for kind, mb, chunk in block]
        for kind, mb, chunk in block:
            virtual = chunk * p + stage
            if kind is Forward and virtual < last:
                ops.append(SendActivation(mb, chunk))
            elif kind is Backward and virtual > 0:
                ops.append(SendGrad(mb, chunk))
    return ops + [ReduceGrads(), OptimizerStep()]


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
    """Runs the schedule on paper; raises Deadlock if it would hang.

    Transfers are rendezvous: a send completes only once its receive is posted. A run of
    consecutive transfer instructions is posted together and waited for together (Isend
    and Irecv, then Waitall), as the interpreter executes it. Every send must meet the
    receive that names the same message, and a stage's backward must follow its forward.

    costs: instruction class -> time (Forward, Backward, ReduceGrads, OptimizerStep), or
    -> a list of times, one per stage (measured stages differ); "transfer" -> time of one
    message.
    """
    costs = {**DEFAULT_COSTS, **(costs or {})}
    p = len(schedule)
    pc = [0] * p                    # next instruction of each stage
    clock = [0.0] * p
    busy = [0.0] * p
    alive, peak = [set() for _ in range(p)], [0] * p
    timeline = [[] for _ in range(p)]
    posted = [None] * p             # open transfer group: index -> completion time or None
    done = lambda s: pc[s] == len(schedule[s])  # noqa: E731
    while not all(done(s) for s in range(p)):
        moved = False
        for s in range(p):
            while not done(s) and posted[s] is None:
                op = schedule[s][pc[s]]
                if type(op) in TRANSFERS:
                    end = pc[s]
                    while end < len(schedule[s]) and type(schedule[s][end]) in TRANSFERS:
                        end += 1
                    posted[s] = dict.fromkeys(range(pc[s], end))
                    break
                start = clock[s]
                cost = costs.get(type(op), 0.0)
                clock[s] += cost[s] if isinstance(cost, (list, tuple)) else cost
                timeline[s].append((op, start, clock[s]))
                if type(op) in COMPUTE:
                    busy[s] += clock[s] - start
                    _track(alive[s], op, s)
                    peak[s] = max(peak[s], len(alive[s]))
                pc[s] += 1
                moved = True
        for s in range(p):
            moved |= _match(schedule, posted, clock, s, costs["transfer"])
        for s in range(p):
            if posted[s] is not None and None not in posted[s].values():
                for i, end in posted[s].items():
                    timeline[s].append((schedule[s][i], clock[s], end))
                clock[s] = max(posted[s].values(), default=clock[s])
                pc[s] += len(posted[s])
                posted[s] = None
                moved = True
        if not moved:
            stuck = "; ".join(f"stage {s} waits at " + ", ".join(
                str(schedule[s][i]) for i, end in (posted[s] or {pc[s]: None}).items()
                if end is None) for s in range(p) if not done(s))
            raise Deadlock(f"no stage can move: {stuck}")
    return Simulation(max(clock), busy, peak, timeline)


def _match(schedule, posted, clock, s, transfer_cost):
    """Pairs each unmatched transfer posted by stage s with its partner's, if posted."""
    if posted[s] is None:
        return False
    matched = False
    for i, end in posted[s].items():
        if end is not None:
            continue
        t, expected = _partner(len(schedule), s, schedule[s][i])
        if posted[t] is None:
            continue
        for j, other_end in posted[t].items():
            if other_end is None and schedule[t][j] == expected:
                posted[s][i] = posted[t][j] = max(clock[s], clock[t]) + transfer_cost
                matched = True
                break
    return matched


def _partner(p, s, op):
    """(stage, instruction) that must meet transfer `op` of stage s."""
    if type(op) in SENDS:
        partner_kind, step = SENDS[type(op)]
    else:
        partner_kind = SendActivation if isinstance(op, RecvActivation) else SendGrad
        step = -SENDS[partner_kind][1]
    other = neighbour(s, op.chunk, p, step)
    if other is None:
        raise ValueError(f"stage {s}: {op} has no neighbour to talk to")
    return other[0], partner_kind(op.mb, other[1])


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
    feeds chunk c+1 of the first (interleaved schedules); None before the first."""
    virtual = chunk * n_stages + stage + step
    return None if virtual < 0 else (virtual % n_stages, virtual // n_stages)
