"""Fused CUDA kernels for CuPy arrays: one pass over device memory where the array-module
forms of `models/layers.py` make several, and fewer launches.

The GPU counterpart of `models/kernels.py` (numba, CPU): `layers.py` and `optim.py` call a
kernel here only when `enabled_for(...)` says so (CuPy arrays of one supported dtype, kernels
not turned off), and the array-module forms stay the reference they are checked against
(`tests/test_gpu.py`). `GPT_MPI_KERNELS=numpy` turns these off as well.

Every kernel is compiled once per element type from one source (`_PRELUDE` defines the
storage type `T`, the accumulation type `acc_t` and `load`/`store`):
- float64 and float32 accumulate in their own type, so float64 results match NumPy to
  rounding (the float64 gradient checks run on the GPU too);
- bfloat16 and float16 are stored as 16-bit words and converted with the hardware's `cvt`
  instructions; all arithmetic (statistics, exponentials, sums) is float32. That needs no
  CUDA header, so the kernels compile wherever CuPy's NVRTC does.

Layouts: attention scores are (B*H, query, key) rows, in blocks of queries, softmax over
the keys a query may see (one warp a row); the LM loss takes row-major (N, V) logits (one
block a token). Column sums (LayerNorm's weight and bias gradients) accumulate per column
with atomics: the order of additions varies between runs, so results agree to rounding, not
bit for bit.
"""
import math
import os

import numpy as np

from models import flash_attention

try:
    import cupy
except ImportError:  # no GPU stack: nothing here is ever enabled
    cupy = None

try:
    import ml_dtypes
    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:
    BFLOAT16 = None

ENABLED = cupy is not None and os.environ.get("GPT_MPI_KERNELS", "auto") != "numpy"

_TYPE_NAMES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32",
               np.dtype(np.float16): "F16"}
if BFLOAT16 is not None:
    _TYPE_NAMES[BFLOAT16] = "BF16"

ACCUMULATOR = {"F64": np.float64, "F32": np.float32, "F16": np.float32, "BF16": np.float32}


def enabled_for(*arrays):
    """True when the kernels apply: CuPy arrays, C-contiguous, of one supported dtype."""
    if not ENABLED:
        return False
    dtype = arrays[0].dtype
    return (dtype in _TYPE_NAMES
            and all(isinstance(a, cupy.ndarray) and a.dtype == dtype and a.flags.c_contiguous
                    for a in arrays))


_PRELUDE = r"""
#if defined(F64)
typedef double T; typedef double acc_t;
__device__ __forceinline__ acc_t load(T x) { return x; }
__device__ __forceinline__ T store(acc_t v) { return v; }
#elif defined(F32)
typedef float T; typedef float acc_t;
__device__ __forceinline__ acc_t load(T x) { return x; }
__device__ __forceinline__ T store(acc_t v) { return v; }
#elif defined(BF16)
typedef unsigned short T; typedef float acc_t;
__device__ __forceinline__ acc_t load(T x) { return __uint_as_float(((unsigned int)x) << 16); }
__device__ __forceinline__ T store(acc_t v) {
    unsigned short h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v)); return h; }
#else
typedef unsigned short T; typedef float acc_t;
__device__ __forceinline__ acc_t load(T x) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x)); return f; }
__device__ __forceinline__ T store(acc_t v) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); return h; }
#endif

// Overloads by hand, so that float code never silently runs in double (or the reverse).
__device__ __forceinline__ float EXP(float x) { return expf(x); }
__device__ __forceinline__ double EXP(double x) { return exp(x); }
__device__ __forceinline__ float LOG(float x) { return logf(x); }
__device__ __forceinline__ double LOG(double x) { return log(x); }
__device__ __forceinline__ float TANH(float x) { return tanhf(x); }
__device__ __forceinline__ double TANH(double x) { return tanh(x); }
__device__ __forceinline__ float SQRT(float x) { return sqrtf(x); }
__device__ __forceinline__ double SQRT(double x) { return sqrt(x); }
__device__ __forceinline__ float FMAX(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double FMAX(double a, double b) { return fmax(a, b); }

__device__ __forceinline__ acc_t warp_sum(acc_t v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ acc_t warp_max(acc_t v) {
    for (int o = 16; o > 0; o >>= 1) v = FMAX(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Sum (or max) over a block of blockDim.x threads (a multiple of 32, at most 1024); every
// thread gets the result. `shared` holds 32 values.
__device__ acc_t block_reduce(acc_t v, acc_t* shared, bool is_max) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = is_max ? warp_max(v) : warp_sum(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : is_max ? shared[0] : (acc_t)0;
    return is_max ? warp_max(v) : warp_sum(v);
}
#define GRID_STRIDE(i, n) \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); \
         i += (long long)gridDim.x * blockDim.x)
"""

_SOURCE = r"""
#define GELU_K ((acc_t)0.7978845608028654)
#define GELU_A ((acc_t)0.044715)

extern "C" __global__ void gelu_forward(const T* x, T* y, long long n) {
    GRID_STRIDE(i, n) {
        acc_t v = load(x[i]);
        acc_t t = TANH(GELU_K * (v + GELU_A * v * v * v));
        y[i] = store((acc_t)0.5 * v * ((acc_t)1 + t));
    }
}

// dx = dy * gelu'(x), gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3a x^2)
extern "C" __global__ void gelu_backward(const T* x, const T* dy, T* dx, long long n) {
    GRID_STRIDE(i, n) {
        acc_t v = load(x[i]);
        acc_t t = TANH(GELU_K * (v + GELU_A * v * v * v));
        acc_t slope = (acc_t)0.5 * ((acc_t)1 + t)
            + (acc_t)0.5 * v * ((acc_t)1 - t * t) * GELU_K * ((acc_t)1 + (acc_t)3 * GELU_A * v * v);
        dx[i] = store(load(dy[i]) * slope);
    }
}

// One warp per row of C: mean and 1/std in acc_t, y = (x - mean) * rstd * w + b.
extern "C" __global__ void layernorm_forward(const T* x, const T* w, const T* b, T* y,
        acc_t* mean, acc_t* rstd, long long rows, int C, acc_t eps) {
    long long row = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* xr = x + row * C;
    acc_t s = 0;
    for (int c = lane; c < C; c += 32) s += load(xr[c]);
    acc_t m = warp_sum(s) / C;
    acc_t var = 0;
    for (int c = lane; c < C; c += 32) { acc_t d = load(xr[c]) - m; var += d * d; }
    acc_t r = (acc_t)1 / SQRT(warp_sum(var) / C + eps);
    T* yr = y + row * C;
    for (int c = lane; c < C; c += 32)
        yr[c] = store((load(xr[c]) - m) * r * load(w[c]) + load(b[c]));
    if (lane == 0) { mean[row] = m; rstd[row] = r; }
}

// dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dy w; one warp per row.
extern "C" __global__ void layernorm_backward_dx(const T* dy, const T* x, const T* w,
        const acc_t* mean, const acc_t* rstd, T* dx, long long rows, int C) {
    long long row = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* dyr = dy + row * C;
    const T* xr = x + row * C;
    acc_t m = mean[row], r = rstd[row];
    acc_t sg = 0, sgx = 0;
    for (int c = lane; c < C; c += 32) {
        acc_t g = load(dyr[c]) * load(w[c]);
        sg += g;
        sgx += g * (load(xr[c]) - m) * r;
    }
    sg = warp_sum(sg) / C;
    sgx = warp_sum(sgx) / C;
    T* dxr = dx + row * C;
    for (int c = lane; c < C; c += 32) {
        acc_t g = load(dyr[c]) * load(w[c]);
        dxr[c] = store(r * (g - sg - (load(xr[c]) - m) * r * sgx));
    }
}

// Column sums over a chunk of rows: dw[c] += sum dy xhat, db[c] += sum dy (zeroed first).
extern "C" __global__ void layernorm_backward_dwdb(const T* dy, const T* x, const acc_t* mean,
        const acc_t* rstd, acc_t* dw, acc_t* db, long long rows, int C, int rows_per_block) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    long long start = (long long)blockIdx.y * rows_per_block;
    long long stop = min(rows, start + rows_per_block);
    acc_t sw = 0, sb = 0;
    for (long long row = start; row < stop; ++row) {
        acc_t d = load(dy[row * C + c]);
        sw += d * (load(x[row * C + c]) - mean[row]) * rstd[row];
        sb += d;
    }
    atomicAdd(dw + c, sw);
    atomicAdd(db + c, sb);
}

// Scores (B*H*Tq rows of Tk keys; query q = q0 + row % Tq sees keys 0..q) -> in place
// softmax(scale * scores) over the visible keys, 0 elsewhere; one warp per row.
extern "C" __global__ void causal_softmax_forward(T* att, long long rows, int Tq, int Tk,
        int q0, acc_t scale) {
    long long row = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    int q = q0 + (int)(row % Tq);
    T* a = att + row * Tk;
    acc_t mx = load(a[0]);
    for (int j = lane; j <= q; j += 32) mx = FMAX(mx, load(a[j]));
    mx = warp_max(mx);
    acc_t s = 0;
    for (int j = lane; j <= q; j += 32) s += EXP((load(a[j]) - mx) * scale);
    acc_t inv = (acc_t)1 / warp_sum(s);
    for (int j = lane; j < Tk; j += 32)
        a[j] = store(j <= q ? EXP((load(a[j]) - mx) * scale) * inv : (acc_t)0);
}

// d(scores) = scale * p (dp - sum_j dp_j p_j), in place in dp; 0 where masked. Rows of up
// to 32 * ROW_REGS keys are read once into registers (two passes over memory cost 2x here).
#define ROW_REGS 32
extern "C" __global__ void causal_softmax_backward(T* datt, const T* att, long long rows,
        int Tq, int Tk, int q0, acc_t scale) {
    long long row = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    int q = q0 + (int)(row % Tq);
    T* d = datt + row * Tk;
    const T* p = att + row * Tk;
    acc_t dot = 0;
    if (Tk <= 32 * ROW_REGS) {
        acc_t pr[ROW_REGS], dr[ROW_REGS];
#pragma unroll
        for (int k = 0; k < ROW_REGS; ++k) {
            int j = lane + 32 * k;
            pr[k] = 0;
            dr[k] = 0;
            if (j <= q) { pr[k] = load(p[j]); dr[k] = load(d[j]); dot += pr[k] * dr[k]; }
        }
        dot = warp_sum(dot);
#pragma unroll
        for (int k = 0; k < ROW_REGS; ++k) {
            int j = lane + 32 * k;
            if (j < Tk) d[j] = store(j <= q ? scale * pr[k] * (dr[k] - dot) : (acc_t)0);
        }
        return;
    }
    for (int j = lane; j <= q; j += 32) dot += load(d[j]) * load(p[j]);
    dot = warp_sum(dot);
    for (int j = lane; j < Tk; j += 32)
        d[j] = store(j <= q ? scale * load(p[j]) * (load(d[j]) - dot) : (acc_t)0);
}

// One block per token row of V logits: losses[n] = logsumexp - logit[target], and the row
// becomes softmax - onehot (the gradient of the summed loss), in place.
extern "C" __global__ void cross_entropy_forward(T* logits, const long long* targets,
        acc_t* losses, long long rows, int V) {
    __shared__ acc_t shared[32];
    long long row = blockIdx.x;
    if (row >= rows) return;
    T* z = logits + row * V;
    acc_t mx = load(z[0]);
    for (int j = threadIdx.x; j < V; j += blockDim.x) mx = FMAX(mx, load(z[j]));
    mx = block_reduce(mx, shared, true);
    acc_t s = 0;
    for (int j = threadIdx.x; j < V; j += blockDim.x) s += EXP(load(z[j]) - mx);
    s = block_reduce(s, shared, false);
    long long t = targets[row];
    acc_t picked = load(z[t]);
    __syncthreads();  // every thread has read z[t] before anyone overwrites it
    acc_t inv = (acc_t)1 / s;
    for (int j = threadIdx.x; j < V; j += blockDim.x)
        z[j] = store(EXP(load(z[j]) - mx) * inv - (j == t ? (acc_t)1 : (acc_t)0));
    if (threadIdx.x == 0) losses[row] = LOG(s) + mx - picked;
}

#if defined(F16) || defined(BF16)
// a += b for 16-bit arrays, 4 elements (8 bytes) a thread; b repeats every b4 vectors (a
// bias broadcast over rows), or b4 = n4 (a residual). CuPy's own 16-bit add reads and
// writes 2 bytes at a time: a third of the memory bandwidth.
extern "C" __global__ void add4(T* a, const T* b, long long n4, long long b4) {
    GRID_STRIDE(i, n4) {
        uint2 va = reinterpret_cast<uint2*>(a)[i];
        uint2 vb = reinterpret_cast<const uint2*>(b)[i % b4];
        T* ea = reinterpret_cast<T*>(&va);
        const T* eb = reinterpret_cast<const T*>(&vb);
#pragma unroll
        for (int k = 0; k < 4; ++k) ea[k] = store(load(ea[k]) + load(eb[k]));
        reinterpret_cast<uint2*>(a)[i] = va;
    }
}

// Head layouts, 4 elements (8 bytes) a thread, D % 4 == 0. Index i runs over (B,T,[3,]H,D/4)
// in order, so reads (or writes) on that side are coalesced, and the other side moves runs
// of D/4 vectors. CuPy's strided 16-bit copies cost 6 ms a GPT-2 step, these about a third.
__device__ __forceinline__ long long heads_index(long long i, int Tn, int H, int D4,
                                                 int parts, int* part) {
    int d4 = (int)(i % D4); i /= D4;
    int h = (int)(i % H); i /= H;
    *part = (int)(i % parts); i /= parts;
    int t = (int)(i % Tn);
    long long b = i / Tn;
    return ((b * H + h) * Tn + t) * D4 + d4;
}

// qkv (B,T,3,H,D) -> q, k, v (B*H,T,D)
extern "C" __global__ void split_qkv4(const T* qkv, T* q, T* k, T* v, long long n4, int Tn,
        int H, int D4) {
    GRID_STRIDE(i, n4) {
        int part;
        long long j = heads_index(i, Tn, H, D4, 3, &part);
        T* out = part == 0 ? q : part == 1 ? k : v;
        reinterpret_cast<uint2*>(out)[j] = reinterpret_cast<const uint2*>(qkv)[i];
    }
}

// (B,T,H,D) <-> (B*H,T,D): to_heads 1 reads the first, 0 writes it
extern "C" __global__ void transpose_heads4(const T* src, T* dst, long long n4, int Tn,
        int H, int D4, int to_heads) {
    GRID_STRIDE(i, n4) {
        int part;
        long long j = heads_index(i, Tn, H, D4, 1, &part);
        if (to_heads) reinterpret_cast<uint2*>(dst)[j] = reinterpret_cast<const uint2*>(src)[i];
        else reinterpret_cast<uint2*>(dst)[i] = reinterpret_cast<const uint2*>(src)[j];
    }
}

// dq (B*H,T,D) and the float32 sums dk, dv -> d(qkv) (B,T,3,H,D)
extern "C" __global__ void merge_qkv_grads4(const T* dq, const float* dk, const float* dv,
        T* out, long long n4, int Tn, int H, int D4) {
    GRID_STRIDE(i, n4) {
        int part;
        long long j = heads_index(i, Tn, H, D4, 3, &part);
        if (part == 0) {
            reinterpret_cast<uint2*>(out)[i] = reinterpret_cast<const uint2*>(dq)[j];
        } else {
            float4 f = reinterpret_cast<const float4*>(part == 1 ? dk : dv)[j];
            uint2 o;
            T* e = reinterpret_cast<T*>(&o);
            e[0] = store(f.x); e[1] = store(f.y); e[2] = store(f.z); e[3] = store(f.w);
            reinterpret_cast<uint2*>(out)[i] = o;
        }
    }
}
#endif

// AdamW's Adam part on a master-weight range (decay is applied before, as on the CPU):
// m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= step * m / (sqrt(v) inv_sqrt_bc2 + eps).
extern "C" __global__ void adam(T* p, const T* g, T* m, T* v, long long n, acc_t b1,
        acc_t b2, acc_t step, acc_t inv_sqrt_bc2, acc_t eps) {
    GRID_STRIDE(i, n) {
        acc_t gi = load(g[i]);
        acc_t mi = b1 * load(m[i]) + ((acc_t)1 - b1) * gi;
        acc_t vi = b2 * load(v[i]) + ((acc_t)1 - b2) * gi * gi;
        m[i] = store(mi);
        v[i] = store(vi);
        p[i] = store(load(p[i]) - step * mi / (SQRT(vi) * inv_sqrt_bc2 + eps));
    }
}
"""

_MODULES = {}


def _kernel(name, dtype):
    type_name = _TYPE_NAMES[np.dtype(dtype)]
    module = _MODULES.get(type_name)
    if module is None:
        module = _MODULES[type_name] = cupy.RawModule(
            code=f"#define {type_name}\n" + _PRELUDE + _SOURCE, options=("--std=c++14",))
    return module.get_function(name), ACCUMULATOR[type_name]


_THREADS = 256


def _elementwise_grid(n):
    # a grid-stride loop: enough blocks to fill the GPU, never more than the work
    return (max(1, min((n + _THREADS - 1) // _THREADS, 65535)),), (_THREADS,)


def _warp_rows_grid(rows):
    warps = _THREADS // 32
    return ((rows + warps - 1) // warps,), (_THREADS,)


# --------------------------------------------------------------------------- GELU


def gelu_forward(x):
    """(...) -> (...) tanh-GELU."""
    y = cupy.empty_like(x)
    fn, _ = _kernel("gelu_forward", x.dtype)
    fn(*_elementwise_grid(x.size), (x, y, np.int64(x.size)))
    return y


def gelu_backward(x, dy):
    """x, dy (...) -> dx (...)."""
    dx = cupy.empty_like(dy)
    fn, _ = _kernel("gelu_backward", x.dtype)
    fn(*_elementwise_grid(x.size), (x, dy, dx, np.int64(x.size)))
    return dx


# --------------------------------------------------------------------------- adds


def add_into(a, b):
    """a += b in place for 16-bit CuPy arrays, b of a's size or a row (a bias) -> True, or
    False where it does not apply (other dtypes, odd sizes): the caller adds as usual."""
    if not (ENABLED and isinstance(a, cupy.ndarray) and isinstance(b, cupy.ndarray)
            and a.dtype == b.dtype and a.dtype.itemsize == 2 and a.dtype in _TYPE_NAMES
            and a.flags.c_contiguous and b.flags.c_contiguous
            and a.size % 4 == 0 and b.size % 4 == 0 and a.size % b.size == 0
            and (b.size == a.size or b.shape == a.shape[-1:])
            and a.data.ptr % 8 == 0 and b.data.ptr % 8 == 0):
        return False
    fn, _ = _kernel("add4", a.dtype)
    fn(*_elementwise_grid(a.size // 4), (a, b, np.int64(a.size // 4), np.int64(b.size // 4)))
    return True


# --------------------------------------------------------------------------- LayerNorm


def layernorm_forward(weight, bias, x, eps):
    """(..., C) -> y (..., C), mean (N,), rstd (N,) in the accumulation type."""
    C = x.shape[-1]
    rows = x.size // C
    fn, acc = _kernel("layernorm_forward", x.dtype)
    y = cupy.empty_like(x)
    mean = cupy.empty(rows, acc)
    rstd = cupy.empty(rows, acc)
    fn(*_warp_rows_grid(rows), (x, weight, bias, y, mean, rstd, np.int64(rows), np.int32(C),
                                acc(eps)))
    return y, mean, rstd


_ROWS_PER_BLOCK = 64  # LayerNorm column sums: 64 rows a block keeps ~100 blocks per 8k rows


def layernorm_backward(x, weight, mean, rstd, dy, dweight, dbias):
    """-> dx; overwrites dweight, dbias (C,)."""
    C = x.shape[-1]
    rows = x.size // C
    fn, acc = _kernel("layernorm_backward_dx", x.dtype)
    dx = cupy.empty_like(dy)
    fn(*_warp_rows_grid(rows), (dy, x, weight, mean, rstd, dx, np.int64(rows), np.int32(C)))
    direct = dweight.dtype == acc and dbias.dtype == acc
    dw = dweight if direct else cupy.empty(C, acc)
    db = dbias if direct else cupy.empty(C, acc)
    dw[...] = 0
    db[...] = 0
    fn, _ = _kernel("layernorm_backward_dwdb", x.dtype)
    grid = ((C + 127) // 128, (rows + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK)
    fn(grid, (128,), (dy, x, mean, rstd, dw, db, np.int64(rows), np.int32(C),
                      np.int32(_ROWS_PER_BLOCK)))
    if not direct:
        dweight[...] = dw.astype(dweight.dtype)
        dbias[...] = db.astype(dbias.dtype)
    return dx


# --------------------------------------------------------------------------- attention


def causal_softmax_forward(att, scale, first_query=0):
    """(BH, Tq, Tk) scores of queries first_query.. -> in place causal softmax(scale *
    scores) over the keys each may see."""
    BH, Tq, Tk = att.shape
    rows = BH * Tq
    fn, acc = _kernel("causal_softmax_forward", att.dtype)
    fn(*_warp_rows_grid(rows), (att, np.int64(rows), np.int32(Tq), np.int32(Tk),
                                np.int32(first_query), acc(scale)))


def causal_softmax_backward(datt, att, scale, first_query=0):
    """d(probabilities) -> in place d(scores) of `causal_softmax_forward`."""
    BH, Tq, Tk = att.shape
    rows = BH * Tq
    fn, acc = _kernel("causal_softmax_backward", att.dtype)
    fn(*_warp_rows_grid(rows), (datt, att, np.int64(rows), np.int32(Tq), np.int32(Tk),
                                np.int32(first_query), acc(scale)))


# cuBLAS's numbers for its typed GEMM (cublasGemmStridedBatchedEx)
_CUDA_TYPES = {"F64": 1, "F32": 0, "F16": 2, "BF16": 14}  # CUDA_R_64F, _32F, _16F, _16BF
_COMPUTE = {"F64": 70, "F32": 68, "F16": 68, "BF16": 68}  # COMPUTE_64F; 32F (no TF32)
_OP_N, _OP_T, _GEMM_DEFAULT = 0, 1, -1
_SCALARS = {t: (np.ones((), ACCUMULATOR[t]), np.zeros((), ACCUMULATOR[t])) for t in _COMPUTE}


def batched_matmul(a, b, transpose_a=False, transpose_b=False, out=None, accumulate=False):
    """(n,M,K) @ (n,K,N) -> (n,M,N), `transpose_*` reading an operand stored (n,K,M) or
    (n,N,K) as its transpose; out += instead of = with `accumulate`. Operands may be strided
    views (a query block of a head's rows) with contiguous last axes; `out` may be float32
    for 16-bit operands. Accumulates in float32 (float64 for float64).

    One cuBLAS call (CuPy's batched matmul has no bfloat16 and copies strided views).
    cuBLAS is column-major: a row-major (r,c) array with row stride s is its (c,r)
    transpose there with leading dimension s, so C = A B is computed as C^T = B^T A^T."""
    from cupy.cuda import cublas
    type_name = _TYPE_NAMES[a.dtype]
    n = a.shape[0]
    M, K = (a.shape[2], a.shape[1]) if transpose_a else (a.shape[1], a.shape[2])
    N = b.shape[1] if transpose_b else b.shape[2]
    if out is None:
        out = cupy.empty((n, M, N), a.dtype)
    assert out.shape == (n, M, N) and b.dtype == a.dtype, (a.shape, b.shape, out.shape)

    def layout(x):  # -> (leading dimension, batch stride), in elements
        assert x.strides[2] == x.itemsize, "the last axis must be contiguous"
        return x.strides[1] // x.itemsize, x.strides[0] // x.itemsize

    one, zero = _SCALARS[type_name]
    cublas.gemmStridedBatchedEx(
        cupy.cuda.device.get_cublas_handle(), _OP_T if transpose_b else _OP_N,
        _OP_T if transpose_a else _OP_N, N, M, K, one.ctypes.data,
        b.data.ptr, _CUDA_TYPES[type_name], *layout(b),
        a.data.ptr, _CUDA_TYPES[type_name], *layout(a),
        (one if accumulate else zero).ctypes.data,
        out.data.ptr, _CUDA_TYPES[_TYPE_NAMES[out.dtype]], *layout(out),
        n, _COMPUTE[type_name], _GEMM_DEFAULT)
    return out


# Queries per block: a block of queries scores only the keys it may see, so the masked
# upper triangle is skipped block by block (at 1024 tokens, 4 blocks do 62% of the work of
# one T x T product) at the price of more, smaller launches.
ATTENTION_QUERY_BLOCK = 256


def attention_forward(qkv, n_head):
    """(B,T,3C) -> (B,T,C), cache: flash attention on tensor cores where it applies (16-bit
    heads of 16, 32 or 64: `models/flash_attention.py`), else per block of queries, cuBLAS
    batched GEMMs over the B*H heads around one fused kernel for the causal mask, 1/sqrt(D)
    and the softmax."""
    if flash_attention.applies(qkv, n_head):
        y, lse = flash_attention.forward(qkv, n_head)
        return y, ("flash", qkv, y, lse, n_head)
    B, T, C3 = qkv.shape
    C = C3 // 3
    H, D = n_head, C // n_head
    if _vector_heads(qkv, D):
        q, k, v = (cupy.empty((B * H, T, D), qkv.dtype) for _ in range(3))
        n4 = qkv.size // 4
        fn, _ = _kernel("split_qkv4", qkv.dtype)
        fn(*_elementwise_grid(n4), (qkv, q, k, v, np.int64(n4), np.int32(T), np.int32(H),
                                    np.int32(D // 4)))
    else:
        heads = qkv.reshape(B, T, 3, H, D).transpose(2, 0, 3, 1, 4)  # (3,B,H,T,D)
        q, k, v = (cupy.ascontiguousarray(heads[i]).reshape(B * H, T, D) for i in range(3))
    scale = 1.0 / math.sqrt(D)
    y = cupy.empty((B * H, T, D), qkv.dtype)
    blocks = []
    for start in range(0, T, ATTENTION_QUERY_BLOCK):
        stop = min(start + ATTENTION_QUERY_BLOCK, T)  # queries start:stop see keys 0:stop
        att = batched_matmul(q[:, start:stop], k[:, :stop], transpose_b=True)
        causal_softmax_forward(att, scale, start)
        batched_matmul(att, v[:, :stop], out=y[:, start:stop])
        blocks.append((start, stop, att))
    return _from_heads(y, B, T, H, D).reshape(B, T, C), ("blocks", q, k, v, blocks, scale,
                                                          (B, T, H, D))


def _vector_heads(x, D):
    """Whether the 16-bit head-layout kernels apply (8-byte vectors of 4 elements)."""
    return (x.dtype.itemsize == 2 and D % 4 == 0 and x.flags.c_contiguous
            and x.data.ptr % 8 == 0)


def _to_heads(x, B, T, H, D):
    """(B,T,H*D) -> (B*H,T,D), contiguous."""
    if not _vector_heads(x, D):
        return cupy.ascontiguousarray(x.reshape(B, T, H, D).transpose(0, 2, 1, 3)).reshape(
            B * H, T, D)
    out = cupy.empty((B * H, T, D), x.dtype)
    fn, _ = _kernel("transpose_heads4", x.dtype)
    n4 = x.size // 4
    fn(*_elementwise_grid(n4), (x, out, np.int64(n4), np.int32(T), np.int32(H),
                                np.int32(D // 4), np.int32(1)))
    return out


def _from_heads(x, B, T, H, D):
    """(B*H,T,D) -> (B,T,H,D), contiguous."""
    if not _vector_heads(x, D):
        return cupy.ascontiguousarray(x.reshape(B, H, T, D).transpose(0, 2, 1, 3))
    out = cupy.empty((B, T, H, D), x.dtype)
    fn, _ = _kernel("transpose_heads4", x.dtype)
    n4 = x.size // 4
    fn(*_elementwise_grid(n4), (x, out, np.int64(n4), np.int32(T), np.int32(H),
                                np.int32(D // 4), np.int32(0)))
    return out


def attention_backward(cache, dout):
    """dout (B,T,C) -> d_qkv (B,T,3C). Keys and values collect gradient from every block
    that sees them: in float32 for 16-bit inputs (cuBLAS adds into a float32 output)."""
    if cache[0] == "flash":
        return flash_attention.backward(*cache[1:4], dout, cache[4])
    _, q, k, v, blocks, scale, (B, T, H, D) = cache
    dy = _to_heads(cupy.ascontiguousarray(dout), B, T, H, D)
    acc = np.promote_types(dout.dtype, np.float32)
    dq = cupy.empty((B * H, T, D), dout.dtype)
    dk = cupy.zeros((B * H, T, D), acc)
    dv = cupy.zeros((B * H, T, D), acc)
    for start, stop, att in blocks:
        dy_block = dy[:, start:stop]
        batched_matmul(att, dy_block, transpose_a=True, out=dv[:, :stop], accumulate=True)
        datt = batched_matmul(dy_block, v[:, :stop], transpose_b=True)
        causal_softmax_backward(datt, att, scale, start)
        batched_matmul(datt, k[:, :stop], out=dq[:, start:stop])
        batched_matmul(datt, q[:, start:stop], transpose_a=True, out=dk[:, :stop],
                       accumulate=True)
    dqkv = cupy.empty((B, T, 3, H, D), dout.dtype)
    if _vector_heads(dqkv, D) and dk.dtype == np.float32:
        n4 = dqkv.size // 4
        fn, _ = _kernel("merge_qkv_grads4", dout.dtype)
        fn(*_elementwise_grid(n4), (dq, dk, dv, dqkv, np.int64(n4), np.int32(T), np.int32(H),
                                    np.int32(D // 4)))
        return dqkv.reshape(B, T, 3 * H * D)
    for i, d in enumerate((dq, dk, dv)):
        d = d.astype(dout.dtype, copy=False)  # dk, dv back from float32
        dqkv[:, :, i] = d.reshape(B, H, T, D).transpose(0, 2, 1, 3)
    return dqkv.reshape(B, T, 3 * H * D)


# --------------------------------------------------------------------------- LM loss


def cross_entropy_forward(logits, targets):
    """(N,V) logits, (N,) ids -> (mean loss, a 0-d accumulation-type array), and `logits`
    overwritten with softmax - onehot (unscaled: the caller scales the GEMMs after it)."""
    N, V = logits.shape
    fn, acc = _kernel("cross_entropy_forward", logits.dtype)
    losses = cupy.empty(N, acc)
    targets = cupy.ascontiguousarray(targets.reshape(-1), dtype=cupy.int64)
    threads = 1024 if V >= 8192 else 128
    fn((N,), (threads,), (logits, targets, losses, np.int64(N), np.int32(V)))
    return losses.mean()


# --------------------------------------------------------------------------- AdamW


def adam(p, g, m, v, b1, b2, step, inv_sqrt_bc2, eps):
    """The fused Adam update of one contiguous range (all four arrays alike)."""
    fn, acc = _kernel("adam", p.dtype)
    fn(*_elementwise_grid(p.size), (p, g, m, v, np.int64(p.size), acc(b1), acc(b2), acc(step),
                                    acc(inv_sqrt_bc2), acc(eps)))
