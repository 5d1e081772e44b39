"""`python -m app train`: the training loop.

One step: read the global batch of step s, forward, backward into the flat gradient buffer,
clip by global norm, AdamW on the flat parameter buffer. Rank 0 logs; a run directory holds
config.toml, metrics.jsonl and the final params.h5.
"""
import math
import os
import time
from pathlib import Path

import numpy as np

from app import metrics
from app.checkpoint import save_params
from app.config import add_config_arguments, field_names, load_config, TrainConfig
from app.data import BatchLoader, TokenData, validation_batches
from app.errors import UserError
from app.generate import sample
from app.tokenizer import get_tokenizer
from comm.backend import (BackendUnavailable, get_xp, keep_freed_host_memory, to_host,
                          world_size)
from models import gpt, layers
from models.optim import AdamW, clip_by_global_norm, decay_mask, lr_at


def add_arguments(parser):
    add_config_arguments(parser)
    parser.add_argument("--out", default=None,
                        help="run directory (default runs/<config name>)")
    parser.add_argument("--peak-gflops", type=float, default=None,
                        help="peak GFLOP/s for MFU (default: measured by a short GEMM probe)")


def run(args):
    overrides = {name: getattr(args, name) for name in field_names()}
    cfg = load_config(args.config, overrides)
    if args.peak_gflops is not None and not args.peak_gflops > 0:
        raise UserError(f"--peak-gflops {args.peak_gflops}: expected a number > 0")
    out = args.out or os.path.join("runs", Path(args.config).stem)
    train(cfg, out, peak_gflops=args.peak_gflops)
    return 0


def evaluate(params, model_cfg, batches, xp):
    """Mean loss over the fixed validation windows (each batch weighted by its size)."""
    total, count = 0.0, 0
    for x, y in batches:
        loss, _ = gpt.forward(params, model_cfg, xp.asarray(x), xp.asarray(y))
        total += float(loss) * len(x)
        count += len(x)
    return total / count


def train(cfg: TrainConfig, run_dir, peak_gflops=None, log=print, sample_prompt="\n"):
    """Trains from scratch; returns {'loss': [...], 'val': {step: loss}, 'params': FlatParams}."""
    try:
        xp = get_xp(cfg.device)
    except BackendUnavailable as err:
        raise UserError(str(err)) from None
    ranks = world_size()
    if ranks != 1:
        raise UserError(f"launched on {ranks} MPI ranks: expected 1 (this trainer has no "
                        "data, pipeline or tensor parallelism yet)")
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise UserError(f"--out {run_dir}: is a file, expected a run directory")
    keep_freed_host_memory()
    log("config: " + ", ".join(f"{k}={v}" for k, v in vars(cfg).items()))
    with TokenData(cfg.data) as data:
        if data.vocab_size != cfg.vocab_size:
            raise UserError(f"data file {cfg.data} has vocab_size {data.vocab_size} but the "
                            f"config says vocab_size = {cfg.vocab_size}: expected them to match")
        loader = BatchLoader(data, "train", cfg.block_size, cfg.batch_size, cfg.seed)
        val_batches = list(validation_batches(data, cfg.block_size, cfg.batch_size,
                                              cfg.eval_windows))
        os.makedirs(run_dir, exist_ok=True)
        metrics.write_text_atomic(os.path.join(run_dir, "config.toml"), cfg.to_toml())
        with metrics.MetricsLog(os.path.join(run_dir, "metrics.jsonl")) as metrics_log:
            history = _train_loop(cfg, xp, data, loader, val_batches, metrics_log, peak_gflops,
                                  log)
        params = history["params"]
        host_params = {name: to_host(value) for name, value in params.items()}
        save_params(os.path.join(run_dir, "params.h5"), host_params,
                    {"step": cfg.steps, "tokenizer": data.tokenizer, "config": cfg.to_toml()})
        if cfg.sample_tokens:
            tokenizer = get_tokenizer(data.tokenizer)
            out = sample(params, cfg.model_config(), tokenizer.encode(sample_prompt),
                         cfg.sample_tokens, temperature=0.8, top_k=0, seed=cfg.seed)
            log("sample:\n" + sample_prompt + tokenizer.decode(out))
    return history


def _train_loop(cfg, xp, data, loader, val_batches, metrics_log, peak_gflops, log):
    dtype = np.dtype(cfg.dtype)
    model_cfg = cfg.model_config()
    params = gpt.init_params(model_cfg, cfg.seed, xp, dtype)
    grads = params.like()
    optimizer = AdamW(params.flat, decay_mask(params, gpt.is_decayed, xp), cfg.beta1, cfg.beta2,
                      weight_decay=cfg.weight_decay)
    mask = layers.causal_mask(xp, cfg.block_size, dtype)
    tokens_per_step = cfg.batch_size * cfg.block_size
    flops_per_step = metrics.flops_per_token(params.size, cfg.n_layer, cfg.block_size,
                                             cfg.n_embd) * tokens_per_step
    peak = peak_gflops or metrics.measure_gemm_gflops(xp)
    log(f"model: {params.size:,} parameters, {flops_per_step / tokens_per_step / 1e6:.2f} "
        f"MFLOP/token; data: {data.train.shape[0]:,} train / {data.val.shape[0]:,} val tokens;"
        f" peak {peak:.1f} GFLOP/s ({'given' if peak_gflops else 'measured'})")

    history = {"loss": [], "val": {}, "params": params}
    step_times = []
    for step in range(cfg.steps + 1):
        if step % cfg.eval_interval == 0 or step == cfg.steps:
            val_loss = evaluate(params, model_cfg, val_batches, xp)
            history["val"][step] = val_loss
            metrics_log.write({"step": step, "val_loss": val_loss})
            log(f"step {step:5d} | val loss {val_loss:.4f}")
        if step == cfg.steps:
            break
        start = time.perf_counter()
        x, y = loader.batch(step)
        loss, cache = gpt.forward(params, model_cfg, xp.asarray(x), xp.asarray(y), mask)
        gpt.backward(cache, grads)
        del cache
        norm = clip_by_global_norm(grads.flat, cfg.grad_clip)
        lr = lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.steps)
        optimizer.step(grads.flat, lr)
        loss = float(loss)  # also waits for the GPU, so the timing below is honest
        step_times.append(time.perf_counter() - start)
        history["loss"].append(loss)
        if not math.isfinite(loss):
            raise RuntimeError(f"loss became {loss} at step {step}: try a lower lr")
        if step % cfg.log_interval == 0 or step == cfg.steps - 1:
            # median over the steps since the last log line: robust to one slow step
            dt = float(np.median(step_times))
            step_times.clear()
            tok_s = tokens_per_step / dt
            mfu = flops_per_step / dt / (peak * 1e9)
            metrics_log.write({"step": step, "loss": loss, "lr": lr, "grad_norm": norm,
                               "ms_per_step": dt * 1e3, "tokens_per_s": tok_s, "mfu": mfu})
            log(f"step {step:5d} | loss {loss:.4f} | lr {lr:.2e} | norm {norm:.3f} | "
                f"{dt * 1e3:7.1f} ms | {tok_s:8.0f} tok/s | MFU {100 * mfu:5.1f}%")
    return history
