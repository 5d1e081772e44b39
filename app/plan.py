"""`python -m app plan`: the fastest layouts of a model on a cluster, by the cost model.

Enumerates every dp x tp x pp grid that fills the cluster (tp within a node, dividing the
heads; pp dividing the layers), every micro-batch count that divides a replica's batch,
every schedule, ZeRO-1, sequence parallelism and recomputation; drops those that do not fit
in device memory; and prints the fastest with their breakdown and the command that runs
them. `--check-megatron` compares the model with Megatron-LM's published 1T run.
"""
from dataclasses import dataclass, field, replace

from app.config import CONFIG_DIR, load_config
from app.costmodel import (CLUSTERS, IMPLEMENTATIONS, MEGATRON, MODELS, Cluster, Link,
                           TrainingLayout, calibrate_laptop, gpu_cluster, num_params, predict,
                           rank_memory, stage_costs)
from app.errors import UserError
from models.gpt import GPTConfig

MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
CLUSTER_FLAGS = {  # flag -> (Cluster field, factor to its unit, help)
    "devices_per_node": ("devices_per_node", 1, "devices (ranks) per node"),
    "device_memory_gb": ("device_memory", 1e9, "memory per device, GB"),
    "peak_tflops": ("peak_flops", 1e12, "bf16 dense peak per device, TFLOP/s"),
    "fp32_tflops": ("fp32_flops", 1e12, "float32 peak per device, TFLOP/s"),
    "efficiency": ("efficiency", 1, "fraction of peak a step's FLOPs run at"),
    "intra_gbs": ("intra", 1e9, "intra-node bandwidth per device and direction, GB/s"),
    "inter_gbs": ("inter", 1e9, "inter-node bandwidth per device and direction, GB/s"),
}


def add_arguments(parser):
    parser.add_argument("--model", default="baby",
                        help=f"a config ({', '.join(_config_names())}) or {', '.join(MODELS)}")
    for name in MODEL_FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                            help="override the model's " + name)
    parser.add_argument("--cluster", default="laptop", help=", ".join(CLUSTERS) +
                        " (laptop: this machine, calibrated at start)")
    parser.add_argument("--nodes", type=int, default=None,
                        help="nodes (h100-ib: 4, a100-selene: 384)")
    for flag, (_, _, text) in CLUSTER_FLAGS.items():
        kind = int if flag == "devices_per_node" else float
        parser.add_argument("--" + flag.replace("_", "-"), type=kind, default=None, help=text)
    parser.add_argument("--implementation", default="ours", choices=list(IMPLEMENTATIONS),
                        help="ours (float32, as this project trains) or megatron (bf16 mixed)")
    parser.add_argument("--global-batch", type=int, default=None,
                        help="sequences per step (default: the config's batch_size, else 512)")
    parser.add_argument("--top", type=int, default=3, help="layouts to print")
    parser.add_argument("--check-megatron", action="store_true",
                        help="compare the model with Megatron-LM's 1T GPT on 3072 A100s")


def _config_names():
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def resolve_model(args) -> tuple[str, GPTConfig, int]:
    """(name, model, default global batch) from --model and the model flags."""
    if args.model in MODELS:
        model, batch = MODELS[args.model], 512
    elif args.model in _config_names():
        cfg = load_config(args.model)
        model, batch = cfg.model_config(), cfg.batch_size
    else:
        raise UserError(f"--model {args.model!r} is not known: expected one of "
                        f"{', '.join(_config_names() + list(MODELS))}")
    given = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    for key, value in given.items():
        _positive(key, value)
    model = replace(model, **given)
    if model.n_embd % model.n_head:
        raise UserError(f"--n-embd {model.n_embd} is not divisible by --n-head "
                        f"{model.n_head}: expected whole heads")
    return args.model + " (modified)" * bool(given), model, batch


def resolve_cluster(args) -> Cluster:
    if args.cluster not in CLUSTERS:
        raise UserError(f"--cluster {args.cluster!r} is not known: expected one of "
                        f"{', '.join(CLUSTERS)}")
    nodes = {"h100-ib": 4, "a100-selene": 384}.get(args.cluster, 1) \
        if args.nodes is None else args.nodes
    _positive("nodes", nodes)
    if args.cluster in ("laptop", "h100-node") and nodes != 1:
        raise UserError(f"--nodes {nodes} with --cluster {args.cluster}: expected 1 (one node; "
                        "h100-ib and a100-selene take more)")
    cluster = calibrate_laptop() if args.cluster == "laptop" else gpu_cluster(args.cluster, nodes)
    for flag, (name, unit, _) in CLUSTER_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        _positive(flag, value)
        if name in ("intra", "inter"):
            value = Link(getattr(cluster, name).latency, value * unit)
        else:
            value = value * unit
        cluster = replace(cluster, **{name: value})
    return cluster


def _positive(flag, value):
    if not value > 0:
        raise UserError(f"--{flag.replace('_', '-')} {value}: expected a number > 0")


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(model: GPTConfig, cluster: Cluster, global_batch: int):
    """Every layout of `model` that fills `cluster` and that the trainer accepts."""
    world = cluster.world
    for tp in _divisors(world):
        if tp > cluster.devices_per_node or model.n_head % tp:
            continue
        for pp in _divisors(world // tp):
            dp = world // (tp * pp)
            if model.n_layer % pp or global_batch % dp:
                continue
            for micro in _divisors(global_batch // dp):
                schedules = [("1f1b", 1)]
                if pp > 1:
                    schedules += [("gpipe", 1)] + [
                        ("interleaved", v) for v in range(2, model.n_layer // pp + 1)
                        if model.n_layer % (pp * v) == 0 and micro % pp == 0]
                for schedule, chunks in schedules:
                    for zero in (0, 1) if dp > 1 else (0,):
                        for sp in (False, True) if tp > 1 and model.block_size % tp == 0 \
                                else (False,):
                            for recompute in ("none", "selective", "full"):
                                yield TrainingLayout(dp, tp, pp, schedule, chunks, micro, zero,
                                                     sp, recompute, global_batch)


@dataclass
class Search:
    best: list                                    # (layout, prediction), fastest first
    candidates: int = 0
    rejected: dict = field(default_factory=dict)  # reason -> count
    skipped: int = 0                              # could not beat the N-th: not examined


def search(model, cluster, implementation, global_batch, top) -> Search:
    """The `top` fastest layouts that fit, one per grid and micro-batch count (its best
    schedule, ZeRO, sequence parallelism and recomputation; the least memory among equals).
    Candidates are examined (activations counted, the step simulated) in order of their
    busiest stage, a lower bound, until none can beat the top: those never examined may
    or may not fit."""
    result, bounded = Search([]), []
    memory_gb = f"{cluster.device_memory / 1e9:.0f} GB"
    for layout in candidate_layouts(model, cluster, global_batch):
        result.candidates += 1
        costs = stage_costs(model, layout, cluster, implementation)
        state = rank_memory(model, layout, costs.blocks, implementation, False)
        if sum(state.values()) > cluster.device_memory:
            _count(result.rejected, f"parameters, gradients and optimizer state alone "
                                    f"exceed {memory_gb}")
        else:
            bounded.append((costs.busiest, layout, costs))
    fastest = {}  # (grid, micro-batches) -> (layout, prediction)
    for bound, layout, costs in sorted(bounded, key=lambda item: item[0]):
        ranked = sorted(p.step_s for _, p in fastest.values())
        if len(ranked) >= top and bound >= ranked[top - 1]:
            result.skipped += 1
            continue
        memory = rank_memory(model, layout, costs.blocks, implementation)
        if sum(memory.values()) > cluster.device_memory:
            _count(result.rejected, f"activations push them over {memory_gb}")
            continue
        prediction = predict(model, layout, cluster, implementation)
        key = (layout.dp, layout.tp, layout.pp, layout.micro_batches)
        held = fastest.get(key)
        if held is None or (prediction.step_s, prediction.memory_bytes) < \
                (held[1].step_s, held[1].memory_bytes):
            fastest[key] = (layout, prediction)
    result.best = sorted(fastest.values(),
                         key=lambda lp: (lp[1].step_s, lp[1].memory_bytes))[:top]
    return result


def _count(counter, reason):
    counter[reason] = counter.get(reason, 0) + 1


def command_line(name, model, layout: TrainingLayout, cluster: Cluster) -> str:
    """The command that trains `layout` with this project."""
    if name in _config_names():
        flags = [f"--config {name}"]
    else:
        flags = [f"--{k.replace('_', '-')} {getattr(model, k)}" for k in MODEL_FLAGS]
    flags += [f"--batch-size {layout.global_batch}", f"--dp {layout.dp}", f"--tp {layout.tp}",
              f"--pp {layout.pp}", f"--micro-batches {layout.micro_batches}"]
    if layout.pp > 1:
        flags.append(f"--schedule {layout.schedule}")
    if layout.chunks > 1:
        flags.append(f"--chunks {layout.chunks}")
    flags.append(f"--zero {layout.zero}")
    if layout.sequence_parallel:
        flags.append("--sequence-parallel")
    if layout.recompute != "none":
        flags.append(f"--recompute {layout.recompute}")
    if cluster.name == "laptop":
        return f"mpirun -n {layout.world} python -m app train " + " ".join(flags)
    flags += [f"--bucket-mb {cluster.bucket_mb:g}", "--device gpu"]
    script = "multinode.sbatch" if cluster.nodes > 1 else "train.sbatch"
    return (f"sbatch -N {cluster.nodes} --ntasks-per-node={cluster.devices_per_node} "
            f"--gpus-per-node={cluster.devices_per_node} slurm/{script} " + " ".join(flags))


def describe_layout(layout: TrainingLayout) -> str:
    text = f"dp={layout.dp} tp={layout.tp} pp={layout.pp} micro-batches={layout.micro_batches}"
    if layout.pp > 1:
        text += f" {layout.schedule}" + (f" x{layout.chunks}" if layout.chunks > 1 else "")
    return text + (f" zero={layout.zero}" + " sp" * layout.sequence_parallel
                   + f" recompute={layout.recompute}")


def format_table(rows, labels=None) -> str:
    """rows: (layout, prediction) -> the breakdown table, times in ms, memory in GB; each
    row numbered, or labelled by `labels`."""
    labels = labels or [str(i) for i in range(1, len(rows) + 1)]
    lines = [f"{'#':>6} {'layout':<64} {'tok/s':>10} {'step ms':>9} | {'compute':>8} "
             f"{'comm':>7} {'bubble':>7} {'optim':>6} | {'GB/rank':>7}"]
    for label, (layout, p) in zip(labels, rows):
        lines.append(f"{label:>6} {describe_layout(layout):<64} {p.tokens_per_s:>10.0f} "
                     f"{p.step_s * 1e3:>9.1f} | {p.compute_s * 1e3:>8.1f} "
                     f"{p.comm_s * 1e3:>7.1f} {p.bubble_s * 1e3:>7.1f} "
                     f"{p.optimizer_s * 1e3:>6.1f} | {p.memory_bytes / 1e9:>7.2f}")
    return "\n".join(lines)


def describe_cluster(cluster: Cluster, implementation) -> str:
    peak = cluster.peak_flops if implementation.low_precision else cluster.fp32_flops
    kind = "bf16" if implementation.low_precision else "fp32"
    rate = f"{peak / 1e12:.3g} TFLOP/s" if peak >= 1e12 else f"{peak / 1e9:.3g} GFLOP/s"
    return (f"{cluster.name}: {cluster.nodes} node(s) x {cluster.devices_per_node} devices, "
            f"{cluster.device_memory / 1e9:.1f} GB each, {rate} {kind} x "
            f"{cluster.efficiency:.2f} efficiency, links {cluster.intra.bandwidth / 1e9:g} GB/s "
            f"in a node and {cluster.inter.bandwidth / 1e9:g} GB/s between")


def describe_model(name, model: GPTConfig) -> str:
    return (f"{name}: {model.n_layer} layers, {model.n_head} heads, width {model.n_embd}, "
            f"context {model.block_size}, vocab {model.vocab_size}, "
            f"{num_params(model) / 1e6:,.1f} M parameters")


def run(args):
    if args.check_megatron:
        print(megatron_check())
        return 0
    name, model, default_batch = resolve_model(args)
    cluster = resolve_cluster(args)
    global_batch = default_batch if args.global_batch is None else args.global_batch
    _positive("global_batch", global_batch)
    _positive("top", args.top)
    implementation = IMPLEMENTATIONS[args.implementation]
    result = search(model, cluster, implementation, global_batch, args.top)
    print(f"model {describe_model(name, model)}")
    print(f"cluster {describe_cluster(cluster, implementation)}")
    if cluster.name == "laptop":
        print(f"  calibrated here: GEMM peak {cluster.peak_flops / 1e9:.1f} GFLOP/s, step "
              f"efficiency {cluster.efficiency:.2f}, Python {cluster.layer_overhead * 1e3:.2f} "
              "ms per layer per micro-batch")
    print(f"implementation {implementation.name}, global batch {global_batch} sequences")
    rejected = sum(result.rejected.values())
    reasons = "; ".join(f"{n} because {why}" for why, n in result.rejected.items())
    print(f"{result.candidates} layouts: {rejected} rejected{': ' + reasons if reasons else ''}; "
          f"{result.skipped} not examined (slower than the top {args.top} even without a "
          "bubble)")
    if not result.best:
        raise UserError(f"no layout of {name} fits in {cluster.device_memory / 1e9:.1f} GB "
                        f"per device on {cluster.world} devices: expected more nodes, a "
                        "smaller --global-batch or a smaller model")
    print(format_table(result.best))
    for i, (layout, _) in enumerate(result.best, 1):
        print(f"{i:>6} {command_line(name, model, layout, cluster)}")
    return 0


# Megatron-LM's 1T GPT on 3072 A100s (Narayanan et al. 2021, Table 1): their layout and result
MEGATRON_LAYOUT = TrainingLayout(dp=6, tp=8, pp=64, schedule="interleaved", chunks=2,
                                 micro_batches=512, recompute="full", global_batch=3072)
MEGATRON_TFLOPS_PER_GPU = 163.0
MEGATRON_PFLOPS = 502.0


def megatron_flops(model: GPTConfig, global_batch: int) -> float:
    """FLOPs of one step as Narayanan et al. count them (recomputation included):
    96 B s l h^2 (1 + s / 6h + V / 16lh)."""
    B, s, L, h, V = (global_batch, model.block_size, model.n_layer, model.n_embd,
                     model.vocab_size)
    return 96 * B * s * L * h * h * (1 + s / (6 * h) + V / (16 * L * h))


def megatron_check() -> str:
    """Predicted vs published per-GPU TFLOP/s for Megatron's 1T run, and the planner's own
    best layout on the same cluster."""
    model, layout = MODELS["1T"], MEGATRON_LAYOUT
    cluster = gpu_cluster("a100-selene", layout.world // 8)
    flops = megatron_flops(model, layout.global_batch)
    ours = predict(model, layout, cluster, MEGATRON)
    tflops = flops / ours.step_s / layout.world / 1e12
    slower = predict(model, layout, replace(cluster, efficiency=0.6), MEGATRON)
    lines = [f"model {describe_model('1T', model)}",
             f"cluster {describe_cluster(cluster, MEGATRON)}",
             f"their layout: {describe_layout(layout)}, global batch {layout.global_batch}",
             f"{'':<28}{'predicted':>10}{'published':>10}",
             f"{'per-GPU TFLOP/s':<28}{tflops:>10.0f}{MEGATRON_TFLOPS_PER_GPU:>10.0f}"
             f"   ratio {tflops / MEGATRON_TFLOPS_PER_GPU:.2f}",
             f"{'aggregate PFLOP/s':<28}{tflops * layout.world / 1e3:>10.0f}"
             f"{MEGATRON_PFLOPS:>10.0f}",
             f"{'fraction of peak':<28}{tflops / 312:>10.0%}{MEGATRON_TFLOPS_PER_GPU / 312:>10.0%}",
             f"step {ours.step_s:.1f} s: compute {ours.compute_s:.1f}, tensor-parallel "
             f"{ours.tp_comm_s:.1f}, bubble and transfers {ours.bubble_s:.1f}, exposed "
             f"data-parallel {ours.dp_comm_s:.2f}, optimizer {ours.optimizer_s:.2f}; memory "
             f"{ours.memory_bytes / 1e9:.1f} GB per GPU of 80",
             f"at efficiency 0.60 instead of {cluster.efficiency:.2f}: "
             f"{flops / slower.step_s / layout.world / 1e12:.0f} TFLOP/s per GPU"]
    found = search(model, cluster, MEGATRON, layout.global_batch, 1)
    lines.append(f"planner on the same cluster ({found.candidates} layouts, "
                 f"{sum(found.rejected.values())} do not fit in 80 GB):")
    lines.append(format_table([(layout, ours)] + found.best,
                              ["theirs"] + [str(i) for i in range(1, len(found.best) + 1)]))
    best = found.best[0][0]
    alike = best.tp == layout.tp and best.pp * 2 >= layout.pp and best.pp <= layout.pp * 2
    lines.append(f"its best resembles theirs: {'yes' if alike else 'no'} (tp {best.tp} vs "
                 f"{layout.tp}, pp {best.pp} vs {layout.pp}, dp {best.dp} vs {layout.dp}, "
                 f"{best.recompute} vs {layout.recompute} recomputation)")
    return "\n".join(lines)
