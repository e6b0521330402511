// CTest check that moa_core works from C++ with no Python: the ops are registered
// when the library loads, give the reference result, and reject bad input with a
// typed exception. Exit code 0 on success.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <functional>
#include <string>

#include "moa/ops.h"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

// Plain per-token reference in float64.
at::Tensor reference(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, const at::Tensor& ids,
                     const at::Tensor& scales) {
  auto y = at::zeros({x.size(0), b.size(1)}, x.options().dtype(at::kDouble));
  for (int64_t t = 0; t < x.size(0); ++t) {
    const int64_t e = ids[t].item<int64_t>();
    if (e < 0) continue;
    auto v = at::mv(a[e].to(at::kDouble), x[t].to(at::kDouble));
    y[t] = at::mv(b[e].to(at::kDouble), v) * scales[e].item<double>();
  }
  return y;
}

template <typename Error>
void expect_throws(const std::function<void()>& fn, const std::string& needle, const std::string& what) {
  try {
    fn();
  } catch (const Error& e) {
    const std::string msg = e.what();
    expect(msg.find(needle) != std::string::npos, what + " (message: " + msg.substr(0, 120) + ")");
    return;
  } catch (const std::exception& e) {
    expect(false, what + " threw the wrong type: " + e.what());
    return;
  }
  expect(false, what + " did not throw");
}

}  // namespace

int main() {
  at::manual_seed(1234);
  const int64_t T = 77, E = 6, r = 8, in = 111, out = 53;
  for (auto dtype : {at::kFloat, at::kBFloat16}) {
    const auto opt = at::TensorOptions().dtype(dtype);
    const auto x = at::randn({T, in}, opt);
    const auto a = (at::randn({E, r, in}) / std::sqrt(double(in))).to(dtype);
    const auto b = (at::randn({E, out, r}) / std::sqrt(double(r))).to(dtype);
    const auto scales = at::rand({E}) + 0.5;
    // Scattered tokens, a run of 20 and some -1 rows: every kernel path.
    auto ids = at::randint(-1, E, {T}, at::TensorOptions().dtype(at::kLong));
    ids.narrow(0, 30, 20).fill_(2);
    const auto ref = reference(x, a, b, ids, scales);
    const double tol = dtype == at::kFloat ? 1e-4 : 5e-2;
    const auto y = moa::grouped_lora(x, a, b, ids, scales);
    const double err = (y.to(at::kDouble) - ref).abs().max().item<double>();
    expect(err < tol, std::string("grouped_lora ") + c10::toString(dtype) + " max err " + std::to_string(err));
    auto y2 = at::randn({T, out}, opt);
    const auto before = y2.clone();
    moa::grouped_lora_add_(y2, x, a, b, ids.to(at::kInt), scales);
    const double err2 = (y2.to(at::kDouble) - before.to(at::kDouble) - ref).abs().max().item<double>();
    expect(err2 < 2 * tol,
           std::string("grouped_lora_add_ ") + c10::toString(dtype) + " max err " + std::to_string(err2));
  }
  const auto x = at::randn({4, 16});
  const auto a = at::randn({3, 2, 16});
  const auto b = at::randn({3, 5, 2});
  const auto s = at::ones({3});
  const auto ids = at::tensor({0, 1, 2, -1}, at::TensorOptions().dtype(at::kLong));
  expect_throws<c10::ValueError>([&] { moa::grouped_lora(x, at::randn({3, 2, 15}), b, ids, s); }, "lora_a",
                                 "in-dim mismatch raises ValueError naming lora_a");
  expect_throws<c10::TypeError>([&] { moa::grouped_lora(x, a, b, ids, s.to(at::kDouble)); }, "scales",
                                "float64 scales raise TypeError naming scales");
  expect_throws<c10::IndexError>([&] { moa::grouped_lora(x, a, b, at::tensor({0, 1, 3, -1}, ids.options()), s); },
                                 "expert_ids[2] = 3", "out-of-range id raises IndexError naming it");
  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
