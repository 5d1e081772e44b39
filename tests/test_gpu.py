"""The CuPy path: the same model code on a GPU gives the numbers NumPy gives.

Skipped, with the reason, where there is no cupy or no CUDA device.
"""
import numpy as np
import pytest

from comm.backend import gpu_available, to_host
from models import gpt
from models.optim import AdamW, decay_mask
from tests.gradcheck import max_relative_error, numerical_grad, sample_indices

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not gpu_available(), reason="no cupy or no CUDA device here")]

CFG = gpt.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32)


def setup_model(xp, dtype=np.float64):
    rng = np.random.default_rng(1)
    params = gpt.init_params(CFG, seed=0, xp=xp, dtype=dtype)
    params.flat += xp.asarray(rng.normal(0.0, 0.2, params.size), dtype=dtype)
    idx = rng.integers(0, CFG.vocab_size, (3, CFG.block_size))
    tgt = rng.integers(0, CFG.vocab_size, (3, CFG.block_size))
    return params, xp.asarray(idx), xp.asarray(tgt)


def test_gpu_gradients_match_finite_differences():
    import cupy
    params, idx, tgt = setup_model(cupy)
    _, cache = gpt.forward(params, CFG, idx, tgt)
    grads = gpt.backward(cache, params.like())
    rng = np.random.default_rng(2)
    for name in params:
        host = to_host(params[name]).copy()
        sample = sample_indices(host.shape, 6, rng)

        def loss():
            params[name][...] = cupy.asarray(host)
            return float(gpt.forward(params, CFG, idx, tgt)[0])

        numeric = numerical_grad(loss, host, sample, eps=1e-3)
        params[name][...] = cupy.asarray(host)
        error = max_relative_error(to_host(grads[name]).reshape(-1)[sample], numeric)
        assert error < 1e-6, f"{name}: {error:.2e}"


def test_gpu_training_step_matches_cpu():
    import cupy
    results = []
    for xp in (np, cupy):
        params, idx, tgt = setup_model(xp)
        grads = params.like()
        opt = AdamW(params.flat, decay_mask(params, gpt.is_decayed, xp))
        losses = []
        for _ in range(3):
            loss, cache = gpt.forward(params, CFG, idx, tgt)
            gpt.backward(cache, grads)
            opt.step(grads.flat, 1e-2)
            losses.append(float(loss))
        results.append((losses, to_host(params.flat)))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-10)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------- fused kernels vs NumPy
# Each fused GPU layer against the NumPy reference on the same inputs: float64 to rtol
# 1e-10, float32 to rtol 1e-4 (elementwise, with an absolute floor of rtol x the largest
# magnitude, for elements that cancel to near zero); bfloat16 against float32 to 3e-2.

TOLERANCE = {np.float64: 1e-10, np.float32: 1e-4}


def close(gpu, ref, rtol):
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(to_host(gpu), dtype=np.float64)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * float(np.abs(ref).max()))


def pair(shape, rng, dtype, scale=1.0):
    import cupy
    host = (rng.normal(0.0, scale, shape)).astype(dtype)
    return host, cupy.asarray(host)


def layer_runs(dtype):
    """(name, fn) where fn(xp, arrays...) runs a layer forward and backward and returns its
    outputs: the same function on NumPy and CuPy inputs."""
    from models import layers

    def layernorm(w, b, x, dy):
        y, cache = layers.layernorm_forward(w, b, x)
        dx, g = layers.layernorm_backward(cache, dy)
        return [y, dx, g["weight"], g["bias"]]

    def gelu(x, dy):
        y, cache = layers.gelu_forward(x)
        return [y, layers.gelu_backward(cache, dy)[0]]

    def attention(qkv, dy):
        y, cache = layers.attention_forward(qkv, 4)
        return [y, layers.attention_backward(cache, dy)[0]]

    def lm_loss(wte, h, targets):
        loss, cache = layers.lm_loss_forward(wte, h, targets)
        dh, g = layers.lm_loss_backward(cache, 0.5)
        return [loss, dh, g["wte"]]

    return {"layernorm": (layernorm, [(80,), (80,), (3, 7, 80), (3, 7, 80)]),
            "gelu": (gelu, [(5, 300), (5, 300)]),
            "attention": (attention, [(2, 70, 3 * 48), (2, 70, 48)]),
            "lm_loss": (lm_loss, [(300, 24), (40, 24), "targets"])}


def layer_inputs(layer, dtype, seed, monkeypatch, device_dtype=None):
    """-> (the layer's run function, its NumPy inputs, the same on the GPU in
    `device_dtype`); "attention-blocks" is attention with 70 queries in blocks of 32, 32, 6."""
    import cupy

    from models import gpu_kernels
    if layer == "attention-blocks":
        monkeypatch.setattr(gpu_kernels, "ATTENTION_QUERY_BLOCK", 32)
        layer = "attention"
    fn, shapes = layer_runs(dtype)[layer]
    rng = np.random.default_rng(seed)
    host, dev = [], []
    for shape in shapes:
        if shape == "targets":
            h = rng.integers(0, 300, 40)
        else:  # rounded to the device dtype first: both sides see the same numbers
            h = pair(shape, rng, dtype)[0].astype(device_dtype or dtype).astype(dtype)
        host.append(h)
        dev.append(cupy.asarray(h) if shape == "targets" or device_dtype is None
                   else cupy.asarray(h).astype(device_dtype))
    return fn, host, dev


LAYERS = ["layernorm", "gelu", "attention", "attention-blocks", "lm_loss"]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("layer", LAYERS)
def test_fused_gpu_layer_equals_numpy(layer, dtype, monkeypatch):
    from models import gpu_kernels
    fn, host, dev = layer_inputs(layer, dtype, 4, monkeypatch)
    assert gpu_kernels.enabled_for(dev[0])  # the fused path, not CuPy's array forms
    for got, ref in zip(fn(*dev), fn(*host)):
        close(got, ref, TOLERANCE[dtype])


@pytest.mark.parametrize("layer", LAYERS)
def test_bfloat16_layers_track_float32(layer, monkeypatch):
    from models import gpu_kernels
    if gpu_kernels.BFLOAT16 is None:
        pytest.skip("no ml_dtypes: CuPy has no bfloat16")
    fn, host, dev = layer_inputs(layer, np.float32, 5, monkeypatch, gpu_kernels.BFLOAT16)
    for got, ref in zip(fn(*dev), fn(*host)):
        assert got.dtype in (gpu_kernels.BFLOAT16, np.float32)
        close(got.astype(np.float32), ref, 3e-2)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_fused_adam_equals_numpy(dtype):
    import cupy
    rng = np.random.default_rng(6)
    host = [rng.normal(0, 1, 1000).astype(dtype) for _ in range(2)] + \
        [np.abs(rng.normal(0, 1, 1000)).astype(dtype) * s for s in (0.1, 0.01)]
    results = []
    for xp in (np, cupy):
        p, g = xp.array(host[0]), xp.array(host[1])  # copies: the step updates p in place
        opt = AdamW(p, xp.ones(1000, dtype))
        opt.m[...], opt.v[...] = xp.asarray(host[2]), xp.asarray(host[3])
        for _ in range(3):
            opt.step(g, 1e-2)
        results.append((p, opt.m, opt.v))
    for got, ref in zip(results[1], results[0]):
        close(got, ref, TOLERANCE[dtype])


# ----------------------------------------------------------------- whole steps


# the whole-step tests' model: 4 heads of 16, so that the 16-bit head kernels apply
STEP_CFG = gpt.GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=96)


def engine_losses(xp, steps, dtype="float64", batch=4):
    """`steps` steps of the step engine on fixed batches -> (losses, final parameters)."""
    from app.config import TrainConfig
    from app.parallel.engine import StepEngine
    from app.parallel.precision import compute_dtype_of, master_dtype_of
    cfg = STEP_CFG
    params = gpt.init_params(cfg, 7, xp, master_dtype_of(dtype))
    engine = StepEngine(cfg, TrainConfig(micro_batches=2), params=params,
                        compute_dtype=compute_dtype_of(dtype))
    rng = np.random.default_rng(8)
    losses = []
    for _ in range(steps):
        tokens = rng.integers(0, cfg.vocab_size, (batch, cfg.block_size + 1))
        losses.append(engine(xp.asarray(tokens[:, :-1]), xp.asarray(tokens[:, 1:]), 3e-3)[0])
    return losses, to_host(params.flat), engine


def test_float64_five_gpu_steps_equal_the_cpu_run():
    import cupy
    cpu_losses, cpu_params, _ = engine_losses(np, 5)
    gpu_losses, gpu_params, _ = engine_losses(cupy, 5)
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=1e-8)
    np.testing.assert_allclose(gpu_params, cpu_params, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_16_bit_steps_track_float32(dtype):
    import cupy
    ref, _, _ = engine_losses(cupy, 5, "float32")
    losses, _, engine = engine_losses(cupy, 5, dtype)
    assert engine.mixed is not None and not engine.skipped
    np.testing.assert_allclose(losses, ref, rtol=2e-2)


def test_a_step_copies_to_the_host_only_its_loss_and_norm():
    """Device-to-host copies in one training step, as CUPTI (through torch's profiler) sees
    them: the loss and the gradient norm, the two numbers every rank must agree on."""
    import cupy
    torch = pytest.importorskip("torch", reason="the copy count reads CUPTI through torch")
    from torch.profiler import ProfilerActivity, profile

    from app.config import TrainConfig
    from app.parallel.engine import StepEngine
    cfg = STEP_CFG
    engine = StepEngine(cfg, TrainConfig(), params=gpt.init_params(cfg, 7, cupy, np.float32))
    x = cupy.asarray(np.random.default_rng(9).integers(0, cfg.vocab_size,
                                                        (4, cfg.block_size + 1)))
    engine(x[:, :-1], x[:, 1:], 1e-3)  # compiles kernels, fills pools
    cupy.cuda.Device().synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine(x[:, :-1], x[:, 1:], 1e-3)
        cupy.cuda.Device().synchronize()
    names = [e.name for e in prof.events()]
    if not any("gemm" in n.lower() or "Kernel" in n or "kernel" in n for n in names):
        pytest.skip(f"the profiler saw none of CuPy's kernels ({len(names)} events)")
    copies = [n for n in names if "DtoH" in n or "Device -> Pageable" in n]
    assert 1 <= len(copies) <= 2, copies
    del torch


@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bf16"])
def test_16_bit_batched_matmul_equals_float32(dtype, transpose_a, transpose_b):
    """The direct cuBLAS call (16-bit attention GEMMs) against CuPy's float32 matmul."""
    import cupy

    from app.parallel.precision import compute_dtype_of
    from models import gpu_kernels
    low = compute_dtype_of(dtype) if dtype == "bf16" else np.float16
    rng = np.random.default_rng(10)
    a = cupy.asarray(rng.normal(0, 1, (3, 40, 24) if transpose_a else (3, 24, 40)))
    b = cupy.asarray(rng.normal(0, 1, (3, 56, 40) if transpose_b else (3, 40, 56)))
    a, b = a.astype(low), b.astype(low)
    got = gpu_kernels.batched_matmul(a, b, transpose_a, transpose_b)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    ref = cupy.matmul(a32.transpose(0, 2, 1) if transpose_a else a32,
                      b32.transpose(0, 2, 1) if transpose_b else b32)
    assert got.shape == ref.shape == (3, 24, 56) and got.dtype == low
    close(got.astype(np.float32), to_host(ref), 1e-2)


@pytest.mark.parametrize("shape_b", [(6, 40), (40,)], ids=["residual", "bias"])
def test_16_bit_add_into_equals_float32(shape_b):
    import cupy

    from models import gpu_kernels, layers
    if gpu_kernels.BFLOAT16 is None:
        pytest.skip("no ml_dtypes: CuPy has no bfloat16")
    rng = np.random.default_rng(11)
    a, b = rng.normal(0, 1, (6, 40)), rng.normal(0, 1, shape_b)
    a16, b16 = (cupy.asarray(x).astype(gpu_kernels.BFLOAT16) for x in (a, b))
    ref = a16.astype(np.float32) + b16.astype(np.float32)
    assert gpu_kernels.add_into(a16, b16)  # the vector kernel, not CuPy's add
    close(a16.astype(np.float32), to_host(ref), 1e-2)
    odd = cupy.ones(7, gpu_kernels.BFLOAT16)
    assert not gpu_kernels.add_into(odd, odd)  # 7 is no multiple of 4: CuPy adds instead
    layers.add_into(odd, odd)
    assert float(odd[0]) == 2.0
