"""`make bench` / `python -m bench.model`: training-step speed of our GPT, against an
equivalent PyTorch eager GPT when torch is importable.

Each (config, threads) cell runs in its own process, because BLAS fixes its thread count
when it loads. Inside a cell both models train on the same random token batches from the
same initial parameters, timed in alternating rounds so that drift of the machine hits both
alike; the table reports medians and the ours/torch ratio measured in that one process.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

SHAPES = {  # config name -> batch size used by the benchmark (the shapes)
    "baby": 12,
    "small": 8,
}


def time_cell(config_name, steps, rounds, use_torch, device="cpu"):
    """Runs in the worker process: returns a dict of measurements for one table row."""
    from app import metrics
    from app.config import load_config
    from app.parallel.engine import TrainStep
    from comm.backend import get_xp, keep_freed_host_memory, to_host
    from models import gpt

    keep_freed_host_memory()
    cfg = load_config(config_name, {"batch_size": SHAPES.get(config_name)})
    xp = get_xp(device)
    mcfg = cfg.model_config()
    B, T = cfg.batch_size, cfg.block_size
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, cfg.vocab_size, (2, B, T)) for _ in range(4)]
    params = gpt.init_params(mcfg, cfg.seed, xp, np.float32)
    host_init = {name: np.array(to_host(v)) for name, v in params.items()}
    train_step = TrainStep(mcfg, params, cfg)  # the trainer's own step
    sync = metrics.synchronizer(xp)

    def ours(i):
        loss, _ = train_step(xp.asarray(batches[i][0]), xp.asarray(batches[i][1]), cfg.lr)
        return loss

    runners = {"ours": ours}
    first_loss = {"ours": ours(0)}
    if use_torch:
        import torch

        from bench import torch_gpt  # a module: its train_step must not shadow ours
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        torch.manual_seed(0)
        model = torch_gpt.TorchGPT(mcfg, host_init)
        topt = torch_gpt.make_optimizer(model, gpt.is_decayed, cfg.lr, (cfg.beta1, cfg.beta2),
                              cfg.weight_decay)
        tb = [(torch.from_numpy(b[0]), torch.from_numpy(b[1])) for b in batches]
        runners["torch"] = lambda i: torch_gpt.train_step(model, topt, *tb[i], cfg.grad_clip)
        first_loss["torch"] = runners["torch"](0)

    times = {name: [] for name in runners}
    for r in range(rounds):  # alternate so both see the same machine state
        for name, fn in runners.items():
            for s in range(steps):
                start = time.perf_counter()
                fn(s % len(batches))
                sync()
                times[name].append(time.perf_counter() - start)

    peak = metrics.measure_gemm_gflops(xp, seconds=0.5)
    flops = metrics.flops_per_token(params.size, cfg.n_layer, T, cfg.n_embd) * B * T
    row = {"config": config_name, "threads": int(os.environ.get("OPENBLAS_NUM_THREADS", 0)),
           "tokens_per_step": B * T, "peak_gflops": peak, "params": params.size,
           "first_loss": first_loss}
    for name, ts in times.items():
        ms = float(np.median(ts)) * 1e3
        row[name] = {"ms": ms, "tokens_per_s": B * T / ms * 1e3,
                     "mfu": flops / (ms / 1e3) / (peak * 1e9)}
    return row


def torch_available():
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def run_cell(config_name, threads, steps, rounds, use_torch, device):
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "bench.model", "--worker", "--configs", config_name,
           "--steps", str(steps), "--rounds", str(rounds), "--device", device]
    if not use_torch:
        cmd.append("--no-torch")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if out.returncode != 0:
        raise RuntimeError(f"benchmark cell {config_name}/{threads} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(rows, out=sys.stdout):
    has_torch = any("torch" in r for r in rows)
    head = (f"{'config':<7}{'thr':>4}{'peak GF/s':>10} | {'ours ms':>8}{'tok/s':>9}{'MFU':>7}")
    if has_torch:
        head += f" | {'torch ms':>8}{'tok/s':>9}{'MFU':>7} | {'ours/torch':>10}"
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        o = r["ours"]
        line = (f"{r['config']:<7}{r['threads']:>4}{r['peak_gflops']:>10.1f} | "
                f"{o['ms']:>8.1f}{o['tokens_per_s']:>9.0f}{100 * o['mfu']:>6.1f}%")
        if "torch" in r:
            t = r["torch"]
            line += (f" | {t['ms']:>8.1f}{t['tokens_per_s']:>9.0f}{100 * t['mfu']:>6.1f}%"
                     f" | {o['tokens_per_s'] / t['tokens_per_s']:>9.2f}x")
        print(line, file=out)
    if has_torch:
        diffs = [abs(r["first_loss"]["ours"] - r["first_loss"]["torch"]) for r in rows]
        print(f"(same init and batch: first-step loss differs by at most {max(diffs):.1e})",
              file=out)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__)
    add_arguments(parser)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return run(args)


def add_arguments(parser):
    parser.add_argument("--configs", nargs="+", default=["baby", "small"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per model")
    parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")


def run(args):
    use_torch = not args.no_torch and torch_available() and args.device == "cpu"
    if getattr(args, "worker", False):
        print(json.dumps(time_cell(args.configs[0], args.steps, args.rounds, use_torch,
                                   args.device)))
        return 0
    if not use_torch and not args.no_torch:
        print("(torch not importable: ours only; `pip install torch==2.13.0` adds the reference)")
    rows = []
    for name in args.configs:
        for threads in args.threads:
            rows.append(run_cell(name, threads, args.steps, args.rounds, use_torch, args.device))
            print(f"  measured {name} at {threads} thread(s)", file=sys.stderr)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
