"""`make bench-gpu`: GPT-2 124M on one GPU, our CuPy step against PyTorch eager, in one run.

Rows: float32 and bf16 (ours: float32 masters, bf16 weights, activations and GEMMs, the
step engine the trainer runs; torch: `torch.autocast(bfloat16)` over float32 weights, its
standard mixed precision), and torch.compile with `--compile`. Both sides start from the
same weights and see the same batches; float32 GEMMs stay float32 on both (no TF32).
Columns: step time, tokens/s, model FLOP/s (6N + 6LTC per token, as llm.c counts) and MFU
against the GPU's dense peak for the precision, and ours over torch's tokens/s.

A second table times causal attention alone (forward + backward, one layer's shape): ours
(16-bit: the flash kernels of `models/flash_attention.py`; every precision: cuBLAS batched
GEMMs around one fused masked-softmax kernel) against torch's
`scaled_dot_product_attention` (a fused flash kernel).
"""
import argparse
import sys
import time

import numpy as np

# Dense peaks (TFLOP/s) by the vendor's datasheets: SXM parts; fp32 is the non-tensor rate.
PEAKS = {"H100": {"float32": 67.0, "bf16": 989.0}, "H200": {"float32": 67.0, "bf16": 989.0},
         "A100": {"float32": 19.5, "bf16": 312.0}}
GPT2 = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304)  # vocab padded as llm.c


def peak_for(device_name, precision):
    for key, peaks in PEAKS.items():
        if key in device_name:
            return peaks[precision]
    return float("nan")


def time_steps(step, sync, warmup, steps):
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    return (time.perf_counter() - start) / steps, float(loss)


def ours(precision, batches, warmup, steps, block_size):
    import cupy

    from app.config import TrainConfig
    from app.parallel.engine import StepEngine
    from app.parallel.precision import compute_dtype_of
    from models import gpt
    cfg = gpt.GPTConfig(block_size=block_size, **GPT2)
    params = gpt.init_params(cfg, 0, cupy, np.float32)
    engine = StepEngine(cfg, TrainConfig(grad_clip=1.0), params=params,
                        compute_dtype=compute_dtype_of(precision))
    data = [(cupy.asarray(x), cupy.asarray(y)) for x, y in batches]
    counter = iter(range(10 ** 9))

    def step():
        x, y = data[next(counter) % len(data)]
        return engine(x, y, 6e-4)[0]

    seconds, loss = time_steps(step, cupy.cuda.Device().synchronize, warmup, steps)
    return seconds, loss, {name: cupy.asnumpy(v) for name, v in params.items()}


def torch_eager(precision, batches, warmup, steps, block_size, host_params, compile_=False):
    import torch

    from bench import torch_gpt
    from models import gpt
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = gpt.GPTConfig(block_size=block_size, **GPT2)
    model = torch_gpt.TorchGPT(cfg, host_params).cuda()
    optimizer = torch_gpt.make_optimizer(model, gpt.is_decayed, 6e-4, (0.9, 0.95), 0.1)
    forward = torch.compile(model) if compile_ else model
    data = [(torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()) for x, y in batches]
    counter = iter(range(10 ** 9))

    def step():
        x, y = data[next(counter) % len(data)]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = forward(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.detach()

    return time_steps(step, torch.cuda.synchronize, warmup, steps)


def attention_rows(batch, block_size, repeats=20):
    """-> [(implementation, precision, ms)] for one layer's causal attention, fwd + bwd."""
    import cupy
    import torch
    import torch.nn.functional as F

    from models import flash_attention, gpu_kernels
    H, C = GPT2["n_head"], GPT2["n_embd"]
    rows = []
    for precision in ("float32", "bf16"):
        dtype = np.float32 if precision == "float32" else gpu_kernels.BFLOAT16
        qkv = cupy.random.standard_normal((batch, block_size, 3 * C)).astype(dtype)
        dy = cupy.random.standard_normal((batch, block_size, C)).astype(dtype)

        def run_ours():
            y, cache = gpu_kernels.attention_forward(qkv, H)
            return gpu_kernels.attention_backward(cache, dy)

        flash = flash_attention.ENABLED
        for label, use_flash in (("ours: flash kernels, tensor cores", True),
                                 ("ours: cuBLAS GEMMs + fused masked softmax", False)):
            flash_attention.ENABLED = use_flash
            if use_flash and not flash_attention.applies(qkv, H):
                continue  # float32: the flash kernels take 16-bit inputs only
            seconds, _ = time_steps(lambda: run_ours()[0, 0, 0].astype(np.float32),
                                    cupy.cuda.Device().synchronize, 3, repeats)
            rows.append((label, precision, seconds * 1e3))
        flash_attention.ENABLED = flash
        tdtype = torch.float32 if precision == "float32" else torch.bfloat16
        q, k, v = (torch.randn(batch, H, block_size, C // H, device="cuda", dtype=tdtype,
                               requires_grad=True) for _ in range(3))
        tdy = torch.randn(batch, H, block_size, C // H, device="cuda", dtype=tdtype)

        def run_torch():
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y.backward(tdy)
            return y.detach()[0, 0, 0, 0]

        seconds, _ = time_steps(run_torch, torch.cuda.synchronize, 3, repeats)
        rows.append(("torch scaled_dot_product_attention", precision, seconds * 1e3))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--block-size", type=int, default=1024, help="context length")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows")
    parser.add_argument("--precisions", default="float32,bf16")
    args = parser.parse_args(argv)
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
        import torch  # noqa: F401
    except Exception as err:  # no CuPy, no device, or no torch: nothing to compare
        print(f"error: make bench-gpu needs CuPy, a CUDA device and PyTorch ({err})",
              file=sys.stderr)
        return 2
    from app.metrics import flops_per_token
    from models import gpt
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    B, T = args.batch, args.block_size
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(4):
        tokens = rng.integers(0, 50257, (B, T + 1))
        batches.append((tokens[:, :-1], tokens[:, 1:]))
    n_params = gpt.num_params(gpt.GPTConfig(block_size=T, **GPT2))
    flops = flops_per_token(n_params, GPT2["n_layer"], T, GPT2["n_embd"]) * B * T
    print(f"GPT-2 124M ({n_params / 1e6:.1f}M parameters, vocabulary {GPT2['vocab_size']}), "
          f"batch {B} x {T} tokens, on {name}; {args.steps} timed steps per row")
    print(f"{'row':34s} {'ms/step':>8s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s} "
          f"{'vs torch':>8s} {'loss':>10s}")
    for precision in args.precisions.split(","):
        peak = peak_for(name, precision)
        t_ours, loss_ours, host = ours(precision, batches, args.warmup, args.steps, T)
        cupy.get_default_memory_pool().free_all_blocks()  # the engine is gone: room for torch
        rows = [(f"ours {precision}", t_ours, loss_ours)]
        rows.append((f"torch eager {precision}",
                     *torch_eager(precision, batches, args.warmup, args.steps, T, host)))
        if args.compile:
            try:
                rows.append((f"torch.compile {precision}",
                             *torch_eager(precision, batches, args.warmup, args.steps, T, host,
                                          compile_=True)))
            except Exception as err:  # report, and go on with the rest of the table
                print(f"torch.compile {precision}: failed ({type(err).__name__}: {err})")
        eager = rows[1][1]
        for label, seconds, loss in rows:
            tflops = flops / seconds / 1e12
            print(f"{label:34s} {seconds * 1e3:8.1f} {B * T / seconds:10.0f} {tflops:8.1f} "
                  f"{tflops / peak:6.1%} {eager / seconds:7.2f}x {loss:10.4f}")
    print(f"\ncausal attention alone, forward + backward, batch {B}, {GPT2['n_head']} heads, "
          f"T = {T}:")
    for impl, precision, ms in attention_rows(B, T):
        print(f"  {impl:44s} {precision:8s} {ms:7.2f} ms")
    print(f"peak: dense {', '.join(f'{p} {peak_for(name, p):g}' for p in ('float32', 'bf16'))} "
          "TFLOP/s (datasheet); loss: the last timed step's (same batches on both sides)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
