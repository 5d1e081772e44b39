"""Does 16-bit training track float32? `python -m bench.precision` trains the same config
(same seed, same batches) once per dtype with `app train --device gpu` (or `--device cpu`,
where bf16 means float32 training with bf16 products, `--matmul bf16`), then prints both
loss curves side by side and the relative gap at the last step.

The gap is read on two numbers: the mean training loss over the last `--window` logged
steps (one step's loss is noisy), and the validation loss at the end, both of float32
master weights evaluated in float32.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path


def train(config, dtype, steps, out, log_interval, device="gpu"):
    # on the CPU, bf16 is float32 training with bf16 products (AMX): `--matmul bf16`
    precision = (["--dtype", "float32", "--matmul", "bf16"] if (device, dtype) == ("cpu", "bf16")
                 else ["--dtype", dtype])
    subprocess.run([sys.executable, "-m", "app", "train", "--config", config, "--device", device,
                    *precision, "--steps", str(steps), "--out", str(out), "--overwrite",
                    "--log-interval", str(log_interval), "--eval-interval", str(steps),
                    "--save-interval", str(steps)], check=True, stdout=subprocess.DEVNULL)
    losses, val, times = {}, None, []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
            if "ms_per_step" in record:
                times.append(record["ms_per_step"])
        if "val_loss" in record:
            val = record["val_loss"]
    return losses, val, times


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__)
    parser.add_argument("--config", default="small")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--dtypes", default="float32,bf16")
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--window", type=int, default=10, help="logged steps averaged")
    parser.add_argument("--out", default="runs/bench-precision")
    parser.add_argument("--device", default="gpu", choices=("gpu", "cpu"),
                        help="cpu: bf16 means float32 training with bf16 products (--matmul)")
    args = parser.parse_args(argv)
    dtypes = args.dtypes.split(",")
    runs = {d: train(args.config, d, args.steps, Path(args.out) / d, args.log_interval,
                     args.device) for d in dtypes}
    base = dtypes[0]
    steps = sorted(runs[base][0])
    shown = [s for s in steps if s in (0, steps[-1]) or s % (args.steps // 10 or 1) == 0]
    print(f"{args.config}, {args.steps} steps: training loss by step")
    print("step  " + "".join(f"{d:>10s}" for d in dtypes))
    for s in shown:
        print(f"{s:5d} " + "".join(f"{runs[d][0].get(s, float('nan')):10.4f}" for d in dtypes))
    last = steps[-args.window:]
    mean = {d: sum(runs[d][0][s] for s in last) / len(last) for d in dtypes}
    for d in dtypes[1:]:
        print(f"{d} vs {base}: mean training loss of steps {last[0]}-{last[-1]} "
              f"{mean[d]:.4f} vs {mean[base]:.4f} ({mean[d] / mean[base] - 1:+.2%}); "
              f"validation loss {runs[d][1]:.4f} vs {runs[base][1]:.4f} "
              f"({runs[d][1] / runs[base][1] - 1:+.2%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
