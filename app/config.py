"""Training configuration: defaults, TOML files under configs/, CLI overrides, validation.

A config file is flat `key = value` TOML. Every key is also a CLI flag (`--lr 3e-4`), and the
CLI wins. Validation names the bad key, its value and what was expected.
"""
import argparse
import dataclasses
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from app.errors import UserError
from app.parallel.layout import check_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class TrainConfig:
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    vocab_size: int = 256
    n_classes: int = 0
    pool: str = "last"
    # optimisation
    batch_size: int = 12
    steps: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    head_lr_scale: float = 10.0
    # run
    seed: int = 1337
    dtype: str = "float32"
    matmul: str = "float32"
    device: str = "cpu"
    cuda_aware_mpi: str = "auto"
    data: str = "data/embedded.h5"
    log_interval: int = 10
    eval_interval: int = 250
    eval_windows: int = 96
    sample_tokens: int = 200
    # data parallelism
    dp: int = 0
    micro_batches: int = 1
    bucket_mb: float = 1.0
    zero: int = 0
    overlap: bool = True
    check_interval: int = 100
    # pipeline parallelism
    pp: int = 1
    schedule: str = "1f1b"
    chunks: int = 1
    partition: str = "balanced"
    # tensor parallelism
    tp: int = 1
    sequence_parallel: bool = False
    recompute: str = "none"
    # parameter server and compression
    mode: str = "ring"
    servers: int = 1
    staleness: int = 0
    staleness_lr: bool = False
    staleness_predict: bool = True
    balance: str = "static"
    straggler: str = ""
    compress: str = "none"
    compress_ratio: float = 0.01
    compress_rank: int = 4
    compress_warmup: int = 0
    timeout: float = 300.0
    # checkpoints
    save_interval: int = 0
    keep: int = 2
    max_skips: int = 5

    def model_config(self):
        from models.gpt import GPTConfig
        return GPTConfig(self.n_layer, self.n_head, self.n_embd, self.block_size, self.vocab_size,
                         self.n_classes, self.pool)

    def to_toml(self) -> str:
        lines = []
        for f in fields(self):
            value = getattr(self, f.name)
            lines.append(f"{f.name} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


HELP = {
    "n_layer": "transformer blocks", "n_head": "attention heads", "n_embd": "model width",
    "block_size": "context length in tokens", "vocab_size": "must match the data file",
    "n_classes": "0 = a language model; K = a K-way classifier (`app finetune` sets it from "
                 "the data file's labels)",
    "pool": "classifier pooling: last (the last real token's state) or mean (over the real "
            "tokens)",
    "head_lr_scale": "`app finetune`: the classifier head's learning rate over the trunk's",
    "batch_size": "global batch, in sequences", "steps": "optimizer steps",
    "lr": "peak learning rate", "min_lr": "learning rate at the end of the cosine",
    "warmup_steps": "linear warm-up steps", "weight_decay": "AdamW decoupled decay (matrices only)",
    "beta1": "AdamW beta1", "beta2": "AdamW beta2", "grad_clip": "global-norm clip (0 = off)",
    "seed": "seed for init and batches",
    "dtype": "float32, float64, or on a GPU bf16 or fp16 (mixed precision: float32 master "
             "weights and optimizer, 16-bit activations and GEMMs; fp16 with a dynamic loss "
             "scale)",
    "matmul": "cpu: precision of the float32 matrix products: float32, or bf16 (operands "
              "rounded to bfloat16, float32 accumulation, on AVX-512-BF16/AMX CPUs through "
              "MKL; weights, activations and optimizer stay float32)",
    "device": "cpu (NumPy) or gpu (CuPy; one GPU per rank, by local rank)",
    "cuda_aware_mpi": "gpu: whether MPI reads device memory: auto (ask the library), yes, or "
                      "no (stage every transfer through pinned host buffers)",
    "data": "token file made by `app prepare`",
    "log_interval": "steps between log lines", "eval_interval": "steps between validation",
    "eval_windows": "fixed validation windows", "sample_tokens": "tokens sampled at the end",
    "dp": "data-parallel ranks (0 = all ranks)",
    "micro_batches": "gradient accumulation steps per optimizer step (per rank)",
    "bucket_mb": "gradient bucket size in MB for the all-reduce",
    "zero": "1 = shard the optimizer state over data-parallel ranks (ZeRO-1)",
    "overlap": "start each bucket's all-reduce during backward (true/false)",
    "check_interval": "steps between cross-rank parameter checks (0 = off)",
    "pp": "pipeline stages", "schedule": "pipeline schedule: 1f1b, gpipe or interleaved",
    "chunks": "model chunks per stage (interleaved schedule only)",
    "partition": "blocks per stage: balanced (FLOP model) or uniform",
    "tp": "tensor-parallel ranks: each weight matrix split Megatron-style (adjacent ranks)",
    "sequence_parallel": "split the LayerNorm regions along the sequence over the "
                         "tensor-parallel ranks (all-gather/reduce-scatter for all-reduce)",
    "recompute": "activation recomputation: none, selective (attention core) or full "
                 "(whole blocks)",
    "mode": "ring (all-reduce) or ps (parameter servers: ranks 0..servers-1, the rest "
            "workers)",
    "servers": "parameter servers in ps mode",
    "staleness": "ps mode: clocks a worker may run ahead of the slowest (0 = synchronous)",
    "staleness_lr": "ps mode: scale a step's learning rate by the mean 1/(1+staleness) of "
                    "its gradients",
    "staleness_predict": "ps async: a stale pull gets the parameters moved on by the last "
                         "update once per clock it lags (weight prediction)",
    "balance": "ps mode: static slices of the batch, or dynamic (micro-batches from a "
               "shared counter)",
    "straggler": "RANK:DELAY_MS: that rank sleeps DELAY_MS every step; any:DELAY_MS: one "
                 "model rank drawn afresh each step (experiments)",
    "compress": "gradient compression: none, fp16, int8, topk or powersgd",
    "compress_ratio": "topk: the fraction of entries sent, in (0, 1]",
    "compress_rank": "powersgd: the rank of the approximation",
    "compress_warmup": "topk: steps over which the ratio falls from 1 to compress_ratio, "
                       "exponentially (DGC's warm-up; 0 = none)",
    "save_interval": "steps between checkpoints (0 = none); the last step is saved too",
    "keep": "checkpoints kept, the newest (0 = all)",
    "max_skips": "steps in a row skipped for a non-finite loss or gradient norm before "
                 "the run stops",
    "timeout": "seconds a rank may wait for the others (collectives, pipeline transfers) "
               "before the watchdog aborts the job",
}

POSITIVE_INTS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size",
                 "steps", "log_interval", "eval_interval", "eval_windows", "micro_batches",
                 "pp", "chunks", "tp", "compress_rank", "servers")
NON_NEGATIVE_INTS = ("warmup_steps", "sample_tokens", "seed", "dp", "check_interval",
                     "save_interval", "keep", "max_skips", "staleness", "compress_warmup",
                     "n_classes")
CHOICES = {"dtype": ("float32", "float64", "bf16", "fp16"), "device": ("cpu", "gpu"),
           "matmul": ("float32", "bf16"),
           "zero": (0, 1),
           "cuda_aware_mpi": ("auto", "yes", "no"),
           "schedule": ("1f1b", "gpipe", "interleaved"), "partition": ("balanced", "uniform"),
           "recompute": ("none", "selective", "full"), "mode": ("ring", "ps"),
           "balance": ("static", "dynamic"), "pool": ("last", "mean"),
           "compress": ("none", "fp16", "int8", "topk", "powersgd")}


def parse_bool(text: str) -> bool:
    """CLI spelling of a boolean: true/false, yes/no, on/off, 1/0."""
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean: expected true or false")


def _toml_value(value):
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def field_names():
    return [f.name for f in fields(TrainConfig)]


def add_config_arguments(parser: argparse.ArgumentParser):
    """--config NAME|PATH plus one override flag per config key (default: not given).

    `--help` shows the values of the config that would be used (`parser.before_help`)."""
    parser.add_argument("--config", default="baby",
                        help="a name in configs/ (tiny, baby, small) or a path to a .toml file "
                             "(default baby)")
    group = parser.add_argument_group(
        "config overrides (win over the file; each shows the value of --config's file)")
    overrides = {}
    for f in fields(TrainConfig):
        # a boolean flag alone means true (`--sequence-parallel`); `--overlap false` works too
        flag = {"type": parse_bool, "nargs": "?", "const": True} if f.type is bool \
            else {"type": f.type}
        overrides[f.name] = group.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, default=None,
            metavar=f.type.__name__.upper(), help=f"{HELP.get(f.name, '')} ({f.default!r})",
            **flag)

    def show_config_values(namespace):
        try:
            cfg, source = load_config(namespace.config), f"{namespace.config}: "
        except UserError as err:
            cfg, source = TrainConfig(), f"built-in, since {err}: "
        for name, action in overrides.items():
            action.help = f"{HELP.get(name, '')} ({source}{getattr(cfg, name)!r})"

    parser.before_help = show_config_values


def config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        candidate = path
    else:
        candidate = CONFIG_DIR / f"{name_or_path}.toml"
    if not candidate.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
        raise UserError(f"config {name_or_path!r} not found: expected one of {known} "
                        "or a path to a .toml file")
    return candidate


def load_config(name_or_path: str = "baby", overrides: dict | None = None) -> TrainConfig:
    """Defaults <- TOML file <- overrides (None values ignored), then validated."""
    path = config_path(name_or_path)
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"config {path}: not valid TOML ({err})") from None
    known = field_names()
    unknown = [k for k in values if k not in known]
    if unknown:
        raise UserError(f"unknown config key {unknown[0]!r} in {path}; "
                        f"valid keys: {', '.join(known)}")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return make_config(values)


def make_config(values: dict) -> TrainConfig:
    """A validated TrainConfig from a mapping (types checked, ints accepted as floats)."""
    known = {f.name: f for f in fields(TrainConfig)}
    for key, value in values.items():
        if key not in known:
            raise UserError(f"unknown config key {key!r}; valid keys: {', '.join(known)}")
        expected = known[key].type
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
        elif not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            raise UserError(f"config {key} = {value!r}: expected a {expected.__name__}")
    cfg = dataclasses.replace(TrainConfig(), **values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig):
    def bad(key, expected):
        raise UserError(f"config {key} = {getattr(cfg, key)!r}: expected {expected}")

    for key in POSITIVE_INTS:
        if getattr(cfg, key) <= 0:
            bad(key, "an integer > 0")
    for key in NON_NEGATIVE_INTS:
        if getattr(cfg, key) < 0:
            bad(key, "an integer >= 0")
    if not cfg.lr > 0:
        bad("lr", "a number > 0")
    if not 0 <= cfg.min_lr <= cfg.lr:
        bad("min_lr", f"a number in [0, lr = {cfg.lr}]")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, key) < 1:
            bad(key, "a number in [0, 1)")
    if not cfg.bucket_mb > 0:
        bad("bucket_mb", "a bucket size in MB > 0")
    for key in ("weight_decay", "grad_clip"):
        if not getattr(cfg, key) >= 0:
            bad(key, "a number >= 0")
    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            bad(key, "one of " + ", ".join(map(str, choices)))
    if not cfg.head_lr_scale > 0:
        bad("head_lr_scale", "a number > 0")
    if not cfg.timeout > 0:
        bad("timeout", "a number of seconds > 0")
    if not 0 < cfg.compress_ratio <= 1:
        bad("compress_ratio", "a fraction in (0, 1]")
    if cfg.dtype in ("bf16", "fp16"):
        if cfg.device != "gpu":
            raise UserError(f"config dtype = {cfg.dtype!r} needs device = 'gpu' (16-bit "
                            f"GEMMs run on tensor cores; NumPy has none): expected dtype "
                            f"float32 or float64 with device = {cfg.device!r}")
        if cfg.mode != "ring":
            raise UserError(f"config dtype = {cfg.dtype!r} does not run with a parameter "
                            f"server (mode = {cfg.mode!r}): expected mode 'ring', or dtype "
                            "float32")
    if cfg.matmul == "bf16" and (cfg.device != "cpu" or cfg.dtype != "float32"):
        raise UserError(f"config matmul = 'bf16' rounds float32 products on the CPU, not with "
                        f"device = {cfg.device!r}, dtype = {cfg.dtype!r}: expected device "
                        "'cpu' and dtype 'float32' (on a GPU, dtype bf16)")
    check_config(cfg)  # the layout rules that need no world size
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"config n_embd = {cfg.n_embd} is not divisible by n_head = {cfg.n_head}: "
                        "expected n_embd % n_head == 0")
