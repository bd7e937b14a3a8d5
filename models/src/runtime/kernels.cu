// Fused kernels of the CUDA forward pass (see fused.rs): each replaces a chain of small tensor
// ops whose launches, not their arithmetic, set the time of a decode step. Arithmetic is in
// f32 whatever the storage type; every output is rounded once.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
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
// (n_kv_heads, n_slots, head_dim). Block (token, head) over the n_heads + 2 n_kv_heads heads of
// the row (Q, then K, then V), one warp each: a one-token step still spreads over dozens of
// blocks.
template <typename T>
__device__ void rope_write_kv(const T *__restrict__ qkv, const T *__restrict__ cos,
                              const T *__restrict__ sin, const uint32_t *positions,
                              const uint32_t *slots, T *__restrict__ q_out, T *__restrict__ k_pool,
                              T *__restrict__ v_pool, int n_heads, int n_kv_heads, int head_dim,
                              size_t n_slots, int interleaved) {
    const int t = blockIdx.x, head = blockIdx.y, half = head_dim / 2;
    const T *x = qkv + ((size_t)t * (n_heads + 2 * n_kv_heads) + head) * head_dim;
    const size_t slot = slots[t];
    if (head >= n_heads + n_kv_heads) {
        T *v = v_pool + ((size_t)(head - n_heads - n_kv_heads) * n_slots + slot) * head_dim;
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) v[d] = x[d];
        return;
    }
    const T *c = cos + (size_t)positions[t] * half;
    const T *s = sin + (size_t)positions[t] * half;
    T *o = head < n_heads ? q_out + ((size_t)t * n_heads + head) * head_dim
                          : k_pool + ((size_t)(head - n_heads) * n_slots + slot) * head_dim;
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        const int a = interleaved ? 2 * j : j, b = interleaved ? 2 * j + 1 : j + half;
        const float x0 = to_f32(x[a]), x1 = to_f32(x[b]);
        const float cj = to_f32(c[j]), sj = to_f32(s[j]);
        o[a] = from_f32<T>(x0 * cj - x1 * sj);
        o[b] = from_f32<T>(x0 * sj + x1 * cj);
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

// Causal attention of a sequence's n newest tokens (rows offset.. of q, (tokens, n_heads, HD))
// over its ctx tokens of context, the new ones last, K and V read from the paged pools through
// the sequence's block table; writes the rows' heads of out (tokens, n_heads * HD). Query i
// sees keys up to ctx - n + i. Block (query tile, head): 4 warps of 16 query rows; keys in
// tiles of 32. Scores and products on tensor cores (wmma, f32 accumulation); the softmax is
// online (running max and sum per row), so the scores never leave shared memory.
#define FA_WARPS 4
#define FA_BQ (16 * FA_WARPS)
#define FA_BK 32
template <typename T, int HD>
__device__ void prefill_attention(const T *__restrict__ q, const T *__restrict__ k_pool,
                                  const T *__restrict__ v_pool, const uint32_t *__restrict__ table,
                                  T *__restrict__ out, int offset, int n, int ctx, int n_heads,
                                  int n_kv_heads, size_t n_slots, int block_size, float scale) {
    using namespace nvcuda;
    __shared__ __align__(32) T kt[FA_BK * HD];
    __shared__ __align__(32) T vt[FA_BK * HD];
    __shared__ __align__(32) float sc[FA_WARPS][16 * FA_BK];
    __shared__ __align__(32) float o[FA_WARPS][16 * HD];
    __shared__ float row_max[FA_BQ], row_sum[FA_BQ];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int head = blockIdx.y, kh = head / (n_heads / n_kv_heads);
    const int q0 = blockIdx.x * FA_BQ;
    const T *k_head = k_pool + (size_t)kh * n_slots * HD;
    const T *v_head = v_pool + (size_t)kh * n_slots * HD;

    // The query tile, staged through o, into fragments each warp keeps.
    T *qs = reinterpret_cast<T *>(&o[0][0]);
    for (int idx = threadIdx.x; idx < FA_BQ * HD; idx += blockDim.x) {
        const int r = idx / HD, d = idx % HD, i = q0 + r;
        qs[idx] = i < n ? q[((size_t)(offset + i) * n_heads + head) * HD + d] : from_f32<T>(0.0f);
    }
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qf[HD / 16];
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) wmma::load_matrix_sync(qf[kk], qs + warp * 16 * HD + kk * 16, HD);
    __syncthreads();
    float *ow = o[warp], *sw = sc[warp];
    for (int idx = lane; idx < 16 * HD; idx += 32) ow[idx] = 0.0f;
    if (lane < 16) {
        row_max[warp * 16 + lane] = -INFINITY;
        row_sum[warp * 16 + lane] = 0.0f;
    }
    // Row r of the warp is split between lanes 2r and 2r + 1.
    const int r = lane / 2, half = lane % 2, i = q0 + warp * 16 + r;
    const int last = ctx - n + i;  // the last key query i sees
    const int keys = min(ctx, ctx - n + min(n - 1, q0 + FA_BQ - 1) + 1);

    for (int kb = 0; kb < keys; kb += FA_BK) {
        __syncthreads();  // the previous tiles are consumed
        for (int idx = threadIdx.x; idx < FA_BK * HD / 8; idx += blockDim.x) {
            const int jj = idx / (HD / 8), c = 8 * (idx % (HD / 8)), j = kb + jj;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
            if (j < ctx) {
                const size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
                kv = *reinterpret_cast<const uint4 *>(k_head + slot * HD + c);
                vv = *reinterpret_cast<const uint4 *>(v_head + slot * HD + c);
            }
            *reinterpret_cast<uint4 *>(kt + jj * HD + c) = kv;
            *reinterpret_cast<uint4 *>(vt + jj * HD + c) = vv;
        }
        __syncthreads();

        // S = Q K^T for the warp's 16 rows and the tile's keys.
#pragma unroll
        for (int nb = 0; nb < FA_BK / 16; ++nb) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.0f);
#pragma unroll
            for (int kk = 0; kk < HD / 16; ++kk) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kf;
                wmma::load_matrix_sync(kf, kt + nb * 16 * HD + kk * 16, HD);
                wmma::mma_sync(acc, qf[kk], kf, acc);
            }
            wmma::store_matrix_sync(sw + nb * 16, acc, FA_BK, wmma::mem_row_major);
        }
        __syncwarp();

        // Online softmax over the tile: new running max, the rescale of what came before.
        float p[FA_BK / 2], mx = -INFINITY;
#pragma unroll
        for (int c = 0; c < FA_BK / 2; ++c) {
            const int j = kb + half * (FA_BK / 2) + c;
            const float v = (i < n && j <= last) ? sw[r * FA_BK + half * (FA_BK / 2) + c] * scale
                                                 : -INFINITY;
            p[c] = v;
            mx = fmaxf(mx, v);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
        const float m_old = row_max[warp * 16 + r], m_new = fmaxf(m_old, mx);
        const float alpha = m_new == -INFINITY ? 1.0f : __expf(m_old - m_new);
        float sum = 0.0f;
#pragma unroll
        for (int c = 0; c < FA_BK / 2; ++c) {
            p[c] = p[c] == -INFINITY ? 0.0f : __expf(p[c] - m_new);
            sum += p[c];
        }
        sum += __shfl_xor_sync(0xffffffff, sum, 1);
        __syncwarp();  // every score is read before P overwrites them
        T *pw = reinterpret_cast<T *>(sw);
#pragma unroll
        for (int c = 0; c < FA_BK / 2; ++c) pw[r * FA_BK + half * (FA_BK / 2) + c] = from_f32<T>(p[c]);
        for (int d = half * (HD / 2); d < (half + 1) * (HD / 2); ++d) ow[r * HD + d] *= alpha;
        __syncwarp();  // both lanes of the row have read row_max
        if (half == 0) {
            row_max[warp * 16 + r] = m_new;
            row_sum[warp * 16 + r] = row_sum[warp * 16 + r] * alpha + sum;
        }
        __syncwarp();

        // O += P V.
#pragma unroll
        for (int nb = 0; nb < HD / 16; ++nb) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::load_matrix_sync(acc, ow + nb * 16, HD, wmma::mem_row_major);
#pragma unroll
            for (int kk = 0; kk < FA_BK / 16; ++kk) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pf;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vf;
                wmma::load_matrix_sync(pf, pw + kk * 16, FA_BK);
                wmma::load_matrix_sync(vf, vt + kk * 16 * HD + nb * 16, HD);
                wmma::mma_sync(acc, pf, vf, acc);
            }
            wmma::store_matrix_sync(ow + nb * 16, acc, HD, wmma::mem_row_major);
        }
        __syncwarp();
    }
    for (int idx = lane; idx < 16 * HD; idx += 32) {
        const int rr = idx / HD, d = idx % HD, ii = q0 + warp * 16 + rr;
        if (ii < n) {
            out[((size_t)(offset + ii) * n_heads + head) * HD + d] =
                from_f32<T>(ow[idx] / row_sum[warp * 16 + rr]);
        }
    }
}

#define INSTANTIATE_PREFILL(T, SUFFIX)                                                          \
    extern "C" __global__ void prefill_attention_##SUFFIX(                                      \
        const T *q, const T *k_pool, const T *v_pool, const uint32_t *table, T *out, int offset, \
        int n, int ctx, int n_heads, int n_kv_heads, size_t n_slots, int block_size,            \
        float scale) {                                                                          \
        prefill_attention<T, 64>(q, k_pool, v_pool, table, out, offset, n, ctx, n_heads,         \
                                 n_kv_heads, n_slots, block_size, scale);                       \
    }

INSTANTIATE_PREFILL(__half, f16)
INSTANTIATE_PREFILL(__nv_bfloat16, bf16)

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
