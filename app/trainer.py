"""`python -m app train`: the training loop, on one rank or many.

Every rank runs this. The process grid (comm/grid.py) gives each rank its data-parallel
coordinate; the rank reads its slice of the global batch of step s, and `TrainStep` does
forward, backward, gradient reduction and the optimizer step. Every rank keeps identical
parameters (checked every `check_interval` steps); rank 0 logs and writes the run
directory: config.toml, metrics.jsonl and the final params.h5.

Set-up runs inside `together` (app/failures.py), so a bad config, data file, run directory
or memory budget ends every rank with one line; every wait on other ranks is under the
watchdog (comm/watchdog.py), armed with the `timeout` config key.
"""
import os
import time
import zlib
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from app import atomic, metrics, preempt, rundir
from app.checkpoint import (check_resumable, find_resume, load_checkpoint, save_checkpoint,
                            save_params)
from app.config import add_config_arguments, field_names, load_config, TrainConfig
from app.data import BatchLoader, TokenData, validation_batches
from app.errors import UserError
from app.failures import together
from app.generate import sample
from app.memory import check_fits
from app.partition import balanced, format_partition, model_costs, stage_costs, uniform
from app.pipeline import PipelineStep
from app.slurm import check_world_matches_slurm
from app.step import TrainStep
from app.tokenizer import get_tokenizer
from comm import ring, watchdog
from comm.backend import BackendUnavailable, get_xp, keep_freed_host_memory, to_host
from comm.grid import ProcessGrid
from models import gpt
from models.optim import lr_at


def add_arguments(parser):
    add_config_arguments(parser)
    parser.add_argument("--out", default=None,
                        help="run directory (default runs/<config name>, or runs/<config "
                             "name>-N if that holds a run already)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --out (without it, that is refused)")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue a run: auto = from the newest valid checkpoint in --out "
                             "(a fresh start if there is none), or a checkpoint directory")
    parser.add_argument("--peak-gflops", type=float, default=None,
                        help="peak GFLOP/s for MFU (default: measured by a short GEMM probe)")


def run(args):
    # First of all: Python's default action for SIGUSR1 would end the rank.
    with preempt.installed():
        return _run(args)


def _run(args):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    with together(comm):
        check_world_matches_slurm(comm.Get_size())
        overrides = {name: getattr(args, name) for name in field_names()}
        cfg = load_config(args.config, overrides)
        if args.peak_gflops is not None and not args.peak_gflops > 0:
            raise UserError(f"--peak-gflops {args.peak_gflops}: expected a number > 0")
        if args.resume and args.overwrite:
            raise UserError("--resume and --overwrite together: expected one of them (continue "
                            "the run, or replace it)")
    out, default = args.out, os.path.join("runs", Path(args.config).stem)
    if out is None and args.resume:
        out = default  # the run to continue
    if out is None:  # rank 0 names a fresh one, so that every rank agrees
        with watchdog.waiting("rank 0 to name the run directory", cfg.timeout):
            out = comm.bcast(rundir.fresh_run_dir(default) if comm.Get_rank() == 0 else None,
                             root=0)
    history = train(cfg, out, peak_gflops=args.peak_gflops, overwrite=args.overwrite,
                    comm=comm, resume=args.resume)
    return preempt.REQUEUE_EXIT_CODE if history.get("stopped") else 0


def evaluate(params, model_cfg, batches, xp, dp_comm):
    """Mean loss over the fixed validation windows, which the data-parallel ranks share out
    (each batch weighted by its size)."""
    rank, size = dp_comm.Get_rank(), dp_comm.Get_size()
    totals = np.zeros(2)
    for x, y in batches[rank::size]:
        loss, _ = gpt.forward(params, model_cfg, xp.asarray(x), xp.asarray(y))
        totals += (float(loss) * len(x), len(x))
    ring.all_reduce(dp_comm, totals)
    return totals[0] / totals[1]


def check_layout(cfg: TrainConfig, world: int) -> int:
    """The data-parallel size of a dp x pp x 1 grid on `world` ranks (tensor parallelism comes
    later); errors name the bad value, and every rank computes the same."""
    dp = cfg.dp or max(1, world // cfg.pp)
    if dp * cfg.pp != world:
        raise UserError(f"world size {world} != dp*pp*tp = {dp}*{cfg.pp}*1 = {dp * cfg.pp}: "
                        "expected the ranks to fill the grid exactly")
    per_rank, rem = divmod(cfg.batch_size, dp * cfg.micro_batches)
    if rem or per_rank == 0:
        raise UserError(f"config batch_size = {cfg.batch_size} is not divisible by dp * "
                        f"micro_batches = {dp} * {cfg.micro_batches}: expected a multiple of "
                        f"{dp * cfg.micro_batches}")
    return dp


def ranks_on_this_node(comm) -> int:
    from mpi4py import MPI
    with watchdog.waiting("the other ranks to count the ranks per node"):
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    size = node.Get_size()
    node.Free()
    return size


def params_digest(params) -> int:
    """A cheap fingerprint of all parameters (CRC-32 of their bytes)."""
    return zlib.crc32(np.ascontiguousarray(to_host(params.flat)).view(np.uint8))


def check_replicas_agree(params, dp_comm, step):
    """Fails loudly, on every rank at once, if data-parallel replicas have drifted apart."""
    with watchdog.waiting(f"the other ranks' parameter digests at step {step}"):
        digests = dp_comm.allgather(params_digest(params))
    if len(set(digests)) > 1:
        raise RuntimeError(f"parameters differ across data-parallel ranks at step {step}: "
                           f"CRC-32 per rank {[hex(d) for d in digests]}")


def train(cfg: TrainConfig, run_dir, peak_gflops=None, log=print, sample_prompt="\n",
          comm=None, overwrite=False, resume=None):
    """Trains on the ranks of `comm` (default MPI.COMM_WORLD), from scratch or, with
    `resume` ("auto" or a checkpoint directory), from a checkpoint; returns
    {'loss': [...], 'val': {step: loss}, 'params': FlatParams} on every rank.

    Refuses (on every rank) a run directory that holds a run, unless `overwrite` or
    `resume`."""
    if comm is None:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
    is_root = comm.Get_rank() == 0
    if not is_root:
        log = _silent
    with ExitStack() as cleanup:
        watchdog.arm(cfg.timeout)
        cleanup.callback(watchdog.arm, None)
        with together(comm):
            try:
                xp = get_xp(cfg.device)
            except BackendUnavailable as err:
                raise UserError(str(err)) from None
            dp = check_layout(cfg, comm.Get_size())
        with watchdog.waiting("the other ranks to build the process grid"):
            grid = ProcessGrid(dp, cfg.pp, 1, comm)
        cleanup.callback(grid.free)
        on_node = ranks_on_this_node(comm)
        with together(comm):
            check_fits(cfg, grid.dp, on_node)
            data = cleanup.enter_context(TokenData(cfg.data))
            if data.vocab_size != cfg.vocab_size:
                raise UserError(f"data file {cfg.data} has vocab_size {data.vocab_size} but "
                                f"the config says vocab_size = {cfg.vocab_size}: expected "
                                "them to match")
            loader = BatchLoader(data, "train", cfg.block_size, cfg.batch_size, cfg.seed)
            val_batches = list(validation_batches(data, cfg.block_size, cfg.batch_size,
                                                  cfg.eval_windows))
        resume_from = None
        with together(comm):  # only once every rank is ready: a refused run writes nothing
            if is_root:
                run = rundir.claim(run_dir, overwrite, resume=bool(resume))
                cleanup.callback(run.release)
                resume_from = resume and find_resume(run_dir, resume, watchdog.say)
                if resume and not resume_from and "params.h5" in rundir.run_files(run_dir):
                    raise UserError(f"--out {run_dir} holds a finished run but no checkpoint "
                                    "to resume: pass --overwrite to replace it, or choose "
                                    "another --out")
                # A run stopped before its first checkpoint has nothing to continue: it
                # starts again from step 0, with a fresh metrics.jsonl.
                _write_or_fail(atomic.write_text, run.path / "config.toml",
                               cfg.to_toml())
        with watchdog.waiting("rank 0 to choose the checkpoint to resume"):
            resume_from = comm.bcast(resume_from, root=0)
        with together(comm):
            if resume_from:
                check_resumable(resume_from, cfg)
        keep_freed_host_memory()
        log("config: " + ", ".join(f"{k}={v}" for k, v in vars(cfg).items()))
        log_path = os.path.join(run_dir, "metrics.jsonl") if is_root else None
        # Overflow ends as a non-finite loss, reported below in one line; NumPy's warnings
        # on the way there would only bury it.
        with metrics.MetricsLog(log_path, append=bool(resume_from)) as metrics_log, \
                np.errstate(all="ignore"):
            history = _train_loop(cfg, xp, grid, data, loader, val_batches, metrics_log,
                                  peak_gflops, log, run_dir, resume_from)
        if is_root and not history.get("stopped"):
            _finish_run(cfg, run_dir, history["params"], data.tokenizer, sample_prompt, log)
    return history


def _write_or_fail(write, path, *args):
    """An unwritable file in the run directory is the user's to fix: one line, not OSError."""
    try:
        write(path, *args)
    except OSError as err:
        raise UserError(f"cannot write {path} ({err.strerror or err}): expected a writable "
                        "run directory with free space") from None


def _silent(*args, **kwargs):
    pass


def _finish_run(cfg, run_dir, params, tokenizer_spec, sample_prompt, log):
    host_params = {name: to_host(value) for name, value in params.items()}
    _write_or_fail(save_params, os.path.join(run_dir, "params.h5"), host_params,
                   {"step": cfg.steps, "tokenizer": tokenizer_spec, "config": cfg.to_toml()})
    if cfg.sample_tokens:
        tokenizer = get_tokenizer(tokenizer_spec)
        out = sample(params, cfg.model_config(), tokenizer.encode(sample_prompt),
                     cfg.sample_tokens, temperature=0.8, top_k=0, seed=cfg.seed)
        log("sample:\n" + sample_prompt + tokenizer.decode(out))
    files = ", ".join(rundir.run_files(run_dir))
    log(f"done: {cfg.steps} steps; run directory {run_dir} holds {files}")


def pipeline_ranges(cfg: TrainConfig, rows_per_micro_batch: int):
    """Block ranges per (virtual) stage and a printable description of the split."""
    model_cfg = cfg.model_config()
    embedding, blocks, head = model_costs(model_cfg, rows_per_micro_batch * cfg.block_size)
    if cfg.chunks > 1:  # interleaving needs equal chunks, whatever `partition` says
        ranges = uniform(cfg.n_layer, cfg.pp * cfg.chunks)
        per_stage = cfg.n_layer // len(ranges)
        return ranges, (f"partition=uniform (interleaving needs equal chunks): {len(ranges)} "
                        f"virtual stages of {per_stage} block{'s' * (per_stage > 1)}")
    if cfg.partition == "uniform":
        ranges = uniform(cfg.n_layer, cfg.pp)
    else:
        ranges = balanced(blocks, cfg.pp, embedding, head)
    return ranges, (f"partition={cfg.partition}: "
                    + format_partition(ranges, stage_costs(ranges, blocks, embedding, head)))


def gather_full_params(params, pp_comm, model_cfg, xp, dtype):
    """Every stage's parameters put together (for validation, sampling and saving)."""
    if pp_comm.Get_size() == 1:
        return params
    full = gpt.FlatParams(gpt.param_shapes(model_cfg), np, dtype)
    with watchdog.waiting("the other pipeline stages' parameters"):
        parts = pp_comm.allgather({name: to_host(v) for name, v in params.items()})
    for part in parts:
        for name, value in part.items():
            full[name][...] = value
    return gpt.FlatParams(full.shapes, xp, dtype, buffer=xp.asarray(full.flat))


def _train_loop(cfg, xp, grid, data, loader, val_batches, metrics_log, peak_gflops, log,
                run_dir, resume_from):
    model_cfg = cfg.model_config()
    dtype = np.dtype(cfg.dtype)
    dp_comm, dp, dp_rank = grid.dp_comm, grid.dp, grid.coords.dp
    if cfg.pp > 1:
        ranges, split = pipeline_ranges(cfg, cfg.batch_size // (dp * cfg.micro_batches))
        step_fn = PipelineStep(model_cfg, cfg, grid.pp_comm, dp_comm if dp > 1 else None,
                               cfg.schedule, cfg.chunks, dtype, xp, cfg.seed, cfg.timeout,
                               ranges)
        params = step_fn.params
        log(f"pipeline: pp={cfg.pp} schedule={cfg.schedule} chunks={cfg.chunks} "
            f"micro_batches={cfg.micro_batches} {split}")
    else:
        params = gpt.init_params(model_cfg, cfg.seed, xp, dtype)
        step_fn = TrainStep(model_cfg, params, cfg, dp_comm)
    tokens_per_step = cfg.batch_size * cfg.block_size
    n_params = gpt.num_params(model_cfg)  # the whole model, whatever this rank holds
    flops_per_step = metrics.flops_per_token(n_params, cfg.n_layer, cfg.block_size,
                                             cfg.n_embd) * tokens_per_step
    # One probe on rank 0 while the others wait: oversubscribed ranks would skew it.
    peak = peak_gflops
    if not peak:
        with watchdog.waiting("rank 0's GEMM probe"):
            peak = grid.comm.bcast(
                metrics.measure_gemm_gflops(xp) if grid.comm.Get_rank() == 0 else None, root=0)
    log(f"model: {n_params:,} parameters, {flops_per_step / tokens_per_step / 1e6:.2f} "
        f"MFLOP/token; data: {data.train.shape[0]:,} train / {data.val.shape[0]:,} val tokens;"
        f" peak {peak:.1f} GFLOP/s per rank ({'given' if peak_gflops else 'measured'})")
    reducer = getattr(step_fn, "reducer", None)
    log(f"layout: dp={dp} pp={cfg.pp} micro_batches={cfg.micro_batches} zero={cfg.zero}; "
        f"optimizer state {optimizer_bytes(step_fn.optimizer) / 2**20:.2f} MiB per rank"
        + (f"; {len(reducer.buckets)} gradient buckets of <= {cfg.bucket_mb} MB, "
           f"overlap {'on' if cfg.overlap else 'off'}" if reducer else ""))

    first = 0
    if resume_from:
        first = load_checkpoint(resume_from, params, step_fn.optimizer)
        log(f"resumed from {resume_from} at step {first}")
    history = {"loss": [], "val": {}}
    step_times, comm_waits = [], []
    started, skips = time.perf_counter(), 0
    for step in range(first, cfg.steps + 1):
        # SIGTERM/SIGUSR1 on any rank (app/preempt.py): every rank stops at this same step
        stopping = step < cfg.steps and preempt.stop_requested(grid.comm)
        if step > first and (stopping or cfg.save_interval and (
                step % cfg.save_interval == 0 or step == cfg.steps)):
            _save(cfg, grid, run_dir, step, params, step_fn.optimizer, data.tokenizer, log)
        if stopping:
            history["stopped"] = preempt.stop_signal()
            metrics_log.write({"step": step, "stopped": history["stopped"]})
            log(f"step {step:5d}/{cfg.steps} | stopped by {history['stopped']}: "
                + (f"checkpoint of step {step} saved" if step > first else "nothing new to save")
                + f"; exit {preempt.REQUEUE_EXIT_CODE} (requeue), --resume auto goes on from here")
            # rank 0 may still be renaming the checkpoint into place: nobody exits before
            with watchdog.waiting("the other ranks to finish the last checkpoint"):
                grid.comm.Barrier()
            return history
        if step % cfg.eval_interval == 0 or step == cfg.steps:
            full = gather_full_params(params, grid.pp_comm, model_cfg, xp, dtype)
            val_loss = evaluate(full, model_cfg, val_batches, xp, dp_comm)
            history["val"][step] = val_loss
            metrics_log.write({"step": step, "val_loss": val_loss})
            log(f"step {step:5d}/{cfg.steps} | val loss {val_loss:.4f}")
        if dp > 1 and ((cfg.check_interval and step % cfg.check_interval == 0)
                       or step == cfg.steps):
            check_replicas_agree(params, dp_comm, step)
        if step == cfg.steps:
            break
        start = time.perf_counter()
        x, y = loader.batch(step, dp_rank, dp)
        lr = lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.steps)
        loss, norm = step_fn(xp.asarray(x), xp.asarray(y), lr)
        step_times.append(time.perf_counter() - start)
        if reducer:
            comm_waits.append(reducer.wait_seconds)
        history["loss"].append(loss)
        if step_fn.skipped:  # decided on global values: every rank is here alike
            skips += 1
            metrics_log.write({"step": step, "skipped": f"loss {loss}, gradient norm {norm}"})
            log(f"step {step:5d}/{cfg.steps} | skipped: loss {loss}, gradient norm {norm}; "
                f"parameters and moments unchanged ({skips} in a row)")
            if skips > cfg.max_skips:
                raise UserError(f"loss or gradient norm not finite in {skips} steps in a row "
                                f"(last: loss {loss} at step {step}, lr {lr:.3g}): training "
                                f"diverged; expected a lower lr (now {cfg.lr:g}) or grad_clip "
                                f"> 0 (now {cfg.grad_clip:g}); the last checkpoint is kept",
                                everywhere=True)
            continue
        skips = 0
        if step % cfg.log_interval == 0 or step == cfg.steps - 1:
            eta = (time.perf_counter() - started) / (step - first + 1) * (cfg.steps - step - 1)
            _log_step(step, cfg.steps, eta, loss, lr, norm, step_times, comm_waits,
                      tokens_per_step, flops_per_step, peak * dp * cfg.pp, metrics_log, log)
    history["params"] = gather_full_params(params, grid.pp_comm, model_cfg, xp, dtype)
    return history


def _save(cfg, grid, run_dir, step, params, optimizer, data_tokenizer, log):
    """A checkpoint of step `step`: each rank writes what it alone owns (app/checkpoint.py)."""
    names = [name for name in params.shapes if not (name == "wte" and grid.coords.pp > 0)]
    first_replica = grid.coords.dp == 0  # the tied wte: written by the first stage only
    meta = {"config": cfg.to_toml(), "dtype": cfg.dtype, "tokenizer": data_tokenizer,
            "shapes": gpt.param_shapes(cfg.model_config()),
            "layout": {"world": grid.comm.Get_size(), "dp": grid.dp, "pp": grid.pp,
                       "tp": grid.tp, "zero": cfg.zero, "schedule": cfg.schedule,
                       "chunks": cfg.chunks, "micro_batches": cfg.micro_batches}}
    start = time.perf_counter()
    try:
        path = save_checkpoint(grid.comm, run_dir, step, params, optimizer,
                               names if first_replica else [],
                               names if cfg.zero or first_replica else [], meta, cfg.keep)
    except OSError as err:
        raise UserError(f"cannot write a checkpoint of step {step} in {run_dir} "
                        f"({err.strerror or err}): expected a writable run directory with "
                        "free space") from None
    log(f"step {step:5d}/{cfg.steps} | saved {path} in {time.perf_counter() - start:.2f} s")


def optimizer_bytes(optimizer):
    """Bytes of AdamW state (both moments) held by this rank."""
    return optimizer.m.nbytes + optimizer.v.nbytes


def _log_step(step, steps, eta, loss, lr, norm, step_times, comm_waits, tokens_per_step,
              flops_per_step, peak_gflops, metrics_log, log):
    # medians over the steps since the last log line: robust to one slow step
    dt = float(np.median(step_times))
    tok_s = tokens_per_step / dt
    mfu = flops_per_step / dt / (peak_gflops * 1e9)
    record = {"step": step, "loss": loss, "lr": lr, "grad_norm": norm,
              "ms_per_step": dt * 1e3, "tokens_per_s": tok_s, "mfu": mfu}
    line = (f"step {step:5d}/{steps} | loss {loss:.4f} | lr {lr:.2e} | norm {norm:.3f} | "
            f"{dt * 1e3:7.1f} ms | {tok_s:8.0f} tok/s | MFU {100 * mfu:5.1f}%")
    if comm_waits:
        record["comm_wait_ms"] = float(np.median(comm_waits)) * 1e3
        line += f" | comm wait {record['comm_wait_ms']:.1f} ms"
    line += f" | ETA {format_duration(eta)}"
    step_times.clear()
    comm_waits.clear()
    metrics_log.write(record)
    log(line)


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m05s', 65 -> '1m05s', 4.2 -> '4s'."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
