// Fused kernels of the CUDA forward pass (see fused.rs): each replaces a chain of small tensor
// ops whose launches, not their arithmetic, set the time of a decode step. Arithmetic is in
// f32 whatever the storage type; every output is rounded once.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}

// Eight consecutive elements as floats, in one 16-byte load (two for f32): `p` is aligned to
// eight elements.
__device__ __forceinline__ void load8(const float *p, float *o) {
    const float4 a = *reinterpret_cast<const float4 *>(p);
    const float4 b = *reinterpret_cast<const float4 *>(p + 4);
    o[0] = a.x, o[1] = a.y, o[2] = a.z, o[3] = a.w, o[4] = b.x, o[5] = b.y, o[6] = b.z, o[7] = b.w;
}
__device__ __forceinline__ void load8(const __half *p, float *o) {
    const uint4 u = *reinterpret_cast<const uint4 *>(p);
    const __half2 *h = reinterpret_cast<const __half2 *>(&u);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const float2 f = __half22float2(h[k]);
        o[2 * k] = f.x, o[2 * k + 1] = f.y;
    }
}
__device__ __forceinline__ void load8(const __nv_bfloat16 *p, float *o) {
    const uint4 u = *reinterpret_cast<const uint4 *>(p);
    const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&u);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const float2 f = __bfloat1622float2(h[k]);
        o[2 * k] = f.x, o[2 * k + 1] = f.y;
    }
}

__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o));
    return x;
}

// Sum (or max) over the block; `scratch` holds one float per warp. Every thread gets the result.
template <bool MAX>
__device__ float block_reduce(float x, float *scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    x = MAX ? warp_max(x) : warp_sum(x);
    __syncthreads();
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < warps ? scratch[lane] : (MAX ? -INFINITY : 0.0f);
    return MAX ? warp_max(x) : warp_sum(x);
}

// x_out = x + y (rounded to T, as the residual stream is kept) and h = RMSNorm(x_out) * w.
// Without y, x is only normalised. One block per row; with `vec` (cols % 8 == 0 and every
// pointer 16-byte aligned) and a row that fits (cols <= 8 * blockDim * ROW_CHUNKS), a thread
// loads 8 columns at a time and keeps them in registers between the two passes.
#define ROW_CHUNKS 4
template <typename T>
__device__ void add_rms_norm(const T *__restrict__ x, const T *__restrict__ y,
                             const float *__restrict__ w, T *__restrict__ x_out, T *__restrict__ h,
                             int cols, float eps, int vec) {
    __shared__ float scratch[32];
    const size_t row = (size_t)blockIdx.x * cols;
    float sq = 0.0f;
    if (vec && cols <= 8 * (int)blockDim.x * ROW_CHUNKS) {
        float v[ROW_CHUNKS][8];
#pragma unroll
        for (int k = 0; k < ROW_CHUNKS; ++k) {
            const int c = 8 * (threadIdx.x + k * blockDim.x);
            if (c >= cols) break;
            load8(x + row + c, v[k]);
            if (y != nullptr) {
                float b[8];
                load8(y + row + c, b);
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const T sum = from_f32<T>(v[k][e] + b[e]);
                    x_out[row + c + e] = sum;
                    v[k][e] = to_f32(sum);
                }
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) sq += v[k][e] * v[k][e];
        }
        const float scale = rsqrtf(block_reduce<false>(sq, scratch) / cols + eps);
#pragma unroll
        for (int k = 0; k < ROW_CHUNKS; ++k) {
            const int c = 8 * (threadIdx.x + k * blockDim.x);
            if (c >= cols) break;
#pragma unroll
            for (int e = 0; e < 8; ++e) h[row + c + e] = from_f32<T>(v[k][e] * scale * w[c + e]);
        }
        return;
    }
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = to_f32(x[row + c]);
        if (y != nullptr) {
            const T sum = from_f32<T>(v + to_f32(y[row + c]));
            x_out[row + c] = sum;
            v = to_f32(sum);
        }
        sq += v * v;
    }
    const float scale = rsqrtf(block_reduce<false>(sq, scratch) / cols + eps);
    const T *src = y != nullptr ? x_out : x;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        h[row + c] = from_f32<T>(to_f32(src[row + c]) * scale * w[c]);
    }
}

// Rotates the Q and K heads of each packed token's QKV row by its position and writes Q to
// q_out (tokens, n_heads, head_dim), K and V into the token's cache slot of the pools
// (n_kv_heads, n_slots, head_dim). One block per token.
template <typename T>
__device__ void rope_write_kv(const T *qkv, const T *cos, const T *sin, const uint32_t *positions,
                              const uint32_t *slots, T *q_out, T *k_pool, T *v_pool, int n_heads,
                              int n_kv_heads, int head_dim, size_t n_slots, int interleaved) {
    const int t = blockIdx.x, half = head_dim / 2;
    const T *x = qkv + (size_t)t * (n_heads + 2 * n_kv_heads) * head_dim;
    const T *c = cos + (size_t)positions[t] * half;
    const T *s = sin + (size_t)positions[t] * half;
    const size_t slot = slots[t];
    for (int i = threadIdx.x; i < (n_heads + n_kv_heads) * half; i += blockDim.x) {
        const int head = i / half, j = i % half;
        const int a = interleaved ? 2 * j : j, b = interleaved ? 2 * j + 1 : j + half;
        const float x0 = to_f32(x[head * head_dim + a]), x1 = to_f32(x[head * head_dim + b]);
        const float cj = to_f32(c[j]), sj = to_f32(s[j]);
        T *o = head < n_heads ? q_out + ((size_t)t * n_heads + head) * head_dim
                              : k_pool + ((size_t)(head - n_heads) * n_slots + slot) * head_dim;
        o[a] = from_f32<T>(x0 * cj - x1 * sj);
        o[b] = from_f32<T>(x0 * sj + x1 * cj);
    }
    const T *v = x + (n_heads + n_kv_heads) * head_dim;
    for (int i = threadIdx.x; i < n_kv_heads * head_dim; i += blockDim.x) {
        const int kh = i / head_dim, d = i % head_dim;
        v_pool[((size_t)kh * n_slots + slot) * head_dim + d] = v[i];
    }
}

// Attention of single-token queries over their paged context: block (i, head) reads query row
// rows[i] of q (tokens, n_heads, head_dim) and the first context[i] tokens of the blocks listed
// at tables[table_start[i]..], and writes its head of row rows[i] of out (tokens, n_heads *
// head_dim). head_dim is a multiple of 8 (rows are read 8 elements at a time).
//
// Decode attention is bound by the latency of its loads, not their bytes (a few hundred KiB per
// layer), so every load is independent of the others in flight: the block table is staged in
// shared memory first, each thread scores whole keys (its own loads, no reduction chain), and
// the V sum splits the context into as many parts as the block has threads per head_dim.
// Shared memory (dynamic, see fused.rs): query, per-part sums, reduction scratch, table, scores.
template <typename T>
__device__ void paged_decode_attention(const T *__restrict__ q, const T *__restrict__ k_pool,
                                       const T *__restrict__ v_pool, const uint32_t *rows,
                                       const uint32_t *context, const uint32_t *table_start,
                                       const uint32_t *tables, T *__restrict__ out, int n_heads,
                                       int n_kv_heads, int head_dim, size_t n_slots,
                                       int block_size, int max_context, float scale) {
    extern __shared__ float smem[];
    const int vecs = head_dim / 8, parts = blockDim.x / vecs;
    float *qs = smem;
    float *partial = qs + head_dim;
    float *scratch = partial + parts * head_dim;
    uint32_t *table = reinterpret_cast<uint32_t *>(scratch + 32);
    float *scores = reinterpret_cast<float *>(table + (max_context + block_size - 1) / block_size);
    const int i = blockIdx.x, head = blockIdx.y;
    const int kh = head / (n_heads / n_kv_heads);
    const size_t row = rows[i];
    const int ctx = context[i];
    const T *k_head = k_pool + (size_t)kh * n_slots * head_dim;
    const T *v_head = v_pool + (size_t)kh * n_slots * head_dim;

    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        qs[d] = to_f32(q[(row * n_heads + head) * head_dim + d]) * scale;
    }
    for (int b = threadIdx.x; b < (ctx + block_size - 1) / block_size; b += blockDim.x) {
        table[b] = tables[table_start[i] + b];
    }
    __syncthreads();

    float m = -INFINITY;
    for (int j = threadIdx.x; j < ctx; j += blockDim.x) {
        const T *k = k_head + ((size_t)table[j / block_size] * block_size + j % block_size) * head_dim;
        float dot = 0.0f;
        for (int c = 0; c < vecs; ++c) {
            float kv[8];
            load8(k + 8 * c, kv);
#pragma unroll
            for (int e = 0; e < 8; ++e) dot += qs[8 * c + e] * kv[e];
        }
        scores[j] = dot;
        m = fmaxf(m, dot);
    }
    m = block_reduce<true>(m, scratch);
    float l = 0.0f;
    for (int j = threadIdx.x; j < ctx; j += blockDim.x) {
        const float e = __expf(scores[j] - m);
        scores[j] = e;
        l += e;
    }
    l = block_reduce<false>(l, scratch);  // its barriers publish the scores

    // Thread (part, c) sums elements 8c..8c+8 of keys part, part + parts, ...
    const int c = threadIdx.x % vecs, part = threadIdx.x / vecs;
    if (part < parts) {
        float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 4
        for (int j = part; j < ctx; j += parts) {
            float vv[8];
            load8(v_head + ((size_t)table[j / block_size] * block_size + j % block_size) * head_dim +
                      8 * c,
                  vv);
            const float p = scores[j];
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[e] += p * vv[e];
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) partial[part * head_dim + 8 * c + e] = acc[e];
    }
    __syncthreads();
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float sum = 0.0f;
        for (int p = 0; p < parts; ++p) sum += partial[p * head_dim + d];
        out[(row * n_heads + head) * head_dim + d] = from_f32<T>(sum / l);
    }
}

// In place over rows of `scores` (rows, ctx), each the scores of one query against the ctx keys
// of its sequence: row r is query r % n of the n newest tokens, which sees keys up to
// ctx - n + r % n. Scaled, masked and normalised in f32; masked keys get 0. One block per row.
template <typename T>
__device__ void causal_softmax(T *scores, int n, int ctx, float scale) {
    __shared__ float scratch[32];
    T *s = scores + (size_t)blockIdx.x * ctx;
    const int last = ctx - n + (int)(blockIdx.x % n);
    float m = -INFINITY;
    for (int j = threadIdx.x; j <= last; j += blockDim.x) m = fmaxf(m, to_f32(s[j]) * scale);
    m = block_reduce<true>(m, scratch);
    float l = 0.0f;
    for (int j = threadIdx.x; j <= last; j += blockDim.x) l += __expf(to_f32(s[j]) * scale - m);
    const float inv = 1.0f / block_reduce<false>(l, scratch);
    for (int j = threadIdx.x; j < ctx; j += blockDim.x) {
        s[j] = from_f32<T>(j <= last ? __expf(to_f32(s[j]) * scale - m) * inv : 0.0f);
    }
}

// act = SiLU(gate) * up over (tokens, 2 * inter) rows [gate | up].
template <typename T>
__device__ void silu_mul(const T *gate_up, T *act, size_t tokens, int inter) {
    const size_t n = tokens * inter;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t t = i / inter, c = i % inter;
        const float g = to_f32(gate_up[t * 2 * inter + c]);
        const float u = to_f32(gate_up[t * 2 * inter + inter + c]);
        act[i] = from_f32<T>(g / (1.0f + __expf(-g)) * u);
    }
}

#define INSTANTIATE(T, SUFFIX)                                                                  \
    extern "C" __global__ void add_rms_norm_##SUFFIX(const T *x, const T *y, const float *w,    \
                                                     T *x_out, T *h, int cols, float eps,        \
                                                     int vec) {                                  \
        add_rms_norm<T>(x, y, w, x_out, h, cols, eps, vec);                                     \
    }                                                                                           \
    extern "C" __global__ void rope_write_kv_##SUFFIX(                                          \
        const T *qkv, const T *cos, const T *sin, const uint32_t *positions,                    \
        const uint32_t *slots, T *q_out, T *k_pool, T *v_pool, int n_heads, int n_kv_heads,     \
        int head_dim, size_t n_slots, int interleaved) {                                        \
        rope_write_kv<T>(qkv, cos, sin, positions, slots, q_out, k_pool, v_pool, n_heads,       \
                         n_kv_heads, head_dim, n_slots, interleaved);                           \
    }                                                                                           \
    extern "C" __global__ void paged_decode_attention_##SUFFIX(                                 \
        const T *q, const T *k_pool, const T *v_pool, const uint32_t *rows,                     \
        const uint32_t *context, const uint32_t *table_start, const uint32_t *tables, T *out,   \
        int n_heads, int n_kv_heads, int head_dim, size_t n_slots, int block_size,              \
        int max_context, float scale) {                                                         \
        paged_decode_attention<T>(q, k_pool, v_pool, rows, context, table_start, tables, out,   \
                                  n_heads, n_kv_heads, head_dim, n_slots, block_size,           \
                                  max_context, scale);                                          \
    }                                                                                           \
    extern "C" __global__ void causal_softmax_##SUFFIX(T *scores, int n, int ctx, float scale) { \
        causal_softmax<T>(scores, n, ctx, scale);                                               \
    }                                                                                           \
    extern "C" __global__ void silu_mul_##SUFFIX(const T *gate_up, T *act, size_t tokens,       \
                                                 int inter) {                                   \
        silu_mul<T>(gate_up, act, tokens, inter);                                               \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__half, f16)
INSTANTIATE(__nv_bfloat16, bf16)
