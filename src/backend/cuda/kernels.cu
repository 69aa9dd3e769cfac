// GPT-2's element-wise and attention kernels, compiled at run time with NVRTC once per storage type.
// T is the storage type of weights and activations: float, or a 16-bit half/bfloat16 held as raw bits
// (converted with PTX, so that no CUDA header is needed). Statistics and sums are always f32; the
// residual stream x is f32.
//
// Prepended by the host: `#define DTYPE 0|1|2` (f32, f16, bf16).

#define INFINITY __int_as_float(0x7f800000)

#if DTYPE == 0
typedef float T;
__device__ __forceinline__ float LD(T v) { return v; }
__device__ __forceinline__ T ST(float v) { return v; }
#elif DTYPE == 1
typedef unsigned short T;
__device__ __forceinline__ float LD(T v) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f; }
__device__ __forceinline__ T ST(float v) { T h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); return h; }
#else
typedef unsigned short T;
__device__ __forceinline__ float LD(T v) { return __uint_as_float(((unsigned int)v) << 16); }
__device__ __forceinline__ T ST(float v) { T h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v)); return h; }
#endif

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}
// Block-wide reductions; `red` holds at least 32 floats. Every thread gets the result.
__device__ float block_sum(float v, float* red) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : 0.0f;
    return warp_sum(v);
}
__device__ float block_max(float v, float* red) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : -INFINITY;
    return warp_max(v);
}

// x[r] = wte[tokens[r]] + wpe[pos[r]]   (rows, C) in f32. Grid: rows.
extern "C" __global__ void embed(const int* tokens, const int* pos, const T* wte, const T* wpe, float* x, int C,
                                 unsigned long long* best) {
    int r = blockIdx.x;
    if (threadIdx.x == 0) best[r] = 0;  // the fused argmax of this step starts from nothing
    const T* te = wte + (size_t)tokens[r] * C;
    const T* pe = wpe + (size_t)pos[r] * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) x[(size_t)r * C + c] = LD(te[c]) + LD(pe[c]);
}

// out[b] = LayerNorm(x[rows ? rows[b] : b]) with biased variance. Grid: output rows.
extern "C" __global__ void layer_norm(const float* x, const int* rows, const float* w, const float* bias, T* out, int C, float eps) {
    __shared__ float red[32];
    int b = blockIdx.x;
    const float* xr = x + (size_t)(rows ? rows[b] : b) * C;
    float s = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) s += xr[c];
    float mean = block_sum(s, red) / C;
    float v = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) { float d = xr[c] - mean; v += d * d; }
    float inv = rsqrtf(block_sum(v, red) / C + eps);
    for (int c = threadIdx.x; c < C; c += blockDim.x) out[(size_t)b * C + c] = ST((xr[c] - mean) * inv * w[c] + bias[c]);
}

__device__ __forceinline__ float activation(float v, int act) {
    switch (act) {
        case 1: return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));  // gelu_new
        case 2: return 0.5f * v * (1.0f + erff(v * 0.7071067811865476f));                             // gelu
        case 3: return fmaxf(v, 0.0f);                                                                 // relu
        case 4: return v / (1.0f + expf(-v));                                                          // silu
        case 5: return v / (1.0f + expf(-1.702f * v));                                                 // quick_gelu
        default: return v;
    }
}

// y = act(y + bias) over (n / n_out, n_out). Grid: ceil(n / blockDim).
extern "C" __global__ void bias_act(T* y, const T* bias, int n_out, int n, int act) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = ST(activation(LD(y[i]) + LD(bias[i % n_out]), act));
}

// x += y + bias (the residual add, in f32). Grid: ceil(n / blockDim).
extern "C" __global__ void residual(float* x, const T* y, const T* bias, int n_out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += LD(y[i]) + LD(bias[i % n_out]);
}

// Store each row's keys and values (from qkv, (rows, 3C)) in the cache, (slot, head, cap, hd).
extern "C" __global__ void kv_write(const T* qkv, T* kc, T* vc, const int* slot, const int* pos, int H, int hd, int cap) {
    int r = blockIdx.x, C = H * hd;
    const T* row = qkv + (size_t)r * 3 * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        int h = c / hd, d = c % hd;
        size_t o = (((size_t)slot[r] * H + h) * cap + pos[r]) * hd + d;
        kc[o] = row[C + c];
        vc[o] = row[2 * C + c];
    }
}

// ids[b] = argmax of logits row b (lowest index among equals). Grid: rows.
extern "C" __global__ void argmax(const float* logits, int V, int* ids) {
    __shared__ float bv[32];
    __shared__ int bi[32];
    const float* row = logits + (size_t)blockIdx.x * V;
    float best = -INFINITY;
    int idx = 0x7fffffff;
    for (int i = threadIdx.x; i < V; i += blockDim.x)
        if (row[i] > best) { best = row[i]; idx = i; }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffff, best, o);
        int oi = __shfl_xor_sync(0xffffffff, idx, o);
        if (ov > best || (ov == best && oi < idx)) { best = ov; idx = oi; }
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { bv[warp] = best; bi[warp] = idx; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++)
            if (bv[w] > best || (bv[w] == best && bi[w] < idx)) { best = bv[w]; idx = bi[w]; }
        ids[blockIdx.x] = idx;
    }
}

// Eight consecutive elements as floats (16-byte aligned loads).
__device__ __forceinline__ void load8(const T* p, float* out) {
#if DTYPE == 0
    float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w; out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
#else
    uint4 v = *reinterpret_cast<const uint4*>(p);
    unsigned int w[4] = {v.x, v.y, v.z, v.w};
    for (int i = 0; i < 4; i++) { out[2 * i] = LD((T)(w[i] & 0xffff)); out[2 * i + 1] = LD((T)(w[i] >> 16)); }
#endif
}

#define GEMV_ROWS 8
#define GEMV_WARPS 4
// Small-batch matrix product for rows <= GEMV_ROWS: one block of GEMV_WARPS warps per output column
// j, each warp a quarter of the dot products x[r] . w[j] (w stored (n, k)); then the epilogue by
// `mode`:
//   0: y[r][j] = acc + bias[j]; with kc != 0, columns C..3C go to the key/value cache instead
//   1: y[r][j] = act(acc + bias[j])
//   2: xf[r][j] += acc + bias[j]          (residual, f32)
//   3: yf[r][j] = acc                      (logits, f32); with best != 0 also the row's argmax
extern "C" __global__ void gemv(const T* x, const T* w, const T* bias, int rows, int k, int n, int mode, int act,
                                T* y, float* yf, T* kc, T* vc, const int* slot, const int* pos, int H, int hd, int cap,
                                unsigned long long* best) {
    __shared__ float part[GEMV_WARPS][GEMV_ROWS];
    int j = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const T* wr = w + (size_t)j * k;
    float acc[GEMV_ROWS];
    for (int r = 0; r < GEMV_ROWS; r++) acc[r] = 0.0f;
    if (k % 8 == 0) {
        // Warp `warp` takes chunks warp, warp + GEMV_WARPS, ... of 256 elements; two loads in flight.
        for (int c = (warp * 32 + lane) * 8; c < k; c += GEMV_WARPS * 256 * 2) {
            int c2 = c + GEMV_WARPS * 256;
            float wv[8], wv2[8], xv[8];
            load8(wr + c, wv);
            bool two = c2 < k;
            if (two) load8(wr + c2, wv2);
            for (int r = 0; r < GEMV_ROWS; r++) {
                if (r < rows) {
                    load8(x + (size_t)r * k + c, xv);
                    for (int i = 0; i < 8; i++) acc[r] += wv[i] * xv[i];
                    if (two) {
                        load8(x + (size_t)r * k + c2, xv);
                        for (int i = 0; i < 8; i++) acc[r] += wv2[i] * xv[i];
                    }
                }
            }
        }
    } else {
        for (int c = warp * 32 + lane; c < k; c += GEMV_WARPS * 32)
            for (int r = 0; r < rows; r++) acc[r] += LD(wr[c]) * LD(x[(size_t)r * k + c]);
    }
    for (int r = 0; r < GEMV_ROWS; r++) {
        float v = warp_sum(acc[r]);
        if (lane == 0) part[warp][r] = v;
    }
    __syncthreads();
    if (warp != 0 || lane >= rows) return;
    int r = lane;
    float v = 0.0f;
    for (int q = 0; q < GEMV_WARPS; q++) v += part[q][r];
    if (mode == 3) {
        yf[(size_t)r * n + j] = v;
        if (best) {
            // Orderable float bits above the inverted index: the max is the best value, lowest index.
            unsigned int b = __float_as_uint(v);
            b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
            atomicMax(best + r, ((unsigned long long)b << 32) | (0xffffffffu - (unsigned int)j));
        }
        return;
    }
    v += LD(bias[j]);
    if (mode == 2) { yf[(size_t)r * n + j] += v; return; }
    if (mode == 1) v = activation(v, act);
    int C = H * hd;
    if (kc && j >= C) {
        int c = j - C, which = c / C, cc = c % C, h = cc / hd, d = cc % hd;
        size_t o = (((size_t)slot[r] * H + h) * cap + pos[r]) * hd + d;
        (which == 0 ? kc : vc)[o] = ST(v);
        return;
    }
    y[(size_t)r * n + j] = ST(v);
}

// ids[b] from the packed maxima of the fused argmax.
extern "C" __global__ void unpack_best(const unsigned long long* best, int* ids, int rows) {
    int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b < rows) ids[b] = (int)(0xffffffffu - (unsigned int)(best[b] & 0xffffffffu));
}

// Split-K ("flash-decoding") attention. Block (r, h, s) takes keys [s·chunk, (s+1)·chunk) of row r's
// 0..=pos and writes its unnormalised partial: m (max score), l (sum of exp), acc[hd] (exp-weighted
// values). Blocks past the row's length write an empty partial. Shared: hd + chunk + blockDim floats.
extern "C" __global__ void attention_split(const T* qkv, const T* kc, const T* vc, float* part_acc, float* part_ml,
                                           const int* slot, const int* pos, int H, int hd, int cap, float scale, int chunk) {
    extern __shared__ float sm[];
    float* q = sm;
    float* sc = sm + hd;
    float* red = sc + chunk;
    int r = blockIdx.x, h = blockIdx.y, sp = blockIdx.z, S = gridDim.z, C = H * hd;
    int tid = threadIdx.x, bs = blockDim.x, lane = tid & 31, warp = tid >> 5, nw = bs >> 5;
    int len = pos[r] + 1, j0 = sp * chunk, n = min(chunk, len - j0);
    size_t pidx = ((size_t)r * H + h) * S + sp;
    if (n <= 0) {
        if (tid == 0) { part_ml[2 * pidx] = -INFINITY; part_ml[2 * pidx + 1] = 0.0f; }
        return;
    }
    const T* qp = qkv + (size_t)r * 3 * C + h * hd;
    for (int d = tid; d < hd; d += bs) q[d] = LD(qp[d]);
    __syncthreads();
    size_t base = ((size_t)slot[r] * H + h) * cap * hd + (size_t)j0 * hd;
    const T* K = kc + base;
    const T* V = vc + base;
    for (int j = warp; j < n; j += nw) {
        float s = 0.0f;
        for (int d = lane; d < hd; d += 32) s += q[d] * LD(K[(size_t)j * hd + d]);
        s = warp_sum(s);
        if (lane == 0) sc[j] = s * scale;
    }
    __syncthreads();
    float m = -INFINITY;
    for (int j = tid; j < n; j += bs) m = fmaxf(m, sc[j]);
    m = block_max(m, red);
    float l = 0.0f;
    for (int j = tid; j < n; j += bs) { float e = expf(sc[j] - m); sc[j] = e; l += e; }
    l = block_sum(l, red);
    __syncthreads();
    // Each thread one output dimension (looping if hd > blockDim), over the chunk's keys.
    for (int d = tid; d < hd; d += bs) {
        float a = 0.0f;
        for (int j = 0; j < n; j++) a += sc[j] * LD(V[(size_t)j * hd + d]);
        part_acc[pidx * hd + d] = a;
    }
    if (tid == 0) { part_ml[2 * pidx] = m; part_ml[2 * pidx + 1] = l; }
}

// out[r][h] = the merged softmax of the S partials. Grid: (rows, H); block: hd threads.
extern "C" __global__ void attention_combine(const float* part_acc, const float* part_ml, T* out, int H, int hd, int S) {
    int r = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
    if (d >= hd) return;
    size_t p0 = ((size_t)r * H + h) * S;
    float M = -INFINITY;
    for (int s = 0; s < S; s++) M = fmaxf(M, part_ml[2 * (p0 + s)]);
    float L = 0.0f, a = 0.0f;
    for (int s = 0; s < S; s++) {
        float m = part_ml[2 * (p0 + s)];
        if (m == -INFINITY) continue;
        float w = expf(m - M);
        L += w * part_ml[2 * (p0 + s) + 1];
        a += w * part_acc[(p0 + s) * hd + d];
    }
    out[(size_t)r * H * hd + h * hd + d] = ST(a / L);
}

// Prefill attention for head_dim 64: block (t, h) runs query rows tiles[2t] .. +tiles[2t+1] (at most 8
// consecutive rows of one sequence, one warp each) over that sequence's keys in tiles of 32 shared
// through shared memory, with an online softmax (one key per lane).
extern "C" __global__ void attention_prefill(const T* qkv, const T* kc, const T* vc, T* out, const int* slot,
                                             const int* pos, const int* tiles, int H, int cap, float scale) {
    __shared__ float Ks[32][65];
    __shared__ float Vs[32][64];
    __shared__ float Qs[8][64];
    int t = blockIdx.x, h = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int r0 = tiles[2 * t], cnt = tiles[2 * t + 1], C = H * 64;
    bool active = warp < cnt;
    int r = r0 + (active ? warp : 0);
    int mypos = active ? pos[r] : -1, maxpos = pos[r0 + cnt - 1];
    if (active) {
        Qs[warp][lane] = LD(qkv[(size_t)r * 3 * C + h * 64 + lane]) * scale;
        Qs[warp][lane + 32] = LD(qkv[(size_t)r * 3 * C + h * 64 + lane + 32]) * scale;
    }
    size_t base = ((size_t)slot[r0] * H + h) * cap * 64;
    float m = -INFINITY, l = 0.0f, o0 = 0.0f, o1 = 0.0f;
    for (int j0 = 0; j0 <= maxpos; j0 += 32) {
        __syncthreads();
        for (int e = threadIdx.x; e < 32 * 64; e += blockDim.x) {
            int jj = e >> 6, d = e & 63, j = j0 + jj;
            bool in = j <= maxpos;
            Ks[jj][d] = in ? LD(kc[base + (size_t)j * 64 + d]) : 0.0f;
            Vs[jj][d] = in ? LD(vc[base + (size_t)j * 64 + d]) : 0.0f;
        }
        __syncthreads();
        if (!active || j0 > mypos) continue;
        int j = j0 + lane;
        float s = -INFINITY;
        if (j <= mypos) {
            float a = 0.0f;
            for (int d = 0; d < 64; d++) a += Qs[warp][d] * Ks[lane][d];
            s = a;
        }
        float mnew = fmaxf(m, warp_max(s));
        float p = j <= mypos ? expf(s - mnew) : 0.0f;
        float corr = expf(m - mnew);
        l = l * corr + warp_sum(p);
        o0 *= corr;
        o1 *= corr;
        for (int jj = 0; jj < 32; jj++) {
            float pj = __shfl_sync(0xffffffff, p, jj);
            o0 += pj * Vs[jj][lane];
            o1 += pj * Vs[jj][lane + 32];
        }
        m = mnew;
    }
    if (active) {
        out[(size_t)r * C + h * 64 + lane] = ST(o0 / l);
        out[(size_t)r * C + h * 64 + lane + 32] = ST(o1 / l);
    }
}
