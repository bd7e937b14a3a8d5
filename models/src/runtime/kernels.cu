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

// Eight elements as stored (16 bytes of f16 or bf16, 32 of f32), for loads issued before
// their values are needed.
template <typename T> struct Raw8 {
    uint4 words[sizeof(T) / 2];
};

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

// Programmatic dependent launch (sm_90 on; fused.rs launches add_rms_norm, the GEMVs and decode
// attention so): such a kernel may start while the kernel before it in the stream runs. Before
// pdl_wait it reads only what no kernel writes (weights, the step's inputs), and it writes
// nothing; pdl_wait returns once the kernel before it has finished and its writes are visible
// (at once when there is no such dependency). pdl_launch, right after the wait, lets the next
// kernel start: one kernel runs ahead at most, its weights loaded while this one ends. On an
// H200 this took a batch-1 TinyLlama step from 1.001 ms to 0.915 in one run. Prefetching the
// rows into L2 before the wait instead of loading them (48 registers against 56) made it
// slower: 1.048 ms, and 1.026 with pdl_launch at each kernel's start.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// x_out = x + y (rounded to T, as the residual stream is kept) and h = RMSNorm(x_out) * w.
// Without y, x is only normalised. One block per row of h; rows of h past x's `rows` (padding
// for the matmuls) are zeroed; with `vec` (cols % 8 == 0 and every
// pointer 16-byte aligned) and a row that fits (cols <= 8 * blockDim * ROW_CHUNKS), a thread
// loads 8 columns at a time and keeps them in registers between the two passes.
#define ROW_CHUNKS 4
template <typename T>
__device__ void add_rms_norm(const T *__restrict__ x, const T *__restrict__ y,
                             const float *__restrict__ w, T *__restrict__ x_out, T *__restrict__ h,
                             int rows, int cols, float eps, int vec) {
    __shared__ float scratch[32];
    pdl_wait();
    pdl_launch();
    const size_t row = (size_t)blockIdx.x * cols;
    if ((int)blockIdx.x >= rows) {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) h[row + c] = from_f32<T>(0.0f);
        return;
    }
    float sq = 0.0f;
    if (vec && cols <= 8 * (int)blockDim.x * ROW_CHUNKS) {
        // The weights are loaded with the row, not after the reduction: one round trip less.
        float v[ROW_CHUNKS][8], wk[ROW_CHUNKS][8];
#pragma unroll
        for (int k = 0; k < ROW_CHUNKS; ++k) {
            const int c = 8 * (threadIdx.x + k * blockDim.x);
            if (c >= cols) break;
            load8(x + row + c, v[k]);
            load8(w + c, wk[k]);
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
            for (int e = 0; e < 8; ++e) h[row + c + e] = from_f32<T>(v[k][e] * scale * wk[k][e]);
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
#define NO_SLOT 0xffffffffu
template <typename T>
__device__ void rope_write_kv(const T *__restrict__ qkv, const T *__restrict__ cos,
                              const T *__restrict__ sin, const uint32_t *positions,
                              const uint32_t *slots, T *__restrict__ q_out, T *__restrict__ k_pool,
                              T *__restrict__ v_pool, int n_heads, int n_kv_heads, int head_dim,
                              size_t n_slots, int interleaved) {
    const int t = blockIdx.x, head = blockIdx.y, half = head_dim / 2;
    const T *x = qkv + ((size_t)t * (n_heads + 2 * n_kv_heads) + head) * head_dim;
    const uint32_t slot_id = slots[t];
    // A padding row of a recorded step (see graph.rs) has no slot: its K and V go nowhere.
    if (slot_id == NO_SLOT && head >= n_heads) return;
    const size_t slot = slot_id;
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

// Attention of single-token queries over their paged context, split over the context (flash
// decoding): block (i, head, split) reads query row rows[i] of q (tokens, n_heads, head_dim)
// and keys [split * split_keys, (split + 1) * split_keys) of the first context[i] tokens of
// the blocks listed at tables[table_start[i]..], and writes its head of row rows[i] of out
// (tokens, n_heads * head_dim). With several splits, each writes (sums, max, sum) to
// `partial`, and the last of (i, head) to finish merges them: counters[i * n_heads + head]
// counts the finished splits (zero between launches: the last resets it), so the merge needs
// no second launch, which cost about as much as the attention itself at batch 1.
//
// Decode attention is bound by the latency of its loads, not their bytes (a few hundred KiB a
// layer), so a batch of one sequence splits its context over many blocks, and within a block
// every load is independent of the others in flight: the split's block ids are staged in
// shared memory first, then groups of head_dim / 8 lanes take a key each, every lane loading
// 8 elements of its K and its V at once, four keys ahead. Each group keeps a running max and
// sum (online softmax, base 2); the block combines its groups at the end. head_dim / 8 is a
// power of two of at most 32 and divides the block.
template <typename T>
__device__ void paged_decode_attention(const T *__restrict__ q, const T *__restrict__ k_pool,
                                       const T *__restrict__ v_pool, const uint32_t *rows,
                                       const uint32_t *context, const uint32_t *table_start,
                                       const uint32_t *tables, T *__restrict__ out,
                                       float *__restrict__ partial, uint32_t *counters,
                                       int n_heads, int n_kv_heads,
                                       int head_dim, size_t n_slots, int block_size,
                                       int split_keys, float scale) {
    extern __shared__ float smem[];
    const int vecs = head_dim / 8, groups = blockDim.x / vecs;
    const int c = threadIdx.x % vecs, grp = threadIdx.x / vecs;
    const int i = blockIdx.x, head = blockIdx.y, split = blockIdx.z;
    float *group_acc = smem;                       // [groups][head_dim]
    float *group_max = group_acc + groups * head_dim;
    float *group_sum = group_max + groups;
    uint32_t *table = reinterpret_cast<uint32_t *>(group_sum + groups);
    const int kh = head / (n_heads / n_kv_heads);
    const size_t row = rows[i];
    const int ctx = context[i];
    const int start = split * split_keys, end = min(ctx, start + split_keys);
    const int first_block = start / block_size;
    const int n_blocks = end > start ? (end - 1) / block_size - first_block + 1 : 0;
    const T *k_head = k_pool + (size_t)kh * n_slots * head_dim + 8 * c;
    const T *v_head = v_pool + (size_t)kh * n_slots * head_dim + 8 * c;

    // The tables are the step's inputs: staged before the wait.
    for (int b = threadIdx.x; b < n_blocks; b += blockDim.x) {
        table[b] = tables[table_start[i] + first_block + b];
    }
    pdl_wait();
    pdl_launch();
    float qv[8];
    load8(q + (row * n_heads + head) * head_dim + 8 * c, qv);
#pragma unroll
    for (int e = 0; e < 8; ++e) qv[e] *= scale * 1.4426950408889634f;  // exp(x) = exp2(x log2 e)
    __syncthreads();

    float m = -INFINITY, l = 0.0f, acc[8] = {};
    constexpr int AHEAD = 4;
    for (int base = start; base < end; base += groups * AHEAD) {  // uniform over the block
        Raw8<T> kr[AHEAD], vr[AHEAD];  // loaded as stored: converted once the loads are out
#pragma unroll
        for (int u = 0; u < AHEAD; ++u) {
            const int j = base + u * groups + grp;
            if (j < end) {
                const size_t slot =
                    (size_t)table[j / block_size - first_block] * block_size + j % block_size;
                kr[u] = *reinterpret_cast<const Raw8<T> *>(k_head + slot * head_dim);
                vr[u] = *reinterpret_cast<const Raw8<T> *>(v_head + slot * head_dim);
            } else {
                kr[u] = vr[u] = Raw8<T>{};
            }
        }
#pragma unroll
        for (int u = 0; u < AHEAD; ++u) {
            const int j = base + u * groups + grp;
            float kf[8], dot = 0.0f;
            load8(reinterpret_cast<const T *>(&kr[u]), kf);
#pragma unroll
            for (int e = 0; e < 8; ++e) dot += qv[e] * kf[e];
            for (int o = 1; o < vecs; o <<= 1) dot += __shfl_xor_sync(0xffffffff, dot, o);
            if (j >= end) continue;  // after the shuffles, which every lane joins
            const float m_new = fmaxf(m, dot), alpha = exp2f(m - m_new), p = exp2f(dot - m_new);
            float vf[8];
            load8(reinterpret_cast<const T *>(&vr[u]), vf);
            l = l * alpha + p;
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[e] = acc[e] * alpha + p * vf[e];
            m = m_new;
        }
    }
    if (c == 0) group_max[grp] = m, group_sum[grp] = l;
#pragma unroll
    for (int e = 0; e < 8; ++e) group_acc[grp * head_dim + 8 * c + e] = acc[e];
    __syncthreads();

    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float mx = -INFINITY;
        for (int g = 0; g < groups; ++g) mx = fmaxf(mx, group_max[g]);
        float sum = 0.0f, o = 0.0f;
        for (int g = 0; g < groups; ++g) {
            if (group_max[g] == -INFINITY) continue;  // a group with no keys
            const float w = exp2f(group_max[g] - mx);
            sum += group_sum[g] * w;
            o += group_acc[g * head_dim + d] * w;
        }
        if (gridDim.z == 1) {
            out[(row * n_heads + head) * head_dim + d] = from_f32<T>(o / sum);
        } else {
            float *p = partial + (((size_t)i * n_heads + head) * gridDim.z + split) * (head_dim + 2);
            p[d] = o;
            if (d == 0) p[head_dim] = mx, p[head_dim + 1] = sum;
        }
    }
    if (gridDim.z == 1) return;

    // Publish this split, count it, and let the last split of (i, head) merge them all.
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        uint32_t *count = counters + (size_t)i * n_heads + head;
        last = atomicAdd(count, 1u) == gridDim.z - 1;
        if (last) *count = 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    // Splits past the row's context hold max -inf and sum 0. Read from L2, where the other
    // blocks' writes are.
    const int splits = gridDim.z;
    const float *p = partial + ((size_t)i * n_heads + head) * splits * (head_dim + 2);
    float mx = -INFINITY;
    for (int s = 0; s < splits; ++s) mx = fmaxf(mx, __ldcg(p + s * (head_dim + 2) + head_dim));
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float sum = 0.0f, o = 0.0f;
        for (int s = 0; s < splits; ++s) {
            const float *ps = p + s * (head_dim + 2);
            const float m_s = __ldcg(ps + head_dim);
            if (m_s == -INFINITY) continue;
            const float w = exp2f(m_s - mx);
            sum += __ldcg(ps + head_dim + 1) * w;
            o += __ldcg(ps + d) * w;
        }
        out[(row * n_heads + head) * head_dim + d] = from_f32<T>(o / sum);
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

// Tensor-core primitives (sm_80 and later): D += A B on a 16x8x16 tile with f32 accumulation,
// fragments loaded from shared memory with ldmatrix, tiles copied in with cp.async.
template <typename T> __device__ __forceinline__ void mma_16816(float *c, const uint32_t *a, const uint32_t *b);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float *c, const uint32_t *a, const uint32_t *b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float *c, const uint32_t *a, const uint32_t *b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Four 8x8 matrices of 16-bit elements; lane l gives the address of row l % 8 of matrix l / 8.
// Register i gets matrix i's row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1 (with TRANS, its
// column l / 4, rows 2 (l % 4) and 2 (l % 4) + 1).
template <bool TRANS> __device__ __forceinline__ void ldmatrix_x4(uint32_t *r, const void *smem) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(smem);
    if (TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    }
}

// 16 bytes from global to shared memory without passing through registers; zeros when !valid.
__device__ __forceinline__ void cp_async16(void *smem, const void *global, bool valid) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(global),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int PENDING> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
}

template <typename T> __device__ __forceinline__ uint32_t pack2(float x, float y);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float x, float y) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<const uint32_t *>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float x, float y) {
    const __half2 v = __floats2half2_rn(x, y);
    return *reinterpret_cast<const uint32_t *>(&v);
}

// Element offset of 16-byte chunk `chunk` of row `row` in a tile of 64-element rows, the chunks
// of each row permuted (XOR with the row) so that the eight rows an ldmatrix reads at one column
// sit in eight different banks.
__device__ __forceinline__ int swizzle64(int row, int chunk) {
    return row * 64 + ((chunk ^ (row & 7)) << 3);
}

// Causal attention of a sequence's n newest tokens (rows offset.. of q, (tokens, n_heads, HD))
// over its ctx tokens of context, the new ones last, K and V read from the paged pools through
// the sequence's block table; writes the rows' heads of out (tokens, n_heads * HD). Query i
// sees keys up to ctx - n + i. The sequence is read from device memory, seq = [offset, n, ctx,
// block table...], so that a recorded step replays for another sequence: the grid covers at
// least n queries, and tiles past them return.
//
// Flash attention: block (query tile, head) of 4 warps, each warp 16 query rows whose Q
// fragments, scores, running max and sum and output stay in registers. Key tiles of 64 are
// copied into shared memory one ahead of the one being used (cp.async, double buffered);
// S = Q K^T and O += P V run on tensor cores, P taken straight from the score registers (the
// accumulator layout of two 16x8 tiles is the A layout of one 16x16). The softmax is online,
// in f32 and base 2. The tiles of the last queries, which see the most keys, start first.
#define FA_WARPS 4
#define FA_BQ (16 * FA_WARPS)
#define FA_BK 64
template <typename T, int HD>
__device__ void prefill_attention(const T *__restrict__ q, const T *__restrict__ k_pool,
                                  const T *__restrict__ v_pool, const uint32_t *__restrict__ seq,
                                  T *__restrict__ out, int n_heads, int n_kv_heads, size_t n_slots,
                                  int block_size, float scale) {
    static_assert(HD == 64, "the shared tiles are laid out for rows of 64 elements");
    const int offset = seq[0], n = seq[1], ctx = seq[2];
    const uint32_t *__restrict__ table = seq + 3;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * FA_BQ;
    if (q0 >= n) return;
    __shared__ __align__(128) T qs[FA_BQ * HD];
    __shared__ __align__(128) T ks[2][FA_BK * HD];
    __shared__ __align__(128) T vs[2][FA_BK * HD];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t4 = lane % 4;
    const int head = blockIdx.y, kh = head / (n_heads / n_kv_heads);
    const T *k_head = k_pool + (size_t)kh * n_slots * HD;
    const T *v_head = v_pool + (size_t)kh * n_slots * HD;
    const int past = ctx - n;                     // keys before the new tokens
    const int keys = past + min(n, q0 + FA_BQ);   // keys the tile's last query sees
    const int tiles = (keys + FA_BK - 1) / FA_BK;
    constexpr int CHUNKS = HD / 8;                // 16-byte chunks of a row

    for (int idx = threadIdx.x; idx < FA_BQ * CHUNKS; idx += blockDim.x) {
        const int r = idx / CHUNKS, c = idx % CHUNKS, i = q0 + r;
        const T *src = q + ((size_t)(offset + min(i, n - 1)) * n_heads + head) * HD + 8 * c;
        cp_async16(qs + swizzle64(r, c), src, i < n);
    }
    auto load_kv = [&](int tile, int buf) {
        for (int idx = threadIdx.x; idx < FA_BK * CHUNKS; idx += blockDim.x) {
            const int r = idx / CHUNKS, c = idx % CHUNKS, j = tile * FA_BK + r;
            const int jj = j < ctx ? j : 0;
            const size_t slot = (size_t)table[jj / block_size] * block_size + jj % block_size;
            cp_async16(ks[buf] + swizzle64(r, c), k_head + slot * HD + 8 * c, j < ctx);
            cp_async16(vs[buf] + swizzle64(r, c), v_head + slot * HD + 8 * c, j < ctx);
        }
    };
    load_kv(0, 0);
    cp_async_commit();

    uint32_t qf[HD / 16][4];
    float o[HD / 8][4];
#pragma unroll
    for (int d = 0; d < HD / 8; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};
    const int row = q0 + warp * 16 + g;              // this lane's rows: row and row + 8
    const int last[2] = {past + row, past + row + 8};  // the last key each sees
    const float scale2 = scale * 1.4426950408889634f;  // exp(x) = exp2(x log2 e)

    for (int tile = 0; tile < tiles; ++tile) {
        const int buf = tile & 1;
        if (tile + 1 < tiles) load_kv(tile + 1, buf ^ 1);
        cp_async_commit();
        cp_async_wait<1>();  // all but the next tile's copies are done
        __syncthreads();
        if (tile == 0) {
#pragma unroll
            for (int kk = 0; kk < HD / 16; ++kk) {
                ldmatrix_x4<false>(qf[kk], qs + swizzle64(warp * 16 + lane % 16, 2 * kk + lane / 16));
            }
        }

        // S = Q K^T: 16 rows x 64 keys, eight 16x8 tiles; K rows are B's columns.
        float s[FA_BK / 8][4];
#pragma unroll
        for (int j = 0; j < FA_BK / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < FA_BK / 16; ++np) {
                uint32_t b[4];
                const int key = 16 * np + 8 * (lane / 16) + lane % 8;
                ldmatrix_x4<false>(b, ks[buf] + swizzle64(key, 2 * kk + (lane / 8) % 2));
                mma_16816<T>(s[2 * np], qf[kk], b);
                mma_16816<T>(s[2 * np + 1], qf[kk], b + 2);
            }
        }
        // Mask keys past a row's last (only tiles that reach the diagonal or the end have any).
        const int k0 = tile * FA_BK;
        if (k0 + FA_BK - 1 > past + q0) {
#pragma unroll
            for (int j = 0; j < FA_BK / 8; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = k0 + 8 * j + 2 * t4 + (e & 1);
                    if (key > last[e / 2]) s[j][e] = -INFINITY;
                }
            }
        }

        // Online softmax: the new running max of each row (over the quad of lanes sharing it),
        // what came before rescaled to it, and P = exp(S - max) in place of S.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float mx = -INFINITY;
#pragma unroll
            for (int j = 0; j < FA_BK / 8; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * h], s[j][2 * h + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
            const float m_new = fmaxf(m_run[h], mx * scale2);
            const float base = m_new == -INFINITY ? 0.0f : m_new;
            const float alpha = exp2f(m_run[h] - base);
            m_run[h] = m_new;
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < FA_BK / 8; ++j) {
#pragma unroll
                for (int e = 2 * h; e < 2 * h + 2; ++e) {
                    s[j][e] = exp2f(s[j][e] * scale2 - base);
                    sum += s[j][e];
                }
            }
            l_run[h] = l_run[h] * alpha + sum;  // this lane's share; the quad sums at the end
#pragma unroll
            for (int d = 0; d < HD / 8; ++d) o[d][2 * h] *= alpha, o[d][2 * h + 1] *= alpha;
        }

        // O += P V: P's 16-key slices as A fragments; V rows (keys) are B's rows (transposed load).
#pragma unroll
        for (int kk = 0; kk < FA_BK / 16; ++kk) {
            const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]),
                                   pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                   pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                   pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int dp = 0; dp < HD / 16; ++dp) {
                uint32_t b[4];
                const int key = 16 * kk + 8 * ((lane / 8) % 2) + lane % 8;
                ldmatrix_x4<true>(b, vs[buf] + swizzle64(key, 2 * dp + lane / 16));
                mma_16816<T>(o[2 * dp], a, b);
                mma_16816<T>(o[2 * dp + 1], a, b + 2);
            }
        }
        __syncthreads();  // this tile's buffers are free for the copy two tiles on
    }

#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float l = l_run[h];
        l += __shfl_xor_sync(0xffffffff, l, 1);
        l += __shfl_xor_sync(0xffffffff, l, 2);
        const int i = row + 8 * h;
        if (i >= n) continue;
        const float inv = 1.0f / l;
        T *dst = out + ((size_t)(offset + i) * n_heads + head) * HD + 2 * t4;
#pragma unroll
        for (int d = 0; d < HD / 8; ++d) {
            *reinterpret_cast<uint32_t *>(dst + 8 * d) = pack2<T>(o[d][2 * h] * inv, o[d][2 * h + 1] * inv);
        }
    }
}

#define INSTANTIATE_PREFILL(T, SUFFIX)                                                          \
    extern "C" __global__ void __launch_bounds__(32 * FA_WARPS) prefill_attention_##SUFFIX(      \
        const T *q, const T *k_pool, const T *v_pool, const uint32_t *seq, T *out, int n_heads,  \
        int n_kv_heads, size_t n_slots, int block_size, float scale) {                          \
        prefill_attention<T, 64>(q, k_pool, v_pool, seq, out, n_heads, n_kv_heads, n_slots,      \
                                 block_size, scale);                                            \
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

// Sixteen bytes of weights that are read once: they bypass L1, which keeps x for every warp.
__device__ __forceinline__ uint4 load_streamed(const uint4 *p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// y (n) = w x for w (n, k) row-major: a one-sequence decode step's matmuls, bound by reading w
// once (at two to four rows cuBLAS was faster, and is used). Each `ksplit` warps (2 or 4)
// compute GEMV_ROWS consecutive outputs, taking alternate 512-byte runs of each row (16 bytes
// a lane, GEMV_UNROLL runs in flight) and adding their sums in shared memory; x is read
// through L1, where every warp of the SM finds it. Sums in f32; y is stored as O. k is a
// multiple of 8, both inputs 16-byte aligned. On an H200, in CUDA graphs of TinyLlama's
// shapes, this took 29.5 us a layer against 34.9 for one warp a row pair with cached loads;
// four warps a row pair paid off on the longest rows (down: 7.5 us against 7.9). Blocks of
// four warps, twice as many as of eight, took a batch-1 step from 1.005 ms to 0.998 in one
// run; eight runs in flight instead of four took 80 registers against 48 and 1.089 ms.
//
// GATED: y (n) = SiLU(w_gate x) * (w_up x) for w (2n, k) = [w_gate | w_up]: the warps take
// row j of each half and write act j, so a SwiGLU's gate and up projections and their product
// are one launch.
//
// ROPE: w is a fused QKV projection and the product goes where rope_write_kv puts it (Q
// rotated to q_out, K rotated and V into the token's slot of the pools), so the projection and
// its RoPE are one launch: the warps take the two rows of a rotation pair of a head (n pairs),
// each rounded to T as the projection's output would be, and rotate them. One token (row 0 of
// positions and slots).
//
// (Folding the RMSNorm before a matmul into it, each block normalising the row itself, made a
// batch-1 step 15% slower on an H200: gate/up's 1408 blocks run in two waves, each paying the
// norm's loads and reduction. Folding the residual add and norm after the o and down
// projections into them instead, the last block to finish normalising, saved nothing: 1.032
// ms a step against 1.016 in an earlier run, whose batch-8 to 64 steps (which it does not
// touch) were 0.5-0.8% faster.)
#define GEMV_ROWS 2
#define GEMV_WARPS 4
#define GEMV_UNROLL 4
enum GemvMode { PLAIN, GATED, ROPE };
// Where ROPE writes (see rope_write_kv).
template <typename T> struct RopeOut {
    const T *cos, *sin;
    const uint32_t *positions, *slots;
    T *q_out, *k_pool, *v_pool;
    int n_heads, n_kv_heads, head_dim;
    size_t n_slots;
    int interleaved;
};
template <typename T, typename O, GemvMode MODE>
__device__ void gemv(const T *__restrict__ x, const T *__restrict__ w, O *__restrict__ y, int n,
                     int k, int ksplit, const RopeOut<T> &rope) {
    __shared__ float part[GEMV_WARPS][GEMV_ROWS];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int group = blockIdx.x * (GEMV_WARPS / ksplit) + warp / ksplit;
    const int slice = warp % ksplit;
    // Outputs col0 .. col0 + GEMV_ROWS (gated: one, col0; rope: pair col0).
    const int col0 = MODE == PLAIN ? group * GEMV_ROWS : group;
    const int chunks = k / 8, stride = 32 * ksplit;
    float acc[GEMV_ROWS] = {};
    const uint4 *rows[GEMV_ROWS];
    // ROPE: head `head`, pair (a, b) of it.
    const int half = rope.head_dim / 2, pair = min(col0, n - 1);
    const int head = MODE == ROPE ? pair / half : 0, j = MODE == ROPE ? pair % half : 0;
    const int a = rope.interleaved ? 2 * j : j, b = rope.interleaved ? 2 * j + 1 : j + half;
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) {
        int row;
        if (MODE == PLAIN) row = min(col0 + r, n - 1);
        else if (MODE == GATED) row = min(col0, n - 1) + r * n;
        else row = head * rope.head_dim + (r == 0 ? a : b);
        rows[r] = reinterpret_cast<const uint4 *>(w + (size_t)row * k);
    }
    uint4 wv[GEMV_UNROLL][GEMV_ROWS];
    auto load_w = [&](int base) {
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            const int c = base + stride * u;
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; ++r) {
                wv[u][r] = c < chunks ? load_streamed(rows[r] + c) : make_uint4(0, 0, 0, 0);
            }
        }
    };
    // The first runs of weights are loaded before the wait: at k = 2048 they are all of the
    // block's, read while the kernel before ends (the step's inputs for ROPE too).
    int base = slice * 32 + lane;
    load_w(base);
    uint32_t slot_id = 0;
    float cj = 0.0f, sj = 0.0f;
    if (MODE == ROPE && slice == 0 && lane == 0 && col0 < n) {
        slot_id = rope.slots[0];
        const size_t at = (size_t)rope.positions[0] * half + j;
        cj = to_f32(rope.cos[at]), sj = to_f32(rope.sin[at]);
    }
    pdl_wait();
    pdl_launch();
    for (;;) {
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            const int c = base + stride * u;
            if (c >= chunks) break;
            float xv[8];
            load8(x + 8 * c, xv);
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; ++r) {
                float wf[8];
                load8(reinterpret_cast<const T *>(&wv[u][r]), wf);
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[r] += xv[e] * wf[e];
            }
        }
        base += stride * GEMV_UNROLL;
        if (base >= chunks) break;
        load_w(base);
    }
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) {
        const float sum = warp_sum(acc[r]);
        if (lane == 0) part[warp][r] = sum;
    }
    __syncthreads();
    if (slice != 0 || lane != 0) return;
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) {
        acc[r] = 0.0f;
        for (int s = 0; s < ksplit; ++s) acc[r] += part[warp + s][r];
    }
    if (MODE == GATED) {
        if (col0 < n) y[col0] = from_f32<O>(acc[0] / (1.0f + __expf(-acc[0])) * acc[1]);
    } else if (MODE == ROPE) {
        if (col0 >= n) return;
        const float x0 = to_f32(from_f32<T>(acc[0])), x1 = to_f32(from_f32<T>(acc[1]));
        const int nh = rope.n_heads, kvh = rope.n_kv_heads, hd = rope.head_dim;
        if (head >= nh + kvh) {
            if (slot_id == NO_SLOT) return;
            T *v = rope.v_pool + ((size_t)(head - nh - kvh) * rope.n_slots + slot_id) * hd;
            v[a] = from_f32<T>(x0), v[b] = from_f32<T>(x1);
            return;
        }
        if (head >= nh && slot_id == NO_SLOT) return;
        T *o = head < nh ? rope.q_out + (size_t)head * hd
                         : rope.k_pool + ((size_t)(head - nh) * rope.n_slots + slot_id) * hd;
        o[a] = from_f32<T>(x0 * cj - x1 * sj);
        o[b] = from_f32<T>(x0 * sj + x1 * cj);
    } else {
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; ++r) {
            if (col0 + r < n) y[col0 + r] = from_f32<O>(acc[r]);
        }
    }
}

#define GEMV_ENTRY(T, O, MODE, NAME)                                                            \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                               \
        NAME(const T *x, const T *w, O *y, int n, int k, int ksplit) {                          \
        gemv<T, O, MODE>(x, w, y, n, k, ksplit, RopeOut<T>{});                                  \
    }
#define INSTANTIATE_GEMV(T, SUFFIX)                                                             \
    GEMV_ENTRY(T, T, PLAIN, gemv_##SUFFIX)                                                      \
    GEMV_ENTRY(T, float, PLAIN, gemv_f32_out_##SUFFIX)                                          \
    GEMV_ENTRY(T, T, GATED, gemv_silu_##SUFFIX)                                                 \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS) gemv_rope_##SUFFIX(           \
        const T *x, const T *w, int n, int k, int ksplit, const T *cos, const T *sin,           \
        const uint32_t *positions, const uint32_t *slots, T *q_out, T *k_pool, T *v_pool,       \
        int n_heads, int n_kv_heads, int head_dim, size_t n_slots, int interleaved) {           \
        const RopeOut<T> rope{cos,    sin,     positions,  slots,      q_out,    k_pool,        \
                              v_pool, n_heads, n_kv_heads, head_dim,   n_slots,  interleaved};  \
        gemv<T, T, ROPE>(x, w, nullptr, n, k, ksplit, rope);                                    \
    }

INSTANTIATE_GEMV(__half, f16)
INSTANTIATE_GEMV(__nv_bfloat16, bf16)

// An export's rows in one launch: row i holds block ids[i] of every pool in turn (layer 0 K,
// layer 0 V, layer 1 K, ...), each part (block_size, n_kv_heads, head_dim) token-major, from
// pools (n_kv_heads, n_slots, head_dim) head-major. `meta` is [pool addresses as (lo, hi)
// u32 pairs | block ids]. Block (i, pool); 8 elements a copy (head_dim % 8 == 0).
// With SCATTER, the other way: rows into the blocks of the pools (an import).
template <typename T, bool SCATTER>
__device__ void move_blocks(const uint32_t *meta, T *__restrict__ rows, int n_pools, int kvh,
                            int block_size, int head_dim, size_t n_slots) {
    const int i = blockIdx.x, p = blockIdx.y, chunks = head_dim / 8;
    T *pool = reinterpret_cast<T *>((uint64_t)meta[2 * p] | ((uint64_t)meta[2 * p + 1] << 32));
    const size_t part = (size_t)block_size * kvh * head_dim;
    const size_t first = (size_t)meta[2 * n_pools + i] * block_size;
    T *row = rows + ((size_t)i * n_pools + p) * part;
    for (int c = threadIdx.x; c < block_size * kvh * chunks; c += blockDim.x) {
        const int d = 8 * (c % chunks), h = (c / chunks) % kvh, t = c / (chunks * kvh);
        Raw8<T> *in_row = reinterpret_cast<Raw8<T> *>(row + ((size_t)t * kvh + h) * head_dim + d);
        Raw8<T> *in_pool = reinterpret_cast<Raw8<T> *>(pool + ((size_t)h * n_slots + first + t) * head_dim + d);
        if (SCATTER) {
            *in_pool = *in_row;
        } else {
            *in_row = *in_pool;
        }
    }
}

#define INSTANTIATE(T, SUFFIX)                                                                  \
    extern "C" __global__ void add_rms_norm_##SUFFIX(const T *x, const T *y, const float *w,    \
                                                     T *x_out, T *h, int rows, int cols,         \
                                                     float eps, int vec) {                       \
        add_rms_norm<T>(x, y, w, x_out, h, rows, cols, eps, vec);                               \
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
        float *partial, uint32_t *counters, int n_heads, int n_kv_heads, int head_dim,          \
        size_t n_slots, int block_size, int split_keys, float scale) {                          \
        paged_decode_attention<T>(q, k_pool, v_pool, rows, context, table_start, tables, out,   \
                                  partial, counters, n_heads, n_kv_heads, head_dim, n_slots,    \
                                  block_size, split_keys, scale);                               \
    }                                                                                           \
    extern "C" __global__ void causal_softmax_##SUFFIX(T *scores, int n, int ctx, float scale) { \
        causal_softmax<T>(scores, n, ctx, scale);                                               \
    }                                                                                           \
    extern "C" __global__ void gather_blocks_##SUFFIX(const uint32_t *meta, T *rows, int n_pools,   \
                                                      int kvh, int block_size, int head_dim,    \
                                                      size_t n_slots) {                         \
        move_blocks<T, false>(meta, rows, n_pools, kvh, block_size, head_dim, n_slots);         \
    }                                                                                           \
    extern "C" __global__ void scatter_blocks_##SUFFIX(const uint32_t *meta, T *rows, int n_pools,  \
                                                       int kvh, int block_size, int head_dim,   \
                                                       size_t n_slots) {                        \
        move_blocks<T, true>(meta, rows, n_pools, kvh, block_size, head_dim, n_slots);          \
    }                                                                                           \
    extern "C" __global__ void silu_mul_##SUFFIX(const T *gate_up, T *act, size_t tokens,       \
                                                 int inter) {                                   \
        silu_mul<T>(gate_up, act, tokens, inter);                                               \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__half, f16)
INSTANTIATE(__nv_bfloat16, bf16)
