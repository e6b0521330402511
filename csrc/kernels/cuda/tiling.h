// Work decomposition of the CUDA grouped LoRA kernels: the one place each constant lives.
//
// python_tests/cuda_emulation.py parses this file (every `inline constexpr int64_t kName =
// <integer>;` line) and replays the kernels' tiling and indexing on CPU with these values,
// so a change here is checked by python_tests/test_cuda_emulation.py. Keep each constant a
// plain integer literal on one line.
//
// Dimension legend: T tokens, E experts, r rank, in / out feature sizes; "sorted position"
// p is a token's place after the plan's stable sort by expert (plan: grouped_lora_plan.cu).
#pragma once

#include <cstdint>

namespace moa::cuda::tiling {

// Bytes of one vectorised global / shared access (uint4).
inline constexpr int64_t kVecBytes = 16;

// ---------------------------------------------------------------------------------------
// Segment kernel (SGMV: prefill, training). A block owns a window of kSegTileM sorted
// positions and a kSegTileN-wide slice of the output columns; it runs one pass per expert
// present in its window (grouped_lora_sgmv.cu).
inline constexpr int64_t kSegThreads = 128;
inline constexpr int64_t kSegTileM = 64;
inline constexpr int64_t kSegTileN = 64;
inline constexpr int64_t kSegTileK = 32;
// Tensor-core path (float16, bfloat16): warps in a kSegWarpsM x kSegWarpsN grid, each
// owning a (kSegTileM / kSegWarpsM) x (kSegTileN / kSegWarpsN) tile of kMma x kMma fragments.
inline constexpr int64_t kSegWarpsM = 2;
inline constexpr int64_t kSegWarpsN = 2;
inline constexpr int64_t kMma = 16;
// FMA path (float32, float64): threads in a (kSegThreads / kFmaThreadsN) x kFmaThreadsN
// grid; thread (tm, tn) owns rows tm * microM + [0, microM) and columns tn + kFmaThreadsN * j.
inline constexpr int64_t kFmaThreadsN = 16;
// Shared-memory row padding, in elements: operand tiles, and the accumulator tile.
inline constexpr int64_t kSmemPad = 8;
inline constexpr int64_t kAccPad = 4;

// ---------------------------------------------------------------------------------------
// Gather kernel (BGMV: decode). A block owns a window of kGatherTokens sorted positions.
// Shrink: kGatherShrinkRows rows of A x a kGatherShrinkK slice of `in`; each warp takes
// kGatherShrinkRows / warps rows, its lanes stride over the slice in 16-byte vectors; the
// slices' partial sums go to a float workspace. Expand: kGatherExpandRows rows of B (output
// columns); a row is read by a sub-warp of W lanes (W: the power of two >= r's vectors, at
// most 32), which sums the partials, rounds V to the input dtype, and adds into y.
inline constexpr int64_t kGatherThreads = 128;
inline constexpr int64_t kGatherTokens = 4;
inline constexpr int64_t kGatherShrinkRows = 16;
inline constexpr int64_t kGatherShrinkK = 512;
inline constexpr int64_t kGatherExpandRows = 128;
inline constexpr int64_t kGatherMaxRank = 256;

// ---------------------------------------------------------------------------------------
// Weight gradients (segment kernel, K = tokens). An expert's tokens are split into up to
// kGradMaxSplits slices of about kGradTokensPerSplit tokens (by the average per expert),
// reduced in order by a second kernel; float workspace at most kGradMaxWorkspaceBytes.
inline constexpr int64_t kGradTokensPerSplit = 256;
inline constexpr int64_t kGradMaxSplits = 16;
inline constexpr int64_t kGradMaxWorkspaceBytes = 67108864;

// ---------------------------------------------------------------------------------------
// Dispatch: the segment kernel when T >= kSegmentMinTokensPerExpert * min(T, E) (many
// tokens per expert on average) or r > kGatherMaxRank; the gather kernel otherwise.
inline constexpr int64_t kSegmentMinTokensPerExpert = 16;

}  // namespace moa::cuda::tiling
