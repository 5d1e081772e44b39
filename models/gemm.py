"""CPU matrix products through Intel MKL where it beats NumPy's OpenBLAS; NumPy otherwise.

`matmul(a, b, out=None, accumulate=False)` is `a @ b` (or `out += a @ b`) for float32/64
host arrays of 2 or more dimensions. It calls MKL's `cblas_?gemm`, or for stacked matrices
one `cblas_?gemm_batch_strided`, when MKL is on and every operand is a BLAS-shaped view:
each matrix row- or column-contiguous, the stack dimensions collapsible to one stride.
Anything else (CuPy arrays, broadcasting, odd strides, MKL absent or off) goes to NumPy,
which stays the reference: `tests/test_gemm.py` checks every path against `np.matmul`.

Why MKL, measured on an Intel Xeon (Sapphire Rapids class, AVX-512) VM of 2 vCPUs, 1 thread:
- attention's per-head products (48 of 64..256 x 64 x 64 at `small`) run 1.3x faster in
  one strided batch call than in NumPy's loop of one OpenBLAS call per matrix;
- the linears' 2-D GEMMs gain 1.04x on average at `small`'s shapes, more at `baby`'s;
- `accumulate` is BLAS's beta = 1: attention's `dk += ...` needs no temporary and no add.
On AMD EPYC (Zen 3) MKL was no faster than OpenBLAS at these shapes, so `auto` (the
default of `GPT_MPI_GEMM`: auto | mkl | numpy) uses MKL only on Intel CPUs. MKL comes from
PyPI's `mkl` package; without it everything runs on NumPy. MKL reads its thread count from
`MKL_NUM_THREADS` / `OMP_NUM_THREADS` like OpenBLAS does.

`use_bf16(True)` (config `matmul = "bf16"`) rounds both float32 operands of every 2-D
product to bfloat16 and runs MKL's `cblas_gemm_bf16bf16f32`, which accumulates and returns
float32: on AVX-512-BF16/AMX CPUs 1.2-5.3x faster than float32 at `small`'s shapes (the
README's bf16 section). Stacked products stay float32 (MKL has no batched bf16 call).
"""
import ctypes
import ctypes.util
import glob
import math
import os
import sys

import numpy as np

from comm.backend import array_module
from models import kernels

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


def _cpuinfo(field) -> list:
    """The words of /proc/cpuinfo's first `field` line (vendor_id, flags), or [] (no Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith(field)), "")
    except OSError:
        return []
    return line.partition(":")[2].split()


def _intel_cpu() -> bool:
    return "GenuineIntel" in _cpuinfo("vendor_id")


def _load_mkl():
    """MKL's single dynamic library (libmkl_rt), from this environment's lib/ or the
    system's search path, or None."""
    candidates = sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))
    found = ctypes.util.find_library("mkl_rt")
    candidates += [found] if found else []
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        P, c_int = ctypes.c_void_p, ctypes.c_int
        for prefix, scalar in (("s", ctypes.c_float), ("d", ctypes.c_double)):
            gemm = getattr(lib, f"cblas_{prefix}gemm")
            gemm.argtypes = [c_int] * 6 + [scalar, P, c_int, P, c_int, scalar, P, c_int]
            gemm.restype = None
            batch = getattr(lib, f"cblas_{prefix}gemm_batch_strided")
            batch.argtypes = ([c_int] * 6 + [scalar, P, c_int, c_int, P, c_int, c_int, scalar,
                                             P, c_int, c_int, c_int])
            batch.restype = None
        if hasattr(lib, "cblas_gemm_bf16bf16f32"):  # MKL 2019 and later
            bf16 = lib.cblas_gemm_bf16bf16f32
            bf16.argtypes = ([c_int] * 6 + [ctypes.c_float, P, c_int, P, c_int, ctypes.c_float,
                                            P, c_int])
            bf16.restype = None
        return lib
    return None


_MODE = os.environ.get("GPT_MPI_GEMM", "auto")
if _MODE not in ("auto", "mkl", "numpy"):
    raise ValueError(f"GPT_MPI_GEMM={_MODE!r}: expected auto, mkl or numpy")
_MKL = None if _MODE == "numpy" else _load_mkl()
if _MODE == "mkl" and _MKL is None:
    raise ImportError("GPT_MPI_GEMM=mkl but MKL's libmkl_rt was not found: "
                      "pip install mkl, or use GPT_MPI_GEMM=auto")


def _openblas_thread_setter():
    """(get, set) of the thread count of the OpenBLAS that NumPy's wheel bundles, or None
    (another NumPy build): its symbols carry the wheel's prefix and suffix."""
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs",
                                  "lib*openblas*.so*"))
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for infix in ("scipy_openblas_{}_num_threads64_", "openblas_{}_num_threads64_",
                      "openblas_{}_num_threads"):
            get = getattr(lib, infix.format("get"), None)
            set_ = getattr(lib, infix.format("set"), None)
            if get is not None and set_ is not None:
                get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
                return get, set_
    return None


_OPENBLAS = _openblas_thread_setter()
_OPENBLAS_THREADS = _OPENBLAS[0]() if _OPENBLAS else None
ENABLED = False


def use_mkl(on: bool):
    """MKL for the products (where it loaded), or NumPy's OpenBLAS. With MKL on, OpenBLAS
    keeps one thread for what still reaches it (GEMVs): two thread pools that both spin
    while waiting ran `small`'s step at 2 threads 2x slower than either pool alone."""
    global ENABLED
    ENABLED = bool(on) and _MKL is not None
    if _OPENBLAS is not None:
        _OPENBLAS[1](1 if ENABLED else _OPENBLAS_THREADS)


use_mkl(_MKL is not None and (_MODE == "mkl" or _intel_cpu()))

# bfloat16 products (`use_bf16`): float32 operands rounded to bfloat16, products accumulated
# and returned in float32, by MKL on CPUs with AVX-512-BF16 or AMX.
BF16 = False


def bf16_unavailable():
    """Why bfloat16 products cannot run here (a sentence), or None when they can."""
    if _MKL is None or not ENABLED:
        return "bf16 products need MKL on (pip install mkl; GPT_MPI_GEMM=auto or mkl)"
    if not hasattr(_MKL, "cblas_gemm_bf16bf16f32"):
        return "this MKL has no cblas_gemm_bf16bf16f32 (MKL 2019 or later has)"
    flags = _cpuinfo("flags")
    if "avx512_bf16" not in flags and "amx_bf16" not in flags:
        return "this CPU has neither avx512_bf16 nor amx_bf16 (Intel Cooper Lake or later)"
    return None


def use_bf16(on: bool):
    """Round float32 operands of 2-D products to bfloat16 (float32 accumulation and
    result), or not. Raises ValueError, saying why, where it cannot run."""
    global BF16
    why = bf16_unavailable() if on else None
    if why:
        raise ValueError(why)
    BF16 = bool(on)
    _PLANS.clear()


def bfloat16_bits(x):
    """(m,n) float32 -> C-contiguous (m,n) uint16: bfloat16 bits rounded to nearest even."""
    out = np.empty(x.shape, np.uint16)
    if kernels.enabled_for(x):
        kernels.to_bfloat16(x, out)
        return out
    u = x.view(np.uint32)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    out[...] = np.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x40, rounded)
    return out


def _gemm_bf16(head, a, b, out, accumulate, ldc):
    ta, tb, m, n, k = head
    # each operand rounded as BLAS reads it: a transposed view converts its stored matrix
    a16 = bfloat16_bits(a.T if ta == _TRANS else a)
    b16 = bfloat16_bits(b.T if tb == _TRANS else b)
    _MKL.cblas_gemm_bf16bf16f32(_ROW_MAJOR, ta, tb, m, n, k, 1.0, a16.ctypes.data,
                                a16.shape[1], b16.ctypes.data, b16.shape[1],
                                1.0 if accumulate else 0.0, out.ctypes.data, ldc)

_GEMM = {np.dtype(np.float32): ("cblas_sgemm", "cblas_sgemm_batch_strided"),
         np.dtype(np.float64): ("cblas_dgemm", "cblas_dgemm_batch_strided")}
# Operand shapes, strides and dtypes -> the BLAS call's fixed arguments, or None (NumPy's).
# Working them out took 17-22 us a product, against ~1 us for this lookup: `baby` makes
# 75 products a step. A step repeats the same few keys; sampling adds one per length.
_PLANS = {}
_PLANS_MAX = 4096


def matmul(a, b, out=None, accumulate=False):
    """(...,m,k) @ (...,k,n) -> (...,m,n), written to `out` if given; `accumulate`: out += a @ b.
    An `out` that may overlap an operand goes to NumPy, which copies as needed."""
    plan = None
    if ENABLED and type(a) is np.ndarray and type(b) is np.ndarray and (
            out is None or not (np.may_share_memory(out, a) or np.may_share_memory(out, b))):
        out_key = None if out is None else (type(out), out.shape, out.strides, out.dtype,
                                            out.flags.writeable)
        key = (a.shape, a.strides, a.dtype, b.shape, b.strides, b.dtype, out_key)
        plan = _PLANS.get(key, False)
        if plan is False:
            if len(_PLANS) >= _PLANS_MAX:
                _PLANS.clear()
            plan = _PLANS[key] = _plan(a, b, out)
    if plan is None:
        if accumulate:
            out += a @ b
            return out
        return a @ b if out is None else array_module(a).matmul(a, b, out=out)
    call, head, a_tail, b_tail, c_tail, out_shape = plan
    if out is None:
        out = np.empty(out_shape, a.dtype)
    if call is _gemm_bf16:
        _gemm_bf16(head, a, b, out, accumulate, *c_tail)
        return out
    call(*head, a.ctypes.data, *a_tail, b.ctypes.data, *b_tail, 1.0 if accumulate else 0.0,
         out.ctypes.data, *c_tail)
    return out


def _plan(a, b, out):
    """(BLAS function, its arguments around the three pointers and beta, out's shape) when
    MKL can take these operands as they lie, else None."""
    args = _blas_args(a, b, out)
    if args is None:
        return None
    out, (batch, m, n, k, ta, lda, sa, tb, ldb, sb, ldc, sc) = args
    if BF16 and batch == 1 and a.dtype == np.float32:
        return _gemm_bf16, (ta, tb, m, n, k), (), (), (ldc,), out.shape
    single, batched = _GEMM[a.dtype]
    head = (_ROW_MAJOR, ta, tb, m, n, k, 1.0)
    if batch == 1:
        return getattr(_MKL, single), head, (lda,), (ldb,), (ldc,), out.shape
    return getattr(_MKL, batched), head, (lda, sa), (ldb, sb), (ldc, sc, batch), out.shape


def _blas_args(a, b, out):
    """(out, BLAS arguments) when MKL can take these operands as they lie, else None."""
    if not (type(a) is np.ndarray and type(b) is np.ndarray) or a.dtype not in _GEMM:
        return None
    if b.dtype != a.dtype or a.ndim < 2 or b.ndim != a.ndim or a.shape[:-2] != b.shape[:-2]:
        return None
    m, k = a.shape[-2:]
    n = b.shape[-1]
    if b.shape[-2] != k or min(m, n, k) < 2:
        return None
    if out is None:
        out = np.empty(a.shape[:-1] + (n,), a.dtype)
    elif (type(out) is not np.ndarray or out.dtype != a.dtype or not out.flags.writeable
          or out.shape != a.shape[:-1] + (n,)):
        return None
    batch = math.prod(a.shape[:-2])
    layouts = []
    for x in (a, b, out):
        layout = _matrix_layout(x)
        stride = _batch_stride(x)
        if layout is None or stride is None:
            return None
        trans, ld = layout
        lines = x.shape[-2] if trans == _NO_TRANS else x.shape[-1]
        if batch > 1 and stride < lines * ld:  # MKL refuses matrices that overlap
            return None
        layouts.append(layout + (stride,))
    (ta, lda, sa), (tb, ldb, sb), (tc, ldc, sc) = layouts
    if tc != _NO_TRANS:
        return None
    return out, (batch, m, n, k, ta, lda, sa, tb, ldb, sb, ldc, sc)


def _matrix_layout(x):
    """(transpose flag, leading dimension) of x's last two axes seen by row-major BLAS."""
    item = x.itemsize
    s0, s1 = x.strides[-2:]
    if s0 % item or s1 % item:
        return None
    s0, s1 = s0 // item, s1 // item
    rows, cols = x.shape[-2:]
    if s1 == 1 and s0 >= cols:
        return _NO_TRANS, s0
    if s0 == 1 and s1 >= rows:
        return _TRANS, s1
    return None


def _batch_stride(x):
    """The one element stride that walks x's stacked matrices in order (0 for one matrix),
    or None when the stack axes do not collapse to a single stride."""
    dims = [(n, s) for n, s in zip(x.shape[:-2], x.strides[:-2]) if n > 1]
    if not dims:
        return 0
    stride = dims[-1][1]
    expected = stride
    for n, s in reversed(dims):
        if s != expected or s % x.itemsize or s <= 0:
            return None
        expected = s * n
    return stride // x.itemsize
