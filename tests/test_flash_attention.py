"""`models/flash_attention.py`: the tensor-core kernels give the NumPy reference's attention
and gradients, in bfloat16 and float16, at every head size they take, at lengths that end
inside a block, and with one token.

The GPU tests skip, with the reason, where there is no cupy or no CUDA device.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from comm.backend import gpu_available, to_host

needs_gpu = [pytest.mark.gpu,
             pytest.mark.skipif(not gpu_available(), reason="no cupy or no CUDA device here")]


def on_gpu(test):
    for mark in needs_gpu:
        test = mark(test)
    return test


# (B, T, heads, head size): 150 and 97 tokens end inside a 64-row block
SHAPES = [(2, 150, 2, 64), (1, 64, 2, 32), (3, 97, 4, 16), (1, 1, 1, 64), (1, 300, 3, 64)]


def sixteen_bit(name):
    if name == "float16":
        return np.dtype(np.float16)
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="CuPy has no bfloat16 without it")
    return np.dtype(ml_dtypes.bfloat16)


def close(gpu, ref, rtol, scale):
    """Elementwise within rtol, with an absolute floor of rtol x `scale` (the largest
    magnitude of the output it is part of: with one token dQ is exactly zero)."""
    got = np.asarray(to_host(gpu), dtype=np.float64)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * scale)


@on_gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("warp_rows", [16, 32], ids=lambda r: f"rows{r}")
def test_flash_attention_equals_numpy(warp_rows, dtype, shape, monkeypatch):
    import cupy

    from models import flash_attention, layers
    monkeypatch.setattr(flash_attention, "WARP_ROWS",
                        dict.fromkeys(flash_attention.WARP_ROWS, warp_rows))
    low = sixteen_bit(dtype)
    B, T, H, D = shape
    rng = np.random.default_rng(12)
    # rounded to 16 bits first: both sides start from the same numbers
    qkv = rng.normal(0, 1, (B, T, 3 * H * D)).astype(low).astype(np.float64)
    dy = rng.normal(0, 1, (B, T, H * D)).astype(low).astype(np.float64)
    y_ref, cache = layers.attention_forward(qkv, H)
    dqkv_ref = layers.attention_backward(cache, dy)[0]

    qkv_dev, dy_dev = cupy.asarray(qkv).astype(low), cupy.asarray(dy).astype(low)
    assert flash_attention.applies(qkv_dev, H)
    y, cache = layers.attention_forward(qkv_dev, H)
    assert cache[1][0] == "flash"  # not the blocked cuBLAS path
    dqkv = layers.attention_backward(cache, dy_dev)[0]
    assert y.dtype == dqkv.dtype == low and dqkv.shape == qkv.shape
    rtol = 3e-2 if dtype == "bfloat16" else 1e-2
    close(y.astype(np.float32), y_ref, rtol, np.abs(y_ref).max())
    C = H * D
    for i, part in enumerate(("dq", "dk", "dv")):  # one by one, to name the one that fails
        got = dqkv[:, :, i * C:(i + 1) * C].astype(np.float32)
        try:
            close(got, dqkv_ref[:, :, i * C:(i + 1) * C], rtol, np.abs(dqkv_ref).max())
        except AssertionError as err:
            raise AssertionError(f"{part}: {err}") from None


@on_gpu
def test_flash_attention_refuses_what_it_cannot_take():
    import cupy

    from models import flash_attention
    low = sixteen_bit("float16")
    assert not flash_attention.applies(np.zeros((1, 8, 3 * 64), low), 1)  # host arrays
    assert not flash_attention.applies(cupy.zeros((1, 8, 3 * 64), np.float32), 1)
    assert not flash_attention.applies(cupy.zeros((1, 8, 3 * 48), low), 4)  # heads of 12
    assert not flash_attention.applies(cupy.zeros((1, 8, 3 * 256), low), 2)  # heads of 128
    unaligned = cupy.zeros(3 * 64 * 8 + 1, low)[1:].reshape(1, 8, 3 * 64)
    assert not flash_attention.applies(unaligned, 1)
    assert flash_attention.applies(cupy.zeros((1, 8, 3 * 64), low), 1)


def test_a_bad_attention_choice_is_refused_at_import():
    env = {"GPT_MPI_ATTENTION": "fast", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", "import models.flash_attention"], env=env,
                         cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode != 0
    assert "GPT_MPI_ATTENTION='fast': expected flash or blocked" in run.stderr
