// One denoising step's action-expert layers (pi0.5: adaptive RMSNorm, FP8 GEMMs) in one persistent
// kernel: a block per multiprocessor walks the phases of every layer, with a grid-wide barrier between
// phases, instead of about twelve kernels per layer. Built and loaded by graphs/expert_step.py, which
// also says what the phases compute and how they match the unfused path.
//
// Phases of layer i (M = batch * suffix rows, at most 64; "row" phases give a block a row):
//   norm     (first layer only) adaptive RMSNorm of the input, FP8 with q/k/v's input scale
//   qkv      FP8 GEMM [M, D] x [D, (H+2)*256] -> bf16
//   attend   split over (batch, 64 query rows, 64 keys): RoPE on the queries and suffix keys as they
//            load, scores, a softmax over the chunk, its unnormalised P.V and (max, sum) per row
//   merge    the chunks' partial softmaxes -> attention output, FP8 with the output projection's scale
//   o        FP8 GEMM split along K into 8 slices -> float32 partial sums
//   residual (row) the slices summed, gated residual, the post-attention adaptive norm -> FP8
//   gate/up  FP8 GEMM with gate and up columns side by side, GeGLU, FP8 with down's input scale
//   down     FP8 GEMM split along K into 8 slices -> float32 partial sums
//   out      (row) summed, gated residual -> the layer's output; the next layer's input norm with it
//
// The FP8 GEMMs use mma.sync m16n8k32 (sm_89+). Within each 64-byte slice of K, lane q of a quad
// loads the 16 contiguous bytes [16q, 16q+16) of its A rows and its B column (one 16-byte load each)
// and feeds them to two MMAs: a dot product does not care in which order K is summed, as long as A and
// B use the same order.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int HEAD_DIM = 256;
constexpr int HALF_DIM = HEAD_DIM / 2;
constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int MAX_ROWS = 64;      // M = batch * suffix rows
constexpr int CHUNK = 64;         // bytes of K per lane-quad load
constexpr int A_PAD = 64;         // bytes after each FP8 row in shared memory: rows 8 apart in banks
constexpr int Q_TILE = 64;        // query rows per attention unit
constexpr int KEY_TILE = 64;      // keys per attention unit
constexpr int ATT_STRIDE = HEAD_DIM + 8;  // bf16 per Q/K row in shared memory
constexpr int S_STRIDE = KEY_TILE + 4;    // float per score row
constexpr int P_STRIDE = KEY_TILE + 8;    // bf16 per probability row
constexpr int SPLIT_K = 8;        // K slices of the o and down GEMMs
constexpr int TILES_PER_UNIT = 8; // n8 tiles a block's GEMM unit covers at most
constexpr float E4M3_MAX = 448.f;

// Columns of the per-layer table (int64 device pointers), as graphs/expert_step.py fills it.
enum Column { W_QKV, W_O, W_GATE_UP, W_DOWN, IN_QKV, SCALE_QKV, IN_O, SCALE_O, IN_GATE_UP, SCALE_GATE_UP,
              IN_DOWN, SCALE_DOWN, TABLE_COLUMNS };

struct Args {
  const int64_t* table;                      // [depth, TABLE_COLUMNS]
  int layer_begin, layer_end;
  const __nv_bfloat16* hidden_in;            // [M, D]
  __nv_bfloat16* hidden_out;                 // [M, D]
  const __nv_bfloat16* mods;                 // [2 * depth + 1, B, 3D]: scale, shift, gate
  const __nv_bfloat16* kv;                   // [depth, 2, B, 1, P, 256]: the prefix cache
  const __nv_bfloat16* cos;                  // [B, S, 256]
  const __nv_bfloat16* sin;
  const __nv_bfloat16* bias;                 // [B, 1, S, bias_len], additive
  int B, S, P, bias_len, D, F, H;
  float eps;
  uint8_t* scratch;
  unsigned* barrier;                         // zero at launch
  unsigned long long* stamps;                // null, or a benchmark's: a time after each barrier
};

struct Scratch {
  uint8_t* normed;        // [64, D] e4m3
  __nv_bfloat16* qkv;     // [64, (H+2)*256]
  float* att_out;         // [units, 64, 256]
  float2* att_stats;      // [units, 64]: (max, sum)
  uint8_t* att_fp8;       // [64, H*256]
  float* partial;         // [SPLIT_K, 64, D]
  __nv_bfloat16* mid;     // [64, D]: after the attention's residual
  uint8_t* normed2;       // [64, D]
  uint8_t* geglu;         // [64, F]
  __nv_bfloat16* hidden;  // [64, D]: between layers
};

__host__ __device__ inline size_t align256(size_t n) { return (n + 255) & ~size_t(255); }

__host__ __device__ inline int attention_units(int B, int S, int P, int H) {
  int query_tiles = (S * H + Q_TILE - 1) / Q_TILE;
  int key_tiles = (P + S + KEY_TILE - 1) / KEY_TILE;
  return B * query_tiles * key_tiles;
}

// The scratch layout; the same function sizes it on the host.
__host__ __device__ inline size_t carve(uint8_t* base, int B, int S, int P, int D, int F, int H, Scratch* s) {
  size_t off = 0;
  auto take = [&](size_t bytes) { uint8_t* p = base + off; off += align256(bytes); return p; };
  int units = attention_units(B, S, P, H);
  Scratch out;
  out.normed = take(size_t(MAX_ROWS) * D);
  out.qkv = reinterpret_cast<__nv_bfloat16*>(take(size_t(MAX_ROWS) * (H + 2) * HEAD_DIM * 2));
  out.att_out = reinterpret_cast<float*>(take(size_t(units) * Q_TILE * HEAD_DIM * 4));
  out.att_stats = reinterpret_cast<float2*>(take(size_t(units) * Q_TILE * 8));
  out.att_fp8 = take(size_t(MAX_ROWS) * H * HEAD_DIM);
  out.partial = reinterpret_cast<float*>(take(size_t(SPLIT_K) * MAX_ROWS * D * 4));
  out.mid = reinterpret_cast<__nv_bfloat16*>(take(size_t(MAX_ROWS) * D * 2));
  out.normed2 = take(size_t(MAX_ROWS) * D);
  out.geglu = take(size_t(MAX_ROWS) * F);
  out.hidden = reinterpret_cast<__nv_bfloat16*>(take(size_t(MAX_ROWS) * D * 2));
  if (s) *s = out;
  return off;
}

// ---- small helpers -------------------------------------------------------------------------------

__device__ inline float bf16_round(float x) { return __bfloat162float(__float2bfloat16(x)); }

__device__ inline uint8_t to_e4m3(float x, float scale) {
  float v = fminf(fmaxf(x / scale, -E4M3_MAX), E4M3_MAX);
  return __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
}

// Cross-block data is read through L2 (ld.global.cg): a multiprocessor's L1 is not kept coherent.
__device__ inline uint4 load_l2(const void* p) { return __ldcg(reinterpret_cast<const uint4*>(p)); }
__device__ inline float4 load_l2f(const float* p) { return __ldcg(reinterpret_cast<const float4*>(p)); }

__device__ inline void mma_fp8(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                               uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ inline void mma_bf16(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ inline uint32_t smem_u32(const __nv_bfloat16* p) { return *reinterpret_cast<const uint32_t*>(p); }

// 16 bytes global -> shared without a register round trip; many in flight per thread (L2 only: .cg).
__device__ inline void copy_async16(void* dst, const void* src) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src) : "memory");
}
__device__ inline void copy_async_wait() { asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory"); }

// Two 8x8 bf16 matrices of a row-major tile, transposed into an MMA's B fragment: lanes 0-15 name rows.
__device__ inline void ldmatrix_x2_trans(uint32_t& r0, uint32_t& r1, const __nv_bfloat16* row) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(address));
}

__device__ inline unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Every block arrives, then waits for all: the writes before it are visible to the reads after it (the
// block's barrier orders its threads' writes before thread 0's release; its acquire before their reads:
// the pattern of cooperative groups' grid sync). `fences` adds the full fences an older pattern had
// (the barrier benchmark compares). With `stamps` (a benchmark's), block 0 records when it left.
template <bool fences = false>
__device__ inline void grid_barrier(unsigned* counter, unsigned& target, unsigned long long* stamps, int& stamp) {
  __syncthreads();
  target += gridDim.x;
  if (threadIdx.x == 0) {
    if (fences) __threadfence();
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;\n" ::"l"(counter) : "memory");
    unsigned seen;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(seen) : "l"(counter) : "memory");
    } while (seen < target);
    if (fences) __threadfence();
    if (stamps && blockIdx.x == 0) stamps[stamp] = global_ns();
  }
  ++stamp;
  __syncthreads();
}

// Barriers alone, for the benchmark: their cost apart from the phases'.
template <bool fences>
__global__ void __launch_bounds__(THREADS, 1) barrier_kernel(unsigned* counter, int n, unsigned long long* stamps) {
  unsigned target = 0;
  int stamp = 0;
  for (int i = 0; i < n; ++i) grid_barrier<fences>(counter, target, nullptr, stamp);
  stamp = 0;
  grid_barrier<fences>(counter, target, stamps, stamp);
}

__device__ inline float block_sum(float v, float* shared) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) total += shared[w];
  return total;
}

template <typename T>
__device__ inline const T* ptr(const int64_t* row, int column) {
  return reinterpret_cast<const T*>(row[column]);
}

// ---- row phases ----------------------------------------------------------------------------------

// Adaptive RMSNorm of one row held as floats x[c] (c = threadIdx.x + k * THREADS), then FP8.
template <int PER_THREAD>
__device__ void norm_row_to_fp8(const float* x, int D, float eps, const __nv_bfloat16* mod, float in_scale,
                                uint8_t* out, float* shared) {
  float squares = 0.f;
#pragma unroll
  for (int k = 0; k < PER_THREAD; ++k) squares += x[k] * x[k];
  float inv = rsqrtf(block_sum(squares, shared) / D + eps);
#pragma unroll
  for (int k = 0; k < PER_THREAD; ++k) {
    int c = threadIdx.x + k * THREADS;
    float scale = __bfloat162float(mod[c]), shift = __bfloat162float(mod[D + c]);
    out[c] = to_e4m3(bf16_round(x[k] * inv * (1.f + scale) + shift), in_scale);
  }
}

// ---- the FP8 GEMM units --------------------------------------------------------------------------

// The first weight row of a unit's n8 tile t: consecutive tiles from `base`, or with `pair_offset`
// (gate/up) tile 2i at base + 8i (gate) and 2i + 1 at base + 8i + pair_offset (up).
__device__ inline int weight_row(int base, int pair_offset, int t) {
  return pair_offset ? base + (t / 2) * 8 + (t % 2) * pair_offset : base + t * 8;
}

// A block's GEMM unit: rows [0, M) of A (FP8 [M, lda]) over K slice [k0, k0 + klen), against
// `tiles` n8 column tiles of W (FP8 [N, ldw]); float32 sums land in `acc` [tiles][64][8] (shared).
// A is staged in shared memory first; warps split the tiles, and K when there are fewer than 8.
template <int MT>
__device__ void gemm_unit(const uint8_t* A, int lda, int M, int k0, int klen, const uint8_t* W, int ldw,
                          int w_base, int pair_offset, int tiles, uint8_t* smem_a, float* acc) {
  const int stride = klen + A_PAD;
  // Stage A (rows past M are zeros) and clear the accumulators.
  for (int i = threadIdx.x; i < MT * 16 * (klen / 16); i += THREADS) {
    int r = i / (klen / 16), c = (i % (klen / 16)) * 16;
    if (r < M)
      copy_async16(smem_a + r * stride + c, A + size_t(r) * lda + k0 + c);
    else
      *reinterpret_cast<uint4*>(smem_a + r * stride + c) = make_uint4(0, 0, 0, 0);
  }
  for (int i = threadIdx.x; i < tiles * MAX_ROWS * 8; i += THREADS) acc[i] = 0.f;
  copy_async_wait();
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  const int chunks = klen / CHUNK;
  const int k_parts = tiles >= WARPS ? 1 : WARPS / tiles;  // warps per tile
  const int tasks = tiles * k_parts;
  const int chunks_per_part = (chunks + k_parts - 1) / k_parts;
  for (int task = warp; task < tasks; task += WARPS) {
    int tile = task / k_parts, part = task % k_parts;
    int c_begin = part * chunks_per_part, c_end = min(chunks, c_begin + chunks_per_part);
    const uint8_t* w = W + size_t(weight_row(w_base, pair_offset, tile) + g) * ldw + k0 + q * 16;
    float c[MT][4] = {};
    for (int cb = c_begin; cb < c_end; cb += 8) {
      uint4 b[8];
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (cb + j < c_end) b[j] = __ldg(reinterpret_cast<const uint4*>(w + (cb + j) * CHUNK));
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (cb + j >= c_end) break;
        const uint8_t* a = smem_a + (cb + j) * CHUNK + q * 16;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          uint4 lo = *reinterpret_cast<const uint4*>(a + (mt * 16 + g) * stride);
          uint4 hi = *reinterpret_cast<const uint4*>(a + (mt * 16 + g + 8) * stride);
          mma_fp8(c[mt], lo.x, hi.x, lo.y, hi.y, b[j].x, b[j].y);
          mma_fp8(c[mt], lo.z, hi.z, lo.w, hi.w, b[j].z, b[j].w);
        }
      }
    }
    float* t = acc + tile * MAX_ROWS * 8;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      int r = mt * 16 + g;
      atomicAdd(t + r * 8 + 2 * q, c[mt][0]);
      atomicAdd(t + r * 8 + 2 * q + 1, c[mt][1]);
      atomicAdd(t + (r + 8) * 8 + 2 * q, c[mt][2]);
      atomicAdd(t + (r + 8) * 8 + 2 * q + 1, c[mt][3]);
    }
  }
  __syncthreads();
}

// ---- attention -----------------------------------------------------------------------------------

struct AttentionShared {
  __nv_bfloat16 q[Q_TILE * ATT_STRIDE];
  __nv_bfloat16 k[KEY_TILE * ATT_STRIDE];
  __nv_bfloat16 v[KEY_TILE * ATT_STRIDE];
  float s[Q_TILE * S_STRIDE];
  __nv_bfloat16 p[Q_TILE * P_STRIDE];
};

// 8 contiguous bf16 of a head vector rotated (RoPE) with its partner half: x_lo = dims [d, d+8), x_hi =
// dims [d+128, d+136), with the token's cos/sin at the same dims. Writes the rotated lo and hi halves.
__device__ inline void rope8(const uint4& lo_raw, const uint4& hi_raw, const uint4& cos_lo, const uint4& cos_hi,
                             const uint4& sin_lo, const uint4& sin_hi, __nv_bfloat16* out_lo, __nv_bfloat16* out_hi) {
  const __nv_bfloat16* lo = reinterpret_cast<const __nv_bfloat16*>(&lo_raw);
  const __nv_bfloat16* hi = reinterpret_cast<const __nv_bfloat16*>(&hi_raw);
  const __nv_bfloat16* cl = reinterpret_cast<const __nv_bfloat16*>(&cos_lo);
  const __nv_bfloat16* ch = reinterpret_cast<const __nv_bfloat16*>(&cos_hi);
  const __nv_bfloat16* sl = reinterpret_cast<const __nv_bfloat16*>(&sin_lo);
  const __nv_bfloat16* sh = reinterpret_cast<const __nv_bfloat16*>(&sin_hi);
  __align__(16) __nv_bfloat16 out_l[8], out_h[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float xl = __bfloat162float(lo[i]), xh = __bfloat162float(hi[i]);
    out_l[i] = __float2bfloat16(xl * __bfloat162float(cl[i]) - xh * __bfloat162float(sl[i]));
    out_h[i] = __float2bfloat16(xh * __bfloat162float(ch[i]) + xl * __bfloat162float(sh[i]));
  }
  *reinterpret_cast<uint4*>(out_lo) = *reinterpret_cast<const uint4*>(out_l);
  *reinterpret_cast<uint4*>(out_hi) = *reinterpret_cast<const uint4*>(out_h);
}

// A value row of the suffix (t) or of the cache (j < P); zeros past the keys.
__device__ inline const __nv_bfloat16* key_source(const Args& a, const Scratch& s, const __nv_bfloat16* cache,
                                                  int b, int j, int qkv_col, bool* from_suffix, int* t) {
  *from_suffix = false;
  if (j < a.P) return cache + size_t(j) * HEAD_DIM;
  if (j < a.P + a.S) {
    *from_suffix = true;
    *t = j - a.P;
    return s.qkv + size_t(b * a.S + *t) * (a.H + 2) * HEAD_DIM + qkv_col;
  }
  return nullptr;
}

__device__ void attention_unit(const Args& a, const Scratch& s, int layer, int unit, AttentionShared& sh) {
  const int R = a.S * a.H;  // query rows per batch element, token-major (t * H + head)
  const int query_tiles = (R + Q_TILE - 1) / Q_TILE;
  const int key_tiles = (a.P + a.S + KEY_TILE - 1) / KEY_TILE;
  const int b = unit / (query_tiles * key_tiles);
  const int qt = (unit / key_tiles) % query_tiles, kt = unit % key_tiles;
  const int qkv_cols = (a.H + 2) * HEAD_DIM;
  const __nv_bfloat16* cache_k = a.kv + (size_t(layer) * 2 * a.B + b) * a.P * HEAD_DIM;
  const __nv_bfloat16* cache_v = cache_k + size_t(a.B) * a.P * HEAD_DIM;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  constexpr int SEGMENTS = HALF_DIM / 8;  // 8-dim segments of a half head

  // Values and the cache's keys (already rotated) go straight to shared memory; rows past the keys are
  // zeros (masked, but they must not be NaN).
  for (int i = threadIdx.x; i < KEY_TILE * (HEAD_DIM / 8); i += THREADS) {
    const int key = i / (HEAD_DIM / 8), d = (i % (HEAD_DIM / 8)) * 8, j = kt * KEY_TILE + key;
    bool suffix;
    int t;
    const __nv_bfloat16* v = key_source(a, s, cache_v, b, j, (a.H + 1) * HEAD_DIM, &suffix, &t);
    if (v != nullptr)
      copy_async16(sh.v + key * ATT_STRIDE + d, v + d);
    else
      *reinterpret_cast<uint4*>(sh.v + key * ATT_STRIDE + d) = zero;
    if (j < a.P)
      copy_async16(sh.k + key * ATT_STRIDE + d, cache_k + size_t(j) * HEAD_DIM + d);
    else if (j >= a.P + a.S)
      *reinterpret_cast<uint4*>(sh.k + key * ATT_STRIDE + d) = zero;
  }
  // The queries and the suffix's keys, rotated (RoPE) as they load: items of 8 dims and their partners
  // 128 dims on, loads of a round issued before any is used.
  constexpr int ITEMS = (Q_TILE + KEY_TILE) * SEGMENTS / THREADS, ROUND = 2;
  static_assert(ITEMS % ROUND == 0, "whole rounds");
#pragma unroll
  for (int first = 0; first < ITEMS; first += ROUND) {
    uint4 lo[ROUND], hi[ROUND], cos_lo[ROUND], cos_hi[ROUND], sin_lo[ROUND], sin_hi[ROUND];
    __nv_bfloat16* dst[ROUND];
    int d[ROUND];
    bool rotate[ROUND];
#pragma unroll
    for (int u = 0; u < ROUND; ++u) {
      const int i = threadIdx.x + (first + u) * THREADS;
      const bool is_key = i >= Q_TILE * SEGMENTS;
      const int row = (is_key ? i - Q_TILE * SEGMENTS : i) / SEGMENTS;
      d[u] = (i % SEGMENTS) * 8;
      dst[u] = (is_key ? sh.k : sh.q) + row * ATT_STRIDE;
      const __nv_bfloat16* src = nullptr;
      int t = 0;
      if (is_key) {
        const int j = kt * KEY_TILE + row;
        if (j >= a.P && j < a.P + a.S) {
          t = j - a.P;
          src = s.qkv + size_t(b * a.S + t) * qkv_cols + a.H * HEAD_DIM;
        }
      } else if (qt * Q_TILE + row < R) {
        const int r = qt * Q_TILE + row;
        t = r / a.H;
        src = s.qkv + size_t(b * a.S + t) * qkv_cols + (r % a.H) * HEAD_DIM;
      }
      rotate[u] = src != nullptr;
      if (rotate[u]) {
        const size_t table_row = size_t(b * a.S + t) * HEAD_DIM + d[u];
        lo[u] = load_l2(src + d[u]);
        hi[u] = load_l2(src + d[u] + HALF_DIM);
        cos_lo[u] = __ldg(reinterpret_cast<const uint4*>(a.cos + table_row));
        cos_hi[u] = __ldg(reinterpret_cast<const uint4*>(a.cos + table_row + HALF_DIM));
        sin_lo[u] = __ldg(reinterpret_cast<const uint4*>(a.sin + table_row));
        sin_hi[u] = __ldg(reinterpret_cast<const uint4*>(a.sin + table_row + HALF_DIM));
      } else if (!is_key) {  // query rows past the last: zeros
        *reinterpret_cast<uint4*>(dst[u] + d[u]) = zero;
        *reinterpret_cast<uint4*>(dst[u] + d[u] + HALF_DIM) = zero;
      }
    }
#pragma unroll
    for (int u = 0; u < ROUND; ++u)
      if (rotate[u]) rope8(lo[u], hi[u], cos_lo[u], cos_hi[u], sin_lo[u], sin_hi[u], dst[u] + d[u], dst[u] + d[u] + HALF_DIM);
  }
  copy_async_wait();
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  const int mt = warp / 2, half = warp % 2;
  const float scale = rsqrtf(float(HEAD_DIM));
  {  // scores: warp (mt, half) computes query rows [16 mt, 16 mt + 16) x keys [32 half, 32 half + 32)
    float c[4][4] = {};
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
      const __nv_bfloat16* qa = sh.q + (mt * 16 + g) * ATT_STRIDE + kk * 16 + 2 * q;
      uint32_t a0 = smem_u32(qa), a1 = smem_u32(qa + 8 * ATT_STRIDE), a2 = smem_u32(qa + 8),
               a3 = smem_u32(qa + 8 * ATT_STRIDE + 8);
#pragma unroll
      for (int n = 0; n < 4; ++n) {
        const __nv_bfloat16* kb = sh.k + ((half * 4 + n) * 8 + g) * ATT_STRIDE + kk * 16 + 2 * q;
        mma_bf16(c[n], a0, a1, a2, a3, smem_u32(kb), smem_u32(kb + 8));
      }
    }
#pragma unroll
    for (int n = 0; n < 4; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = mt * 16 + g + (e / 2) * 8, col = (half * 4 + n) * 8 + 2 * q + e % 2;
        const int r = qt * Q_TILE + row, j = kt * KEY_TILE + col;
        float v = -INFINITY;
        if (r < R && j < a.P + a.S) {
          // As the unfused path: the scores GEMM writes bf16, then scale and bias in float32.
          const float bias = __bfloat162float(a.bias[size_t(b * a.S + r / a.H) * a.bias_len + j]);
          v = bf16_round(c[n][e]) * scale + bias;
        }
        sh.s[row * S_STRIDE + col] = v;
      }
    }
  }
  __syncthreads();
  {  // this chunk's softmax: four threads a row, 16 keys each; unnormalised probabilities in bf16
    const int row = threadIdx.x / 4, part = threadIdx.x % 4;
    float* sr = sh.s + row * S_STRIDE + part * 16;
    float m = -INFINITY;
#pragma unroll
    for (int k = 0; k < 16; ++k) m = fmaxf(m, sr[k]);
    m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 1));
    m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 2));
    float l = 0.f;
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      const float p = m == -INFINITY ? 0.f : expf(sr[k] - m);
      l += p;
      sh.p[row * P_STRIDE + part * 16 + k] = __float2bfloat16(p);
    }
    l += __shfl_xor_sync(0xffffffff, l, 1);
    l += __shfl_xor_sync(0xffffffff, l, 2);
    if (part == 0) s.att_stats[size_t(unit) * Q_TILE + row] = make_float2(m, l);
  }
  __syncthreads();
  {  // P.V: warp (mt, half) computes query rows [16 mt, +16) x dims [128 half, +128)
    float c[16][4] = {};
    for (int kk = 0; kk < KEY_TILE / 16; ++kk) {
      const __nv_bfloat16* pa = sh.p + (mt * 16 + g) * P_STRIDE + kk * 16 + 2 * q;
      uint32_t a0 = smem_u32(pa), a1 = smem_u32(pa + 8 * P_STRIDE), a2 = smem_u32(pa + 8),
               a3 = smem_u32(pa + 8 * P_STRIDE + 8);
#pragma unroll
      for (int n = 0; n < 16; ++n) {
        uint32_t b0, b1;  // keys [16 kk, +16) x dims [8 (16 half + n), +8), lanes 0-15 naming the keys
        ldmatrix_x2_trans(b0, b1, sh.v + (kk * 16 + lane % 16) * ATT_STRIDE + (half * 16 + n) * 8);
        mma_bf16(c[n], a0, a1, a2, a3, b0, b1);
      }
    }
    float* out = s.att_out + size_t(unit) * Q_TILE * HEAD_DIM;
#pragma unroll
    for (int n = 0; n < 16; ++n) {
      const int row = mt * 16 + g, col = (half * 16 + n) * 8 + 2 * q;
      *reinterpret_cast<float2*>(out + row * HEAD_DIM + col) = make_float2(c[n][0], c[n][1]);
      *reinterpret_cast<float2*>(out + (row + 8) * HEAD_DIM + col) = make_float2(c[n][2], c[n][3]);
    }
  }
  __syncthreads();  // the shared tiles are reused by the block's next unit
}

// The key chunks' partial softmaxes of one query row and 4 dims -> bf16 -> FP8 for the output projection.
__device__ void merge_attention(const Args& a, const Scratch& s, float in_o) {
  const int R = a.S * a.H;
  const int query_tiles = (R + Q_TILE - 1) / Q_TILE;
  const int key_tiles = (a.P + a.S + KEY_TILE - 1) / KEY_TILE;
  const int total = a.B * R * (HEAD_DIM / 4);
  for (int i = blockIdx.x * THREADS + threadIdx.x; i < total; i += gridDim.x * THREADS) {
    const int b = i / (R * (HEAD_DIM / 4)), r = (i / (HEAD_DIM / 4)) % R, d = (i % (HEAD_DIM / 4)) * 4;
    const int first = (b * query_tiles + r / Q_TILE) * key_tiles, row = r % Q_TILE;
    constexpr int BATCH = 8;  // key tiles whose partial results are loaded before any is used
    float m = -INFINITY;
    for (int k0 = 0; k0 < key_tiles; k0 += BATCH) {
      float2 st[BATCH];
#pragma unroll
      for (int u = 0; u < BATCH; ++u)
        st[u] = k0 + u < key_tiles ? __ldcg(&s.att_stats[size_t(first + k0 + u) * Q_TILE + row])
                                   : make_float2(-INFINITY, 0.f);
#pragma unroll
      for (int u = 0; u < BATCH; ++u) m = fmaxf(m, st[u].x);
    }
    float4 num = make_float4(0.f, 0.f, 0.f, 0.f);
    float den = 0.f;
    for (int k0 = 0; k0 < key_tiles; k0 += BATCH) {
      float2 st[BATCH];
      float4 o[BATCH];
#pragma unroll
      for (int u = 0; u < BATCH; ++u) {
        const bool in = k0 + u < key_tiles;
        const size_t tile = size_t(first + k0 + u) * Q_TILE + row;
        st[u] = in ? __ldcg(&s.att_stats[tile]) : make_float2(-INFINITY, 0.f);
        o[u] = in ? load_l2f(s.att_out + tile * HEAD_DIM + d) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int u = 0; u < BATCH; ++u) {
        if (st[u].x == -INFINITY) continue;  // no key of this tile may be attended to
        const float w = expf(st[u].x - m);
        num.x += w * o[u].x, num.y += w * o[u].y, num.z += w * o[u].z, num.w += w * o[u].w;
        den += w * st[u].y;
      }
    }
    const int t = r / a.H, head = r % a.H;
    uint8_t* dst = s.att_fp8 + size_t(b * a.S + t) * a.H * HEAD_DIM + head * HEAD_DIM + d;
    // As the unfused path: the P.V GEMM writes bf16, which the output projection casts to FP8.
    const uint32_t packed = uint32_t(to_e4m3(bf16_round(num.x / den), in_o)) |
                            uint32_t(to_e4m3(bf16_round(num.y / den), in_o)) << 8 |
                            uint32_t(to_e4m3(bf16_round(num.z / den), in_o)) << 16 |
                            uint32_t(to_e4m3(bf16_round(num.w / den), in_o)) << 24;
    *reinterpret_cast<uint32_t*>(dst) = packed;
  }
}

// ---- the kernel ----------------------------------------------------------------------------------

constexpr int PER_THREAD = 4;  // D = 1024 = 4 x THREADS (checked by the launcher)

__device__ inline const __nv_bfloat16* modulation(const Args& a, int norm_index, int b) {
  return a.mods + (size_t(norm_index) * a.B + b) * 3 * a.D;
}

__device__ inline float scalar(const int64_t* row, int column) { return *ptr<float>(row, column); }

template <int MT>
__global__ void __launch_bounds__(THREADS, 1) expert_step_kernel(Args a) {
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ float reduce_shared[WARPS];
  Scratch s;
  carve(a.scratch, a.B, a.S, a.P, a.D, a.F, a.H, &s);
  unsigned target = 0;
  int stamp = 1;
  if (a.stamps && blockIdx.x == 0 && threadIdx.x == 0) a.stamps[0] = global_ns();
  const int M = a.B * a.S, D = a.D, F = a.F, HD = a.H * HEAD_DIM, qkv_cols = (a.H + 2) * HEAD_DIM;
  uint8_t* smem_a = smem;
  float* acc = nullptr;  // after the A tile: set per GEMM

  for (int layer = a.layer_begin; layer < a.layer_end; ++layer) {
    const int64_t* w = a.table + size_t(layer) * TABLE_COLUMNS;
    const __nv_bfloat16* layer_in = layer == a.layer_begin ? a.hidden_in : s.hidden;

    if (layer == a.layer_begin) {  // the input norm (later layers get it from the previous one's out phase)
      for (int r = blockIdx.x; r < M; r += gridDim.x) {
        float x[PER_THREAD];
#pragma unroll
        for (int k = 0; k < PER_THREAD; ++k) x[k] = __bfloat162float(layer_in[size_t(r) * D + threadIdx.x + k * THREADS]);
        norm_row_to_fp8<PER_THREAD>(x, D, a.eps, modulation(a, 2 * layer, r / a.S), scalar(w, IN_QKV),
                                    s.normed + size_t(r) * D, reduce_shared);
      }
      grid_barrier(a.barrier, target, a.stamps, stamp);
    }

    {  // q/k/v: units of consecutive n8 tiles over the whole K
      const int tiles = qkv_cols / 8;
      const int per_unit = min(TILES_PER_UNIT, (tiles + gridDim.x - 1) / gridDim.x);
      const int units = (tiles + per_unit - 1) / per_unit;
      const float out_scale = scalar(w, IN_QKV) * scalar(w, SCALE_QKV);
      acc = reinterpret_cast<float*>(smem + MT * 16 * (D + A_PAD));
      for (int u = blockIdx.x; u < units; u += gridDim.x) {
        const int first = u * per_unit, n = min(per_unit, tiles - first);
        gemm_unit<MT>(s.normed, D, M, 0, D, ptr<uint8_t>(w, W_QKV), D, first * 8, 0, n, smem_a, acc);
        for (int i = threadIdx.x; i < n * M * 8; i += THREADS) {
          const int tile = i / (M * 8), r = (i / 8) % M, c = i % 8;
          s.qkv[size_t(r) * qkv_cols + (first + tile) * 8 + c] =
              __float2bfloat16(acc[(tile * MAX_ROWS + r) * 8 + c] * out_scale);
        }
        __syncthreads();
      }
    }
    grid_barrier(a.barrier, target, a.stamps, stamp);

    {
      AttentionShared& sh = *reinterpret_cast<AttentionShared*>(smem);
      const int units = attention_units(a.B, a.S, a.P, a.H);
      for (int u = blockIdx.x; u < units; u += gridDim.x) attention_unit(a, s, layer, u, sh);
    }
    grid_barrier(a.barrier, target, a.stamps, stamp);
    merge_attention(a, s, scalar(w, IN_O));
    grid_barrier(a.barrier, target, a.stamps, stamp);

    // o and down: 64-column groups x SPLIT_K slices of K, float32 partial sums.
    auto split_gemm = [&](const uint8_t* A, int K, const uint8_t* W) {
      const int klen = K / SPLIT_K, groups = D / (TILES_PER_UNIT * 8);
      acc = reinterpret_cast<float*>(smem + MT * 16 * (klen + A_PAD));
      for (int u = blockIdx.x; u < groups * SPLIT_K; u += gridDim.x) {
        const int group = u / SPLIT_K, slice = u % SPLIT_K;
        gemm_unit<MT>(A, K, M, slice * klen, klen, W, K, group * TILES_PER_UNIT * 8, 0, TILES_PER_UNIT, smem_a,
                      acc);
        for (int i = threadIdx.x; i < TILES_PER_UNIT * M * 8; i += THREADS) {
          const int tile = i / (M * 8), r = (i / 8) % M, c = i % 8;
          s.partial[(size_t(slice) * MAX_ROWS + r) * D + (group * TILES_PER_UNIT + tile) * 8 + c] =
              acc[(tile * MAX_ROWS + r) * 8 + c];
        }
        __syncthreads();
      }
    };
    split_gemm(s.att_fp8, HD, ptr<uint8_t>(w, W_O));
    grid_barrier(a.barrier, target, a.stamps, stamp);

    {  // the attention's gated residual and the post-attention norm
      const float o_scale = scalar(w, IN_O) * scalar(w, SCALE_O);
      for (int r = blockIdx.x; r < M; r += gridDim.x) {
        const __nv_bfloat16* mod_in = modulation(a, 2 * layer, r / a.S);
        float x[PER_THREAD];
#pragma unroll
        for (int k = 0; k < PER_THREAD; ++k) {
          const int c = threadIdx.x + k * THREADS;
          float sum = 0.f;
#pragma unroll
          for (int sl = 0; sl < SPLIT_K; ++sl) sum += __ldcg(&s.partial[(size_t(sl) * MAX_ROWS + r) * D + c]);
          const float residual = __bfloat162float(layer == a.layer_begin ? layer_in[size_t(r) * D + c]
                                                                         : __ldcg(&layer_in[size_t(r) * D + c]));
          x[k] = bf16_round(residual + bf16_round(sum * o_scale) * __bfloat162float(mod_in[2 * D + c]));
          s.mid[size_t(r) * D + c] = __float2bfloat16(x[k]);
        }
        norm_row_to_fp8<PER_THREAD>(x, D, a.eps, modulation(a, 2 * layer + 1, r / a.S), scalar(w, IN_GATE_UP),
                                    s.normed2 + size_t(r) * D, reduce_shared);
      }
    }
    grid_barrier(a.barrier, target, a.stamps, stamp);

    {  // gate/up with GeGLU: a unit is up to 4 column pairs (8 tiles: gate, up, gate, up, ...)
      const int pairs = F / 8;
      const int per_unit = min(TILES_PER_UNIT / 2, (pairs + gridDim.x - 1) / gridDim.x);
      const int units = (pairs + per_unit - 1) / per_unit;
      const float gu_scale = scalar(w, IN_GATE_UP) * scalar(w, SCALE_GATE_UP), in_down = scalar(w, IN_DOWN);
      acc = reinterpret_cast<float*>(smem + MT * 16 * (D + A_PAD));
      for (int u = blockIdx.x; u < units; u += gridDim.x) {
        const int first = u * per_unit, n = min(per_unit, pairs - first);
        gemm_unit<MT>(s.normed2, D, M, 0, D, ptr<uint8_t>(w, W_GATE_UP), D, first * 8, F, 2 * n, smem_a, acc);
        for (int i = threadIdx.x; i < n * M * 8; i += THREADS) {
          const int pair = i / (M * 8), r = (i / 8) % M, c = i % 8;
          const float gate = acc[(2 * pair * MAX_ROWS + r) * 8 + c] * gu_scale;
          const float up = acc[((2 * pair + 1) * MAX_ROWS + r) * 8 + c] * gu_scale;
          const float inner = 0.7978845608028654f * (gate + 0.044715f * gate * gate * gate);
          const float h = gate / (1.f + expf(-2.f * inner)) * up;  // gelu (tanh form) times up
          s.geglu[size_t(r) * F + (first + pair) * 8 + c] = to_e4m3(h, in_down);
        }
        __syncthreads();
      }
    }
    grid_barrier(a.barrier, target, a.stamps, stamp);
    split_gemm(s.geglu, F, ptr<uint8_t>(w, W_DOWN));
    grid_barrier(a.barrier, target, a.stamps, stamp);

    {  // the MLP's gated residual: the layer's output, and the next layer's input norm
      const float down_scale = scalar(w, IN_DOWN) * scalar(w, SCALE_DOWN);
      const bool last = layer + 1 == a.layer_end;
      __nv_bfloat16* out = last ? a.hidden_out : s.hidden;
      for (int r = blockIdx.x; r < M; r += gridDim.x) {
        const __nv_bfloat16* mod_post = modulation(a, 2 * layer + 1, r / a.S);
        float x[PER_THREAD];
#pragma unroll
        for (int k = 0; k < PER_THREAD; ++k) {
          const int c = threadIdx.x + k * THREADS;
          float sum = 0.f;
#pragma unroll
          for (int sl = 0; sl < SPLIT_K; ++sl) sum += __ldcg(&s.partial[(size_t(sl) * MAX_ROWS + r) * D + c]);
          const float mid = __bfloat162float(__ldcg(&s.mid[size_t(r) * D + c]));
          x[k] = bf16_round(mid + bf16_round(sum * down_scale) * __bfloat162float(mod_post[2 * D + c]));
          out[size_t(r) * D + c] = __float2bfloat16(x[k]);
        }
        if (!last) {
          const int64_t* next = w + TABLE_COLUMNS;
          norm_row_to_fp8<PER_THREAD>(x, D, a.eps, modulation(a, 2 * (layer + 1), r / a.S), scalar(next, IN_QKV),
                                      s.normed + size_t(r) * D, reduce_shared);
        }
      }
      if (!last) grid_barrier(a.barrier, target, a.stamps, stamp);
    }
  }
  if (a.stamps) {  // the end: when every block is done (block 0's view after one more barrier)
    grid_barrier(a.barrier, target, a.stamps, stamp);
  }
}

template <int MT>
cudaError_t launch(const Args& a, int device, size_t smem, cudaStream_t stream, int cooperative) {
  auto kernel = expert_step_kernel<MT>;
  // This library has its own copy of the CUDA runtime: name the caller's device to it.
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return err;
  if ((err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem))) != cudaSuccess)
    return err;
  int sms;
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) return err;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(sms);
  config.blockDim = dim3(THREADS);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeCooperative;
  attribute.val.cooperative = 1;
  config.attrs = &attribute;
  config.numAttrs = cooperative ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, a);
}

}  // namespace

extern "C" {

size_t vla_expert_step_scratch_bytes(int B, int S, int P, int D, int F, int H) {
  return carve(nullptr, B, S, P, D, F, H, nullptr);
}

// What the kernel supports; 0 when it does, else a code the Python side names.
int vla_expert_step_check(int B, int S, int D, int F, int H) {
  if (B * S < 1 || B * S > MAX_ROWS) return 1;
  if (D != PER_THREAD * THREADS) return 2;
  if (F % (SPLIT_K * 128) || (H * HEAD_DIM) % (SPLIT_K * 128) || D % (TILES_PER_UNIT * 8)) return 3;
  return 0;
}

int vla_expert_step(const int64_t* table, int layer_begin, int layer_end, const void* hidden_in, void* hidden_out,
                    const void* mods, const void* kv, const void* cos, const void* sin, const void* bias, int B,
                    int S, int P, int bias_len, int D, int F, int H, float eps, void* scratch, void* barrier,
                    int device, void* stream, int cooperative, void* stamps) {
  if (vla_expert_step_check(B, S, D, F, H)) return int(cudaErrorInvalidValue);
  Args a{table, layer_begin, layer_end,
         static_cast<const __nv_bfloat16*>(hidden_in), static_cast<__nv_bfloat16*>(hidden_out),
         static_cast<const __nv_bfloat16*>(mods), static_cast<const __nv_bfloat16*>(kv),
         static_cast<const __nv_bfloat16*>(cos), static_cast<const __nv_bfloat16*>(sin),
         static_cast<const __nv_bfloat16*>(bias), B, S, P, bias_len, D, F, H, eps,
         static_cast<uint8_t*>(scratch), static_cast<unsigned*>(barrier),
         static_cast<unsigned long long*>(stamps)};
  const int M = B * S, widest_k = D > F / SPLIT_K ? D : F / SPLIT_K;
  const size_t gemm_smem = size_t(MAX_ROWS) * (widest_k + A_PAD) + TILES_PER_UNIT * MAX_ROWS * 8 * sizeof(float);
  const size_t smem = gemm_smem > sizeof(AttentionShared) ? gemm_smem : sizeof(AttentionShared);
  auto s = static_cast<cudaStream_t>(stream);
  cudaError_t err = M <= 16   ? launch<1>(a, device, smem, s, cooperative)
                    : M <= 32 ? launch<2>(a, device, smem, s, cooperative)
                    : M <= 48 ? launch<3>(a, device, smem, s, cooperative)
                              : launch<4>(a, device, smem, s, cooperative);
  return int(err);
}

// n grid barriers of a grid of one block per multiprocessor (with the launch's dynamic shared memory, so
// that the grid is placed as the step's is); the time is read with CUDA events by the caller.
int vla_expert_barrier_bench(int n, int fences, void* counter, void* stamps, int device, void* stream) {
  cudaError_t err = cudaSetDevice(device);
  int sms;
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return int(err);
  auto s = static_cast<cudaStream_t>(stream);
  auto c = static_cast<unsigned*>(counter);
  auto t = static_cast<unsigned long long*>(stamps);
  if (fences)
    barrier_kernel<true><<<sms, THREADS, 0, s>>>(c, n, t);
  else
    barrier_kernel<false><<<sms, THREADS, 0, s>>>(c, n, t);
  return int(cudaGetLastError());
}

const char* vla_expert_step_error(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // extern "C"
