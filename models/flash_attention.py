"""Causal flash attention on tensor cores, for 16-bit CuPy arrays (FlashAttention-2's
algorithm, hand-written in CUDA C with `mma.sync`, `ldmatrix` and `cp.async` PTX; no CUDA
header, so it compiles wherever CuPy's NVRTC does).

The blocked cuBLAS path of `gpu_kernels.attention_forward` writes each block's scores and
probabilities to memory and reads them back four times; here they live in registers:

| kernel | grid | each warp (16 or 32 rows), per tile of keys or queries |
|---|---|---|
| `flash_forward` | query blocks x heads | S = Q K^T, online softmax, O += P V; O, lse |
| `flash_delta` | rows | delta = rowsum(dO * O) |
| `flash_backward_dq` | query blocks x heads | P from lse, dS = P (dO V^T - delta), dQ += dS K |
| `flash_backward_dkdv` | key blocks x heads | P^T, dV += P^T dO, dS^T likewise, dK += dS^T Q |

dQ and dK/dV come from two kernels that each recompute P, not from one with atomic adds:
every gradient is written once, in the model's 16 bits, straight into d_qkv's layout.

Layouts: Q, K and V are read in place from the packed (B,T,3,H,D) activations and O is
written as (B,T,H,D), so no head transposes run. A warp holds its own rows of Q (or K and
V) as A fragments for the whole kernel; tiles of the other operand are copied to shared
memory by `cp.async`, double-buffered (tile j+1 is in flight while tile j is used), with
rows padded by 16 bytes so that the 8 rows an `ldmatrix` reads fall on different banks.
`ldmatrix.trans` gives the B fragments of an operand that a product needs transposed (V in
P V, K in dS K, Q and dO in the dK/dV products), so no tile is ever transposed in memory.
Scores are in the log2 domain (one `ex2` instruction each); the saved log-sum-exp is too.

Fragment layouts (PTX ISA, `mma.m16n8k16`, g = lane / 4, t = lane % 4): A rows g and g+8,
columns 2t, 2t+1 and 2t+8, 2t+9; B (k x n) columns g, rows 2t, 2t+1 and 2t+8, 2t+9; C rows
g and g+8, columns 2t, 2t+1. So a C tile pair converted to 16 bits is the next GEMM's A.

Measured on an H100 at GPT-2 124M's shape (batch 16, 12 heads of 64, T = 1024; bf16):
| kernel, rows a warp | 16 | 32 |
|---|---|---|
| forward | 0.216 ms | **0.198** |
| dQ | **0.225** | 0.231 |
| dK, dV | **0.293** | 0.339 (255 registers, spills) |
Forward and backward 0.76 ms, against 1.83 for the blocked cuBLAS path and 0.46 for
torch's `scaled_dot_product_attention`. The first version (synchronous tile loads,
transposed copies in shared memory, 2-byte stores) took 1.25 ms with the same arithmetic:
its outputs and these are bit for bit the same.
"""
import math
import os

import numpy as np

try:
    import cupy
except ImportError:
    cupy = None

HEAD_DIMS = (16, 32, 64)  # 128 would need more shared memory than a static array may take
# Rows (queries, or keys for dK/dV) a warp owns, per kernel, 16 or 32: each fragment read
# from shared memory feeds rows / 16 products, at the price of registers (occupancy). A
# block is 4 warps.
WARP_ROWS = {"flash_forward": 32, "flash_backward_dq": 16, "flash_backward_dkdv": 16}
# GPT_MPI_ATTENTION=blocked keeps 16-bit attention on the cuBLAS path (to compare the two)
_CHOICE = os.environ.get("GPT_MPI_ATTENTION", "flash")
if _CHOICE not in ("flash", "blocked"):
    raise ValueError(f"GPT_MPI_ATTENTION={_CHOICE!r}: expected flash or blocked")
ENABLED = (cupy is not None and os.environ.get("GPT_MPI_KERNELS", "auto") != "numpy"
           and _CHOICE == "flash")

_SOURCE = r"""
typedef unsigned short u16;
typedef unsigned int u32;

#define MT (WARP_ROWS / 16)  // m-tiles of 16 rows a warp owns
#define BR (4 * WARP_ROWS)   // rows a block owns: queries (forward, dQ) or keys (dK, dV)
#define BK 64                // keys a forward tile holds; queries a dK/dV tile holds
#define BKQ (64 / MT)        // keys a dQ tile holds (its registers hold S and dP)
#define DP (D_HEAD + 8)      // a tile's row pitch: 16 bytes of padding
#define NEG_INF __int_as_float(0xff800000)

#if defined(BF16)
#define MMA "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r; }
__device__ __forceinline__ float to_float(u16 x) { return __uint_as_float(((u32)x) << 16); }
#else
#define MMA "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r; }
__device__ __forceinline__ float to_float(u16 x) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x)); return f; }
#endif

// 2^x in one instruction (2 ulp; -inf -> 0): softmax's exponentials are a bottleneck
__device__ __forceinline__ float fast_exp2(float x) {
    float y; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }

// d += a b: a 16 x 16 (4 registers of 2), b 16 x 8 (2 registers), d 16 x 8 in float32
__device__ __forceinline__ void mma(float* d, const u32* a, u32 b0, u32 b1) {
    asm(MMA "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 shared_address(const void* p) {
    u32 a;
    asm("{ .reg .u64 s; cvta.to.shared.u64 s, %1; cvt.u32.u64 %0, s; }" : "=r"(a) : "l"(p));
    return a;
}

// 16 bytes global -> shared without a trip through registers; zeros where !valid
__device__ __forceinline__ void copy16_async(u16* dst, const u16* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"(shared_address(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;"); }
// every group of copies but the newest has landed (this thread's)
__device__ __forceinline__ void wait_older_copies() {
    asm volatile("cp.async.wait_group 1;" ::: "memory"); }

// Rows row0..row0+n-1 of a (rows, D) row-major matrix into a shared (n, DP) tile, zero past
// `rows` (so that masked products stay finite). Asynchronous: see commit/wait above.
__device__ __forceinline__ void load_tile(u16* tile, const u16* m, long long stride,
                                          int row0, int rows, int n) {
    for (int i = threadIdx.x; i < n * D_HEAD / 8; i += blockDim.x) {
        int r = i / (D_HEAD / 8), c = (i % (D_HEAD / 8)) * 8;
        bool valid = row0 + r < rows;
        copy16_async(tile + r * DP + c, valid ? m + (long long)(row0 + r) * stride + c : m, valid);
    }
}

// The A fragment of rows row0..row0+15, columns col0..col0+15 of a row-major matrix in
// global memory (zero for rows past `rows`).
__device__ __forceinline__ void load_a(u32* a, const u16* m, long long stride, int row0,
                                       int rows, int col0, int g, int t) {
    const u16* p0 = m + (long long)(row0 + g) * stride + col0 + 2 * t;
    const u16* p1 = p0 + 8 * stride;
    bool in0 = row0 + g < rows, in1 = row0 + g + 8 < rows;
    a[0] = in0 ? *(const u32*)p0 : 0u;
    a[1] = in1 ? *(const u32*)p1 : 0u;
    a[2] = in0 ? *(const u32*)(p0 + 8) : 0u;
    a[3] = in1 ? *(const u32*)(p1 + 8) : 0u;
}

// B fragments of two n-tiles (n0..n0+7 in b[0..1], n0+8..n0+15 in b[2..3]) at k0..k0+15,
// in one ldmatrix: lanes 8j..8j+7 give the row addresses of 8 x 8 matrix j. `load_b_nk`
// reads a tile stored n-major ((n, k) at tile[n][k]: K for Q K^T); `load_b_kn` one stored
// k-major ((k, n) at tile[k][n]: V for P V), transposed on the way.
__device__ __forceinline__ void load_b_nk(u32* b, const u16* tile, int n0, int k0, int lane) {
    const int row = n0 + (lane & 7) + ((lane >> 4) << 3), col = k0 + (((lane >> 3) & 1) << 3);
    const u16* p = tile + row * DP + col;
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3]) : "r"(shared_address(p)));
}
__device__ __forceinline__ void load_b_kn(u32* b, const u16* tile, int n0, int k0, int lane) {
    const int row = k0 + (lane & 7) + (((lane >> 3) & 1) << 3), col = n0 + ((lane >> 4) << 3);
    const u16* p = tile + row * DP + col;
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3]) : "r"(shared_address(p)));
}

__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// C tiles 2c and 2c+1 (16 rows x 16 columns of a product) as the A fragment of the next
__device__ __forceinline__ void c_to_a(u32* a, const float (*s)[4], int c) {
    a[0] = pack2(s[2 * c][0], s[2 * c][1]);
    a[1] = pack2(s[2 * c][2], s[2 * c][3]);
    a[2] = pack2(s[2 * c + 1][0], s[2 * c + 1][1]);
    a[3] = pack2(s[2 * c + 1][2], s[2 * c + 1][3]);
}

// Rows r0 and r0 + 8 of a 16 x D accumulator (C fragments), times s0 and s1, into a
// row-major matrix; rows at or past T are skipped.
__device__ __forceinline__ void store_c(u16* m, long long stride, int r0, int T,
                                        const float (*acc)[4], float s0, float s1, int t) {
    #pragma unroll
    for (int d = 0; d < D_HEAD / 8; ++d) {
        u16* p = m + (long long)r0 * stride + d * 8 + 2 * t;
        if (r0 < T) *(u32*)p = pack2(acc[d][0] * s0, acc[d][1] * s0);
        if (r0 + 8 < T) *(u32*)(p + 8 * stride) = pack2(acc[d][2] * s1, acc[d][3] * s1);
    }
}

__device__ __forceinline__ void zero(float (*x)[4], int n) {
    #pragma unroll
    for (int i = 0; i < n; ++i) x[i][0] = x[i][1] = x[i][2] = x[i][3] = 0.f;
}

// acc[i] += s[i] @ tile for each m-tile i: s[i] holds N C tiles (16 rows x 8N columns of
// a product, taken as 16-bit A fragments), the tile is 8N rows of D stored k-major
template <int N>
__device__ __forceinline__ void add_product_with_tile(float (*acc)[D_HEAD / 8][4],
                                                      float (*s)[N][4], const u16* tile,
                                                      int lane) {
    #pragma unroll
    for (int c = 0; c < N / 2; ++c) {
        u32 a[MT][4];
        #pragma unroll
        for (int i = 0; i < MT; ++i) c_to_a(a[i], s[i], c);
        #pragma unroll
        for (int d = 0; d < D_HEAD / 8; d += 2) {
            u32 b[4];
            load_b_kn(b, tile, d * 8, c * 16, lane);
            #pragma unroll
            for (int i = 0; i < MT; ++i) {
                mma(acc[i][d], a[i], b[0], b[1]);
                mma(acc[i][d + 1], a[i], b[2], b[3]);
            }
        }
    }
}

// qkv (B,T,3,H,D) -> out (B,T,H,D), lse (B*H,T) in log2 units. Grid (query blocks, B*H).
// Tiles of K and V are double-buffered: the copy of tile j+1 runs while tile j is used.
extern "C" __global__ void __launch_bounds__(128)
flash_forward(const u16* __restrict__ qkv, u16* __restrict__ out, float* __restrict__ lse,
              int T, int H, float scale_log2) {
    __shared__ __align__(16) u16 k_tile[2][BK * DP];
    __shared__ __align__(16) u16 v_tile[2][BK * DP];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int bh = blockIdx.y, b = bh / H, h = bh % H, C = H * D_HEAD;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BR;  // the blocks with most keys first
    const int w0 = q0 + warp * WARP_ROWS;  // this warp's first row
    const long long stride = 3LL * C;
    const u16* q = qkv + (long long)b * T * stride + h * D_HEAD;
    const u16* k = q + C;
    const u16* v = q + 2 * C;
    const int keys = min(T, q0 + BR);
    load_tile(k_tile[0], k, stride, 0, T, BK);
    load_tile(v_tile[0], v, stride, 0, T, BK);
    commit_copies();

    u32 qa[MT][D_HEAD / 16][4];
    float o[MT][D_HEAD / 8][4], m[MT][2], l[MT][2];
    #pragma unroll
    for (int i = 0; i < MT; ++i) {
        #pragma unroll
        for (int c = 0; c < D_HEAD / 16; ++c)
            load_a(qa[i][c], q, stride, w0 + i * 16, T, c * 16, g, t);
        zero(o[i], D_HEAD / 8);
        m[i][0] = m[i][1] = NEG_INF;
        l[i][0] = l[i][1] = 0.f;
    }
    for (int k0 = 0, j = 0; k0 < keys; k0 += BK, j ^= 1) {
        if (k0 + BK < keys) {
            load_tile(k_tile[j ^ 1], k, stride, k0 + BK, T, BK);
            load_tile(v_tile[j ^ 1], v, stride, k0 + BK, T, BK);
        }
        commit_copies();
        wait_older_copies();
        __syncthreads();  // tile j has landed, every thread's part of it
        float s[MT][BK / 8][4];
        #pragma unroll
        for (int i = 0; i < MT; ++i) zero(s[i], BK / 8);
        #pragma unroll
        for (int n = 0; n < BK / 8; n += 2)
            #pragma unroll
            for (int c = 0; c < D_HEAD / 16; ++c) {
                u32 kb[4];
                load_b_nk(kb, k_tile[j], n * 8, c * 16, lane);
                #pragma unroll
                for (int i = 0; i < MT; ++i) {
                    mma(s[i][n], qa[i][c], kb[0], kb[1]);
                    mma(s[i][n + 1], qa[i][c], kb[2], kb[3]);
                }
            }
        // tile 0 holds key 0 <= every row, so each row's running maximum is finite
        const bool edge = k0 + BK > w0 || k0 + BK > T;
        #pragma unroll
        for (int i = 0; i < MT; ++i) {
            const int r0 = w0 + i * 16 + g;
            float mx0 = m[i][0], mx1 = m[i][1];
            #pragma unroll
            for (int n = 0; n < BK / 8; ++n)
                #pragma unroll
                for (int e = 0; e < 4; ++e) {
                    int key = k0 + n * 8 + 2 * t + (e & 1), row = r0 + (e < 2 ? 0 : 8);
                    float x = s[i][n][e] * scale_log2;
                    if (edge && (key > row || key >= T)) x = NEG_INF;
                    s[i][n][e] = x;
                    if (e < 2) mx0 = fmaxf(mx0, x); else mx1 = fmaxf(mx1, x);
                }
            mx0 = quad_max(mx0);
            mx1 = quad_max(mx1);
            const float alpha0 = fast_exp2(m[i][0] - mx0), alpha1 = fast_exp2(m[i][1] - mx1);
            m[i][0] = mx0;
            m[i][1] = mx1;
            float sum0 = 0.f, sum1 = 0.f;
            #pragma unroll
            for (int n = 0; n < BK / 8; ++n) {
                s[i][n][0] = fast_exp2(s[i][n][0] - mx0); s[i][n][1] = fast_exp2(s[i][n][1] - mx0);
                s[i][n][2] = fast_exp2(s[i][n][2] - mx1); s[i][n][3] = fast_exp2(s[i][n][3] - mx1);
                sum0 += s[i][n][0] + s[i][n][1];
                sum1 += s[i][n][2] + s[i][n][3];
            }
            l[i][0] = l[i][0] * alpha0 + sum0;
            l[i][1] = l[i][1] * alpha1 + sum1;
            #pragma unroll
            for (int d = 0; d < D_HEAD / 8; ++d) {
                o[i][d][0] *= alpha0; o[i][d][1] *= alpha0;
                o[i][d][2] *= alpha1; o[i][d][3] *= alpha1;
            }
        }
        add_product_with_tile<BK / 8>(o, s, v_tile[j], lane);  // O += P V
        __syncthreads();  // every warp is done with tile j before it is refilled
    }
    u16* y = out + (long long)b * T * C + h * D_HEAD;
    #pragma unroll
    for (int i = 0; i < MT; ++i) {
        const int r0 = w0 + i * 16 + g, r1 = r0 + 8;
        const float l0 = quad_sum(l[i][0]), l1 = quad_sum(l[i][1]);
        store_c(y, C, r0, T, o[i], 1.f / l0, 1.f / l1, t);
        if (t == 0) {
            if (r0 < T) lse[(long long)bh * T + r0] = m[i][0] + log2f(l0);
            if (r1 < T) lse[(long long)bh * T + r1] = m[i][1] + log2f(l1);
        }
    }
}

// delta (B*H,T) = rowsum(dO * O) over each head's D, both (B,T,H,D)
extern "C" __global__ void flash_delta(const u16* __restrict__ out, const u16* __restrict__ dout,
                                       float* __restrict__ delta, int T, int H, long long rows) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < rows;
         i += (long long)gridDim.x * blockDim.x) {
        const uint4* o = (const uint4*)(out + i * D_HEAD);
        const uint4* d = (const uint4*)(dout + i * D_HEAD);
        float sum = 0.f;
        for (int j = 0; j < D_HEAD / 8; ++j) {
            uint4 a = o[j], b = d[j];
            const u16* ea = (const u16*)&a;
            const u16* eb = (const u16*)&b;
            #pragma unroll
            for (int e = 0; e < 8; ++e) sum += to_float(ea[e]) * to_float(eb[e]);
        }
        long long bt = i / H;
        int h = (int)(i % H);
        long long b = bt / T, tq = bt % T;
        delta[(b * H + h) * T + tq] = sum;
    }
}

// dQ: qkv, dout (B,T,H,D), lse, delta -> the q part of dqkv (B,T,3,H,D)
extern "C" __global__ void __launch_bounds__(128)
flash_backward_dq(const u16* __restrict__ qkv, const u16* __restrict__ dout,
                  const float* __restrict__ lse, const float* __restrict__ delta,
                  u16* __restrict__ dqkv, int T, int H, float scale_log2, float scale) {
    __shared__ __align__(16) u16 k_tile[2][BKQ * DP];
    __shared__ __align__(16) u16 v_tile[2][BKQ * DP];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int bh = blockIdx.y, b = bh / H, h = bh % H, C = H * D_HEAD;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BR;
    const int w0 = q0 + warp * WARP_ROWS;
    const long long stride = 3LL * C;
    const long long head = (long long)b * T * stride + h * D_HEAD;
    const u16* q = qkv + head;
    const u16* k = q + C;
    const u16* v = q + 2 * C;
    const u16* dy = dout + (long long)b * T * C + h * D_HEAD;
    const int keys = min(T, q0 + BR);
    load_tile(k_tile[0], k, stride, 0, T, BKQ);
    load_tile(v_tile[0], v, stride, 0, T, BKQ);
    commit_copies();

    u32 qa[MT][D_HEAD / 16][4], da[MT][D_HEAD / 16][4];
    float lse_r[MT][2], delta_r[MT][2], dq[MT][D_HEAD / 8][4];
    #pragma unroll
    for (int i = 0; i < MT; ++i) {
        #pragma unroll
        for (int c = 0; c < D_HEAD / 16; ++c) {
            load_a(qa[i][c], q, stride, w0 + i * 16, T, c * 16, g, t);
            load_a(da[i][c], dy, C, w0 + i * 16, T, c * 16, g, t);
        }
        #pragma unroll
        for (int e = 0; e < 2; ++e) {
            int row = w0 + i * 16 + g + 8 * e;
            lse_r[i][e] = row < T ? lse[(long long)bh * T + row] : 0.f;
            delta_r[i][e] = row < T ? delta[(long long)bh * T + row] : 0.f;
        }
        zero(dq[i], D_HEAD / 8);
    }
    for (int k0 = 0, j = 0; k0 < keys; k0 += BKQ, j ^= 1) {
        if (k0 + BKQ < keys) {
            load_tile(k_tile[j ^ 1], k, stride, k0 + BKQ, T, BKQ);
            load_tile(v_tile[j ^ 1], v, stride, k0 + BKQ, T, BKQ);
        }
        commit_copies();
        wait_older_copies();
        __syncthreads();
        float s[MT][BKQ / 8][4], dp[MT][BKQ / 8][4];
        #pragma unroll
        for (int i = 0; i < MT; ++i) { zero(s[i], BKQ / 8); zero(dp[i], BKQ / 8); }
        #pragma unroll
        for (int n = 0; n < BKQ / 8; n += 2)
            #pragma unroll
            for (int c = 0; c < D_HEAD / 16; ++c) {
                u32 kb[4], vb[4];
                load_b_nk(kb, k_tile[j], n * 8, c * 16, lane);
                load_b_nk(vb, v_tile[j], n * 8, c * 16, lane);
                #pragma unroll
                for (int i = 0; i < MT; ++i) {
                    mma(s[i][n], qa[i][c], kb[0], kb[1]);
                    mma(s[i][n + 1], qa[i][c], kb[2], kb[3]);
                    mma(dp[i][n], da[i][c], vb[0], vb[1]);
                    mma(dp[i][n + 1], da[i][c], vb[2], vb[3]);
                }
            }
        const bool edge = k0 + BKQ > w0 || k0 + BKQ > T;
        #pragma unroll
        for (int i = 0; i < MT; ++i)
            #pragma unroll
            for (int n = 0; n < BKQ / 8; ++n)
                #pragma unroll
                for (int e = 0; e < 4; ++e) {
                    int key = k0 + n * 8 + 2 * t + (e & 1), row = w0 + i * 16 + g + (e < 2 ? 0 : 8);
                    float p = fast_exp2(s[i][n][e] * scale_log2 - lse_r[i][e / 2]);
                    if (edge && (key > row || key >= T)) p = 0.f;
                    s[i][n][e] = p * (dp[i][n][e] - delta_r[i][e / 2]);  // dS
                }
        add_product_with_tile<BKQ / 8>(dq, s, k_tile[j], lane);  // dQ += dS K
        __syncthreads();
    }
    u16* dq_out = dqkv + head;
    #pragma unroll
    for (int i = 0; i < MT; ++i)
        store_c(dq_out, stride, w0 + i * 16 + g, T, dq[i], scale, scale, t);
}

// dK, dV: the k and v parts of dqkv. Grid (key blocks, B*H); a block's keys are seen by
// the queries from its first key on, taken 64 to a tile and 16 at a time from it.
extern "C" __global__ void __launch_bounds__(128)
flash_backward_dkdv(const u16* __restrict__ qkv, const u16* __restrict__ dout,
                    const float* __restrict__ lse, const float* __restrict__ delta,
                    u16* __restrict__ dqkv, int T, int H, float scale_log2, float scale) {
    __shared__ __align__(16) u16 q_tile[2][BK * DP];
    __shared__ __align__(16) u16 do_tile[2][BK * DP];
    __shared__ float lse_s[2][BK], delta_s[2][BK];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int bh = blockIdx.y, b = bh / H, h = bh % H, C = H * D_HEAD;
    const int k0 = blockIdx.x * BR;  // the blocks with most queries first
    const int w0 = k0 + warp * WARP_ROWS;
    const long long stride = 3LL * C;
    const long long head = (long long)b * T * stride + h * D_HEAD;
    const u16* q = qkv + head;
    const u16* k = q + C;
    const u16* v = q + 2 * C;
    const u16* dy = dout + (long long)b * T * C + h * D_HEAD;
    const float* lse_h = lse + (long long)bh * T;
    const float* delta_h = delta + (long long)bh * T;
    // q0 = k0 here and below: the rows of Q and dO are tiled from this block's first key
    load_tile(q_tile[0], q, stride, k0, T, BK);
    load_tile(do_tile[0], dy, C, k0, T, BK);
    commit_copies();
    if (threadIdx.x < BK) {
        int row = k0 + threadIdx.x;
        lse_s[0][threadIdx.x] = row < T ? lse_h[row] : 0.f;
        delta_s[0][threadIdx.x] = row < T ? delta_h[row] : 0.f;
    }

    u32 ka[MT][D_HEAD / 16][4], va[MT][D_HEAD / 16][4];
    float dk[MT][D_HEAD / 8][4], dv[MT][D_HEAD / 8][4];
    #pragma unroll
    for (int i = 0; i < MT; ++i) {
        #pragma unroll
        for (int c = 0; c < D_HEAD / 16; ++c) {
            load_a(ka[i][c], k, stride, w0 + i * 16, T, c * 16, g, t);
            load_a(va[i][c], v, stride, w0 + i * 16, T, c * 16, g, t);
        }
        zero(dk[i], D_HEAD / 8);
        zero(dv[i], D_HEAD / 8);
    }
    for (int q0 = k0, j = 0; q0 < T; q0 += BK, j ^= 1) {
        if (q0 + BK < T) {
            load_tile(q_tile[j ^ 1], q, stride, q0 + BK, T, BK);
            load_tile(do_tile[j ^ 1], dy, C, q0 + BK, T, BK);
            if (threadIdx.x < BK) {
                int row = q0 + BK + threadIdx.x;
                lse_s[j ^ 1][threadIdx.x] = row < T ? lse_h[row] : 0.f;
                delta_s[j ^ 1][threadIdx.x] = row < T ? delta_h[row] : 0.f;
            }
        }
        commit_copies();
        wait_older_copies();
        __syncthreads();
        const bool edge = q0 < w0 + WARP_ROWS || q0 + BK > T;
        #pragma unroll
        for (int c = 0; c < BK / 16; ++c) {  // 16 queries at a time: S^T, dP^T 16 x 16 per m-tile
            float st[MT][2][4], dpt[MT][2][4];
            #pragma unroll
            for (int i = 0; i < MT; ++i) { zero(st[i], 2); zero(dpt[i], 2); }
            #pragma unroll
            for (int e = 0; e < D_HEAD / 16; ++e) {
                u32 qb[4], ob[4];
                load_b_nk(qb, q_tile[j], c * 16, e * 16, lane);
                load_b_nk(ob, do_tile[j], c * 16, e * 16, lane);
                #pragma unroll
                for (int i = 0; i < MT; ++i) {
                    mma(st[i][0], ka[i][e], qb[0], qb[1]);
                    mma(st[i][1], ka[i][e], qb[2], qb[3]);
                    mma(dpt[i][0], va[i][e], ob[0], ob[1]);
                    mma(dpt[i][1], va[i][e], ob[2], ob[3]);
                }
            }
            u32 pa[MT][4], sa[MT][4];
            #pragma unroll
            for (int i = 0; i < MT; ++i) {
                #pragma unroll
                for (int n = 0; n < 2; ++n)
                    #pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        int col = c * 16 + n * 8 + 2 * t + (e & 1), query = q0 + col;
                        int key = w0 + i * 16 + g + (e < 2 ? 0 : 8);
                        float p = fast_exp2(st[i][n][e] * scale_log2 - lse_s[j][col]);
                        if (edge && (query < key || query >= T)) p = 0.f;
                        st[i][n][e] = p;
                        dpt[i][n][e] = p * (dpt[i][n][e] - delta_s[j][col]);  // dS^T
                    }
                c_to_a(pa[i], st[i], 0);
                c_to_a(sa[i], dpt[i], 0);
            }
            #pragma unroll
            for (int d = 0; d < D_HEAD / 8; d += 2) {
                u32 ob[4], qb[4];
                load_b_kn(ob, do_tile[j], d * 8, c * 16, lane);
                load_b_kn(qb, q_tile[j], d * 8, c * 16, lane);
                #pragma unroll
                for (int i = 0; i < MT; ++i) {
                    mma(dv[i][d], pa[i], ob[0], ob[1]);
                    mma(dv[i][d + 1], pa[i], ob[2], ob[3]);
                    mma(dk[i][d], sa[i], qb[0], qb[1]);
                    mma(dk[i][d + 1], sa[i], qb[2], qb[3]);
                }
            }
        }
        __syncthreads();
    }
    u16* dk_out = dqkv + head + C;
    u16* dv_out = dqkv + head + 2 * C;
    #pragma unroll
    for (int i = 0; i < MT; ++i) {
        store_c(dk_out, stride, w0 + i * 16 + g, T, dk[i], scale, scale, t);
        store_c(dv_out, stride, w0 + i * 16 + g, T, dv[i], 1.f, 1.f, t);
    }
}
"""

_TYPES = {np.dtype(np.float16): "F16"}
try:
    import ml_dtypes
    _TYPES[np.dtype(ml_dtypes.bfloat16)] = "BF16"
except ImportError:
    pass

_MODULES = {}


def _module(dtype, head_dim, warp_rows):
    key = (_TYPES[np.dtype(dtype)], head_dim, warp_rows)
    module = _MODULES.get(key)
    if module is None:
        module = _MODULES[key] = cupy.RawModule(
            code=f"#define {key[0]}\n#define D_HEAD {head_dim}\n#define WARP_ROWS {warp_rows}\n"
            + _SOURCE, options=("--std=c++14",))
    return module


def _launch(name, dtype, head_dim, T, BH, args):
    """Runs kernel `name` over (row blocks of T, BH heads), compiled for its WARP_ROWS."""
    rows = WARP_ROWS[name]
    grid = ((T + 4 * rows - 1) // (4 * rows), BH)
    _module(dtype, head_dim, rows).get_function(name)(grid, (128,), args)


def _aligned(x):
    return x.flags.c_contiguous and x.data.ptr % 16 == 0


def applies(qkv, n_head):
    """Whether the flash kernels take this (B,T,3C) input: a 16-bit CuPy array, contiguous
    and 16-byte aligned, heads of 16, 32 or 64."""
    if not (ENABLED and isinstance(qkv, cupy.ndarray) and qkv.dtype in _TYPES
            and qkv.ndim == 3 and qkv.shape[2] % (3 * n_head) == 0):
        return False
    return qkv.shape[2] // (3 * n_head) in HEAD_DIMS and _aligned(qkv)


def forward(qkv, n_head):
    """(B,T,3C) -> y (B,T,C), lse (B*H,T) float32 (log2 of each row's softmax sum)."""
    B, T, C3 = qkv.shape
    H, D = n_head, C3 // (3 * n_head)
    y = cupy.empty((B, T, H * D), qkv.dtype)
    lse = cupy.empty((B * H, T), np.float32)
    scale_log2 = np.float32(math.log2(math.e) / math.sqrt(D))
    _launch("flash_forward", qkv.dtype, D, T, B * H,
            (qkv, y, lse, np.int32(T), np.int32(H), scale_log2))
    return y, lse


def backward(qkv, y, lse, dout, n_head):
    """dout (B,T,C) -> d_qkv (B,T,3C), from the forward's input, output and lse."""
    B, T, C3 = qkv.shape
    H, D = n_head, C3 // (3 * n_head)
    if not _aligned(dout):
        dout = cupy.array(dout, order="C")  # a fresh allocation is aligned
    rows = B * T * H
    delta = cupy.empty((B * H, T), np.float32)
    _module(qkv.dtype, D, WARP_ROWS["flash_forward"]).get_function("flash_delta")(
        (max(1, min((rows + 255) // 256, 65535)),), (256,),  # a thread a row, grid-stride
        (y, dout, delta, np.int32(T), np.int32(H), np.int64(rows)))
    dqkv = cupy.empty_like(qkv)
    scale = 1.0 / math.sqrt(D)
    args = (qkv, dout, lse, delta, dqkv, np.int32(T), np.int32(H),
            np.float32(scale * math.log2(math.e)), np.float32(scale))
    _launch("flash_backward_dq", qkv.dtype, D, T, B * H, args)
    _launch("flash_backward_dkdv", qkv.dtype, D, T, B * H, args)
    return dqkv
