// mangrove prelude: prepended to every rendered template (part of each template's content hash).

// Programmatic dependent launch. A template whose schema says `pdl = true` calls GRID_DEP_WAIT()
// before it reads or writes any memory that another kernel may write (weights, never written by
// a kernel, may be prefetched before it). It holds the block until the previous kernel of the
// stream has finished and its writes are visible, then lets the next kernel be scheduled while
// this one runs. Without a PDL launch (or below sm_90) it costs nothing.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define GRID_DEP_WAIT() asm volatile("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;" ::: "memory")
#define PREFETCH_L2(p) asm volatile("prefetch.global.L2 [%0];" ::"l"(p))
#else
#define GRID_DEP_WAIT() do {} while (0)
#define PREFETCH_L2(p) do {} while (0)
#endif

// bf16 as raw bits: f32 -> bf16 rounds to nearest even (NaNs stay quiet NaNs); bf16 -> f32 is exact.
__device__ __forceinline__ unsigned short f32_to_bf16_bits(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                                   // round to nearest even
    return (unsigned short)(u >> 16);
}
__device__ __forceinline__ float bf16_bits_to_f32(unsigned bits) { return __uint_as_float(bits << 16); }

// KV-cache elements: f32, or bf16 bits (a template picks kv_t with its KV_BF16 parameter).
// kv_get widens one element, kv_put stores one (rounded to nearest even for bf16), and
// kv_round<kv_t> is the value a store then a load gives back.
__device__ __forceinline__ float kv_get(const float* p) { return *p; }
__device__ __forceinline__ float kv_get(const unsigned short* p) { return bf16_bits_to_f32(*p); }
__device__ __forceinline__ void kv_put(float* p, float v) { *p = v; }
__device__ __forceinline__ void kv_put(unsigned short* p, float v) { *p = f32_to_bf16_bits(v); }
template <typename T> __device__ __forceinline__ float kv_round(float v);
template <> __device__ __forceinline__ float kv_round<float>(float v) { return v; }
template <> __device__ __forceinline__ float kv_round<unsigned short>(float v) { return bf16_bits_to_f32(f32_to_bf16_bits(v)); }

// The row GEMVs' prologue: an L2 prefetch of the first UNROLL chunks (VEC bytes, 32 lanes apart,
// starting at chunk c) of each of the warp's RPW weight rows, skipping chunks at or past c_end.
template <int UNROLL, int RPW, int VEC>
__device__ __forceinline__ void prefetch_first_chunks(const unsigned char* const (&rows)[RPW], int c, int c_end) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
#pragma unroll
        for (int i = 0; i < RPW; ++i)
            if (c + u * 32 < c_end) PREFETCH_L2(rows[i] + (size_t)(c + u * 32) * VEC);
}


// Block-wide reduction over the block's NWARPS warps (sum when MAX is false, max otherwise),
// in warp order; every thread gets the result. `red` holds NWARPS floats of shared memory.
template <int NWARPS, bool MAX>
__device__ __forceinline__ float block_reduce(float v, float* red) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        float o = __shfl_xor_sync(0xffffffffu, v, off);
        v = MAX ? fmaxf(v, o) : v + o;
    }
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float r = red[0];
    for (int w = 1; w < NWARPS; ++w) r = MAX ? fmaxf(r, red[w]) : r + red[w];
    __syncthreads();
    return r;
}
