// How the CUDA forward finalises a group from its S, as host-and-device functions so that a host
// test (tests/test_mmd_cuda_finalize.py) runs the same indexing and order of additions.
//
// One warp per group. The lanes split the M x M positions (i, j); each position takes the four
// entries (i, j), (M+i, M+j), (i, M+j), (M+i, j) of S together, whose signed terms
// (k_xx - k_xy) + (k_yy - k_yx) cancel exactly when x == y. Each lane sums its positions in
// index order; lane sums then meet in a fixed shuffle tree, whatever the launch geometry.
#pragma once

#include "mmd_common.h"

#include <cstdint>
#include <type_traits>

namespace imm_kernels {

constexpr int kWarpSize = 32;

// Index of the upper-triangle pair (i, j), i <= j, among ROWS rows.
IMM_HOST_DEVICE constexpr int pair_index(int i, int j, int rows) { return i * rows - i * (i - 1) / 2 + (j - i); }

// S_ij from the packed upper triangle of a group's S (ROWS = 2 MAX_M rows).
template <int ROWS, typename acc_t>
IMM_HOST_DEVICE acc_t sqdist_entry(const acc_t* upper, int i, int j) {
  return upper[i <= j ? pair_index(i, j, ROWS) : pair_index(j, i, ROWS)];
}

// Pair p's S: the partial sums of the D splits (group-major, then split, then pair) added in split order.
template <int PAIRS, typename acc_t>
IMM_HOST_DEVICE acc_t split_total(const acc_t* partial, int64_t group, int64_t num_splits, int p) {
  acc_t total = 0;
  for (int64_t split = 0; split < num_splits; ++split) total += partial[(group * num_splits + split) * PAIRS + p];
  return total;
}

// a * b rounded on its own. nvcc contracts a product and the subtraction that follows into an
// FMA, after which k_xx d_xx - k_xy d_xy is no longer exactly 0 for equal terms.
template <typename acc_t>
IMM_HOST_DEVICE acc_t rounded_product(acc_t a, acc_t b) {
#ifdef __CUDA_ARCH__
  if constexpr (std::is_same_v<acc_t, double>) {
    return __dmul_rn(a, b);
  } else {
    return __fmul_rn(a, b);
  }
#else
  return a * b;  // host code is built with -ffp-contract=off
#endif
}

// sum_ij sigma_i sigma_j k_ij and sum_ij sigma_i sigma_j k_ij d_ij, over some or all (i, j).
template <typename acc_t>
struct KernelSums {
  acc_t kern, kern_dist;
};

// One lane's share of a group's sums: positions lane, lane + 32, ... of the M x M quadrant.
template <int ROWS, typename acc_t>
IMM_HOST_DEVICE KernelSums<acc_t> lane_kernel_sums(const acc_t* upper, int lane, int group_size, acc_t bandwidth,
                                                   acc_t eps, acc_t features) {
  KernelSums<acc_t> sums{0, 0};
  const int m = group_size;
  for (int q = lane; q < m * m; q += kWarpSize) {
    const int i = q / m, j = q % m;
    const LaplaceTerms<acc_t> xx(sqdist_entry<ROWS>(upper, i, j), bandwidth, eps, features);
    const LaplaceTerms<acc_t> yy(sqdist_entry<ROWS>(upper, m + i, m + j), bandwidth, eps, features);
    const LaplaceTerms<acc_t> xy(sqdist_entry<ROWS>(upper, i, m + j), bandwidth, eps, features);
    const LaplaceTerms<acc_t> yx(sqdist_entry<ROWS>(upper, m + i, j), bandwidth, eps, features);
    sums.kern += (xx.kern - xy.kern) + (yy.kern - yx.kern);
    sums.kern_dist += (rounded_product(xx.kern, xx.dist) - rounded_product(xy.kern, xy.dist)) +
                      (rounded_product(yy.kern, yy.dist) - rounded_product(yx.kern, yx.dist));
  }
  return sums;
}

template <typename acc_t>
struct GroupMMD {
  acc_t mmd2, dmmd_db;
};

// MMD^2 and dMMD^2/db of a group from its whole sums.
template <typename acc_t>
IMM_HOST_DEVICE GroupMMD<acc_t> group_mmd(const KernelSums<acc_t>& sums, int group_size, acc_t features) {
  const acc_t pairs = static_cast<acc_t>(group_size * group_size);
  return {sums.kern / pairs, -sums.kern_dist / pairs / features};
}

}  // namespace imm_kernels
