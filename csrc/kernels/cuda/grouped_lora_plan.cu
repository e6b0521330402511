// The device plan of a grouped LoRA call: tokens stably sorted by key = expert + 1
// (0: no expert), and each key's first sorted position. Three steps on one stream, no host
// sync (so a CUDA graph can capture them and replay with new expert_ids):
//   1. keys[t] = expert_ids[t] + 1 (0 when the id is outside [0, E)), vals[t] = t;
//   2. a stable radix sort of (keys, vals) over the bits that E + 1 needs (cub);
//   3. seg_begin[k] = lower_bound(sorted_keys, k) for k in [0, E + 1].
// Expert e's tokens are the sorted positions [seg_begin[e + 1], seg_begin[e + 2]).
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>

#include "kernels/cuda/common.cuh"

namespace moa::cuda {
namespace {

constexpr int kPlanThreads = 256;
constexpr size_t kAlign = 256;

size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Bits of the largest key, E (at least 1).
int key_bits(int64_t E) {
  int bits = 1;
  while (bits < 31 && (int64_t(1) << bits) <= E) ++bits;
  return bits;
}

// Keys are unsigned, so the radix sort's bit range [0, key_bits) is the whole key.
template <typename Id>
__global__ void make_keys_kernel(const Id* __restrict__ ids, int T, int E, uint32_t* keys, int32_t* vals) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= T) return;
  const int64_t id = static_cast<int64_t>(ids[t]);
  keys[t] = (id >= 0 && id < E) ? static_cast<uint32_t>(id + 1) : 0u;
  vals[t] = t;
}

__global__ void segment_bounds_kernel(const uint32_t* __restrict__ sorted_keys, int T, int E, int32_t* seg_begin) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k > E + 1) return;
  int lo = 0, hi = T;  // first position with key >= k
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    if (sorted_keys[mid] < static_cast<uint32_t>(k)) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  seg_begin[k] = lo;
}

// Offsets of the arrays inside the workspace.
struct Layout {
  size_t keys, vals, sorted_keys, perm, seg_begin, sort_temp, sort_temp_bytes, total;
};

Layout layout(int64_t T, int64_t E) {
  Layout l{};
  const size_t ints = align_up(sizeof(int32_t) * static_cast<size_t>(std::max<int64_t>(T, 1)));
  l.keys = 0;
  l.vals = l.keys + ints;
  l.sorted_keys = l.vals + ints;
  l.perm = l.sorted_keys + ints;
  l.seg_begin = l.perm + ints;
  l.sort_temp = l.seg_begin + align_up(sizeof(int32_t) * static_cast<size_t>(E + 2));
  size_t temp = 0;
  // Size query only: no launch, nothing dereferenced.
  cub::DeviceRadixSort::SortPairs(nullptr, temp, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
                                  static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
                                  static_cast<int>(T), 0, key_bits(E));
  l.sort_temp_bytes = temp;
  l.total = l.sort_temp + align_up(std::max<size_t>(temp, 1));
  return l;
}

}  // namespace

size_t plan_workspace_bytes(int64_t T, int64_t E) { return layout(T, E).total; }

cudaError_t make_plan(const void* ids, bool ids_int64, int64_t T, int64_t E, void* workspace, size_t workspace_bytes,
                      cudaStream_t stream, Plan* plan) {
  const Layout l = layout(T, E);
  if (workspace_bytes < l.total || T <= 0 || E <= 0) return cudaErrorInvalidValue;
  char* base = static_cast<char*>(workspace);
  auto* keys = reinterpret_cast<uint32_t*>(base + l.keys);
  auto* vals = reinterpret_cast<int32_t*>(base + l.vals);
  auto* sorted_keys = reinterpret_cast<uint32_t*>(base + l.sorted_keys);
  auto* perm = reinterpret_cast<int32_t*>(base + l.perm);
  auto* seg_begin = reinterpret_cast<int32_t*>(base + l.seg_begin);
  const int n = static_cast<int>(T), experts = static_cast<int>(E);

  const unsigned blocks = static_cast<unsigned>(ceil_div(T, kPlanThreads));
  if (ids_int64) {
    make_keys_kernel<<<blocks, kPlanThreads, 0, stream>>>(static_cast<const int64_t*>(ids), n, experts, keys, vals);
  } else {
    make_keys_kernel<<<blocks, kPlanThreads, 0, stream>>>(static_cast<const int32_t*>(ids), n, experts, keys, vals);
  }
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  size_t temp_bytes = l.sort_temp_bytes;
  status = cub::DeviceRadixSort::SortPairs(base + l.sort_temp, temp_bytes, keys, sorted_keys, vals, perm, n, 0,
                                           key_bits(E), stream);
  if (status != cudaSuccess) return status;
  const unsigned bound_blocks = static_cast<unsigned>(ceil_div(E + 2, kPlanThreads));
  segment_bounds_kernel<<<bound_blocks, kPlanThreads, 0, stream>>>(sorted_keys, n, experts, seg_begin);
  status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  plan->tokens = T;
  plan->experts = E;
  plan->perm = perm;
  plan->sorted_keys = reinterpret_cast<const int32_t*>(sorted_keys);  // keys <= E < 2^31
  plan->seg_begin = seg_begin;
  return cudaSuccess;
}

}  // namespace moa::cuda

namespace moa::cuda {

int64_t element_bytes(Dtype dtype) {
  switch (dtype) {
    case Dtype::kFloat16:
    case Dtype::kBFloat16: return 2;
    case Dtype::kFloat32: return 4;
    case Dtype::kFloat64: return 8;
  }
  return 0;
}

int64_t acc_bytes(Dtype dtype) { return dtype == Dtype::kFloat64 ? 8 : 4; }

}  // namespace moa::cuda
