// The portable reference backend (backend.h), declared so that a device backend can
// take its steps and replace the ones it has kernels for.
#pragma once

#include "engine/backend.h"

namespace moa::engine {

// Every step in ATen ops, on the tensors' device, in the rounding order of transformers'
// Llama modules (each op rounds to the storage dtype as HF's does; attention and the
// LoRA updates accumulate in float32). The LoRA update is its own gather-matmul per
// expert, independent of the grouped op, so comparing the two backends checks the op's
// use as well.
class ReferenceBackend : public Backend {
 public:
  const char* name() const override { return "reference"; }
  at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, float eps) const override;
  void rope_qk(const at::Tensor& qkv, const AttentionDims& dims, const at::Tensor& positions,
               const at::Tensor& table) const override;
  void store_kv(const at::Tensor& qkv, const AttentionDims& dims, const std::vector<SeqSpan>& seqs,
                const KvStores& stores, const ForwardPlan* plan) const override;
  at::Tensor attention(const at::Tensor& qkv, const AttentionDims& dims, const std::vector<SeqSpan>& seqs,
                       const KvStores& stores, const ForwardPlan* plan) const override;
  at::Tensor silu_mul(const at::Tensor& gu) const override;
  at::Tensor linear(const at::Tensor& x, const Matrix& w, const at::Tensor& b) const override;
  void lora_add_(const at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                 const at::Tensor& ids, const at::Tensor& scales) const override;
  at::Tensor embedding(const Matrix& w, const at::Tensor& ids, at::ScalarType dtype) const override;

 protected:
  // attention() for one sequence: its rows of out [N, Q].
  void attend(const at::Tensor& qkv, const AttentionDims& dims, const SeqSpan& seq, const KvStores& stores,
              const at::Tensor& out) const;
  // store_kv() for one sequence.
  void store(const at::Tensor& qkv, const AttentionDims& dims, const SeqSpan& seq, const KvStores& stores) const;
};

}  // namespace moa::engine
