// Grouped Laplace-kernel MMD: the native (C++ / CUDA) kernels behind imm_kernels._C.
//
// Per group g, z = [x_g; y_g] stacks its M rows of x over its M rows of y (2M rows,
// sign sigma = +1 for x and -1 for y). With S_ij = ||z_i - z_j||^2,
// d_ij = max(sqrt(S_ij), eps) and k_ij = exp(-b d_ij / D):
//
//   forward   loss_g = w (1/M^2) sum_ij sigma_i sigma_j k_ij
//   backward  dz_i   = sum_j A_ij (z_i - z_j),
//             A_ij   = -(2 w b g / (M^2 D)) sigma_i sigma_j k_ij / d_ij   (0 where sqrt(S_ij) <= eps)
//
// Inputs x, y are (B, D) views with unit column stride and any row stride (0 too).
// bandwidth, weight are contiguous (G,) tensors of the compute dtype (float32, or
// float64 for float64 inputs); grad_loss is (G,) of that dtype with any stride.
// S is saved as a contiguous (G, 2M, 2M) tensor of the compute dtype.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace imm_kernels {

// -> (loss_g, S, MMD^2_g, dMMD^2_g/db), all in the compute dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mmd_forward_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& bandwidth, const at::Tensor& weight, int64_t group_size,
    double eps);

// -> (dx, dy) as contiguous (B, D) tensors of x's dtype; an empty tensor where not asked for.
std::tuple<at::Tensor, at::Tensor> mmd_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& y, const at::Tensor& sqdist,
    const at::Tensor& bandwidth, const at::Tensor& weight, int64_t group_size, double eps, bool need_dx, bool need_dy);

// The forward and, for an upstream gradient grad_loss (G,) known in advance, (dx, dy) as the
// backward would return them for it: one pass over each group while its rows are in cache.
// -> (loss_g, S, MMD^2_g, dMMD^2_g/db, dx, dy).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mmd_forward_with_grad_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& bandwidth, const at::Tensor& weight, int64_t group_size,
    double eps, const at::Tensor& grad_loss, bool need_dx, bool need_dy);

// Gradients of 1 MiB or more come from blocks kept mapped between calls (at most 4 freed ones,
// 1 GiB). Frees the kept blocks (those of live gradients go when the gradients do); -> bytes freed.
int64_t release_cached_gradients_cpu();

#ifdef IMM_KERNELS_WITH_CUDA
constexpr int64_t kCudaMaxGroupSize = 8;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mmd_forward_cuda(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& bandwidth, const at::Tensor& weight, int64_t group_size,
    double eps);

std::tuple<at::Tensor, at::Tensor> mmd_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& y, const at::Tensor& sqdist,
    const at::Tensor& bandwidth, const at::Tensor& weight, int64_t group_size, double eps, bool need_dx, bool need_dy);
#endif

}  // namespace imm_kernels
