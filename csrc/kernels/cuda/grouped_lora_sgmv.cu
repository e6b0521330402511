// Segment kernel (SGMV, after Punica / S-LoRA): prefill and training shapes, where an
// expert has many tokens. See grouped_lora_cuda.h for the legend and tiling.h for the
// constants.
//
// Forward (shrink, expand): block (w, n) owns sorted positions [w * BM, w * BM + BM) and
// output columns [n * BN, n * BN + BN). Tokens are sorted by expert, so its window holds
// one or a few experts' segments; it runs one tile GEMM per segment ("pass"):
//   C[BM, BN] = P[rows, K] @ Q[BN, K]^T     P: token rows (x or V), Q: the expert's A or B rows
// streaming K in steps of BK through shared memory; rows of other experts are zero-filled.
// Weight gradient: block (m, n tile; e; split s) reduces over slice s of expert e's tokens:
//   C[BM, BN] = L[tokens, BM]^T @ R[tokens, BN]     (K = tokens)
// with the operands staged K-major. The same cores serve both:
//   float16 / bfloat16: tensor cores through wmma (16x16x16 fragments, float accumulators);
//   float32 / float64:  an FMA micro-tile per thread (float / double accumulators).
// Every pass ends with the accumulator tile in shared memory, written out by one epilogue.
//
// An sm_90a wgmma path (and cp.async / TMA pipelining) is future work: this file compiles
// to HMMA via wmma on sm_80 and sm_90a alike.
#include <mma.h>

#include <algorithm>

#include "kernels/cuda/common.cuh"

namespace moa::cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int BM = static_cast<int>(tiling::kSegTileM);
constexpr int BN = static_cast<int>(tiling::kSegTileN);
constexpr int BK = static_cast<int>(tiling::kSegTileK);
constexpr int kThreads = static_cast<int>(tiling::kSegThreads);
constexpr int kWarps = kThreads / 32;
constexpr int kMma = static_cast<int>(tiling::kMma);
constexpr int kWarpsN = static_cast<int>(tiling::kSegWarpsN);
constexpr int kWarpTileM = BM / static_cast<int>(tiling::kSegWarpsM);
constexpr int kWarpTileN = BN / kWarpsN;
constexpr int kFragsM = kWarpTileM / kMma;
constexpr int kFragsN = kWarpTileN / kMma;
constexpr int kFmaThreadsN = static_cast<int>(tiling::kFmaThreadsN);
constexpr int kMicroM = BM / (kThreads / kFmaThreadsN);
constexpr int kMicroN = BN / kFmaThreadsN;
constexpr int kPad = static_cast<int>(tiling::kSmemPad);
constexpr int kLdC = BN + static_cast<int>(tiling::kAccPad);

static_assert(tiling::kSegWarpsM * tiling::kSegWarpsN == kWarps, "one warp per warp tile");
static_assert(kWarpTileM % kMma == 0 && kWarpTileN % kMma == 0 && BK % kMma == 0,
              "warp tiles and BK are whole fragments");
static_assert(kThreads % kFmaThreadsN == 0 && BM % (kThreads / kFmaThreadsN) == 0 && BN % kFmaThreadsN == 0,
              "the FMA micro-tiles cover the block tile");
static_assert(kPad % 8 == 0 && kLdC % 4 == 0, "wmma leading dimensions: 16-byte multiples");

// Shared memory of one block: operand tiles P (M side) and Q (N side), then, after the
// main loop, the accumulator tile C [BM][kLdC] in the same bytes.
//   forward      P [BM][BK + pad]   Q [BN][BK + pad]   (K contiguous)
//   weight grad  P [BK][BM + pad]   Q [BK][BN + pad]   (M / N contiguous)
template <typename T>
struct SegSmem {
  static constexpr int kPElems = std::max(BM * (BK + kPad), BK*(BM + kPad));
  static constexpr int kQElems = std::max(BN * (BK + kPad), BK*(BN + kPad));
  static constexpr int kOperandBytes = (kPElems + kQElems) * static_cast<int>(sizeof(T));
  static constexpr int kAccBytes = BM * kLdC * static_cast<int>(sizeof(acc_t<T>));
  static constexpr int kBytes = std::max(kOperandBytes, kAccBytes);
  static_assert(kPElems * sizeof(T) % 128 == 0, "Q starts 128-byte aligned");
  static_assert(kBytes <= 48 * 1024, "static shared memory limit");
};

// Rows of a row-major operand with unit column stride: row(p) = perm[p] or p.
template <typename T>
struct RowSource {
  const T* data;
  int64_t ld;
  const int32_t* perm;  // null: direct
  bool vec;             // 16-byte loads are aligned
  __device__ __forceinline__ const T* row(int64_t p) const {
    return data + (perm != nullptr ? static_cast<int64_t>(perm[p]) : p) * ld;
  }
};

// Loads the [R][C] tile into dst (row stride ld_dst): element (i, c) is src.row(first + i)
// at column c0 + c, for i < rows_valid and c0 + c < cols; zero elsewhere.
template <int R, int C, typename T>
__device__ __forceinline__ void load_tile(T* dst, int ld_dst, const RowSource<T>& src, int64_t first, int rows_valid,
                                          int64_t c0, int64_t cols) {
  if (src.vec) {
    constexpr int V = kVec<T>;
    constexpr int kVecsPerRow = C / V;
    static_assert(C % V == 0 && (R * kVecsPerRow) % kThreads == 0, "whole vectors per thread");
#pragma unroll
    for (int i = 0; i < R * kVecsPerRow / kThreads; ++i) {
      const int v = static_cast<int>(threadIdx.x) + i * kThreads;
      const int row = v / kVecsPerRow;
      const int c = (v % kVecsPerRow) * V;
      const int64_t col = c0 + c;
      Vec<T> value = zero_vec<T>();
      if (row < rows_valid) {
        const T* src_row = src.row(first + row);
        if (col + V <= cols) {
          value = load_vec_global(src_row + col);
        } else {
#pragma unroll
          for (int q = 0; q < V; ++q) {
            if (col + q < cols) value.v[q] = src_row[col + q];
          }
        }
      }
      store_vec_shared(dst + row * ld_dst + c, value);
    }
  } else {
    static_assert((R * C) % kThreads == 0, "whole elements per thread");
#pragma unroll 4
    for (int i = 0; i < R * C / kThreads; ++i) {
      const int idx = static_cast<int>(threadIdx.x) + i * kThreads;
      const int row = idx / C;
      const int c = idx % C;
      const int64_t col = c0 + c;
      dst[row * ld_dst + c] = (row < rows_valid && col < cols) ? src.row(first + row)[col] : zero_value<T>();
    }
  }
}

// Tensor-core core (float16, bfloat16). kKMajor: operands staged K-major (weight grads).
template <typename T, bool kKMajor>
struct MmaCore {
  using LayoutA = std::conditional_t<kKMajor, wmma::col_major, wmma::row_major>;
  using LayoutB = std::conditional_t<kKMajor, wmma::row_major, wmma::col_major>;
  static constexpr int kLdP = kKMajor ? BM + kPad : BK + kPad;
  static constexpr int kLdQ = kKMajor ? BN + kPad : BK + kPad;

  wmma::fragment<wmma::accumulator, kMma, kMma, kMma, float> acc[kFragsM][kFragsN];
  int row0, col0;  // this warp's tile in the block tile

  __device__ __forceinline__ MmaCore() {
    const int warp = static_cast<int>(threadIdx.x) / 32;
    row0 = (warp / kWarpsN) * kWarpTileM;
    col0 = (warp % kWarpsN) * kWarpTileN;
#pragma unroll
    for (int i = 0; i < kFragsM; ++i) {
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    }
  }

  __device__ __forceinline__ void step(const T* p_s, const T* q_s) {
#pragma unroll
    for (int kk = 0; kk < BK; kk += kMma) {
      wmma::fragment<wmma::matrix_a, kMma, kMma, kMma, T, LayoutA> a[kFragsM];
      wmma::fragment<wmma::matrix_b, kMma, kMma, kMma, T, LayoutB> b[kFragsN];
#pragma unroll
      for (int i = 0; i < kFragsM; ++i) {
        const int m = row0 + i * kMma;
        wmma::load_matrix_sync(a[i], kKMajor ? p_s + kk * kLdP + m : p_s + m * kLdP + kk, kLdP);
      }
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) {
        const int n = col0 + j * kMma;
        wmma::load_matrix_sync(b[j], kKMajor ? q_s + kk * kLdQ + n : q_s + n * kLdQ + kk, kLdQ);
      }
#pragma unroll
      for (int i = 0; i < kFragsM; ++i) {
#pragma unroll
        for (int j = 0; j < kFragsN; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
    }
  }

  __device__ __forceinline__ void store(float* c_s) {
#pragma unroll
    for (int i = 0; i < kFragsM; ++i) {
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) {
        wmma::store_matrix_sync(c_s + (row0 + i * kMma) * kLdC + col0 + j * kMma, acc[i][j], kLdC, wmma::mem_row_major);
      }
    }
  }
};

// FMA core (float32, float64): thread (tm, tn) owns rows tm * kMicroM + i and columns
// tn + kFmaThreadsN * j of the block tile.
template <typename T, bool kKMajor>
struct FmaCore {
  using A = acc_t<T>;
  static constexpr int kLdP = kKMajor ? BM + kPad : BK + kPad;
  static constexpr int kLdQ = kKMajor ? BN + kPad : BK + kPad;

  A acc[kMicroM][kMicroN];
  int m0, n0;

  __device__ __forceinline__ FmaCore() {
    m0 = (static_cast<int>(threadIdx.x) / kFmaThreadsN) * kMicroM;
    n0 = static_cast<int>(threadIdx.x) % kFmaThreadsN;
#pragma unroll
    for (int i = 0; i < kMicroM; ++i) {
#pragma unroll
      for (int j = 0; j < kMicroN; ++j) acc[i][j] = A(0);
    }
  }

  __device__ __forceinline__ void step(const T* p_s, const T* q_s) {
#pragma unroll 4
    for (int k = 0; k < BK; ++k) {
      A a[kMicroM], b[kMicroN];
#pragma unroll
      for (int i = 0; i < kMicroM; ++i) {
        const int m = m0 + i;
        a[i] = to_acc(kKMajor ? p_s[k * kLdP + m] : p_s[m * kLdP + k]);
      }
#pragma unroll
      for (int j = 0; j < kMicroN; ++j) {
        const int n = n0 + j * kFmaThreadsN;
        b[j] = to_acc(kKMajor ? q_s[k * kLdQ + n] : q_s[n * kLdQ + k]);
      }
#pragma unroll
      for (int i = 0; i < kMicroM; ++i) {
#pragma unroll
        for (int j = 0; j < kMicroN; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
      }
    }
  }

  __device__ __forceinline__ void store(A* c_s) {
#pragma unroll
    for (int i = 0; i < kMicroM; ++i) {
#pragma unroll
      for (int j = 0; j < kMicroN; ++j) c_s[(m0 + i) * kLdC + n0 + j * kFmaThreadsN] = acc[i][j];
    }
  }
};

// Tensor cores for float16 / bfloat16 on the targets CI builds (sm_80, sm_90a). Builds for
// older GPUs (a TORCH_CUDA_ARCH_LIST that names them) take the FMA core where wmma lacks the
// type: bfloat16 fragments need sm_80, float16 ones sm_70. Only kernel bodies differ.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
template <typename T>
inline constexpr bool kUseMma = false;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
template <typename T>
inline constexpr bool kUseMma = std::is_same_v<T, __half>;
#else
template <typename T>
inline constexpr bool kUseMma = kIsHalfLike<T>;
#endif

template <typename T, bool kKMajor>
using Core = std::conditional_t<kUseMma<T>, MmaCore<T, kKMajor>, FmaCore<T, kKMajor>>;

// ---------------------------------------------------------------------------------------
// Forward: shrink (v_sorted = x A^T) and expand (y = (y or 0) + s V B^T).

template <typename T>
struct ForwardParams {
  Plan plan;
  RowSource<T> p_src;  // shrink: x rows (gathered); expand: V rows
  const T* weight;     // shrink: A [E, r, in]; expand: B [E, out, r]
  int64_t N, K;        // shrink: r, in; expand: out, r
  bool q_vec;          // the weight rows take 16-byte loads
  T* out;              // shrink: v_sorted [T, r]; expand: y
  int64_t ld_out;
  const float* scales;  // expand only
  bool accumulate;      // expand only: add into y (else store, zeroing rows without expert)
};

template <typename T, bool kExpand>
__device__ __forceinline__ void forward_pass(const ForwardParams<T>& p, int64_t e, int64_t s0, int rows, int64_t n0,
                                             T* p_s, T* q_s, acc_t<T>* c_s) {
  Core<T, false> core;
  const RowSource<T> q_src{p.weight + e * p.N * p.K, p.K, nullptr, p.q_vec};
  const int n_valid = static_cast<int>(min64(BN, p.N - n0));
  for (int64_t k0 = 0; k0 < p.K; k0 += BK) {
    load_tile<BM, BK>(p_s, BK + kPad, p.p_src, s0, rows, k0, p.K);   // [rows, BK]
    load_tile<BN, BK>(q_s, BK + kPad, q_src, n0, n_valid, k0, p.K);  // [BN, BK]
    __syncthreads();
    core.step(p_s, q_s);
    __syncthreads();
  }
  core.store(c_s);
  __syncthreads();
  const acc_t<T> scale = kExpand ? static_cast<acc_t<T>>(p.scales[e]) : acc_t<T>(1);
  for (int idx = static_cast<int>(threadIdx.x); idx < BM * BN; idx += kThreads) {
    const int row = idx / BN, col = idx % BN;
    if (row >= rows || col >= n_valid) continue;
    const acc_t<T> value = c_s[row * kLdC + col];
    if constexpr (kExpand) {
      T* dst = p.out + static_cast<int64_t>(p.plan.perm[s0 + row]) * p.ld_out + n0 + col;
      const acc_t<T> base = p.accumulate ? to_acc(*dst) : acc_t<T>(0);
      *dst = from_acc<T>(base + scale * value);
    } else {
      p.out[(s0 + row) * p.ld_out + n0 + col] = from_acc<T>(value);
    }
  }
  __syncthreads();  // the next pass overwrites the tiles
}

// Rows without an expert, when y is stored rather than accumulated into: zeros.
template <typename T>
__device__ __forceinline__ void zero_rows(const ForwardParams<T>& p, int64_t s0, int rows, int64_t n0) {
  const int n_valid = static_cast<int>(min64(BN, p.N - n0));
  for (int idx = static_cast<int>(threadIdx.x); idx < BM * BN; idx += kThreads) {
    const int row = idx / BN, col = idx % BN;
    if (row >= rows || col >= n_valid) continue;
    p.out[static_cast<int64_t>(p.plan.perm[s0 + row]) * p.ld_out + n0 + col] = zero_value<T>();
  }
}

template <typename T, bool kExpand>
__global__ void __launch_bounds__(kThreads) segment_forward_kernel(const ForwardParams<T> p) {
  __shared__ __align__(128) unsigned char smem[SegSmem<T>::kBytes];
  T* p_s = reinterpret_cast<T*>(smem);
  T* q_s = p_s + SegSmem<T>::kPElems;
  auto* c_s = reinterpret_cast<acc_t<T>*>(smem);

  const int64_t w0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t w1 = min64(p.plan.tokens, w0 + BM);
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int key_last = p.plan.sorted_keys[w1 - 1];
  // One pass per key in the window (uniform across the block: __syncthreads is safe).
  for (int key = p.plan.sorted_keys[w0]; key <= key_last; ++key) {
    const int64_t s0 = max64(w0, p.plan.seg_begin[key]);
    const int64_t s1 = min64(w1, p.plan.seg_begin[key + 1]);
    if (s0 >= s1) continue;
    const int rows = static_cast<int>(s1 - s0);
    if (key == 0) {
      if constexpr (kExpand) {
        if (!p.accumulate) zero_rows(p, s0, rows, n0);
      }
      continue;
    }
    forward_pass<T, kExpand>(p, key - 1, s0, rows, n0, p_s, q_s, c_s);
  }
}

template <typename T, bool kExpand>
cudaError_t launch_forward(const ForwardParams<T>& p, cudaStream_t stream) {
  const int64_t tiles_n = ceil_div(p.N, BN);
  if (tiles_n > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.plan.tokens, BM)), static_cast<unsigned>(tiles_n));
  segment_forward_kernel<T, kExpand><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------
// Weight gradient: dW[e] = s_e L_e^T R_e, K = the expert's tokens.

template <typename T>
struct GradParams {
  Plan plan;
  RowSource<T> l, r;  // L [., M], R [., N] by sorted position
  int64_t M, N;
  const float* scales;
  T* dW;         // [E, M, N]
  acc_t<T>* ws;  // [splits, E, M, N] when splits > 1
  int64_t splits;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) segment_weight_grad_kernel(const GradParams<T> p) {
  __shared__ __align__(128) unsigned char smem[SegSmem<T>::kBytes];
  T* p_s = reinterpret_cast<T*>(smem);
  T* q_s = p_s + SegSmem<T>::kPElems;
  auto* c_s = reinterpret_cast<acc_t<T>*>(smem);

  const int64_t tiles_n = ceil_div(p.N, BN);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) / tiles_n * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) % tiles_n * BN;
  const int64_t e = blockIdx.y, split = blockIdx.z;
  const int64_t seg0 = p.plan.seg_begin[e + 1], seg1 = p.plan.seg_begin[e + 2];
  const int64_t chunk = ceil_div(ceil_div(seg1 - seg0, p.splits), BK) * BK;
  const int64_t t_begin = min64(seg1, seg0 + split * chunk);
  const int64_t t_end = min64(seg1, t_begin + chunk);

  Core<T, true> core;
  for (int64_t t0 = t_begin; t0 < t_end; t0 += BK) {
    const int rows = static_cast<int>(min64(BK, t_end - t0));
    load_tile<BK, BM>(p_s, BM + kPad, p.l, t0, rows, m0, p.M);  // [BK tokens, BM]
    load_tile<BK, BN>(q_s, BN + kPad, p.r, t0, rows, n0, p.N);  // [BK tokens, BN]
    __syncthreads();
    core.step(p_s, q_s);
    __syncthreads();
  }
  core.store(c_s);
  __syncthreads();
  const int m_valid = static_cast<int>(min64(BM, p.M - m0));
  const int n_valid = static_cast<int>(min64(BN, p.N - n0));
  const acc_t<T> scale = static_cast<acc_t<T>>(p.scales[e]);
  for (int idx = static_cast<int>(threadIdx.x); idx < BM * BN; idx += kThreads) {
    const int row = idx / BN, col = idx % BN;
    if (row >= m_valid || col >= n_valid) continue;
    const acc_t<T> value = c_s[row * kLdC + col];
    const int64_t offset = (e * p.M + m0 + row) * p.N + n0 + col;
    if (p.splits == 1) {
      p.dW[offset] = from_acc<T>(scale * value);
    } else {
      p.ws[split * p.plan.experts * p.M * p.N + offset] = value;
    }
  }
}

// dW[e, m, n] = s_e * sum over splits, in order.
template <typename T>
__global__ void weight_grad_reduce_kernel(const acc_t<T>* __restrict__ ws, int64_t splits, int64_t E, int64_t MN,
                                          const float* __restrict__ scales, T* __restrict__ dW) {
  const int64_t total = E * MN;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t<T> sum = 0;
    for (int64_t s = 0; s < splits; ++s) sum += ws[s * total + i];
    dW[i] = from_acc<T>(static_cast<acc_t<T>>(scales[i / MN]) * sum);
  }
}

template <typename T>
RowSource<T> row_source(const Plan& plan, Rows rows) {
  return {static_cast<const T*>(rows.data), rows.ld, rows.gathered ? plan.perm : nullptr,
          vec_ok<T>(rows.data, rows.ld)};
}

}  // namespace

bool use_segment_path(int64_t T, int64_t E, int64_t r) {
  return r > tiling::kGatherMaxRank || T >= tiling::kSegmentMinTokensPerExpert * std::min(T, std::max<int64_t>(E, 1));
}

cudaError_t segment_shrink(Dtype dtype, const Plan& plan, Rows x, const void* A, int64_t in, int64_t r, void* v_sorted,
                           cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    ForwardParams<T> p{};
    p.plan = plan;
    p.p_src = row_source<T>(plan, x);
    p.weight = static_cast<const T*>(A);
    p.N = r;
    p.K = in;
    p.q_vec = vec_ok<T>(A, in);
    p.out = static_cast<T*>(v_sorted);
    p.ld_out = r;
    return launch_forward<T, false>(p, stream);
  });
}

cudaError_t segment_expand(Dtype dtype, const Plan& plan, Rows v, const void* B, const float* scales, int64_t out,
                           int64_t r, void* y, int64_t ldy, bool accumulate, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    ForwardParams<T> p{};
    p.plan = plan;
    p.p_src = row_source<T>(plan, v);
    p.weight = static_cast<const T*>(B);
    p.N = out;
    p.K = r;
    p.q_vec = vec_ok<T>(B, r);
    p.out = static_cast<T*>(y);
    p.ld_out = ldy;
    p.scales = scales;
    p.accumulate = accumulate;
    return launch_forward<T, true>(p, stream);
  });
}

int64_t weight_grad_splits(Dtype dtype, int64_t T, int64_t E, int64_t M, int64_t N) {
  const int64_t per_expert = ceil_div(T, std::max<int64_t>(E, 1));
  int64_t splits = std::clamp<int64_t>(ceil_div(per_expert, tiling::kGradTokensPerSplit), 1, tiling::kGradMaxSplits);
  const int64_t split_bytes = std::max<int64_t>(1, E * M * N * acc_bytes(dtype));
  splits = std::min(splits, std::max<int64_t>(1, tiling::kGradMaxWorkspaceBytes / split_bytes));
  return std::min<int64_t>(splits, kMaxGridYZ);
}

cudaError_t segment_weight_grad(Dtype dtype, const Plan& plan, Rows L, Rows R, int64_t M, int64_t N,
                                const float* scales, void* dW, void* workspace, int64_t splits, cudaStream_t stream) {
  if (plan.experts > kMaxGridYZ || splits < 1 || splits > kMaxGridYZ) {
    return cudaErrorInvalidConfiguration;
  }
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    GradParams<T> p{};
    p.plan = plan;
    p.l = row_source<T>(plan, L);
    p.r = row_source<T>(plan, R);
    p.M = M;
    p.N = N;
    p.scales = scales;
    p.dW = static_cast<T*>(dW);
    p.ws = static_cast<acc_t<T>*>(workspace);
    p.splits = splits;
    const dim3 grid(static_cast<unsigned>(ceil_div(M, BM) * ceil_div(N, BN)), static_cast<unsigned>(plan.experts),
                    static_cast<unsigned>(splits));
    segment_weight_grad_kernel<T><<<grid, kThreads, 0, stream>>>(p);
    cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess || splits == 1) return status;
    const int64_t total = plan.experts * M * N;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(total, 256), 65535));
    weight_grad_reduce_kernel<T><<<blocks, 256, 0, stream>>>(p.ws, splits, plan.experts, M * N, scales, p.dW);
    return cudaGetLastError();
  });
}

}  // namespace moa::cuda
