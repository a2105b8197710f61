// The CUDA forward's finalisation of one group (csrc/mmd_cuda_finalize.h), run on the host for
// tests/test_mmd_cuda_finalize.py: the kernel's split sum, S store and per-lane sums for the 32
// lanes one after another, then __shfl_down_sync's reduction tree as lane 0 receives it.
// Build: g++ -std=c++17 -O2 -ffp-contract=off -shared -fPIC -I csrc -I <torch includes>.
#include "mmd_cuda_finalize.h"

#include <cstdint>

namespace {

using namespace imm_kernels;

// What lane 0 holds after warp_sum in csrc/mmd_cuda.cu: at each offset, lane l adds lane l + offset.
template <typename acc_t>
acc_t warp_sum_on_host(acc_t (&lanes)[kWarpSize]) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    for (int lane = 0; lane < offset; ++lane) lanes[lane] += lanes[lane + offset];
  }
  return lanes[0];
}

// partial: (num_splits, PAIRS) of one group; sqdist: (2M, 2M) out; result: {MMD^2, dMMD^2/db} out.
template <typename acc_t, int MAX_M>
void finalize_group_on_host(const acc_t* partial, int64_t num_splits, int group_size, acc_t bandwidth, double eps,
                            int64_t num_features, acc_t* sqdist, acc_t* result) {
  constexpr int ROWS = 2 * MAX_M, PAIRS = ROWS * (ROWS + 1) / 2;
  acc_t upper[PAIRS];
  for (int p = 0; p < PAIRS; ++p) upper[p] = split_total<PAIRS>(partial, 0, num_splits, p);
  const int rows = 2 * group_size;
  for (int e = 0; e < rows * rows; ++e) sqdist[e] = sqdist_entry<ROWS>(upper, e / rows, e % rows);
  const acc_t features = static_cast<acc_t>(num_features);
  acc_t kern[kWarpSize], kern_dist[kWarpSize];
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const KernelSums<acc_t> sums =
        lane_kernel_sums<ROWS>(upper, lane, group_size, bandwidth, static_cast<acc_t>(eps), features);
    kern[lane] = sums.kern;
    kern_dist[lane] = sums.kern_dist;
  }
  const KernelSums<acc_t> sums{warp_sum_on_host(kern), warp_sum_on_host(kern_dist)};
  const GroupMMD<acc_t> out = group_mmd(sums, group_size, features);
  result[0] = out.mmd2;
  result[1] = out.dmmd_db;
}

// The instantiation mmd_forward_cuda picks for max_m in {1, 2, 4, 8}; false for another max_m.
template <typename acc_t>
bool dispatch(const acc_t* partial, int64_t num_splits, int group_size, int max_m, acc_t bandwidth, double eps,
              int64_t num_features, acc_t* sqdist, acc_t* result) {
  using Finalize = void (*)(const acc_t*, int64_t, int, acc_t, double, int64_t, acc_t*, acc_t*);
  const Finalize finalize = max_m == 1   ? finalize_group_on_host<acc_t, 1>
                            : max_m == 2 ? finalize_group_on_host<acc_t, 2>
                            : max_m == 4 ? finalize_group_on_host<acc_t, 4>
                            : max_m == 8 ? finalize_group_on_host<acc_t, 8>
                                         : nullptr;
  if (finalize == nullptr || group_size < 1 || group_size > max_m) return false;
  finalize(partial, num_splits, group_size, bandwidth, eps, num_features, sqdist, result);
  return true;
}

}  // namespace

extern "C" {

bool finalize_group_float(const float* partial, int64_t num_splits, int group_size, int max_m, float bandwidth,
                          double eps, int64_t num_features, float* sqdist, float* result) {
  return dispatch(partial, num_splits, group_size, max_m, bandwidth, eps, num_features, sqdist, result);
}

bool finalize_group_double(const double* partial, int64_t num_splits, int group_size, int max_m, double bandwidth,
                           double eps, int64_t num_features, double* sqdist, double* result) {
  return dispatch(partial, num_splits, group_size, max_m, bandwidth, eps, num_features, sqdist, result);
}

}  // extern "C"
