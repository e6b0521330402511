// The engine's dtypes, float32, bfloat16 and float16, as an ATen dtype switch: the body
// runs with scalar_t set to the tensor's element type.
//   MOA_DISPATCH_ENGINE_TYPES(x.scalar_type(), "moa_linear", [&] { kernel<scalar_t>(...); });
#pragma once

#include <ATen/Dispatch.h>

#define MOA_DISPATCH_ENGINE_TYPES(TYPE, NAME, ...)                                                          \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                                            \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
