// Gather kernel (BGMV, after Punica): decode shapes, one or a few tokens per expert. See
// grouped_lora_cuda.h for the legend and tiling.h for the constants.
//
// No plan, no sort: both phases work on windows of kGatherTokens consecutive tokens, in
// the caller's order, and split each window into runs of one expert (consecutive equal
// keys, key = expert + 1, 0 for -1 or an id outside [0, E)). A run reads its expert's weight
// rows once for all of its tokens (up to kGatherTokens dot products per weight element);
// tokens of one expert that are not adjacent read the rows again, mostly from L2.
//
// Shrink: block (window, row tile, split) computes, for rows j of A in its row tile and
// the slice [k0, k1) of `in`:
//   partials[split, t, j] = x[t, k0:k1] . A[e, j, k0:k1]
// The window's x slice is staged in shared memory; each warp owns kGatherShrinkRows /
// warps rows of A, and its lanes stride over the slice in 16-byte vectors (lane l reads
// elements k0 + (l + 32 u) * V + [0, V)); a butterfly reduction gives every lane the sums.
//
// Expand: block (window, row tile) first forms V[t, :] = round(sum_split partials) for its
// window (fixed order, rounded to the input dtype as the contract says), then for output
// rows o of its tile computes y[t, o] = (y[t, o] or 0) + s_e * V[t, :] . B[e, o, :].
// A row of B (r elements) is read by a sub-warp of W lanes, W the power of two >= r's
// vectors (at most 32); 32 / W rows per warp at a time.
#include <algorithm>

#include "kernels/cuda/common.cuh"

namespace moa::cuda {
namespace {

constexpr int kThreads = static_cast<int>(tiling::kGatherThreads);
constexpr int kWarps = kThreads / 32;
constexpr int G = static_cast<int>(tiling::kGatherTokens);
constexpr int kShrinkRows = static_cast<int>(tiling::kGatherShrinkRows);
constexpr int KC = static_cast<int>(tiling::kGatherShrinkK);
constexpr int kExpandRows = static_cast<int>(tiling::kGatherExpandRows);
constexpr int kMaxRank = static_cast<int>(tiling::kGatherMaxRank);
constexpr int kRowsPerWarp = kShrinkRows / kWarps;

static_assert(kThreads % 32 == 0 && kShrinkRows % kWarps == 0, "whole rows per warp");
static_assert(kRowsPerWarp * G <= 32, "one lane writes each (row, token) sum");
static_assert(KC % (32 * 8) == 0, "whole vectors per lane in a slice, for every dtype");
static_assert(kExpandRows % kThreads == 0, "whole row steps per tile, down to W = 1");
static_assert(G <= kThreads, "one thread stages each key of a window");

// Each window's keys (expert + 1; 0: no expert), staged in shared memory by the first
// threads; entries past the last token are -1, which no run matches.
__device__ __forceinline__ void stage_keys(const Ids& ids, int64_t w0, int64_t w1, int* keys) {
  const int g = static_cast<int>(threadIdx.x);
  if (g >= G) return;
  const int64_t t = w0 + g;
  if (t >= w1) {
    keys[g] = -1;
    return;
  }
  const int64_t id = ids.int64 ? static_cast<const int64_t*>(ids.data)[t] : static_cast<const int32_t*>(ids.data)[t];
  keys[g] = (id >= 0 && id < ids.experts) ? static_cast<int>(id + 1) : 0;
}

// The window's next run: slots [g0, end) share keys[g0].
__device__ __forceinline__ int run_end(const int* keys, int g0, int slots) {
  int end = g0 + 1;
  while (end < slots && keys[end] == keys[g0]) ++end;
  return end;
}

// ---------------------------------------------------------------------------------------
// Shrink

template <typename T>
struct ShrinkParams {
  Ids ids;
  const T* x;  // [T, in], row stride ldx
  int64_t ldx;
  const T* A;  // [E, r, in]
  int64_t in, r;
  acc_t<T>* partials;  // [splits, T, r]
  bool vec;            // rows of A take 16-byte loads
};

// One run: the window's tokens at slots [g0, g0 + nt), of expert e; this warp's rows
// j_first + [0, kRowsPerWarp) of A, over the slice [k0, k1).
template <typename T>
__device__ __forceinline__ void shrink_run(const ShrinkParams<T>& p, int64_t e, int g0, int nt, int64_t j_first,
                                           int64_t k0, int64_t k1, const T* xs, int64_t w0) {
  using A = acc_t<T>;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  A acc[kRowsPerWarp][G];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
#pragma unroll
    for (int g = 0; g < G; ++g) acc[i][g] = A(0);
  }
  const T* a_e = p.A + e * p.r * p.in;
  if (p.vec) {
    constexpr int V = kVec<T>;
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int64_t j = j_first + i;
      if (j >= p.r) break;
      const T* row = a_e + j * p.in;
#pragma unroll
      for (int u = 0; u < KC / (32 * V); ++u) {
        const int64_t k = k0 + static_cast<int64_t>(lane + 32 * u) * V;
        if (k >= k1) break;  // k1 - k0 is a multiple of V here
        const Vec<T> w = load_vec_global(row + k);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          if (g >= nt) break;
          const Vec<T> xv = load_vec_shared(xs + (g0 + g) * KC + (k - k0));
#pragma unroll
          for (int q = 0; q < V; ++q) acc[i][g] += to_acc(w.v[q]) * to_acc(xv.v[q]);
        }
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int64_t j = j_first + i;
      if (j >= p.r) break;
      const T* row = a_e + j * p.in;
#pragma unroll 4
      for (int u = 0; u < KC / 32; ++u) {
        const int64_t k = k0 + lane + 32 * u;
        if (k >= k1) break;
        const A w = to_acc(row[k]);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          if (g >= nt) break;
          acc[i][g] += w * to_acc(xs[(g0 + g) * KC + (k - k0)]);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const A sum = sub_warp_sum(acc[i][g], 32);
      const int64_t j = j_first + i;
      if (lane == i * G + g && j < p.r && g < nt) {
        const int64_t t = w0 + g0 + g;
        p.partials[(static_cast<int64_t>(blockIdx.z) * p.ids.tokens + t) * p.r + j] = sum;
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gather_shrink_kernel(const ShrinkParams<T> p) {
  __shared__ __align__(16) T xs[G * KC];  // the window's x slice: [G][KC]
  __shared__ int keys[G];
  const int64_t w0 = static_cast<int64_t>(blockIdx.x) * G;
  const int64_t w1 = min64(p.ids.tokens, w0 + G);
  const int64_t k0 = static_cast<int64_t>(blockIdx.z) * KC;
  const int64_t k1 = min64(p.in, k0 + KC);
  for (int i = static_cast<int>(threadIdx.x); i < G * KC; i += kThreads) {
    const int64_t t = w0 + i / KC, k = k0 + i % KC;
    xs[i] = (t < w1 && k < k1) ? p.x[t * p.ldx + k] : zero_value<T>();
  }
  stage_keys(p.ids, w0, w1, keys);
  __syncthreads();
  const int64_t j_first =
      static_cast<int64_t>(blockIdx.y) * kShrinkRows + static_cast<int64_t>(threadIdx.x / 32) * kRowsPerWarp;
  const int slots = static_cast<int>(w1 - w0);
  for (int g0 = 0; g0 < slots;) {  // the window's runs
    const int end = run_end(keys, g0, slots);
    if (keys[g0] > 0) shrink_run(p, keys[g0] - 1, g0, end - g0, j_first, k0, k1, xs, w0);
    g0 = end;
  }
}

// ---------------------------------------------------------------------------------------
// Expand

template <typename T>
struct ExpandParams {
  Ids ids;
  const acc_t<T>* partials;  // [splits, T, r]
  int64_t splits;
  const T* B;  // [E, out, r]
  const float* scales;
  int64_t out, r;
  T* y;  // [T, out], row stride ldy
  int64_t ldy;
  bool accumulate;
  bool vec;           // rows of B take 16-byte loads
  int lanes_per_row;  // W
};

template <typename T>
__device__ __forceinline__ void expand_run(const ExpandParams<T>& p, int64_t e, int g0, int nt, int64_t w0, int64_t o0,
                                           const acc_t<T>* vs) {
  using A = acc_t<T>;
  const int W = p.lanes_per_row;
  const int rows_per_warp = 32 / W;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int sub = lane / W, lw = lane % W;
  const T* b_e = p.B + e * p.out * p.r;
  const A scale = static_cast<A>(p.scales[e]);
  for (int64_t base = o0; base < o0 + kExpandRows; base += kWarps * rows_per_warp) {
    const int64_t o = base + static_cast<int64_t>(threadIdx.x / 32) * rows_per_warp + sub;
    A acc[G];
#pragma unroll
    for (int g = 0; g < G; ++g) acc[g] = A(0);
    if (o < p.out) {
      const T* row = b_e + o * p.r;
      if (p.vec) {
        constexpr int V = kVec<T>;
        for (int64_t j = static_cast<int64_t>(lw) * V; j < p.r; j += static_cast<int64_t>(W) * V) {
          const Vec<T> b = load_vec_global(row + j);
#pragma unroll
          for (int g = 0; g < G; ++g) {
            if (g >= nt) break;
#pragma unroll
            for (int q = 0; q < V; ++q) acc[g] += to_acc(b.v[q]) * vs[(g0 + g) * kMaxRank + j + q];
          }
        }
      } else {
        for (int64_t j = lw; j < p.r; j += W) {
          const A b = to_acc(row[j]);
#pragma unroll
          for (int g = 0; g < G; ++g) {
            if (g >= nt) break;
            acc[g] += b * vs[(g0 + g) * kMaxRank + j];
          }
        }
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) acc[g] = sub_warp_sum(acc[g], W);
    if (lw == 0 && o < p.out) {
#pragma unroll
      for (int g = 0; g < G; ++g) {
        if (g >= nt) break;
        T* dst = p.y + (w0 + g0 + g) * p.ldy + o;
        const A prior = p.accumulate ? to_acc(*dst) : A(0);
        *dst = from_acc<T>(prior + scale * acc[g]);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gather_expand_kernel(const ExpandParams<T> p) {
  using A = acc_t<T>;
  __shared__ A vs[G * kMaxRank];  // the window's V rows, rounded: [G][kMaxRank]
  __shared__ int keys[G];
  const int64_t tokens = p.ids.tokens;
  const int64_t w0 = static_cast<int64_t>(blockIdx.x) * G;
  const int64_t w1 = min64(tokens, w0 + G);
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kExpandRows;
  stage_keys(p.ids, w0, w1, keys);
  __syncthreads();
  for (int i = static_cast<int>(threadIdx.x); i < G * p.r; i += kThreads) {
    const int g = i / static_cast<int>(p.r), j = i % static_cast<int>(p.r);
    const int64_t t = w0 + g;
    A v = A(0);
    if (t < w1 && keys[g] > 0) {  // the shrink wrote only these
      A sum = A(0);
      for (int64_t s = 0; s < p.splits; ++s) sum += p.partials[(s * tokens + t) * p.r + j];
      v = to_acc(from_acc<T>(sum));
    }
    vs[g * kMaxRank + j] = v;
  }
  __syncthreads();
  const int slots = static_cast<int>(w1 - w0);
  for (int g0 = 0; g0 < slots;) {  // the window's runs
    const int end = run_end(keys, g0, slots);
    if (keys[g0] > 0) {
      expand_run(p, keys[g0] - 1, g0, end - g0, w0, o0, vs);
    } else if (!p.accumulate) {  // rows without an expert: zeros
      for (int i = static_cast<int>(threadIdx.x); i < (end - g0) * kExpandRows; i += kThreads) {
        const int64_t o = o0 + i % kExpandRows;
        if (o < p.out) p.y[(w0 + g0 + i / kExpandRows) * p.ldy + o] = zero_value<T>();
      }
    }
    g0 = end;
  }
}

int lanes_per_row(int64_t vectors) {
  int w = 1;
  while (w < 32 && w < vectors) w *= 2;
  return w;
}

}  // namespace

int64_t gather_splits(int64_t in) { return ceil_div(in, KC); }

cudaError_t gather_shrink(Dtype dtype, const Ids& ids, const void* x, int64_t ldx, const void* A, int64_t in, int64_t r,
                          void* partials, cudaStream_t stream) {
  const int64_t splits = gather_splits(in);
  if (splits > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    ShrinkParams<T> p{};
    p.ids = ids;
    p.x = static_cast<const T*>(x);
    p.ldx = ldx;
    p.A = static_cast<const T*>(A);
    p.in = in;
    p.r = r;
    p.partials = static_cast<acc_t<T>*>(partials);
    p.vec = vec_ok<T>(A, in);
    const dim3 grid(static_cast<unsigned>(ceil_div(ids.tokens, G)), static_cast<unsigned>(ceil_div(r, kShrinkRows)),
                    static_cast<unsigned>(splits));
    gather_shrink_kernel<T><<<grid, kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t gather_expand(Dtype dtype, const Ids& ids, const void* partials, int64_t splits, const void* B,
                          const float* scales, int64_t out, int64_t r, void* y, int64_t ldy, bool accumulate,
                          cudaStream_t stream) {
  if (r > kMaxRank) return cudaErrorInvalidValue;
  const int64_t tiles = ceil_div(out, kExpandRows);
  if (tiles > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    ExpandParams<T> p{};
    p.ids = ids;
    p.partials = static_cast<const acc_t<T>*>(partials);
    p.splits = splits;
    p.B = static_cast<const T*>(B);
    p.scales = scales;
    p.out = out;
    p.r = r;
    p.y = static_cast<T*>(y);
    p.ldy = ldy;
    p.accumulate = accumulate;
    p.vec = vec_ok<T>(B, r);
    p.lanes_per_row = lanes_per_row(p.vec ? r / kVec<T> : r);
    const dim3 grid(static_cast<unsigned>(ceil_div(ids.tokens, G)), static_cast<unsigned>(tiles));
    gather_expand_kernel<T><<<grid, kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace moa::cuda
