"""Predicts one training step's time and each rank's memory for a layout on a cluster.

    step = the pipeline's makespan, simulated by app/parallel/schedules.py with each
           stage's forward and backward = its share of the GEMMs / tp at the device's
           sustained rate + its tensor-parallel collectives, and one point-to-point message
           per transfer (so the bubble is the simulator's, never a formula of our own)
         + the data-parallel reduction's exposed part (+ ZeRO-1's all-gather) + AdamW

Communication is the alpha-beta model over rings: all-reduce 2(p-1)(a + n/(p*b)),
all-gather and reduce-scatter (p-1)(a + n/(p*b)) for n the whole buffer, point-to-point
a + n/b. A group whose ranks lie on more than one node runs at the inter-node link: its
ring crosses the slowest link on every step. Ranks are numbered tp fastest, then dp, then
pp (comm/grid.py), so a tp group spans tp ranks, a dp group tp*dp, a pipeline all of them.

Memory per rank: parameters, gradients (and an accumulation buffer), AdamW state (sharded
over dp under ZeRO-1), and the activations of as many micro-batches as the stage's
program keeps alive, each sized by app/memory.py's estimate.
"""
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache

from app.memory import activation_elements
from app.metrics import flops_per_token
from app.parallel.partition import balanced, uniform
from app.parallel.schedules import Backward, Forward, gpipe, interleaved_1f1b, one_f_one_b, \
    simulate
from models.gpt import GPTConfig, num_params as _count_params


num_params = lru_cache(maxsize=64)(_count_params)  # a planner asks thousands of times


@dataclass(frozen=True)
class Link:
    latency: float    # alpha, s per message
    bandwidth: float  # beta, bytes/s one way per device


def all_reduce_time(nbytes: float, p: int, link: Link) -> float:
    """Ring all-reduce of an n-byte buffer over p ranks, in seconds."""
    return 2 * (p - 1) * (link.latency + nbytes / (p * link.bandwidth)) if p > 1 else 0.0


def all_gather_time(nbytes: float, p: int, link: Link) -> float:
    """Ring all-gather (or reduce-scatter) whose whole buffer is n bytes, in seconds."""
    return (p - 1) * (link.latency + nbytes / (p * link.bandwidth)) if p > 1 else 0.0


reduce_scatter_time = all_gather_time


def p2p_time(nbytes: float, link: Link) -> float:
    return link.latency + nbytes / link.bandwidth


@dataclass(frozen=True)
class Implementation:
    """What a training program holds and sends: bytes per element or per parameter."""
    name: str
    low_precision: bool     # GEMMs at the device's bf16 rate, else at its fp32 rate
    activation_bytes: int
    param_bytes: int        # the weights forward reads
    grad_bytes: int         # gradients as accumulated and reduced
    optimizer_bytes: int    # AdamW's two moments, plus fp32 master weights when mixed
    accumulation_buffer: bool  # micro-batches after the first add in from a second buffer
    gathered_model: bool    # the whole model gathered on every rank when pp > 1
    # each tensor-parallel rank sends 1/tp of an activation to the next stage, which
    # all-gathers it within its node (Megatron's scatter/gather optimisation)
    pipeline_scatter_gather: bool


# This project: float32 throughout; the trainer gathers the stages for validation and saving.
OURS = Implementation("ours", False, 4, 4, 4, 8, True, True, False)
# Megatron-LM (2021): bf16 weights and activations, fp32 main gradients, fp32 master
# weights and moments.
MEGATRON = Implementation("megatron", True, 2, 2, 4, 12, False, False, True)
IMPLEMENTATIONS = {i.name: i for i in (OURS, MEGATRON)}


@dataclass(frozen=True)
class Cluster:
    name: str
    nodes: int
    devices_per_node: int
    device_memory: float    # bytes
    peak_flops: float       # bf16 (tensor-core) FLOP/s per device, dense
    fp32_flops: float       # float32 FLOP/s per device
    efficiency: float       # the fraction of peak a step's FLOPs run at
    intra: Link             # within a node
    inter: Link             # between nodes, per device
    memory_bandwidth: float  # bytes/s per device, for the optimizer's passes
    layer_overhead: float = 0.0  # s per layer per micro-batch (forward + backward): Python's
    # s per step on every rank whatever its share of the batch: the step engine's Python
    # (slicing, the loss's reduction, clipping), which neither tp nor pp divides
    step_overhead: float = 0.0
    bucket_mb: float = 1.0       # gradient bucket size the commands ask for
    # How much longer a rank computes when other ranks compute beside it on the node: CPU
    # cores share caches and memory bandwidth, and ranks that exchange every step wait for
    # the slowest. Measured on the laptop (bench/costcheck.py); 1.0 for one rank per GPU.
    colocated_slowdown: float = 1.0

    @property
    def world(self) -> int:
        return self.nodes * self.devices_per_node

    def rate(self, implementation: Implementation) -> float:
        """The FLOP/s a step sustains on one device."""
        peak = self.peak_flops if implementation.low_precision else self.fp32_flops
        return peak * self.efficiency

    def link(self, span: int) -> Link:
        """The link a ring over `span` consecutive ranks runs at."""
        return self.inter if span > self.devices_per_node else self.intra


GB = 1e9
# Per direction: NVLink 4 is 900 GB/s both ways per H100, NVLink 3 600 GB/s per A100.
NVLINK_H100 = Link(5e-6, 450 * GB)
NVLINK_A100 = Link(5e-6, 300 * GB)
# Assumed, not measured (there is no GPU here): a step's layers run at 70% of peak.
# Large GEMMs reach about 80%; attention, norms and elementwise kernels pull a layer lower.
# fp32 peaks are the CUDA cores' (CuPy does not use TF32 unless asked).
GPU_EFFICIENCY = 0.7


def gpu_cluster(name, nodes=1) -> Cluster:
    """The GPU presets: h100-node, h100-ib (N nodes of 8 over 400 Gb/s InfiniBand per
    GPU), a100-selene (Megatron's: 8x A100 80GB per node, 8x 200 Gb/s HDR per node)."""
    if name in ("h100-node", "h100-ib"):
        return Cluster(name, nodes if name == "h100-ib" else 1, 8, 80 * GB, 989e12, 67e12,
                       GPU_EFFICIENCY, NVLINK_H100, Link(10e-6, 50 * GB), 3350 * GB,
                       bucket_mb=25.0)
    if name == "a100-selene":
        return Cluster(name, nodes, 8, 80 * GB, 312e12, 19.5e12, GPU_EFFICIENCY, NVLINK_A100,
                       Link(10e-6, 25 * GB), 2039 * GB, bucket_mb=25.0)
    raise ValueError(f"cluster {name!r}: expected one of {', '.join(CLUSTERS)}")


CLUSTERS = ("laptop", "h100-node", "h100-ib", "a100-selene")

MODELS = {  # GPT-2 sizes and Megatron-LM's 1T (Narayanan et al. 2021, Table 1)
    "124M": GPTConfig(12, 12, 768, 1024, 50257),
    "350M": GPTConfig(24, 16, 1024, 1024, 50257),
    "1.3B": GPTConfig(24, 32, 2048, 1024, 50257),
    "1T": GPTConfig(128, 160, 25600, 2048, 51200),
}


@dataclass(frozen=True)
class TrainingLayout:
    dp: int
    tp: int = 1
    pp: int = 1
    schedule: str = "1f1b"
    chunks: int = 1
    micro_batches: int = 1
    zero: int = 0
    sequence_parallel: bool = False
    recompute: str = "none"
    global_batch: int = 1   # sequences per optimizer step

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def rows(self) -> int:
        """Sequences per micro-batch on one data-parallel rank."""
        return self.global_batch // (self.dp * self.micro_batches)


@dataclass
class Prediction:
    step_s: float
    compute_s: float        # the slowest stage's GEMMs (and Python, on the laptop)
    tp_comm_s: float        # tensor-parallel collectives, on the critical path
    dp_comm_s: float        # the gradient reduction not hidden behind backward, + ZeRO gather
    bubble_s: float         # pipeline idle time of the slowest stage, transfers included
    optimizer_s: float
    tokens_per_s: float
    model_flops_per_device: float  # model FLOP/s per device (6N + 6LTd per token)
    memory: dict = field(default_factory=dict)  # bytes per rank, the largest stage

    @property
    def comm_s(self) -> float:
        return self.tp_comm_s + self.dp_comm_s

    @property
    def memory_bytes(self) -> float:
        return sum(self.memory.values())


def block_params(model: GPTConfig) -> int:
    return 12 * model.n_embd ** 2 + 13 * model.n_embd


def stage_blocks(model: GPTConfig, layout: TrainingLayout, head_share: float) -> list:
    """Blocks each stage holds: the trainer's partition (balanced by FLOPs, or uniform when
    interleaving) folded onto the pp stages. head_share: the head's cost in blocks."""
    return list(_stage_blocks(model.n_layer, layout.pp, layout.chunks, head_share))


@lru_cache(maxsize=1024)
def _stage_blocks(n_layer, pp, chunks, head_share):
    if pp == 1 or chunks > 1:
        ranges = uniform(n_layer, pp * chunks)
    else:
        ranges = balanced([1.0] * n_layer, pp, 0.0, head_share)
    blocks = [0] * pp
    for v, (start, stop) in enumerate(ranges):
        blocks[v % pp] += stop - start
    return tuple(blocks)


@dataclass(frozen=True)
class StageCosts:
    """Seconds per stage of one step, before the schedule orders them."""
    blocks: list        # blocks each stage holds
    forward: tuple      # one Forward instruction (one chunk of one micro-batch), TP included
    backward: tuple
    compute: list       # all micro-batches' GEMMs (and Python, on the laptop)
    tp_comm: list       # all micro-batches' tensor-parallel collectives
    transfer: float     # one pipeline message

    @property
    def busiest(self) -> float:
        """A lower bound of the step: the busiest stage never idles."""
        return max(c + t for c, t in zip(self.compute, self.tp_comm))


def stage_costs(model: GPTConfig, layout: TrainingLayout, cluster: Cluster,
                implementation: Implementation = OURS) -> StageCosts:
    if layout.global_batch % (layout.dp * layout.micro_batches):
        raise ValueError(f"global batch {layout.global_batch} is not divisible by dp * "
                         f"micro_batches = {layout.dp} * {layout.micro_batches}")
    T, C, V = model.block_size, model.n_embd, model.vocab_size
    tp, pp, M = layout.tp, layout.pp, layout.micro_batches
    tokens = layout.rows * T  # per micro-batch on one rank
    # training FLOPs per token; the head's logits GEMM (6VC) is the last stage's
    head_flops = 6 * V * C
    block_flops = (flops_per_token(num_params(model), model.n_layer, T, C) - head_flops) \
        / model.n_layer
    recompute_extra = {"none": 0.0, "selective": 2 * T * C, "full": block_flops / 3}
    blocks = stage_blocks(model, layout, head_flops / block_flops)
    sharing = oversubscription(layout, cluster) * colocation(layout, cluster)
    rate = cluster.rate(implementation) / sharing
    act_bytes = tokens * C * implementation.activation_bytes
    tp_link = cluster.link(tp)
    tp_forward = 2 * all_reduce_time(act_bytes, tp, tp_link)  # Megatron's f and g, per block
    tp_backward = tp_forward * (2 if layout.recompute == "full" else 1)
    forward, backward, compute, tp_comm = [], [], [], []
    for s, n in enumerate(blocks):
        last = s == pp - 1
        flops = n * block_flops + (head_flops if last else 0)
        overhead = cluster.layer_overhead * (n + last) * sharing
        f = tokens * flops / 3 / tp / rate + overhead / 3
        b = tokens * (2 * flops / 3 + n * recompute_extra[layout.recompute]) / tp / rate \
            + 2 * overhead / 3
        compute.append(M * (f + b))
        tp_comm.append(M * n * (tp_forward + tp_backward))
        forward.append((f + n * tp_forward) / layout.chunks)  # an instruction runs one chunk
        backward.append((b + n * tp_backward) / layout.chunks)
    transfer = 0.0
    if pp > 1 and implementation.pipeline_scatter_gather:
        transfer = p2p_time(act_bytes / tp, cluster.link(layout.world)) \
            + all_gather_time(act_bytes, tp, tp_link)
    elif pp > 1:
        transfer = p2p_time(act_bytes, cluster.link(layout.world))
    return StageCosts(blocks, tuple(forward), tuple(backward), compute, tp_comm, transfer)


def oversubscription(layout: TrainingLayout, cluster: Cluster) -> float:
    """More ranks than devices (the laptop at 4 ranks) share them: the slowdown factor."""
    return max(1.0, layout.world / cluster.world)


def colocation(layout: TrainingLayout, cluster: Cluster) -> float:
    """The slowdown of a rank's compute that shares its node with other ranks."""
    return cluster.colocated_slowdown if min(layout.world, cluster.devices_per_node) > 1 \
        else 1.0


def predict(model: GPTConfig, layout: TrainingLayout, cluster: Cluster,
            implementation: Implementation = OURS) -> Prediction:
    """One step of `layout` on `cluster` (ValueError if the batch does not split)."""
    costs = stage_costs(model, layout, cluster, implementation)
    pp, T, C = layout.pp, model.block_size, model.n_embd
    sim = simulate_step(layout.schedule if pp > 1 else "1f1b", pp, layout.micro_batches,
                        layout.chunks, costs.forward, costs.backward, costs.transfer)
    sharing = oversubscription(layout, cluster) * colocation(layout, cluster)
    dp_link = cluster.link(layout.tp * layout.dp)
    bucket = cluster.bucket_mb * 2 ** 20
    n_params = num_params(model)
    ends, parts = [], []
    for s, (n, params) in enumerate(zip(costs.blocks, stage_params(model, layout,
                                                                   costs.blocks))):
        grad_bytes = params * implementation.grad_bytes
        reduce = (reduce_scatter_time if layout.zero else all_reduce_time)(
            grad_bytes, layout.dp, dp_link)
        if layout.dp > 1:  # every bucket is a ring of its own
            reduce += math.ceil(grad_bytes / bucket) * 2 * (layout.dp - 1) * dp_link.latency
        # buckets go out as backward finishes them, during the stage's last backward (both
        # halves of a tied wte included); the last bucket can never hide
        last_backward = costs.backward[s] * layout.chunks
        exposed = max(reduce - last_backward, reduce * min(1.0, bucket / grad_bytes))
        if layout.zero:
            exposed += all_gather_time(params * implementation.param_bytes, layout.dp, dp_link)
        owned = params / (layout.dp if layout.zero else 1)
        # AdamW reads p, g, m, v and writes p, m, v: 7 float32 passes
        optimizer = owned * 7 * 4 / (cluster.memory_bandwidth / sharing)
        finish = sim.timeline[s][-1][2] if sim.timeline[s] else 0.0
        fixed = cluster.step_overhead * sharing
        ends.append(finish + exposed + optimizer + fixed)
        parts.append((costs.compute[s] + fixed, costs.tp_comm[s], exposed,
                      finish - sim.busy[s], optimizer))
    critical = max(range(pp), key=ends.__getitem__)
    step = ends[critical]
    global_tokens = layout.global_batch * T
    flops = flops_per_token(n_params, model.n_layer, T, C) * global_tokens / step
    return Prediction(step, *parts[critical], global_tokens / step, flops / layout.world,
                      rank_memory(model, layout, costs.blocks, implementation))


def stage_params(model: GPTConfig, layout: TrainingLayout, blocks: list) -> list:
    """Parameters one rank of each stage holds: its blocks, wte and wpe on the first, ln_f
    and (in a pipeline) a copy of the tied wte on the last; all split over tp (the norms
    and biases are not, a few per mille)."""
    T, C, V = model.block_size, model.n_embd, model.vocab_size
    last = layout.pp - 1
    tied = V * C * (layout.pp > 1)  # a second copy of wte, on the last stage
    return [(n * block_params(model) + (V + T) * C * (s == 0) + (tied + 2 * C) * (s == last))
            / layout.tp for s, n in enumerate(blocks)]


def rank_memory(model: GPTConfig, layout: TrainingLayout, blocks: list,
                implementation: Implementation = OURS, with_activations=True) -> dict:
    """Bytes by kind of the rank that needs the most (without activations: a cheap bound
    that needs no simulation)."""
    alive = peak_alive(layout.schedule if layout.pp > 1 else "1f1b", layout.pp,
                       layout.micro_batches, layout.chunks) if with_activations \
        else [0] * layout.pp
    last = layout.pp - 1
    return max((stage_memory(model, layout, implementation, params, n, s == last, alive[s])
                for s, (n, params) in enumerate(zip(blocks, stage_params(model, layout,
                                                                          blocks)))),
               key=lambda kinds: sum(kinds.values()))


@lru_cache(maxsize=1024)
def peak_alive(schedule, pp, micro_batches, chunks) -> list:
    """Micro-batch chunks each stage holds at its peak, as the simulator counts them: a
    stage's own program order sets it, whatever the timing, so no simulation is needed."""
    peaks = []
    for program in SCHEDULES[schedule](pp, micro_batches, chunks):
        alive = peak = 0
        for op in program:
            alive += isinstance(op, Forward) - isinstance(op, Backward)
            peak = max(peak, alive)
        peaks.append(peak)
    return peaks


def stage_memory(model, layout, prec: Implementation, params, n_blocks, last, alive) -> dict:
    """Bytes one rank of a stage holds at the peak. alive: micro-batch chunks in flight."""
    grads = params * prec.grad_bytes * (2 if prec.accumulation_buffer and
                                        layout.micro_batches > 1 else 1)
    optimizer = params * prec.optimizer_bytes / (layout.dp if layout.zero else 1)
    whole = dict(tp=layout.tp, sequence_parallel=layout.sequence_parallel)
    head = activation_elements(model, layout.rows, 0, **whole)
    per_block = activation_elements(model, layout.rows, 1, layout.recompute, **whole) - head
    chunk_blocks = n_blocks / layout.chunks
    activations = (alive * chunk_blocks * per_block + head * last) * prec.activation_bytes
    gathered = num_params(model) * prec.param_bytes if prec.gathered_model and layout.pp > 1 else 0
    return {"params": params * prec.param_bytes, "grads": grads, "optimizer": optimizer,
            "activations": activations, "whole_model": gathered}


SCHEDULES = {"1f1b": lambda p, m, v: one_f_one_b(p, m), "gpipe": lambda p, m, v: gpipe(p, m),
             "interleaved": interleaved_1f1b}


@lru_cache(maxsize=4096)
def simulate_step(schedule, pp, micro_batches, chunks, forward, backward, transfer):
    """The simulator's run of one step; forward/backward: seconds per instruction per stage
    (tuples, so that layouts that differ only in memory share one simulation)."""
    program = SCHEDULES[schedule](pp, micro_batches, chunks)
    return simulate(program, {Forward: list(forward), Backward: list(backward),
                              "transfer": transfer})


# The laptop's links, from `make bench-comm` (README, p=2): our ring all-reduce of 4 KB takes
# about 22 us (2 alphas of Python and MPI) and moves 4-16 MB at about 7 GB/s of bus bandwidth.
LAPTOP_LINK = Link(11e-6, 7 * GB)
MEMCPY_BANDWIDTH = 11.5 * GB  # a large NumPy copy on this machine


def calibrate_laptop(config="baby", repeats=21) -> Cluster:
    """The laptop preset, calibrated in this process: the GEMM peak of its BLAS threads
    (one under make), then one rank's `config` step timed at 1 and 4 micro-batches and
    solved for the efficiency of its FLOPs and Python's overhead per layer. The two steps
    differ by 5-10 ms in 80: with 9 repeats of each, the overhead read 0.0-1.09 ms per layer
    within a minute here, with 25 0.49-0.93 (and a pipeline's row moves by 0.15 in ratio
    between 0.2 and 1.15 ms)."""
    import time

    import numpy as np

    from app.config import load_config
    from app.metrics import measure_gemm_gflops
    from app.parallel.engine import TrainStep
    from models import gpt

    peak = measure_gemm_gflops() * 1e9
    cfg = load_config(config)
    model = cfg.model_config()
    x = np.random.default_rng(0).integers(0, model.vocab_size, (cfg.batch_size, model.block_size))
    steps = {}
    for micro in (1, 4):
        options = load_config(config, {"micro_batches": micro})
        steps[micro] = TrainStep(model, gpt.init_params(model, 0, np, np.float32), options)
        steps[micro](x, x, 1e-3)  # warm-up: allocations, caches
    samples = {micro: [] for micro in steps}
    for _ in range(repeats):  # in turn: the machine's drift weighs on both alike
        for micro, step in steps.items():
            start = time.perf_counter()
            step(x, x, 1e-3)
            samples[micro].append(time.perf_counter() - start)
    times = {micro: float(np.median(t)) for micro, t in samples.items()}
    layers = model.n_layer + 1  # the head counts as one
    n_params = num_params(model)
    optimizer = n_params * 7 * 4 / MEMCPY_BANDWIDTH
    # noise may not leave the FLOPs less than half the step: the efficiency stays finite
    overhead = min(max(0.0, (times[4] - times[1]) / (3 * layers)),
                   (times[1] - optimizer) / (2 * layers))
    flops = flops_per_token(n_params, model.n_layer, model.block_size, model.n_embd) \
        * cfg.batch_size * model.block_size
    efficiency = flops / peak / (times[1] - layers * overhead - optimizer)
    return laptop_cluster(peak, efficiency, overhead)


def laptop_cluster(peak_flops, efficiency, layer_overhead) -> Cluster:
    """The laptop preset from its three calibrated numbers (`calibrate_laptop`'s, or
    those `make report` stored beside its rows)."""
    from app.memory import available_bytes

    cores = os.cpu_count() or 1
    memory = (available_bytes() or 8 * 2 ** 30) / cores
    return Cluster("laptop", 1, cores, memory, peak_flops, peak_flops, min(efficiency, 1.0),
                   LAPTOP_LINK, LAPTOP_LINK, MEMCPY_BANDWIDTH, layer_overhead)

