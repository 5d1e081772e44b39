"""`python -m app finetune`: a pre-trained GPT fine-tuned as a sequence classifier, on one
rank or many.

The run starts from `--init` (a run directory of `app train` or one of its checkpoints,
app/pretrained.py): the trunk is copied by GPT-2 names, the head `cls.*` starts at zero
and learns `head_lr_scale` times faster. The data is a file of `prepare --task classify`
(app/classify_data.py); its labels set `n_classes`. Everything else is the trainer's: the
layout plan, the process grid, the one step engine (any dp x pp x tp, ZeRO-1; not ps mode),
the run directory, checkpoints and `--resume`, which continues a fine-tune run from its own
checkpoints (`--init` then plays no part), and the stop on SIGTERM/SIGUSR1 (app/preempt.py):
every rank saves at the same step boundary and the command exits 75 (requeue).

Every `eval_interval` steps and at the end the validation split is scored (loss, accuracy,
macro-F1, app/classify.py); the parameters of the best validation accuracy so far are
written to RUN/best.h5 (atomically; its attributes say the step and the scores). At the end
the test split is scored with best.h5's parameters, and RUN/params.h5 holds the last step's.
"""
import dataclasses
import json
import os
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from app import metrics, preempt
from app.checkpoint import load_checkpoint, load_params, save_params, save_training_state
from app.classify import BEST, shared_scores
from app.classify_data import ClassifyBatchLoader, ClassifyData, split_batches
from app.config import add_config_arguments, field_names, load_config
from app.errors import UserError
from app.failures import together
from app.memory import check_fits
from app.parallel import layout as layouts
from app.parallel.state import gather_full_params, placement
from app.pretrained import check_trunk, initial_params, read_pretrained
from app.trainer import (array_backend, check_resume_flags, claim_run, make_engine, out_dir,
                         place_on_node, stop_here, use_matmul_precision)
from comm import watchdog
from comm.backend import configure_mpi_buffers, to_host
from comm.grid import ProcessGrid
from models import gpt, sharding
from models.classifier import ClassTargets
from models.optim import lr_at


def add_arguments(parser):
    add_config_arguments(parser)
    parser.add_argument("--init", default=None, metavar="RUN_OR_CHECKPOINT",
                        help="the pre-trained model: a run directory of `app train` or one of "
                             "its checkpoints (RUN/checkpoints/step_N); needed unless --resume "
                             "names a checkpoint")
    parser.add_argument("--out", default=None,
                        help="run directory (default runs/<config name>-finetune, or "
                             "-finetune-N if that holds a run already)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --out (without it, that is refused)")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue a fine-tune run: auto = from the newest valid checkpoint "
                             "in --out (a fresh start from --init if there is none), or a "
                             "checkpoint directory")


def run(args):
    # As `app train`: SIGTERM/SIGUSR1 stop every rank at a step boundary with a checkpoint.
    with preempt.installed():
        return _run(args)


def _run(args):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    with together(comm):
        cfg = load_config(args.config, {name: getattr(args, name) for name in field_names()})
        check_resume_flags(args)
        if not args.init and args.resume in (None, "auto"):
            raise UserError("--init is missing: expected the pre-trained run directory or "
                            "checkpoint to fine-tune")
    default = os.path.join("runs", Path(args.config).stem + "-finetune")
    history = finetune(cfg, out_dir(args, default, comm, cfg.timeout), args.init, comm=comm,
                       overwrite=args.overwrite, resume=args.resume)
    return preempt.REQUEUE_EXIT_CODE if history.get("stopped") else 0


def classifier_config(cfg, data: ClassifyData):
    """`cfg` with `n_classes` from the data's labels, checked against the data."""
    if cfg.mode != "ring":
        raise UserError(f"config mode = {cfg.mode!r}: expected ring for `app finetune`")
    if cfg.n_classes not in (0, len(data.labels)):
        raise UserError(f"config n_classes = {cfg.n_classes} but data file {cfg.data} has "
                        f"{len(data.labels)} labels ({', '.join(map(str, data.labels))}): "
                        "expected them to match (or n_classes = 0: taken from the file)")
    if data.vocab_size != cfg.vocab_size:
        raise UserError(f"data file {cfg.data} has vocab_size {data.vocab_size} but the config "
                        f"says vocab_size = {cfg.vocab_size}: expected them to match")
    if data.max_len > cfg.block_size:
        raise UserError(f"data file {cfg.data} has rows of max_len {data.max_len} but the "
                        f"config says block_size = {cfg.block_size}: expected max_len <= "
                        "block_size (prepare the data with a smaller --max-len)")
    return dataclasses.replace(cfg, n_classes=len(data.labels))


def finetune(cfg, run_dir, init=None, log=print, comm=None, overwrite=False, resume=None):
    """Fine-tunes on the ranks of `comm` (default MPI.COMM_WORLD) from `init`, or with
    `resume` from a checkpoint; returns {'loss': [...], 'val': {step: scores}, 'test':
    scores, 'params': the last FlatParams} on every rank, or, where a stop signal ended it
    early (app/preempt.py), {'loss', 'val', 'stopped': the signal's name}."""
    if comm is None:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
    with ExitStack() as cleanup:
        watchdog.arm(cfg.timeout)
        cleanup.callback(watchdog.arm, None)
        local_rank, on_node = place_on_node(comm)
        with together(comm):
            xp = array_backend(cfg, local_rank)
            configure_mpi_buffers(cfg.cuda_aware_mpi, xp)
            use_matmul_precision(cfg.matmul, cleanup)
            data = ClassifyData(cfg.data)
            cfg = classifier_config(cfg, data)
            layout = layouts.plan(cfg, comm.Get_size())
            loader = ClassifyBatchLoader(data, "train", cfg.batch_size, cfg.seed)
            if not len(data.split("val").labels):
                raise UserError(f"the val split of {cfg.data} has no rows: expected some, to "
                                "choose the best checkpoint (prepare with --val-fraction > 0)")
            pretrained = read_pretrained(init) if init else None
            if pretrained:
                check_trunk(init, pretrained[0], cfg.model_config())
                if pretrained[2] != data.tokenizer:
                    raise UserError(f"--init {init} was trained with tokenizer "
                                    f"{pretrained[2]!r} but data file {cfg.data} uses "
                                    f"{data.tokenizer!r}: expected the same tokenizer")
        if comm.Get_rank() != 0:
            log = _silent
        with watchdog.waiting("the other ranks to build the process grid"):
            grid = ProcessGrid(layout.dp, layout.pp, layout.tp, comm)
        cleanup.callback(grid.free)
        with together(comm):
            check_fits(cfg, layout.dp, on_node)
        resume_from = claim_run(comm, cfg, run_dir, overwrite, resume, cleanup)
        with together(comm):
            if not (resume_from or pretrained):
                raise UserError(f"--out {run_dir} holds no checkpoint to resume: expected "
                                "--init, the pre-trained model to start from")
        log("config: " + ", ".join(f"{k}={v}" for k, v in vars(cfg).items()))
        engine = make_engine(cfg, layout, xp, grid, comm, None,
                             lr_scales={n: cfg.head_lr_scale for n in gpt.CLASSIFIER_PARAMS})
        cleanup.callback(engine.free)
        if resume_from:
            first = load_checkpoint(resume_from, engine.params, engine.optimizer,
                                    placement(engine))
            log(f"resumed from {resume_from} at step {first}")
        else:
            first, (params, copied) = 0, initial_params(cfg.model_config(), cfg.seed,
                                                        pretrained[1])
            sharding.set_rank_params(engine.params, params, cfg.model_config(),
                                     engine.tp_size, engine.tp_rank)
            new = [name for name in params.shapes if name not in copied]
            log(f"initialised from {init}: {len(copied)} tensors copied by name; new: "
                f"{', '.join(new) or 'none'}")
        log(f"layout: {layout.describe()}; data: {len(loader.rows.labels):,} train rows of "
            f"{data.max_len} tokens, labels {', '.join(map(str, data.labels))}")
        is_logger = comm.Get_rank() == 0
        log_path = os.path.join(run_dir, "metrics.jsonl") if is_logger else None
        with metrics.MetricsLog(log_path, append=bool(resume_from)) as metrics_log, \
                np.errstate(all="ignore"):
            loop = FinetuneLoop(cfg, layout, xp, grid, engine, data, run_dir, metrics_log, log,
                                resuming=bool(resume_from))
            history = loop.run(loader, first)
        if is_logger and not history.get("stopped"):
            loop.write_params("params.h5", to_host(history["params"].flat), cfg.steps, {})
            log(f"done: {cfg.steps} steps; run directory {run_dir} holds best.h5 (step "
                f"{loop.best_step}, val accuracy {loop.best_accuracy:.4f}) and params.h5")
    return history


class FinetuneLoop:
    """The steps of a fine-tune, its validation and the best parameters so far."""

    def __init__(self, cfg, layout, xp, grid, engine, data, run_dir, metrics_log, log,
                 resuming):
        self.cfg, self.layout, self.xp, self.grid, self.engine = cfg, layout, xp, grid, engine
        self.data, self.run_dir, self.metrics_log, self.log = data, run_dir, metrics_log, log
        self.model_cfg = cfg.model_config()
        self.val_batches = list(split_batches(data, "val", cfg.batch_size))
        self.best_accuracy, self.best_step, self.best_params = -1.0, None, None
        best_file = Path(run_dir) / BEST
        if resuming and best_file.is_file():  # an earlier job's: to beat, or to keep
            params, attrs = load_params(best_file)
            self.best_accuracy, self.best_step = float(attrs["val_accuracy"]), int(attrs["step"])
            self.best_params = gpt.FlatParams(gpt.param_shapes(self.model_cfg), np,
                                              params["wte"].dtype)
            for name, view in self.best_params.items():
                view[...] = params[name]

    def run(self, loader, first):
        cfg, engine, log = self.cfg, self.engine, self.log
        dp, dp_rank = self.grid.dp, self.grid.coords.dp
        history = {"loss": [], "val": {}}
        step_times, skips = [], 0
        for step in range(first, cfg.steps + 1):
            # SIGTERM/SIGUSR1 on any rank: every rank saves and stops at this step, as in train
            stopping = step < cfg.steps and preempt.stop_requested(self.grid.comm)
            if step > first and (stopping or cfg.save_interval and (
                    step % cfg.save_interval == 0 or step == cfg.steps)):
                save_training_state(cfg, self.layout, engine, self.grid, self.run_dir, step,
                                    self.data.tokenizer, log)
            if stopping:
                history["stopped"] = stop_here(step, first, cfg.steps, self.grid.comm,
                                               self.metrics_log, log)
                return history
            if step % cfg.eval_interval == 0 or step == cfg.steps:
                history["val"][step] = self.validate(step)
            if step == cfg.steps:
                break
            start = time.perf_counter()
            ids, lengths, labels = loader.batch(step, dp_rank, dp)
            lr = lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.steps)
            targets = ClassTargets(self.xp.asarray(lengths), self.xp.asarray(labels))
            loss, norm = engine(self.xp.asarray(ids), targets, lr)
            step_times.append(time.perf_counter() - start)
            history["loss"].append(loss)
            skips = skips + 1 if engine.skipped else 0
            if skips > cfg.max_skips:  # decided on global values: every rank is here alike
                raise UserError(f"loss or gradient norm not finite in {skips} steps in a row "
                                f"(last: loss {loss} at step {step}, lr {lr:.3g}): expected a "
                                f"lower lr (now {cfg.lr:g})", everywhere=True)
            if step % cfg.log_interval == 0 or step == cfg.steps - 1:
                ms = float(np.median(step_times)) * 1e3
                step_times.clear()
                self.metrics_log.write({"step": step, "loss": loss, "lr": lr,
                                        "grad_norm": norm, "ms_per_step": ms})
                log(f"step {step:5d}/{cfg.steps} | loss {loss:.4f} | lr {lr:.2e} | norm "
                    f"{norm:.3f} | {ms:7.1f} ms" + (" | skipped" if engine.skipped else ""))
        history["params"] = gather_full_params(engine, self.xp)
        history["test"] = self.test()
        return history

    def validate(self, step):
        """Scores the validation split; a better accuracy than any before is kept (best.h5)."""
        params = gather_full_params(self.engine, self.xp)
        found = shared_scores(params, self.model_cfg, self.val_batches, self.xp,
                              self.grid.dp_comm)
        record = {f"val_{key}": value for key, value in found.items() if key != "rows"}
        self.metrics_log.write({"step": step, **record})
        line = (f"step {step:5d}/{self.cfg.steps} | val loss {found['loss']:.4f} | accuracy "
                f"{found['accuracy']:.4f} | macro-F1 {found['macro_f1']:.4f}")
        if found["accuracy"] > self.best_accuracy:  # the same numbers on every rank
            self.best_accuracy, self.best_step = found["accuracy"], step
            self.best_params = gpt.FlatParams(params.shapes, np, params.flat.dtype,
                                              buffer=np.array(to_host(params.flat)))
            if self.grid.comm.Get_rank() == 0:
                self.write_params(BEST, to_host(params.flat), step, record)
            line += " | best so far: best.h5"
        self.log(line)
        return found

    def test(self):
        """The test split scored with the best parameters (None when it has no rows)."""
        batches = list(split_batches(self.data, "test", self.cfg.batch_size))
        if not batches:
            self.log("test: the test split has no rows")
            return None
        found = shared_scores(self.best_params, self.model_cfg, batches, np, self.grid.dp_comm)
        self.metrics_log.write({"step": self.cfg.steps, "best_step": self.best_step,
                                **{f"test_{k}": v for k, v in found.items() if k != "rows"}})
        self.log(f"test ({found['rows']:,} rows, best.h5 of step {self.best_step}): loss "
                 f"{found['loss']:.4f} | accuracy {found['accuracy']:.4f} | macro-F1 "
                 f"{found['macro_f1']:.4f}")
        return found

    def write_params(self, name, flat, step, scores):
        """RUN/name: the whole model under GPT-2 names, with what `app classify` needs."""
        params = gpt.FlatParams(gpt.param_shapes(self.model_cfg), np, flat.dtype, buffer=flat)
        attrs = {"step": step, "tokenizer": self.data.tokenizer, "config": self.cfg.to_toml(),
                 "labels": json.dumps(self.data.labels), "max_len": self.data.max_len,
                 **scores}
        path = os.path.join(self.run_dir, name)
        try:
            save_params(path, dict(params.items()), attrs)
        except OSError as err:
            raise UserError(f"cannot write {path} ({err.strerror or err}): expected a writable "
                            "run directory with free space") from None


def _silent(*args, **kwargs):
    pass
