// Grouped Laplace-kernel MMD in CUDA C++ (see mmd.h for the mathematics): the
// `cuda` backend, a second GPU implementation to cross-check and race Triton's.
//
// One thread block per (group, column split). Each thread walks its columns in
// VEC-element steps (16-byte loads when rows are aligned), holds the stacked
// group z = [x_g; y_g] for those columns in registers, and accumulates every
// pair's squared difference (direct differences, never the Gram form) for the
// upper triangle of S. Pairs are then reduced across the block in a fixed order
// (warp shuffles, then warps in index order): no atomics, bitwise repeatable.
// One warp then finalises the group (mmd_cuda_finalize.h). With too few groups to
// fill the GPU, D is split across blocks and a second kernel, a warp per group,
// adds the partial S in split order and finalises alike. The backward block loads the
// (2M)x(2M) coefficient matrix into shared memory and streams its columns once.
//
// Rows are templated on MAX_M in {1, 2, 4, 8} (registers hold 2*MAX_M rows and
// MAX_M(2*MAX_M+1) pair sums); a runtime group_size <= MAX_M leaves the extra
// rows unused.
#include "mmd.h"
#include "mmd_common.h"
#include "mmd_cuda_finalize.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace imm_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kFinalizeWarps = 4;  // groups per block of mmd_finalize_kernel

template <typename T, int N>
struct alignas(sizeof(T) * N) Packed {
  T v[N];
};

// z[r][v] for the VEC columns starting at `col`; rows past 2M (and past D) read 0.
template <typename scalar_t, typename acc_t, int ROWS, int VEC>
__device__ __forceinline__ void load_columns(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                                             int64_t stride_x, int64_t stride_y, int64_t group, int group_size,
                                             int64_t col, int64_t col_end, acc_t (&z)[ROWS][VEC]) {
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const bool real = r < 2 * group_size;
    const scalar_t* row =
        r < group_size ? x + (group * group_size + r) * stride_x : y + (group * group_size + r - group_size) * stride_y;
    if constexpr (VEC > 1) {  // col_end and col are multiples of VEC here
      Packed<scalar_t, VEC> packed{};
      if (real && col < col_end) packed = *reinterpret_cast<const Packed<scalar_t, VEC>*>(row + col);
#pragma unroll
      for (int v = 0; v < VEC; ++v) z[r][v] = static_cast<acc_t>(packed.v[v]);
    } else {
      z[r][0] = real && col < col_end ? static_cast<acc_t>(row[col]) : acc_t(0);
    }
  }
}

// Lane 0 gets the sum of the warp's values, added in a fixed tree.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  return value;
}

// One whole warp: from the packed upper triangle of the group's S (in shared memory), store
// S (2M x 2M), MMD^2, dMMD^2/db and the loss.
template <typename acc_t, int ROWS>
__device__ void finalize_group(const acc_t* upper, int lane, int64_t group, int group_size, const acc_t* bandwidth,
                               const acc_t* weight, double eps, int64_t num_features, acc_t* loss, acc_t* sqdist,
                               acc_t* mmd2, acc_t* dmmd_db) {
  const int rows = 2 * group_size;
  for (int e = lane; e < rows * rows; e += kWarpSize) {
    sqdist[group * rows * rows + e] = sqdist_entry<ROWS>(upper, e / rows, e % rows);
  }
  const acc_t features = static_cast<acc_t>(num_features);
  const KernelSums<acc_t> lane_sums =
      lane_kernel_sums<ROWS>(upper, lane, group_size, bandwidth[group], static_cast<acc_t>(eps), features);
  const KernelSums<acc_t> sums{warp_sum(lane_sums.kern), warp_sum(lane_sums.kern_dist)};
  if (lane == 0) {
    const GroupMMD<acc_t> out = group_mmd(sums, group_size, features);
    mmd2[group] = out.mmd2;
    dmmd_db[group] = out.dmmd_db;
    loss[group] = weight[group] * out.mmd2;
  }
}

template <typename scalar_t, typename acc_t, int MAX_M, int VEC>
__global__ void __launch_bounds__(kThreads)
    mmd_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, int64_t stride_x,
                       int64_t stride_y, int group_size, int64_t num_features, int64_t cols_per_split, double eps,
                       const acc_t* __restrict__ bandwidth, const acc_t* __restrict__ weight,
                       acc_t* __restrict__ partial, acc_t* __restrict__ loss, acc_t* __restrict__ sqdist,
                       acc_t* __restrict__ mmd2, acc_t* __restrict__ dmmd_db) {
  constexpr int ROWS = 2 * MAX_M, PAIRS = ROWS * (ROWS + 1) / 2;
  __shared__ acc_t warp_sums[kWarps][PAIRS];
  __shared__ acc_t block_sums[PAIRS];
  const int64_t group = blockIdx.x, split = blockIdx.y, num_splits = gridDim.y;
  const int64_t col_start = split * cols_per_split;
  const int64_t col_end = min(num_features, col_start + cols_per_split);

  acc_t acc[PAIRS];
#pragma unroll
  for (int p = 0; p < PAIRS; ++p) acc[p] = 0;
  for (int64_t col = col_start + threadIdx.x * VEC; col < col_end; col += kThreads * VEC) {
    acc_t z[ROWS][VEC];
    load_columns<scalar_t, acc_t, ROWS, VEC>(x, y, stride_x, stride_y, group, group_size, col, col_end, z);
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
#pragma unroll
      for (int j = i; j < ROWS; ++j) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const acc_t diff = z[i][v] - z[j][v];
          acc[pair_index(i, j, ROWS)] += diff * diff;
        }
      }
    }
  }

  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int p = 0; p < PAIRS; ++p) {
    const acc_t value = warp_sum(acc[p]);
    if (lane == 0) warp_sums[warp][p] = value;
  }
  __syncthreads();
  for (int p = threadIdx.x; p < PAIRS; p += kThreads) {
    acc_t total = 0;
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w][p];
    block_sums[p] = total;
  }
  __syncthreads();

  if (num_splits > 1) {
    for (int p = threadIdx.x; p < PAIRS; p += kThreads)
      partial[(group * num_splits + split) * PAIRS + p] = block_sums[p];
  } else if (warp == 0) {
    finalize_group<acc_t, ROWS>(block_sums, lane, group, group_size, bandwidth, weight, eps, num_features, loss, sqdist,
                                mmd2, dmmd_db);
  }
}

// One warp per group: its lanes add the partial S in split order, then finalise it as the
// forward kernel does an unsplit group.
template <typename acc_t, int MAX_M>
__global__ void __launch_bounds__(kFinalizeWarps* kWarpSize)
    mmd_finalize_kernel(const acc_t* __restrict__ partial, int64_t num_groups, int64_t num_splits, int group_size,
                        int64_t num_features, double eps, const acc_t* __restrict__ bandwidth,
                        const acc_t* __restrict__ weight, acc_t* __restrict__ loss, acc_t* __restrict__ sqdist,
                        acc_t* __restrict__ mmd2, acc_t* __restrict__ dmmd_db) {
  constexpr int ROWS = 2 * MAX_M, PAIRS = ROWS * (ROWS + 1) / 2;
  __shared__ acc_t upper[kFinalizeWarps][PAIRS];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * kFinalizeWarps + warp;
  if (group >= num_groups) return;  // whole warps leave: the shuffles see full warps
  for (int p = lane; p < PAIRS; p += kWarpSize) upper[warp][p] = split_total<PAIRS>(partial, group, num_splits, p);
  __syncwarp();
  finalize_group<acc_t, ROWS>(upper[warp], lane, group, group_size, bandwidth, weight, eps, num_features, loss, sqdist,
                              mmd2, dmmd_db);
}

// A_ij from shared memory. Up to MAX_M = 4 the compiler keeps all (2M)^2 values in
// registers across the column loop; at MAX_M = 8 that would be 256 and spill, so
// each is re-read (a broadcast shared load) instead.
template <int MAX_M, typename acc_t>
__device__ __forceinline__ acc_t coefficient(const acc_t (&coeff)[2 * MAX_M][2 * MAX_M], int i, int j) {
  if constexpr (MAX_M > 4) {
    return *static_cast<const volatile acc_t*>(&coeff[i][j]);
  } else {
    return coeff[i][j];
  }
}

template <typename scalar_t, typename acc_t, int MAX_M, int VEC>
__global__ void __launch_bounds__(kThreads)
    mmd_backward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, int64_t stride_x,
                        int64_t stride_y, scalar_t* __restrict__ dx, scalar_t* __restrict__ dy,
                        const acc_t* __restrict__ grad_loss, int64_t grad_stride, const acc_t* __restrict__ sqdist,
                        const acc_t* __restrict__ bandwidth, const acc_t* __restrict__ weight, int group_size,
                        int64_t num_features, int64_t cols_per_split, double eps) {
  constexpr int ROWS = 2 * MAX_M;
  __shared__ acc_t coeff[ROWS][ROWS];
  const int64_t group = blockIdx.x, split = blockIdx.y;
  const int rows = 2 * group_size;
  const acc_t features = static_cast<acc_t>(num_features), b = bandwidth[group];
  const acc_t scale = acc_t(-2) * grad_loss[group * grad_stride] * weight[group] * b /
                      static_cast<acc_t>(group_size * group_size) / features;
  for (int e = threadIdx.x; e < ROWS * ROWS; e += kThreads) {
    const int i = e / ROWS, j = e % ROWS;
    acc_t a = 0;
    if (i < rows && j < rows) {
      const LaplaceTerms<acc_t> terms(sqdist[group * rows * rows + i * rows + j], b, static_cast<acc_t>(eps), features);
      a = terms.close ? acc_t(0) : scale * pair_sign<acc_t>(i, j, group_size) * terms.kern / terms.dist;
    }
    coeff[i][j] = a;
  }
  __syncthreads();

  const int64_t col_start = split * cols_per_split;
  const int64_t col_end = min(num_features, col_start + cols_per_split);
  for (int64_t col = col_start + threadIdx.x * VEC; col < col_end; col += kThreads * VEC) {
    acc_t z[ROWS][VEC];
    load_columns<scalar_t, acc_t, ROWS, VEC>(x, y, stride_x, stride_y, group, group_size, col, col_end, z);
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
      const bool is_x = i < group_size;
      if (i >= rows || (is_x && dx == nullptr) || (!is_x && dy == nullptr)) continue;
      acc_t sum[VEC] = {};
#pragma unroll
      for (int j = 0; j < ROWS; ++j) {
        const acc_t a = coefficient<MAX_M>(coeff, i, j);
#pragma unroll
        for (int v = 0; v < VEC; ++v) sum[v] += a * (z[i][v] - z[j][v]);
      }
      Packed<scalar_t, VEC> out;
#pragma unroll
      for (int v = 0; v < VEC; ++v) out.v[v] = static_cast<scalar_t>(sum[v]);
      scalar_t* dst = is_x ? dx + (group * group_size + i) * num_features
                           : dy + (group * group_size + i - group_size) * num_features;
      *reinterpret_cast<Packed<scalar_t, VEC>*>(dst + col) = out;
    }
  }
}

// ----------------------------------------------------------------------------
// Host side
// ----------------------------------------------------------------------------

template <int N>
using Int = std::integral_constant<int, N>;

// Bytes per vector load: 16, or 8 above MAX_M = 4 so that 2*MAX_M rows x VEC values fit in registers.
constexpr int vector_bytes(int max_m) { return max_m <= 4 ? 16 : 8; }

struct Plan {
  int64_t num_groups, num_features, num_splits, cols_per_split;
  int vec, max_m;
};

// 16-byte loads need every row start aligned: base pointers, row strides and D.
int vector_width(const at::Tensor& x, const at::Tensor& y, int max_m) {
  const int64_t itemsize = x.element_size();
  const int64_t vec = std::max<int64_t>(1, vector_bytes(max_m) / itemsize);
  const auto aligned = [&](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % (vec * itemsize) == 0 && t.stride(0) % vec == 0;
  };
  return vec > 1 && x.size(1) % vec == 0 && aligned(x) && aligned(y) ? static_cast<int>(vec) : 1;
}

Plan make_plan(const at::Tensor& x, const at::Tensor& y, int64_t group_size) {
  Plan plan;
  plan.num_groups = x.size(0) / group_size;
  plan.num_features = x.size(1);
  plan.max_m = group_size <= 1 ? 1 : group_size <= 2 ? 2 : group_size <= 4 ? 4 : 8;
  plan.vec = vector_width(x, y, plan.max_m);
  // Fewer groups than 4 blocks per SM: split D, a whole number of block strides per split.
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  const int64_t stride = static_cast<int64_t>(kThreads) * plan.vec;
  const int64_t strides = (plan.num_features + stride - 1) / stride;
  const int64_t wanted = (4 * sms + plan.num_groups - 1) / plan.num_groups;
  const int64_t per_split = (strides + std::min(strides, wanted) - 1) / std::min(strides, wanted);
  plan.cols_per_split = per_split * stride;
  plan.num_splits = (plan.num_features + plan.cols_per_split - 1) / plan.cols_per_split;
  return plan;
}

void check_inputs(const at::Tensor& x, const at::Tensor& y, const at::Tensor& bandwidth, const at::Tensor& weight,
                  int64_t group_size) {
  TORCH_CHECK(x.is_cuda() && y.device() == x.device() && bandwidth.device() == x.device() &&
                  weight.device() == x.device(),
              "mmd (cuda): all tensors must be on one CUDA device");
  TORCH_CHECK(group_size <= kCudaMaxGroupSize, "mmd (cuda): group_size must be at most ", kCudaMaxGroupSize);
  check_mmd_inputs(x, y, bandwidth, weight, group_size, "cuda");
}

// Calls body(Int<MAX_M>, Int<VEC>) for the plan's instantiation (C++17: no templated lambdas).
template <typename scalar_t, typename Body>
void dispatch_shape(const Plan& plan, Body&& body) {
  const auto with_m = [&](auto max_m) {
    constexpr int vec = std::max<int>(1, vector_bytes(decltype(max_m)::value) / static_cast<int>(sizeof(scalar_t)));
    if constexpr (vec > 1) {
      if (plan.vec == vec) return body(max_m, Int<vec>{});
    }
    return body(max_m, Int<1>{});
  };
  switch (plan.max_m) {
    case 1: return with_m(Int<1>{});
    case 2: return with_m(Int<2>{});
    case 4: return with_m(Int<4>{});
    default: return with_m(Int<8>{});
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mmd_forward_cuda(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& bandwidth, const at::Tensor& weight, int64_t group_size,
    double eps) {
  check_inputs(x, y, bandwidth, weight, group_size);
  const c10::cuda::CUDAGuard guard(x.device());
  const Plan plan = make_plan(x, y, group_size);
  const auto options = bandwidth.options();
  const int64_t rows = 2 * group_size;
  at::Tensor loss = at::empty({plan.num_groups}, options), mmd2 = at::empty({plan.num_groups}, options);
  at::Tensor dmmd_db = at::empty({plan.num_groups}, options);
  at::Tensor sqdist = at::empty({plan.num_groups, rows, rows}, options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mmd_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_shape<scalar_t>(plan, [&](auto max_m, auto vec) {
      constexpr int MAX_M = decltype(max_m)::value, VEC = decltype(vec)::value;
      constexpr int PAIRS = 2 * MAX_M * (2 * MAX_M + 1) / 2;
      at::Tensor partial =
          plan.num_splits > 1 ? at::empty({plan.num_groups, plan.num_splits, PAIRS}, options) : at::empty({0}, options);
      const dim3 grid(static_cast<unsigned>(plan.num_groups), static_cast<unsigned>(plan.num_splits));
      mmd_forward_kernel<scalar_t, acc_t, MAX_M, VEC><<<grid, kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.stride(0), y.stride(0), static_cast<int>(group_size),
          plan.num_features, plan.cols_per_split, eps, bandwidth.data_ptr<acc_t>(), weight.data_ptr<acc_t>(),
          partial.data_ptr<acc_t>(), loss.data_ptr<acc_t>(), sqdist.data_ptr<acc_t>(), mmd2.data_ptr<acc_t>(),
          dmmd_db.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (plan.num_splits > 1) {
        const unsigned blocks = static_cast<unsigned>((plan.num_groups + kFinalizeWarps - 1) / kFinalizeWarps);
        mmd_finalize_kernel<acc_t, MAX_M><<<blocks, kFinalizeWarps * kWarpSize, 0, stream>>>(
            partial.data_ptr<acc_t>(), plan.num_groups, plan.num_splits, static_cast<int>(group_size),
            plan.num_features, eps, bandwidth.data_ptr<acc_t>(), weight.data_ptr<acc_t>(), loss.data_ptr<acc_t>(),
            sqdist.data_ptr<acc_t>(), mmd2.data_ptr<acc_t>(), dmmd_db.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {loss, sqdist, mmd2, dmmd_db};
}

std::tuple<at::Tensor, at::Tensor> mmd_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& y, const at::Tensor& sqdist,
    const at::Tensor& bandwidth, const at::Tensor& weight, int64_t group_size, double eps, bool need_dx, bool need_dy) {
  check_inputs(x, y, bandwidth, weight, group_size);
  const c10::cuda::CUDAGuard guard(x.device());
  const Plan plan = make_plan(x, y, group_size);
  const int64_t rows = 2 * group_size;
  check_backward_inputs(grad_loss, sqdist, bandwidth, plan.num_groups, rows, "cuda");
  at::Tensor dx = need_dx ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor dy = need_dy ? at::empty(y.sizes(), y.options()) : at::empty({0}, y.options());
  if (!(need_dx || need_dy)) return {dx, dy};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mmd_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_shape<scalar_t>(plan, [&](auto max_m, auto vec) {
      constexpr int MAX_M = decltype(max_m)::value, VEC = decltype(vec)::value;
      const dim3 grid(static_cast<unsigned>(plan.num_groups), static_cast<unsigned>(plan.num_splits));
      mmd_backward_kernel<scalar_t, acc_t, MAX_M, VEC><<<grid, kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.stride(0), y.stride(0),
          need_dx ? dx.data_ptr<scalar_t>() : nullptr, need_dy ? dy.data_ptr<scalar_t>() : nullptr,
          grad_loss.data_ptr<acc_t>(), grad_loss.stride(0), sqdist.data_ptr<acc_t>(), bandwidth.data_ptr<acc_t>(),
          weight.data_ptr<acc_t>(), static_cast<int>(group_size), plan.num_features, plan.cols_per_split, eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dx, dy};
}

}  // namespace imm_kernels
