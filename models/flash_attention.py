"""Causal flash attention on tensor cores, for 16-bit CuPy arrays (FlashAttention-2's
algorithm, hand-written in CUDA C with `mma.sync` PTX; no CUDA header, so it compiles
wherever CuPy's NVRTC does).

The blocked cuBLAS path of `gpu_kernels.attention_forward` writes each block's scores and
probabilities to memory and reads them back four times; here they live in registers:

| kernel | grid | each warp (16 rows), per tile of 64 keys or queries |
|---|---|---|
| `flash_forward` | query blocks x heads | S = Q K^T, online softmax, O += P V; O, lse |
| `flash_delta` | rows | delta = rowsum(dO * O) |
| `flash_backward_dq` | query blocks x heads | P from lse, dS = P (dO V^T - delta), dQ += dS K |
| `flash_backward_dkdv` | key blocks x heads | P^T, dV += P^T dO, dS^T likewise, dK += dS^T Q |

dQ and dK/dV come from two kernels that each recompute P, not from one with atomic adds:
every gradient is written once, in the model's 16 bits, straight into d_qkv's layout.

Layouts: Q, K and V are read in place from the packed (B,T,3,H,D) activations and O is
written as (B,T,H,D), so no head transposes run. Tiles of 64 rows go to shared memory with
rows padded by 8 elements (16 bytes), which puts the 8 rows a fragment load touches on
different banks; operands a GEMM needs as its transpose get a transposed copy in shared
memory. Scores are in the log2 domain (`exp2`); the saved log-sum-exp is too.

Fragment layouts (PTX ISA, `mma.m16n8k16`, g = lane / 4, t = lane % 4): A rows g and g+8,
columns 2t, 2t+1 and 2t+8, 2t+9; B (k x n) columns g, rows 2t, 2t+1 and 2t+8, 2t+9; C rows
g and g+8, columns 2t, 2t+1. So a C tile pair converted to 16 bits is the next GEMM's A.
"""
import math
import os

import numpy as np

try:
    import cupy
except ImportError:
    cupy = None

HEAD_DIMS = (16, 32, 64)  # 128 would need more shared memory than a static array may take
BLOCK = 64  # queries (forward, dQ) or keys (dK, dV) per thread block: 4 warps of 16 rows
ENABLED = (cupy is not None and os.environ.get("GPT_MPI_KERNELS", "auto") != "numpy"
           and os.environ.get("GPT_MPI_ATTENTION", "flash") == "flash")

_SOURCE = r"""
typedef unsigned short u16;
typedef unsigned int u32;

#define BQ 64
#define BK 64
#define DP (D_HEAD + 8)
#define RP (64 + 8)
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

// d += a b: a 16 x 16 (4 registers of 2), b 16 x 8 (2 registers), d 16 x 8 in float32
__device__ __forceinline__ void mma(float* d, const u32* a, u32 b0, u32 b1) {
    asm(MMA "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
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

// The B fragment (k0..k0+15) x (n0..n0+7) of a shared tile stored n-major: (k, n) at
// tile[n * pitch + k].
__device__ __forceinline__ void load_b(u32& b0, u32& b1, const u16* tile, int pitch, int n0,
                                       int k0, int g, int t) {
    const u16* p = tile + (n0 + g) * pitch + k0 + 2 * t;
    b0 = *(const u32*)p;
    b1 = *(const u32*)(p + 8);
}

// Rows row0..row0+63 of a (rows, D) row-major matrix into shared memory: `tile` as is
// (64, DP), `tile_t` transposed (D, RP); either may be null. Zero past `rows`, so that
// masked products stay finite. A warp takes 32 consecutive rows of one 8-column piece:
// its 16-byte stores and its transposed 2-byte stores are free of bank conflicts.
__device__ __forceinline__ void load_tile(u16* tile, u16* tile_t, const u16* m,
                                          long long stride, int row0, int rows) {
    for (int i = threadIdx.x; i < 64 * D_HEAD / 8; i += blockDim.x) {
        int r = i % 64, c = (i / 64) * 8;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (row0 + r < rows) v = *(const uint4*)(m + (long long)(row0 + r) * stride + c);
        if (tile) *(uint4*)(tile + r * DP + c) = v;
        if (tile_t) {
            const u16* e = (const u16*)&v;
            for (int j = 0; j < 8; ++j) tile_t[(c + j) * RP + r] = e[j];
        }
    }
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

// qkv (B,T,3,H,D) -> out (B,T,H,D), lse (B*H,T) in log2 units. Grid (query blocks, B*H).
extern "C" __global__ void __launch_bounds__(128)
flash_forward(const u16* __restrict__ qkv, u16* __restrict__ out, float* __restrict__ lse,
              int T, int H, float scale_log2) {
    __shared__ __align__(16) u16 k_tile[64 * DP];
    __shared__ __align__(16) u16 v_t[D_HEAD * RP];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int bh = blockIdx.y, b = bh / H, h = bh % H, C = H * D_HEAD;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;  // the blocks with most keys first
    const long long stride = 3LL * C;
    const u16* q = qkv + (long long)b * T * stride + h * D_HEAD;
    const u16* k = q + C;
    const u16* v = q + 2 * C;
    const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;

    u32 qa[D_HEAD / 16][4];
    for (int c = 0; c < D_HEAD / 16; ++c) load_a(qa[c], q, stride, q0 + warp * 16, T, c * 16, g, t);
    float o[D_HEAD / 8][4];
    for (int d = 0; d < D_HEAD / 8; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
    const int keys = min(T, q0 + BQ);
    for (int k0 = 0; k0 < keys; k0 += BK) {
        __syncthreads();  // every warp is done with the previous tile
        load_tile(k_tile, nullptr, k, stride, k0, T);
        load_tile(nullptr, v_t, v, stride, k0, T);
        __syncthreads();
        float s[BK / 8][4];
        for (int n = 0; n < BK / 8; ++n) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
            for (int c = 0; c < D_HEAD / 16; ++c) {
                u32 b0, b1;
                load_b(b0, b1, k_tile, DP, n * 8, c * 16, g, t);
                mma(s[n], qa[c], b0, b1);
            }
        }
        // every row sees key k0 <= q0 <= row, so each row's maximum is finite
        const bool edge = k0 + BK > q0 || k0 + BK > T;
        float mx0 = m0, mx1 = m1;
        for (int n = 0; n < BK / 8; ++n)
            for (int j = 0; j < 4; ++j) {
                int key = k0 + n * 8 + 2 * t + (j & 1), row = j < 2 ? r0 : r1;
                float x = s[n][j] * scale_log2;
                if (edge && (key > row || key >= T)) x = NEG_INF;
                s[n][j] = x;
                if (j < 2) mx0 = fmaxf(mx0, x); else mx1 = fmaxf(mx1, x);
            }
        mx0 = quad_max(mx0);
        mx1 = quad_max(mx1);
        const float alpha0 = exp2f(m0 - mx0), alpha1 = exp2f(m1 - mx1);
        m0 = mx0;
        m1 = mx1;
        l0 *= alpha0;
        l1 *= alpha1;
        for (int d = 0; d < D_HEAD / 8; ++d) {
            o[d][0] *= alpha0; o[d][1] *= alpha0; o[d][2] *= alpha1; o[d][3] *= alpha1;
        }
        for (int n = 0; n < BK / 8; ++n) {
            s[n][0] = exp2f(s[n][0] - m0); s[n][1] = exp2f(s[n][1] - m0);
            s[n][2] = exp2f(s[n][2] - m1); s[n][3] = exp2f(s[n][3] - m1);
            l0 += s[n][0] + s[n][1];
            l1 += s[n][2] + s[n][3];
        }
        for (int c = 0; c < BK / 16; ++c) {
            u32 pa[4];
            c_to_a(pa, s, c);
            for (int d = 0; d < D_HEAD / 8; ++d) {
                u32 b0, b1;
                load_b(b0, b1, v_t, RP, d * 8, c * 16, g, t);
                mma(o[d], pa, b0, b1);
            }
        }
    }
    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    u16* y = out + (long long)b * T * C + h * D_HEAD;
    for (int d = 0; d < D_HEAD / 8; ++d) {
        int col = d * 8 + 2 * t;
        if (r0 < T) *(u32*)(y + (long long)r0 * C + col) = pack2(o[d][0] / l0, o[d][1] / l0);
        if (r1 < T) *(u32*)(y + (long long)r1 * C + col) = pack2(o[d][2] / l1, o[d][3] / l1);
    }
    if (t == 0) {
        if (r0 < T) lse[(long long)bh * T + r0] = m0 + log2f(l0);
        if (r1 < T) lse[(long long)bh * T + r1] = m1 + log2f(l1);
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
    __shared__ __align__(16) u16 k_tile[64 * DP];
    __shared__ __align__(16) u16 v_tile[64 * DP];
    __shared__ __align__(16) u16 k_t[D_HEAD * RP];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int bh = blockIdx.y, b = bh / H, h = bh % H, C = H * D_HEAD;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;
    const long long stride = 3LL * C;
    const long long head = (long long)b * T * stride + h * D_HEAD;
    const u16* q = qkv + head;
    const u16* k = q + C;
    const u16* v = q + 2 * C;
    const u16* dy = dout + (long long)b * T * C + h * D_HEAD;
    const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;

    u32 qa[D_HEAD / 16][4], da[D_HEAD / 16][4];
    for (int c = 0; c < D_HEAD / 16; ++c) {
        load_a(qa[c], q, stride, q0 + warp * 16, T, c * 16, g, t);
        load_a(da[c], dy, C, q0 + warp * 16, T, c * 16, g, t);
    }
    const float lse0 = r0 < T ? lse[(long long)bh * T + r0] : 0.f;
    const float lse1 = r1 < T ? lse[(long long)bh * T + r1] : 0.f;
    const float delta0 = r0 < T ? delta[(long long)bh * T + r0] : 0.f;
    const float delta1 = r1 < T ? delta[(long long)bh * T + r1] : 0.f;
    float dq[D_HEAD / 8][4];
    for (int d = 0; d < D_HEAD / 8; ++d) dq[d][0] = dq[d][1] = dq[d][2] = dq[d][3] = 0.f;
    const int keys = min(T, q0 + BQ);
    for (int k0 = 0; k0 < keys; k0 += BK) {
        __syncthreads();
        load_tile(k_tile, k_t, k, stride, k0, T);
        load_tile(v_tile, nullptr, v, stride, k0, T);
        __syncthreads();
        float s[BK / 8][4], dp[BK / 8][4];
        for (int n = 0; n < BK / 8; ++n) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
            dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.f;
            for (int c = 0; c < D_HEAD / 16; ++c) {
                u32 b0, b1;
                load_b(b0, b1, k_tile, DP, n * 8, c * 16, g, t);
                mma(s[n], qa[c], b0, b1);
                load_b(b0, b1, v_tile, DP, n * 8, c * 16, g, t);
                mma(dp[n], da[c], b0, b1);
            }
        }
        const bool edge = k0 + BK > q0 || k0 + BK > T;
        for (int n = 0; n < BK / 8; ++n)
            for (int j = 0; j < 4; ++j) {
                int key = k0 + n * 8 + 2 * t + (j & 1), row = j < 2 ? r0 : r1;
                float p = exp2f(s[n][j] * scale_log2 - (j < 2 ? lse0 : lse1));
                if (edge && (key > row || key >= T)) p = 0.f;
                s[n][j] = p * (dp[n][j] - (j < 2 ? delta0 : delta1));  // dS
            }
        for (int c = 0; c < BK / 16; ++c) {
            u32 sa[4];
            c_to_a(sa, s, c);
            for (int d = 0; d < D_HEAD / 8; ++d) {
                u32 b0, b1;
                load_b(b0, b1, k_t, RP, d * 8, c * 16, g, t);
                mma(dq[d], sa, b0, b1);
            }
        }
    }
    u16* dq_out = dqkv + head;
    for (int d = 0; d < D_HEAD / 8; ++d) {
        int col = d * 8 + 2 * t;
        if (r0 < T) *(u32*)(dq_out + r0 * stride + col) = pack2(dq[d][0] * scale, dq[d][1] * scale);
        if (r1 < T) *(u32*)(dq_out + r1 * stride + col) = pack2(dq[d][2] * scale, dq[d][3] * scale);
    }
}

// dK, dV: the k and v parts of dqkv. Grid (key blocks, B*H); a block's 64 keys are seen by
// the queries from its first key on.
extern "C" __global__ void __launch_bounds__(128)
flash_backward_dkdv(const u16* __restrict__ qkv, const u16* __restrict__ dout,
                    const float* __restrict__ lse, const float* __restrict__ delta,
                    u16* __restrict__ dqkv, int T, int H, float scale_log2, float scale) {
    __shared__ __align__(16) u16 q_tile[64 * DP];
    __shared__ __align__(16) u16 q_t[D_HEAD * RP];
    __shared__ __align__(16) u16 do_tile[64 * DP];
    __shared__ __align__(16) u16 do_t[D_HEAD * RP];
    __shared__ float lse_s[BQ], delta_s[BQ];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int bh = blockIdx.y, b = bh / H, h = bh % H, C = H * D_HEAD;
    const int k0 = blockIdx.x * BK;  // the blocks with most queries first
    const long long stride = 3LL * C;
    const long long head = (long long)b * T * stride + h * D_HEAD;
    const u16* q = qkv + head;
    const u16* k = q + C;
    const u16* v = q + 2 * C;
    const u16* dy = dout + (long long)b * T * C + h * D_HEAD;
    const int kr0 = k0 + warp * 16 + g, kr1 = kr0 + 8;

    u32 ka[D_HEAD / 16][4], va[D_HEAD / 16][4];
    for (int c = 0; c < D_HEAD / 16; ++c) {
        load_a(ka[c], k, stride, k0 + warp * 16, T, c * 16, g, t);
        load_a(va[c], v, stride, k0 + warp * 16, T, c * 16, g, t);
    }
    float dk[D_HEAD / 8][4], dv[D_HEAD / 8][4];
    for (int d = 0; d < D_HEAD / 8; ++d) {
        dk[d][0] = dk[d][1] = dk[d][2] = dk[d][3] = 0.f;
        dv[d][0] = dv[d][1] = dv[d][2] = dv[d][3] = 0.f;
    }
    for (int q0 = k0; q0 < T; q0 += BQ) {
        __syncthreads();
        load_tile(q_tile, q_t, q, stride, q0, T);
        load_tile(do_tile, do_t, dy, C, q0, T);
        if (threadIdx.x < BQ) {
            int row = q0 + threadIdx.x;
            lse_s[threadIdx.x] = row < T ? lse[(long long)bh * T + row] : 0.f;
            delta_s[threadIdx.x] = row < T ? delta[(long long)bh * T + row] : 0.f;
        }
        __syncthreads();
        float st[BQ / 8][4], dpt[BQ / 8][4];  // S^T, dP^T: 16 keys x 64 queries
        for (int n = 0; n < BQ / 8; ++n) {
            st[n][0] = st[n][1] = st[n][2] = st[n][3] = 0.f;
            dpt[n][0] = dpt[n][1] = dpt[n][2] = dpt[n][3] = 0.f;
            for (int c = 0; c < D_HEAD / 16; ++c) {
                u32 b0, b1;
                load_b(b0, b1, q_tile, DP, n * 8, c * 16, g, t);
                mma(st[n], ka[c], b0, b1);
                load_b(b0, b1, do_tile, DP, n * 8, c * 16, g, t);
                mma(dpt[n], va[c], b0, b1);
            }
        }
        const bool edge = q0 < k0 + BK || q0 + BQ > T;
        for (int n = 0; n < BQ / 8; ++n)
            for (int j = 0; j < 4; ++j) {
                int col = n * 8 + 2 * t + (j & 1), query = q0 + col, key = j < 2 ? kr0 : kr1;
                float p = exp2f(st[n][j] * scale_log2 - lse_s[col]);
                if (edge && (query < key || query >= T)) p = 0.f;
                st[n][j] = p;
                dpt[n][j] = p * (dpt[n][j] - delta_s[col]);  // dS^T
            }
        for (int c = 0; c < BQ / 16; ++c) {
            u32 pa[4], sa[4];
            c_to_a(pa, st, c);
            c_to_a(sa, dpt, c);
            for (int d = 0; d < D_HEAD / 8; ++d) {
                u32 b0, b1;
                load_b(b0, b1, do_t, RP, d * 8, c * 16, g, t);
                mma(dv[d], pa, b0, b1);
                load_b(b0, b1, q_t, RP, d * 8, c * 16, g, t);
                mma(dk[d], sa, b0, b1);
            }
        }
    }
    u16* dk_out = dqkv + head + C;
    u16* dv_out = dqkv + head + 2 * C;
    for (int d = 0; d < D_HEAD / 8; ++d) {
        int col = d * 8 + 2 * t;
        if (kr0 < T) {
            *(u32*)(dk_out + kr0 * stride + col) = pack2(dk[d][0] * scale, dk[d][1] * scale);
            *(u32*)(dv_out + kr0 * stride + col) = pack2(dv[d][0], dv[d][1]);
        }
        if (kr1 < T) {
            *(u32*)(dk_out + kr1 * stride + col) = pack2(dk[d][2] * scale, dk[d][3] * scale);
            *(u32*)(dv_out + kr1 * stride + col) = pack2(dv[d][2], dv[d][3]);
        }
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


def _kernel(name, dtype, head_dim):
    key = (_TYPES[np.dtype(dtype)], head_dim)
    module = _MODULES.get(key)
    if module is None:
        module = _MODULES[key] = cupy.RawModule(
            code=f"#define {key[0]}\n#define D_HEAD {head_dim}\n" + _SOURCE,
            options=("--std=c++14",))
    return module.get_function(name)


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
    _kernel("flash_forward", qkv.dtype, D)(
        ((T + BLOCK - 1) // BLOCK, B * H), (128,),
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
    _kernel("flash_delta", qkv.dtype, D)(
        (max(1, min((rows + 255) // 256, 65535)),), (256,),
        (y, dout, delta, np.int32(T), np.int32(H), np.int64(rows)))
    dqkv = cupy.empty_like(qkv)
    scale = 1.0 / math.sqrt(D)
    args = (qkv, dout, lse, delta, dqkv, np.int32(T), np.int32(H),
            np.float32(scale * math.log2(math.e)), np.float32(scale))
    blocks = ((T + BLOCK - 1) // BLOCK, B * H)
    _kernel("flash_backward_dq", qkv.dtype, D)(blocks, (128,), args)
    _kernel("flash_backward_dkdv", qkv.dtype, D)(blocks, (128,), args)
    return dqkv
