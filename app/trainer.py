"""`python -m app train`: the training loop, on one rank or many.

Every rank runs this. The layout (app/parallel/layout.py) places the rank on the dp x pp x
tp grid (comm/grid.py); the rank reads its data-parallel slice of the global batch of step
s, and the step engine (app/parallel/engine.py) runs forward, backward, gradient reduction
and the optimizer step of whatever it holds. Replicas are checked to agree every
`check_interval` steps; rank 0 logs and writes the run directory: config.toml,
metrics.jsonl, checkpoints/ and the final params.h5.

Set-up runs inside `together` (app/failures.py), so a bad config, layout, data file, run
directory or memory budget ends every rank with one line; every wait on other ranks is
under the watchdog (comm/watchdog.py), armed with the `timeout` config key.
"""
import os
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from app import atomic, metrics, preempt, rundir
from app.checkpoint import (check_resumable, find_resume, load_checkpoint, read_manifest,
                            save_params, save_training_state)
from app.config import add_config_arguments, field_names, load_config, TrainConfig
from app.data import BatchLoader, TokenData, validation_batches
from app.errors import UserError
from app.evaluate import shared_validation_loss
from app.failures import together
from app.parallel.precision import compute_dtype_of, master_dtype_of
from app.generate import sample
from app.memory import check_fits
from app.parallel import layout as layouts, ps as parameter_server
from app.parallel.engine import Comms, StepEngine
from app.parallel.state import check_replicas_agree, gather_full_params, placement
from app.slurm import check_world_matches_slurm
from app.tokenizer import get_tokenizer
from comm import watchdog
from comm.compress import make_compressor
from comm.backend import (BackendUnavailable, configure_mpi_buffers, get_xp,
                          keep_freed_host_memory, to_host, use_local_device)
from comm.grid import ProcessGrid
from models import gemm, gpt, sharding
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
        check_resume_flags(args)
        if cfg.n_classes:
            raise UserError(f"config n_classes = {cfg.n_classes}: expected 0 (a language "
                            "model) for `app train`; `app finetune` trains a classifier")
    out = out_dir(args, os.path.join("runs", Path(args.config).stem), comm, cfg.timeout)
    history = train(cfg, out, peak_gflops=args.peak_gflops, overwrite=args.overwrite,
                    comm=comm, resume=args.resume)
    return preempt.REQUEUE_EXIT_CODE if history.get("stopped") else 0


def check_resume_flags(args):
    """--resume continues a run and --overwrite replaces it: one of them at most."""
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite together: expected one of them (continue "
                        "the run, or replace it)")


def out_dir(args, default, comm, timeout) -> str:
    """The run directory of --out, or without it `default` (a run to continue) or, for a
    fresh run, the first free `default-N`, named by rank 0 so that every rank agrees."""
    if args.out is not None:
        return args.out
    if args.resume:
        return default
    with watchdog.waiting("rank 0 to name the run directory", timeout):
        return comm.bcast(rundir.fresh_run_dir(default) if comm.Get_rank() == 0 else None,
                          root=0)


def claim_run(comm, cfg, run_dir, overwrite, resume, cleanup):
    """Rank 0 claims the run directory (released by `cleanup`) and writes config.toml;
    returns, on every rank, the checkpoint to resume from (None: a fresh start), checked
    against the config. Refused on every rank, before anything is written, where the
    directory cannot take this run."""
    resume_from = None
    with together(comm):  # only once every rank is ready: a refused run writes nothing
        if comm.Get_rank() == 0:
            run = rundir.claim(run_dir, overwrite, resume=bool(resume))
            cleanup.callback(run.release)
            resume_from = resume and find_resume(run_dir, resume, watchdog.say)
            if resume and not resume_from and "params.h5" in rundir.run_files(run_dir):
                raise UserError(f"--out {run_dir} holds a finished run but no checkpoint "
                                "to resume: pass --overwrite to replace it, or choose "
                                "another --out")
            # A run stopped before its first checkpoint has nothing to continue: it
            # starts again from step 0, with a fresh metrics.jsonl.
            _write_or_fail(atomic.write_text, run.path / "config.toml", cfg.to_toml())
    with watchdog.waiting("rank 0 to choose the checkpoint to resume"):
        resume_from = comm.bcast(resume_from, root=0)
    with together(comm):
        if resume_from:
            check_resumable(resume_from, cfg)
    return resume_from


def place_on_node(comm) -> tuple[int, int]:
    """(this rank's rank among the ranks of its node, how many they are)."""
    from mpi4py import MPI
    with watchdog.waiting("the other ranks to count the ranks per node"):
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    place = node.Get_rank(), node.Get_size()
    node.Free()
    return place


def array_backend(cfg, local_rank=0):
    """The array module of cfg.device, on a GPU of this rank's own when it is gpu (one per
    rank: device = `local_rank`, the rank on its node); a device that is not there is the
    user's error."""
    try:
        xp = get_xp(cfg.device)
        if xp is not np:
            use_local_device(local_rank)
        return xp
    except BackendUnavailable as err:
        raise UserError(str(err)) from None


def use_matmul_precision(name, cleanup):
    """config matmul -> the products' precision for this process (models/gemm.py), until
    `cleanup` (the run's ExitStack) closes; bf16 where the CPU or MKL cannot is the user's
    error, with the reason."""
    cleanup.callback(gemm.use_bf16, False)  # first: a run's product precision ends with it
    try:
        gemm.use_bf16(name == "bf16")
    except ValueError as err:
        raise UserError(f"config matmul = {name!r} cannot run here: {err}: expected matmul "
                        "= 'float32'") from None


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
    with ExitStack() as cleanup:
        watchdog.arm(cfg.timeout)
        cleanup.callback(watchdog.arm, None)
        local_rank, on_node = place_on_node(comm)
        with together(comm):
            xp = array_backend(cfg, local_rank)
            layout = layouts.plan(cfg, comm.Get_size())
            mpi_buffers = configure_mpi_buffers(cfg.cuda_aware_mpi, xp)
            use_matmul_precision(cfg.matmul, cleanup)
        is_logger = comm.Get_rank() == layout.logger
        if not is_logger:
            log = _silent
        with watchdog.waiting("the other ranks to build the process grid"):
            # ps mode: servers and workers each get a communicator; the workers' grid
            role = comm.Split(int(comm.Get_rank() >= layout.servers), comm.Get_rank())
            is_server = comm.Get_rank() < layout.servers
            grid = None if is_server else ProcessGrid(layout.dp, layout.pp, layout.tp, role)
        cleanup.callback(role.Free)
        if grid is not None:
            cleanup.callback(grid.free)
        with together(comm):
            check_fits(cfg, layout.dp, on_node)
            data = cleanup.enter_context(TokenData(cfg.data))
            if data.vocab_size != cfg.vocab_size:
                raise UserError(f"data file {cfg.data} has vocab_size {data.vocab_size} but "
                                f"the config says vocab_size = {cfg.vocab_size}: expected "
                                "them to match")
            loader = BatchLoader(data, "train", cfg.block_size, cfg.batch_size, cfg.seed)
            val_batches = list(validation_batches(data, cfg.block_size, cfg.batch_size,
                                                  cfg.eval_windows))
        resume_from = claim_run(comm, cfg, run_dir, overwrite, resume, cleanup)
        keep_freed_host_memory()
        log("config: " + ", ".join(f"{k}={v}" for k, v in vars(cfg).items()))
        log(f"device: {cfg.device}; {mpi_buffers}" + ("; matrix products in bf16 (float32 "
            "accumulation)" if cfg.matmul == "bf16" else ""))
        if is_server:
            return parameter_server.serve(cfg, layout, comm, role, run_dir, data.tokenizer,
                                          resume_from)
        engine = make_engine(cfg, layout, xp, grid, comm, resume_from)
        cleanup.callback(engine.free)
        log_path = os.path.join(run_dir, "metrics.jsonl") if is_logger else None
        # Overflow ends as a non-finite loss, reported below in one line; NumPy's warnings
        # on the way there would only bury it.
        with metrics.MetricsLog(log_path, append=bool(resume_from)) as metrics_log, \
                np.errstate(all="ignore"):
            history = _train_loop(cfg, layout, xp, grid, engine, data, loader, val_batches,
                                  metrics_log, peak_gflops, log, run_dir, resume_from)
        if layout.mode == "ps":
            engine.client.stop()
        if is_logger and not history.get("stopped"):
            _finish_run(cfg, run_dir, history["params"], data.tokenizer, sample_prompt, log)
    return history


def stop_here(step, first, steps, comm, metrics_log, log):
    """The end of a run stopped by a signal at `step` (app/preempt.py), its checkpoint saved
    already (none when step == first): records and logs the stop, then waits until every
    rank of `comm` is here. Returns the signal's name, for history["stopped"]."""
    stopped = preempt.stop_signal()
    metrics_log.write({"step": step, "stopped": stopped})
    log(f"step {step:5d}/{steps} | stopped by {stopped}: "
        + (f"checkpoint of step {step} saved" if step > first else "nothing new to save")
        + f"; exit {preempt.REQUEUE_EXIT_CODE} (requeue), --resume auto goes on from here")
    # rank 0 may still be renaming the checkpoint into place: nobody exits before
    with watchdog.waiting("the other ranks to finish the last checkpoint"):
        comm.Barrier()
    return stopped


def make_engine(cfg, layout, xp, grid, comm, resume_from, **extra):
    """The step engine of this rank (`extra`: more StepEngine options)."""
    options = dict(extra, schedule=layout.schedule, chunks=layout.chunks,
                   ranges=list(layout.ranges), seed=cfg.seed, dtype=master_dtype_of(cfg.dtype),
                   compute_dtype=compute_dtype_of(cfg.dtype), xp=xp,
                   timeout=cfg.timeout, sequence_parallel=layout.sequence_parallel,
                   recompute=layout.recompute)
    if layout.mode == "ps":
        return parameter_server.worker_engine(cfg, layout, comm, resume_from, options)
    return StepEngine(cfg.model_config(), cfg, Comms.of_grid(grid), compressor=compressor(cfg),
                      **options)


def topk_ratio_at(step, ratio, warmup):
    """DGC's warm-up: the kept fraction falls exponentially from 1 to `ratio` over `warmup`
    steps, so the first, largest updates are not the sparsest."""
    return ratio if step >= warmup else ratio ** (step / warmup)


def compressor(cfg):
    """The gradient compressor of the config (comm/compress.py), or None."""
    if cfg.compress == "none":
        return None
    return make_compressor(cfg.compress, cfg.compress_ratio, cfg.compress_rank)


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


def _train_loop(cfg, layout, xp, grid, engine, data, loader, val_batches, metrics_log,
                peak_gflops, log, run_dir, resume_from):
    model_cfg = cfg.model_config()
    dp, dp_rank = grid.dp, grid.coords.dp
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
    if layout.pp > 1:
        log(f"pipeline: pp={layout.pp} schedule={layout.schedule} chunks={layout.chunks} "
            f"micro_batches={layout.micro_batches} {layout.partition}")
    if layout.tp > 1:
        log(f"tensor parallel: tp={layout.tp}, {model_cfg.n_head // layout.tp} heads and "
            f"{4 * model_cfg.n_embd // layout.tp} MLP columns per rank, vocabulary padded to "
            f"{sharding.padded_vocab(model_cfg, layout.tp)}; sequence parallel "
            f"{'on' if layout.sequence_parallel else 'off'}")
    reducer = engine.reducer
    log(f"layout: {layout.describe()}"
        + (f"; {len(reducer.buckets)} gradient buckets of <= {cfg.bucket_mb} MB, "
           f"overlap {'on' if cfg.overlap else 'off'}" if reducer else ""))

    first = 0
    if resume_from and engine.optimizer is None:  # ps mode: the servers loaded it
        first = engine.clock
    elif resume_from:
        first = load_checkpoint(resume_from, engine.params, engine.optimizer, placement(engine))
        if engine.mixed and engine.mixed.dynamic:
            engine.mixed.restore(read_manifest(resume_from).get("loss_scale"))
    if resume_from:
        log(f"resumed from {resume_from} at step {first}")
    straggler = layouts.parse_straggler(cfg.straggler)
    dynamic = layout.mode == "ps" and cfg.balance == "dynamic"
    staleness_seen = engine.staleness_counts() if layout.mode == "ps" else None
    history = {"loss": [], "val": {}}
    step_times, comm_waits = [], []
    started, skips = time.perf_counter(), 0
    for step in range(first, cfg.steps + 1):
        # SIGTERM/SIGUSR1 on any rank (app/preempt.py): every rank stops at this same step
        stopping = step < cfg.steps and (engine.stop_requested(step) if layout.mode == "ps"
                                          else preempt.stop_requested(grid.comm))
        if step > first and (stopping or cfg.save_interval and (
                step % cfg.save_interval == 0 or step == cfg.steps)):
            if layout.mode == "ps":  # the servers hold the state: a meeting at this clock
                engine.save(cfg, layout, run_dir, step, data.tokenizer, log)
            else:
                save_training_state(cfg, layout, engine, grid, run_dir, step, data.tokenizer,
                                    log)
        if stopping:
            history["stopped"] = stop_here(step, first, cfg.steps, grid.comm, metrics_log, log)
            return history
        if step % cfg.eval_interval == 0 or step == cfg.steps:
            val_loss = shared_validation_loss(gather_full_params(engine, xp), model_cfg,
                                              val_batches, xp, grid.dp_comm)
            history["val"][step] = val_loss
            metrics_log.write({"step": step, "val_loss": val_loss})
            log(f"step {step:5d}/{cfg.steps} | val loss {val_loss:.4f}")
        if dp > 1 and layout.mode == "ring" and (
                (cfg.check_interval and step % cfg.check_interval == 0) or step == cfg.steps):
            check_replicas_agree(engine.params, grid.dp_comm, step)
        if step == cfg.steps:
            break
        start = time.perf_counter()
        delay = layouts.straggler_delay(straggler, step, grid.comm.Get_rank() + layout.servers,
                                        layout.servers, layout.world, cfg.seed)
        if delay:
            time.sleep(delay)
        x, y = loader.batch(step, 0, 1) if dynamic else loader.batch(step, dp_rank, dp)
        lr = lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.steps)
        if cfg.compress == "topk" and engine.compressor is not None:
            engine.compressor.ratio = topk_ratio_at(step, cfg.compress_ratio,
                                                    cfg.compress_warmup)
        loss, norm = engine(xp.asarray(x), xp.asarray(y), lr)
        step_times.append(time.perf_counter() - start)
        if reducer:
            comm_waits.append(reducer.wait_seconds)
        if step == first:  # what this layout costs, now that a step has measured it
            log(metrics.footprint_line(engine, grid.comm))
        history["loss"].append(loss)
        if engine.skipped and engine.overflowed:  # fp16: a lower loss scale, then go on
            metrics_log.write({"step": step, "skipped": "float16 overflow",
                               "loss_scale": engine.mixed.scale})
            log(f"step {step:5d}/{cfg.steps} | skipped: float16 gradients overflowed; loss "
                f"scale lowered to {engine.mixed.scale:g}")
            continue
        if engine.skipped:  # decided on global values: every rank is here alike
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
            record, line = metrics.step_record(
                step, cfg.steps, eta, loss, lr, norm, step_times, comm_waits, tokens_per_step,
                flops_per_step, peak * grid.comm.Get_size(), engine.bytes_sent)
            if staleness_seen is not None:  # pushes by staleness 0..k since the last line
                counts = engine.staleness_counts()
                record["staleness"] = (counts - staleness_seen).tolist()
                staleness_seen = counts
            metrics_log.write(record)
            log(line)
    history["params"] = gather_full_params(engine, xp)
    if staleness_seen is not None:  # the pushes the last log line had not seen yet
        metrics_log.write({"step": cfg.steps,
                           "staleness": (engine.staleness_counts() - staleness_seen).tolist()})
    if dynamic:  # who computed how much
        with watchdog.waiting("the other workers' micro-batch counts"):
            shares = grid.comm.allgather(engine.micro_done)
        metrics_log.write({"step": cfg.steps, "micro_batches_per_worker": shares})
        log("dynamic balancing: micro-batches per worker " + ", ".join(
            f"{n} ({100 * n / max(1, sum(shares)):.0f}%)" for n in shares))
    return history
