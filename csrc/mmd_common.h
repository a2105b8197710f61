// Pieces the CPU and CUDA MMD kernels share: the per-pair Laplace terms and signs
// (host and device), and the host-side checks of the tensors the bindings receive.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define IMM_HOST_DEVICE __host__ __device__
#else
#define IMM_HOST_DEVICE
#endif

namespace imm_kernels {

// (close, d, k) of one pair from its squared distance, NaN-preserving: `s <= eps^2` is false for NaN.
template <typename acc_t>
struct LaplaceTerms {
  bool close;
  acc_t dist, kern;

  IMM_HOST_DEVICE LaplaceTerms(acc_t sqdist, acc_t bandwidth, acc_t eps, acc_t num_features) {
    close = sqdist <= eps * eps;
    dist = close ? eps : std::sqrt(sqdist);
    kern = std::exp(-bandwidth * dist / num_features);
  }
};

// sigma_i sigma_j: +1 within x or within y, -1 across.
template <typename acc_t>
IMM_HOST_DEVICE acc_t pair_sign(int64_t i, int64_t j, int64_t group_size) {
  return (i < group_size) == (j < group_size) ? acc_t(1) : acc_t(-1);
}

// Shapes, dtypes and strides both forward entry points need (devices are each backend's own check).
inline void check_mmd_inputs(const at::Tensor& x, const at::Tensor& y, const at::Tensor& bandwidth,
                             const at::Tensor& weight, int64_t group_size, const char* backend) {
  TORCH_CHECK(x.dim() == 2 && y.sizes() == x.sizes(), "mmd (", backend, "): x and y must be (B, D) of one shape");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "mmd (", backend, "): x and y must share a dtype");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1, "mmd (", backend, "): x and y need a unit column stride");
  TORCH_CHECK(group_size >= 1 && x.size(0) % group_size == 0, "mmd (", backend, "): group_size must divide B");
  const auto cdtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t num_groups = x.size(0) / group_size;
  for (const at::Tensor* t : {&bandwidth, &weight}) {
    TORCH_CHECK(t->scalar_type() == cdtype && t->is_contiguous() && t->dim() == 1 && t->size(0) == num_groups, "mmd (",
                backend, "): bandwidth and weight must be contiguous (G,) tensors of the compute dtype");
  }
}

// The upstream gradient: (G,) in the compute dtype, any stride.
inline void check_grad_loss(const at::Tensor& grad_loss, const at::Tensor& bandwidth, int64_t num_groups,
                            const char* backend) {
  TORCH_CHECK(grad_loss.scalar_type() == bandwidth.scalar_type() && grad_loss.dim() == 1 &&
                  grad_loss.size(0) == num_groups && grad_loss.device() == bandwidth.device(),
              "mmd (", backend, "): grad_loss must be (G,) in the compute dtype");
}

// What the backward receives besides the inputs: grad_loss (G,) and the S the forward saved.
inline void check_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& sqdist, const at::Tensor& bandwidth,
                                  int64_t num_groups, int64_t rows, const char* backend) {
  check_grad_loss(grad_loss, bandwidth, num_groups, backend);
  TORCH_CHECK(sqdist.is_contiguous() && sqdist.scalar_type() == bandwidth.scalar_type() &&
                  sqdist.sizes() == at::IntArrayRef({num_groups, rows, rows}),
              "mmd (", backend, "): sqdist must be the contiguous (G, 2M, 2M) tensor the forward saved");
}

}  // namespace imm_kernels
