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
// Without y, x is only normalised. One block per row.
template <typename T>
__device__ void add_rms_norm(const T *x, const T *y, const float *w, T *x_out, T *h, int cols,
                             float eps) {
    __shared__ float scratch[32];
    const size_t row = (size_t)blockIdx.x * cols;
    float sq = 0.0f;
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
// head_dim). Scores live in shared memory (dynamic: head_dim + blockDim + max context floats).
// blockDim is a multiple of head_dim: its threads split the context when summing V.
template <typename T>
__device__ void paged_decode_attention(const T *q, const T *k_pool, const T *v_pool,
                                       const uint32_t *rows, const uint32_t *context,
                                       const uint32_t *table_start, const uint32_t *tables,
                                       T *out, int n_heads, int n_kv_heads, int head_dim,
                                       size_t n_slots, int block_size, float scale) {
    extern __shared__ float smem[];
    float *qs = smem;
    float *partial = qs + head_dim;
    float *scores = partial + blockDim.x;
    const int i = blockIdx.x, head = blockIdx.y;
    const int kh = head / (n_heads / n_kv_heads);
    const size_t row = rows[i];
    const int ctx = context[i];
    const uint32_t *table = tables + table_start[i];
    const T *k_head = k_pool + (size_t)kh * n_slots * head_dim;
    const T *v_head = v_pool + (size_t)kh * n_slots * head_dim;

    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        qs[d] = to_f32(q[(row * n_heads + head) * head_dim + d]) * scale;
    }
    __syncthreads();

    // One warp per key: lanes split head_dim, so each key's row is read coalesced.
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    for (int j = warp; j < ctx; j += warps) {
        const size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
        const T *k = k_head + slot * head_dim;
        float dot = 0.0f;
        for (int d = lane; d < head_dim; d += 32) dot += qs[d] * to_f32(k[d]);
        dot = warp_sum(dot);
        if (lane == 0) scores[j] = dot;
    }
    __syncthreads();

    float m = -INFINITY;
    for (int j = threadIdx.x; j < ctx; j += blockDim.x) m = fmaxf(m, scores[j]);
    m = block_reduce<true>(m, partial);
    float l = 0.0f;
    for (int j = threadIdx.x; j < ctx; j += blockDim.x) {
        const float e = __expf(scores[j] - m);
        scores[j] = e;
        l += e;
    }
    l = block_reduce<false>(l, partial);
    __syncthreads();

    // Threads (part, d): part sums keys part, part + parts, ... of dimension d.
    const int parts = blockDim.x / head_dim, d = threadIdx.x % head_dim, part = threadIdx.x / head_dim;
    float acc = 0.0f;
    for (int j = part; j < ctx; j += parts) {
        const size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
        acc += scores[j] * to_f32(v_head[slot * head_dim + d]);
    }
    partial[threadIdx.x] = acc;
    __syncthreads();
    if (part == 0) {
        for (int p = 1; p < parts; ++p) acc += partial[p * head_dim + d];
        out[(row * n_heads + head) * head_dim + d] = from_f32<T>(acc / l);
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
                                                     T *x_out, T *h, int cols, float eps) {      \
        add_rms_norm<T>(x, y, w, x_out, h, cols, eps);                                          \
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
        float scale) {                                                                          \
        paged_decode_attention<T>(q, k_pool, v_pool, rows, context, table_start, tables, out,   \
                                  n_heads, n_kv_heads, head_dim, n_slots, block_size, scale);   \
    }                                                                                           \
    extern "C" __global__ void silu_mul_##SUFFIX(const T *gate_up, T *act, size_t tokens,       \
                                                 int inter) {                                   \
        silu_mul<T>(gate_up, act, tokens, inter);                                               \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__half, f16)
INSTANTIATE(__nv_bfloat16, bf16)
