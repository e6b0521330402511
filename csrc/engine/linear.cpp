// The engine's dense linear and its choice of kernel (see linear.h).
#include "engine/linear.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <optional>
#include <vector>

#include "engine/dispatch.h"
#include "kernels/cpu/decode_avx2.h"
#include "kernels/cpu/decode_avx512.h"
#include "kernels/cpu/grouped_lora_cpu.h"  // native_matmul
#include "kernels/cpu/quant.h"
#include "moa/errors.h"

namespace moa::engine {
namespace {

constexpr int64_t kDefaultSmallM = 32;
constexpr int64_t kDefaultInt8M = 8;

// The integer >= 0 in environment variable `name`, or `fallback` when it is unset.
int64_t read_limit(const char* name, int64_t fallback, const char* zero_means) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  char* end = nullptr;
  errno = 0;
  const long long parsed = std::strtoll(value, &end, 10);
  if (end == value || *end != '\0' || errno == ERANGE || parsed < 0)
    throw_error<InvalidArgument>(name, " must be an integer >= 0 (0: ", zero_means, "), got '", value, "'");
  return parsed;
}

template <typename T>
void linear_small_m(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  std::vector<const T*> xs(M);
  std::vector<T*> ys(M);
  for (int64_t m = 0; m < M; ++m) {
    xs[m] = x.data_ptr<T>() + m * x.stride(0);
    ys[m] = y.data_ptr<T>() + m * y.stride(0);
  }
  const T* W = w.data_ptr<T>();
  const T* bias = b.defined() ? b.data_ptr<T>() : nullptr;
  // Blocks of 8 rows of W per task, at least ~32 KB of W each.
  const int64_t rows_per_task = std::max<int64_t>(8, (32768 / (K * int64_t(sizeof(T))) + 7) / 8 * 8);
  const int64_t blocks = (N + 7) / 8;
  const bool avx512 = cpu::cpu_isa() == cpu::CpuIsa::avx512;
  at::parallel_for(0, blocks, rows_per_task / 8, [&](int64_t b0, int64_t b1) {
    if (avx512) {
      cpu::linear_rows_avx512(W, K, b0 * 8, std::min(N, b1 * 8), xs.data(), ys.data(), M, bias);
    } else {
      cpu::linear_rows_avx2(W, K, b0 * 8, std::min(N, b1 * 8), xs.data(), ys.data(), M, bias);
    }
  });
}

// BLAS, in float32 for a reduced dtype that this CPU multiplies only by emulation.
void linear_blas(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, at::Tensor& y) {
  const bool reduced = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  bool native = true;
  if (reduced && x.is_cpu()) {
    native = x.scalar_type() == at::kBFloat16 ? cpu::native_matmul<c10::BFloat16>() : cpu::native_matmul<c10::Half>();
  }
  if (!native) {
    // Without bf16/fp16 matmul instructions BLAS emulates them slowly: multiply in
    // float32 (same products, float accumulation as the native path) and round once.
    at::Tensor xf = x.to(at::kFloat), wf = w.to(at::kFloat);
    y.copy_(b.defined() ? at::addmm(b.to(at::kFloat), xf, wf.t()) : at::mm(xf, wf.t()));
  } else if (b.defined()) {
    at::addmm_out(y, b, x, w.t());
  } else {
    at::mm_out(y, x, w.t());
  }
}

constexpr int64_t kQuantBlasTile = 128;

// x as the int8 and bfloat16 kernels take it, made on first use and shared by a matrix's runs.
struct RoundedActs {
  std::optional<cpu::Int8Rows> int8;
  std::vector<uint16_t> bf16;
};

// Products of more rows than this take the bfloat16 kernels when they are in use; fewer are
// bound by reading W, and the fused float kernels (dequantized in registers) read it once.
constexpr int64_t kBf16MinM = 4;

// On the AVX2 level the SIMD tiles of a quantized matrix lose to BLAS on dequantized tiles
// from about 16 rows: 16 registers of 8 lanes leave them well below the FMA peak that BLAS's
// packed GEMM reaches (on a Zen 3, batch-32 decode of the Q4_1 file 1.25x faster through
// BLAS, batch 16 1.05x; batch 8 1.3x slower). Unless MOA_ENGINE_SMALL_M is set, products of
// more rows than this take BLAS there.
constexpr int64_t kAvx2QuantSmallM = 12;

// MOA_ENGINE_SMALL_M, or -1 when it is unset.
int64_t small_m_env() {
  static const int64_t value = read_limit("MOA_ENGINE_SMALL_M", -1, "always BLAS");
  return value;
}

int64_t quant_small_m_limit() {
  if (small_m_env() >= 0) return small_m_env();
  return cpu::quant_isa() == cpu::QuantIsa::avx2 ? kAvx2QuantSmallM : kDefaultSmallM;
}

// y[:, col0 : col0 + run.rows] = x run^T, x float32 [M, k] contiguous, y float32.
void quant_run(const at::Tensor& x, const QuantRows& run, int64_t k, at::Tensor& y, int64_t col0, RoundedActs& acts) {
  const int64_t M = x.size(0);
  const int64_t row_bytes = run.data.size(1);
  const uint8_t* W = run.data.data_ptr<uint8_t>();
  // Without SIMD kernels (QuantIsa::portable: no AVX2 / AVX-512, e.g. aarch64) every product
  // takes the BLAS tiles: dequantizing in portable C++, then BLAS, is ~10x faster there than
  // the portable SIMD-tile fallback's scalar dot products.
  if (M <= quant_small_m_limit() && cpu::quant_isa() != cpu::QuantIsa::portable) {
    std::vector<const float*> xs(M);
    std::vector<float*> ys(M);
    for (int64_t m = 0; m < M; ++m) {
      xs[m] = x.data_ptr<float>() + m * k;
      ys[m] = y.data_ptr<float>() + m * y.stride(0) + col0;
    }
    // 16-row tiles, at least ~16 KB of quantized W per task.
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, 16 * row_bytes));
    if (M <= int8_m_limit() && cpu::int8_kernel(run.type, k)) {
      if (!acts.int8) cpu::quantize_activations(xs.data(), M, k, acts.int8.emplace());
      at::parallel_for(0, (run.rows + 15) / 16, grain, [&](int64_t t0, int64_t t1) {
        cpu::quant_linear_rows_int8(run.type, W, row_bytes, k, t0 * 16, std::min(run.rows, t1 * 16), *acts.int8,
                                    ys.data(), nullptr);
      });
      return;
    }
    if (M > kBf16MinM && cpu::bf16_kernel(run.type, k)) {
      if (acts.bf16.empty()) cpu::round_activations_bf16(xs.data(), M, k, acts.bf16);
      at::parallel_for(0, (run.rows + 15) / 16, grain, [&](int64_t t0, int64_t t1) {
        cpu::quant_linear_rows_bf16(run.type, W, row_bytes, k, t0 * 16, std::min(run.rows, t1 * 16), acts.bf16.data(),
                                    M, ys.data(), nullptr);
      });
      return;
    }
    at::parallel_for(0, (run.rows + 15) / 16, grain, [&](int64_t t0, int64_t t1) {
      cpu::quant_linear_rows(run.type, W, row_bytes, k, t0 * 16, std::min(run.rows, t1 * 16), xs.data(), ys.data(), M,
                             nullptr);
    });
    return;
  }
  const int64_t tiles = (run.rows + kQuantBlasTile - 1) / kQuantBlasTile;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor tile = at::empty({kQuantBlasTile, k}, x.options());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * kQuantBlasTile, rows = std::min(kQuantBlasTile, run.rows - r0);
      cpu::dequantize_rows(run.type, W, row_bytes, k, r0, r0 + rows, tile.data_ptr<float>());
      y.narrow(1, col0 + r0, rows).copy_(at::mm(x, tile.narrow(0, 0, rows).t()));
    }
  });
}

at::Tensor linear_quant(const at::Tensor& x, const Matrix& w, const at::Tensor& b) {
  TORCH_CHECK(x.size(1) == w.k, "moa linear: x has ", x.size(1), " features, the quantized matrix ", w.k);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({x.size(0), w.n}, xf.options());
  int64_t col = 0;
  RoundedActs acts;
  for (const QuantRows& run : w.quant) {
    quant_run(xf, run, w.k, y, col, acts);
    col += run.rows;
  }
  if (b.defined()) y.add_(b.to(at::kFloat));
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

}  // namespace

at::Tensor linear(const at::Tensor& x, const Matrix& w, const at::Tensor& b) {
  if (!w.quantized()) return linear(x, w.dense, b);
  if (x.size(0) == 0) return at::empty({0, w.n}, x.options());
  return linear_quant(x, w, b);
}

at::Tensor embedding(const Matrix& w, const at::Tensor& ids, at::ScalarType dtype) {
  if (!w.quantized()) return w.dense.index_select(0, ids);
  const int64_t N = ids.numel();
  at::Tensor out = at::empty({N, w.k}, at::TensorOptions().dtype(at::kFloat));
  const at::Tensor idc = ids.to(at::kLong).contiguous();
  const int64_t* id = idc.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    int64_t row = id[i];
    TORCH_CHECK(row >= 0 && row < w.n, "moa embedding: token id ", row, " is outside the vocabulary [0, ", w.n, ")");
    for (const QuantRows& run : w.quant) {
      if (row < run.rows) {
        cpu::dequantize_rows(run.type, run.data.data_ptr<uint8_t>(), run.data.size(1), w.k, row, row + 1,
                             out.data_ptr<float>() + i * w.k);
        break;
      }
      row -= run.rows;
    }
  }
  return dtype == at::kFloat ? out : out.to(dtype);
}

int64_t small_m_limit() { return small_m_env() >= 0 ? small_m_env() : kDefaultSmallM; }

int64_t int8_m_limit() {
  static const int64_t limit = read_limit("MOA_ENGINE_INT8_M", kDefaultInt8M, "never the int8 kernels");
  return limit;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, w.size(0)}, x.options());
  if (M == 0) return y;
  if (x.is_cpu() && M <= small_m_limit() && cpu::cpu_isa() != cpu::CpuIsa::portable && x.stride(1) == 1) {
    MOA_DISPATCH_ENGINE_TYPES(x.scalar_type(), "moa_linear", [&] { linear_small_m<scalar_t>(x, w, b, y); });
  } else {
    linear_blas(x, w, b, y);
  }
  return y;
}

}  // namespace moa::engine
