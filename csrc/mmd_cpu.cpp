// Grouped Laplace-kernel MMD on the CPU (see mmd.h for the mathematics).
//
// Work is split into tasks (group, column split). A task walks its columns in
// blocks: fp32/fp64 rows are read in place, fp16/bf16 rows (and a ragged last
// block) are first converted into a small zero-padded buffer. The group's 2M rows
// are padded to whole 4-row tiles. S_ij is summed for pairs i < j only: within a
// tile its 6 pairs, across two tiles 2x4 pairs at a time (8 accumulators and 6 row
// vectors fit the 16 AVX2 registers); the diagonal is 0 unless a row holds Inf or
// NaN, which the off-diagonal sums reveal (see forward_kernel). Lane sums stay in
// registers over a block and are added once per task, in a fixed order. The hot
// loops are compiled for x86-64-v4 (AVX-512), v3 (AVX2) and baseline, picked at
// load time (GCC target_clones), and contract into FMAs where the clone has them.
// The number of splits depends only on (G, D), so results are bitwise the same for
// any thread count. Nothing (2M)x(2M)xD is ever allocated.
//
// mmd_forward_with_grad_cpu also writes dz for an upstream gradient given in
// advance, right after the group's S: its rows are then reread from L2, not
// memory, and the backward has nothing left to do. Gradient vectors are stored as
// they are made; large outputs with streaming stores (no read of each line before
// it is overwritten), which then drain to memory while the arithmetic goes on.
#include "mmd.h"
#include "mmd_common.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#ifdef __linux__
#include <sys/mman.h>  // madvise
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace imm_kernels {
namespace {

// Independent accumulators per pair: one 32-byte vector (AVX2 / AVX-512VL registers).
template <typename acc_t>
constexpr int64_t kLanes = 32 / sizeof(acc_t);
constexpr int64_t kTile = 4;  // rows per register tile; a group's 2M rows are padded to a multiple
constexpr int64_t kHalfTile = 2;  // rows of a tile an off-diagonal pass takes at once
constexpr int64_t kPairRows = 2;  // gradient rows made at once
constexpr int64_t kBlockBytes = 65536;  // a block of the group's rows stays in L2 while its tiles reread it
constexpr int64_t kTargetTasks = 64;  // fewer groups than this split D (fixed, not the thread count)
constexpr int64_t kMinSplitColumns = 4096;

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// Geometry of one call, shared by forward and backward so that both split alike.
struct Plan {
  int64_t num_groups, group_size, rows, num_features;
  int64_t padded_rows;  // rows rounded up to whole tiles; the extra buffer rows stay zero
  int64_t num_splits, cols_per_split, block_cols;

  Plan(int64_t batch, int64_t group_size_, int64_t num_features_, int64_t acc_bytes)
      : num_groups(batch / group_size_), group_size(group_size_), rows(2 * group_size_), num_features(num_features_),
        padded_rows(round_up(2 * group_size_, kTile)) {
    const int64_t lanes = 32 / acc_bytes;
    block_cols = std::clamp<int64_t>(kBlockBytes / (padded_rows * acc_bytes) / lanes * lanes, lanes, 8192);
    const int64_t wanted = (kTargetTasks + num_groups - 1) / num_groups;
    num_splits = std::max<int64_t>(1, std::min(wanted, num_features / kMinSplitColumns));
    cols_per_split = round_up((num_features + num_splits - 1) / num_splits, block_cols);
    num_splits = (num_features + cols_per_split - 1) / cols_per_split;
  }

  // Columns [begin, end) of column split `split`.
  std::pair<int64_t, int64_t> columns(int64_t split) const {
    return {split * cols_per_split, std::min(num_features, (split + 1) * cols_per_split)};
  }
};

// Row r of group g's stacked z = [x_g; y_g].
template <typename scalar_t>
struct GroupRows {
  const scalar_t* x;
  const scalar_t* y;
  int64_t stride_x, stride_y, group_size;

  const scalar_t* row(int64_t group, int64_t r) const {
    return r < group_size ? x + (group * group_size + r) * stride_x
                          : y + (group * group_size + r - group_size) * stride_y;
  }
};

// Pointers to columns [col, col + padded) of the group's rows (then zero rows up to padded_rows).
// fp32/fp64 rows are read in place when the block is a whole number of vectors; otherwise the
// block is converted into `buf` (row pitch `pitch`) and zero-padded. No software prefetch: the
// hardware's stream prefetchers follow these sequential rows, and a burst of prefetches for a
// whole block only stalls the core until they drain (measured slower).
template <typename scalar_t, typename acc_t>
void block_rows(const GroupRows<scalar_t>& src, int64_t group, int64_t rows, int64_t col, int64_t n, int64_t padded,
                int64_t pitch, acc_t* buf, const acc_t* zeros, std::vector<const acc_t*>& ptrs) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* in = src.row(group, r) + col;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (n == padded) {
        ptrs[r] = in;
        continue;
      }
    }
    acc_t* out = buf + r * pitch;
    for (int64_t c = 0; c < n; ++c) out[c] = static_cast<acc_t>(in[c]);
    std::fill(out + n, out + padded, acc_t(0));
    ptrs[r] = out;
  }
  for (int64_t r = rows; r < static_cast<int64_t>(ptrs.size()); ++r) ptrs[r] = zeros;
}

#if defined(__x86_64__)
#include <emmintrin.h>  // SSE2 streaming stores: every x86-64 has them
#endif

// A gradient at least this large does not stay in cache anyway: its rows are written with
// streaming stores, which skip reading each line before overwriting it (half the bytes of a write).
constexpr int64_t kStreamingBytes = int64_t(8) << 20;

// dst[0, n) = src[0, n) converted to scalar_t; streaming stores for fp32/fp64 when `streaming`.
template <typename scalar_t, typename acc_t>
void store_row(scalar_t* dst, const acc_t* src, int64_t n, bool streaming) {
  int64_t c = 0;
#if defined(__x86_64__)
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (streaming) {
      constexpr int64_t per_store = 16 / sizeof(acc_t);
      for (; c < n && reinterpret_cast<std::uintptr_t>(dst + c) % 16 != 0; ++c) dst[c] = src[c];
      for (; c + per_store <= n; c += per_store) {
        if constexpr (std::is_same_v<acc_t, float>) {
          _mm_stream_ps(dst + c, _mm_loadu_ps(src + c));
        } else {
          _mm_stream_pd(dst + c, _mm_loadu_pd(src + c));
        }
      }
    }
  }
#endif
  for (; c < n; ++c) dst[c] = static_cast<scalar_t>(src[c]);
}

// Orders this thread's streaming stores before whatever follows the parallel region.
inline void fence_streaming_stores() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define IMM_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define IMM_INLINE inline __attribute__((always_inline))
#define IMM_UNROLL _Pragma("GCC unroll 4")
#define IMM_UNROLL16 _Pragma("GCC unroll 16")
#else
#define IMM_VECTOR_CLONES
#define IMM_INLINE inline
#define IMM_UNROLL
#define IMM_UNROLL16
#endif

// The vector loops below, alone, contract a * b + c into FMAs (in the AVX-512 and AVX2 clones,
// which then round alike; the pre-FMA baseline clone cannot): it halves their arithmetic, and
// their sums need no exact cancellation. Scalar code elsewhere keeps -ffp-contract=off.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")

// One 32-byte vector of the compute dtype (GCC/Clang vector extensions: the target_clones
// variants turn it into one AVX register, the baseline into two SSE registers).
typedef float float_vector __attribute__((vector_size(32)));
typedef double double_vector __attribute__((vector_size(32)));
template <typename acc_t>
struct VectorOf;
template <>
struct VectorOf<float> {
  using type = float_vector;
};
template <>
struct VectorOf<double> {
  using type = double_vector;
};

template <typename V, typename T>
IMM_INLINE V load_vector(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));  // unaligned load
  return v;
}

template <typename V, typename T>
IMM_INLINE void store_vector(T* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

// Rows i0, i0+1 against a tile's 4 rows j: lane vector p = ti * kTile + tj accumulates
// (z_i - z_j)^2 over columns c = l mod kLanes. 8 accumulators and 6 row vectors fit in the 16
// AVX2 registers, where a whole 4x4 tile would spill. Lanes are summed once, at the end of a task.
template <typename acc_t>
IMM_INLINE void add_half_tile_sqdist(const acc_t* const* rows_i, const acc_t* const* rows_j, int64_t padded,
                                     acc_t* lanes) {
  using V = typename VectorOf<acc_t>::type;
  constexpr int64_t L = kLanes<acc_t>;
  V acc[kHalfTile * kTile];
  IMM_UNROLL16 for (int64_t p = 0; p < kHalfTile * kTile; ++p) acc[p] = load_vector<V>(lanes + p * L);
  for (int64_t c = 0; c < padded; c += L) {
    V a[kHalfTile], b[kTile];
    IMM_UNROLL for (int64_t t = 0; t < kHalfTile; ++t) a[t] = load_vector<V>(rows_i[t] + c);
    IMM_UNROLL for (int64_t t = 0; t < kTile; ++t) b[t] = load_vector<V>(rows_j[t] + c);
    IMM_UNROLL for (int64_t ti = 0; ti < kHalfTile; ++ti) {
      IMM_UNROLL for (int64_t tj = 0; tj < kTile; ++tj) {
        const V diff = a[ti] - b[tj];
        acc[ti * kTile + tj] += diff * diff;
      }
    }
  }
  IMM_UNROLL16 for (int64_t p = 0; p < kHalfTile * kTile; ++p) store_vector(lanes + p * L, acc[p]);
}

// The same within one tile's 4 rows: its 6 pairs i < j, in the slots add_half_tile_sqdist would
// use. The diagonal is not summed: it is 0 for finite rows (see forward_kernel for the others).
template <typename acc_t>
IMM_INLINE void add_diagonal_tile_sqdist(const acc_t* const* rows, int64_t padded, acc_t* lanes) {
  using V = typename VectorOf<acc_t>::type;
  constexpr int64_t L = kLanes<acc_t>;
  constexpr int64_t kPairs = kTile * (kTile - 1) / 2;
  V acc[kPairs];
  IMM_UNROLL16 for (int64_t ti = 0, p = 0; ti < kTile; ++ti) {
    IMM_UNROLL for (int64_t tj = ti + 1; tj < kTile; ++tj, ++p) acc[p] = load_vector<V>(lanes + (ti * kTile + tj) * L);
  }
  for (int64_t c = 0; c < padded; c += L) {
    V a[kTile];
    IMM_UNROLL for (int64_t t = 0; t < kTile; ++t) a[t] = load_vector<V>(rows[t] + c);
    IMM_UNROLL for (int64_t ti = 0, p = 0; ti < kTile; ++ti) {
      IMM_UNROLL for (int64_t tj = ti + 1; tj < kTile; ++tj, ++p) {
        const V diff = a[ti] - a[tj];
        acc[p] += diff * diff;
      }
    }
  }
  IMM_UNROLL16 for (int64_t ti = 0, p = 0; ti < kTile; ++ti) {
    IMM_UNROLL for (int64_t tj = ti + 1; tj < kTile; ++tj, ++p) store_vector(lanes + (ti * kTile + tj) * L, acc[p]);
  }
}

IMM_VECTOR_CLONES void add_diagonal_tile_sqdist_vec(const float* const* rows, int64_t padded, float* lanes) {
  add_diagonal_tile_sqdist(rows, padded, lanes);
}
IMM_VECTOR_CLONES void add_diagonal_tile_sqdist_vec(const double* const* rows, int64_t padded, double* lanes) {
  add_diagonal_tile_sqdist(rows, padded, lanes);
}

IMM_VECTOR_CLONES void add_half_tile_sqdist_vec(const float* const* rows_i, const float* const* rows_j, int64_t padded,
                                                float* lanes) {
  add_half_tile_sqdist(rows_i, rows_j, padded, lanes);
}
IMM_VECTOR_CLONES void add_half_tile_sqdist_vec(const double* const* rows_i, const double* const* rows_j,
                                                int64_t padded, double* lanes) {
  add_half_tile_sqdist(rows_i, rows_j, padded, lanes);
}

// Stores v at p; with kStream, as SSE2 non-temporal stores (every clone has them; p 16-byte
// aligned), which do not read the line first and leave the cache to the rows still in use.
template <bool kStream, typename V, typename T>
IMM_INLINE void write_vector(T* p, V v) {
#if defined(__x86_64__)
  if constexpr (kStream) {
    IMM_UNROLL for (size_t half = 0; half < sizeof(V) / 16; ++half) {
      if constexpr (std::is_same_v<T, float>) {
        __m128 part;
        __builtin_memcpy(&part, reinterpret_cast<const char*>(&v) + 16 * half, 16);
        _mm_stream_ps(p + half * 4, part);
      } else {
        __m128d part;
        __builtin_memcpy(&part, reinterpret_cast<const char*>(&v) + 16 * half, 16);
        _mm_stream_pd(p + half * 2, part);
      }
    }
    return;
  }
#endif
  store_vector(p, v);
}

// out[t][c] = sum_j coeff[i0 + t][j] (z_(i0+t),c - z_j,c) for the 2 rows t of a row pair, j = 0..rows-1
// in order: direct differences, exact when rows converge. coeff has row pitch `rows`. Two rows by
// two column vectors keep their 4 z_i and 4 sums in registers next to z_j and A_ij (a 4-row
// tile spilled 3 of its z_i and reloaded them at every j: measured 5% slower). Results go
// straight to `out` as they are made, as streaming stores when kStream.
template <typename acc_t, bool kStream>
IMM_INLINE void apply_pair_coefficients(const acc_t* coeff, const acc_t* const* z, int64_t i0, int64_t rows,
                                        int64_t padded, acc_t* const* out) {
  using V = typename VectorOf<acc_t>::type;
  constexpr int64_t L = kLanes<acc_t>;
  constexpr int64_t kCols = 2;
  const acc_t* coeff_rows[kPairRows] = {coeff + i0 * rows, coeff + (i0 + 1) * rows};
  int64_t c = 0;
  for (; c + kCols * L <= padded; c += kCols * L) {
    V zi[kPairRows][kCols], sums[kPairRows][kCols];
    IMM_UNROLL for (int64_t t = 0; t < kPairRows; ++t) {
      IMM_UNROLL for (int64_t u = 0; u < kCols; ++u) {
        zi[t][u] = load_vector<V>(z[i0 + t] + c + u * L);
        sums[t][u] = V{};
      }
    }
    for (int64_t j = 0; j < rows; ++j) {
      V zj[kCols];
      IMM_UNROLL for (int64_t u = 0; u < kCols; ++u) zj[u] = load_vector<V>(z[j] + c + u * L);
      IMM_UNROLL for (int64_t t = 0; t < kPairRows; ++t) {
        IMM_UNROLL for (int64_t u = 0; u < kCols; ++u) sums[t][u] += coeff_rows[t][j] * (zi[t][u] - zj[u]);
      }
    }
    IMM_UNROLL for (int64_t t = 0; t < kPairRows; ++t) {
      IMM_UNROLL for (int64_t u = 0; u < kCols; ++u) write_vector<kStream>(out[t] + c + u * L, sums[t][u]);
    }
  }
  for (; c < padded; c += L) {  // the odd last vector
    V zi[kPairRows], sums[kPairRows];
    IMM_UNROLL for (int64_t t = 0; t < kPairRows; ++t) {
      zi[t] = load_vector<V>(z[i0 + t] + c);
      sums[t] = V{};
    }
    for (int64_t j = 0; j < rows; ++j) {
      const V zj = load_vector<V>(z[j] + c);
      IMM_UNROLL for (int64_t t = 0; t < kPairRows; ++t) sums[t] += coeff_rows[t][j] * (zi[t] - zj);
    }
    IMM_UNROLL for (int64_t t = 0; t < kPairRows; ++t) write_vector<kStream>(out[t] + c, sums[t]);
  }
}

IMM_VECTOR_CLONES void apply_pair_coefficients_vec(const float* coeff, const float* const* z, int64_t i0, int64_t rows,
                                                   int64_t padded, float* const* out, bool streaming) {
  streaming ? apply_pair_coefficients<float, true>(coeff, z, i0, rows, padded, out)
            : apply_pair_coefficients<float, false>(coeff, z, i0, rows, padded, out);
}
IMM_VECTOR_CLONES void apply_pair_coefficients_vec(const double* coeff, const double* const* z, int64_t i0,
                                                   int64_t rows, int64_t padded, double* const* out, bool streaming) {
  streaming ? apply_pair_coefficients<double, true>(coeff, z, i0, rows, padded, out)
            : apply_pair_coefficients<double, false>(coeff, z, i0, rows, padded, out);
}
#pragma GCC pop_options

// sum_c (z_ic - z_ic)^2 over [col_begin, col_end): 0, or NaN where the row holds Inf or NaN.
template <typename acc_t, typename scalar_t>
acc_t self_sqdist(const GroupRows<scalar_t>& src, int64_t group, int64_t r, int64_t col_begin, int64_t col_end) {
  const scalar_t* row = src.row(group, r);
  acc_t sum = 0;
  for (int64_t c = col_begin; c < col_end; ++c) {
    const acc_t diff = static_cast<acc_t>(row[c]) - static_cast<acc_t>(row[c]);
    sum += diff * diff;
  }
  return sum;
}

// Sums the L lanes pairwise, in a fixed order.
template <typename acc_t>
acc_t sum_lanes(const acc_t* lanes) {
  constexpr int64_t L = kLanes<acc_t>;
  acc_t tmp[L];
  std::copy(lanes, lanes + L, tmp);
  for (int64_t width = L / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) tmp[l] += tmp[l + width];
  }
  return tmp[0];
}

// Where group_terms puts loss_g, MMD^2_g and dMMD^2_g/db: (G,) arrays, or all null (backward).
template <typename acc_t>
struct GroupLosses {
  acc_t* loss;
  acc_t* mmd2;
  acc_t* dmmd_db;
};

// The group's losses into `out` (unless null) and, into `coeff` (unless null), its (2M x 2M) A
// of mmd.h for upstream gradient `grad`, row pitch 2M, from its finished S. Each unordered pair's
// sqrt and exp are taken once (into `work`, 2 (2M)^2 values); the sums then run over all (i, j)
// row by row, whose +k and -k cancel exactly when x == y.
template <typename acc_t>
void group_terms(const acc_t* sq, int64_t group, int64_t group_size, acc_t bandwidth, acc_t weight, acc_t eps,
                 acc_t features, const GroupLosses<acc_t>& out, acc_t grad, acc_t* coeff, acc_t* work) {
  const int64_t rows = 2 * group_size;
  const acc_t pairs = static_cast<acc_t>(group_size * group_size);
  const acc_t scale = acc_t(-2) * grad * weight * bandwidth / pairs / features;
  acc_t* signed_kern = work;
  acc_t* signed_kern_dist = work + rows * rows;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = i; j < rows; ++j) {
      const LaplaceTerms<acc_t> terms(sq[i * rows + j], bandwidth, eps, features);
      const acc_t sign = pair_sign<acc_t>(i, j, group_size);
      signed_kern[i * rows + j] = signed_kern[j * rows + i] = sign * terms.kern;
      signed_kern_dist[i * rows + j] = signed_kern_dist[j * rows + i] = sign * terms.kern * terms.dist;
      if (coeff != nullptr) {
        coeff[i * rows + j] = coeff[j * rows + i] = terms.close ? acc_t(0) : scale * sign * terms.kern / terms.dist;
      }
    }
  }
  if (out.loss != nullptr) {
    acc_t sum_kern = 0, sum_kern_dist = 0;
    for (int64_t e = 0; e < rows * rows; ++e) {
      sum_kern += signed_kern[e];
      sum_kern_dist += signed_kern_dist[e];
    }
    out.mmd2[group] = sum_kern / pairs;
    out.dmmd_db[group] = -sum_kern_dist / pairs / features;
    out.loss[group] = weight * out.mmd2[group];
  }
}

// Per-thread scratch: converted/padded blocks, row pointers, 2 output rows, A, the forward's lane sums.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> buf, zeros, out, coeff, terms;
  std::vector<acc_t> lanes;  // tile (bi, bj)'s, bi <= bj, at (bi * blocks + bj) * kTile^2 * L
  std::vector<const acc_t*> ptrs;

  explicit Scratch(const Plan& plan)
      : buf(plan.padded_rows * plan.block_cols), zeros(plan.block_cols, acc_t(0)), out(kPairRows * plan.block_cols),
        coeff(plan.padded_rows * plan.rows, acc_t(0)),  // padding rows: zero coefficients
        terms(2 * plan.rows * plan.rows),
        lanes((plan.padded_rows / kTile) * (plan.padded_rows / kTile) * kTile * kTile * kLanes<acc_t>),
        ptrs(plan.padded_rows) {}
};

// Where dz goes: dx and/or dy rows of the group (rows [first_row, last_row) of z).
template <typename scalar_t>
struct GradientRows {
  scalar_t* dx;
  scalar_t* dy;
  int64_t first_row, last_row;
  bool streaming;  // large outputs: streaming stores (see kStreamingBytes)

  scalar_t* row(int64_t group, int64_t i, const Plan& plan) const {
    return i < plan.group_size ? dx + (group * plan.group_size + i) * plan.num_features
                               : dy + (group * plan.group_size + i - plan.group_size) * plan.num_features;
  }
};

// dz_i = sum_j A_ij (z_i - z_j) over columns [col_begin, col_end) of the group, A in scratch.coeff.
template <typename scalar_t, typename acc_t>
void write_group_gradient(const GroupRows<scalar_t>& src, const Plan& plan, int64_t group, int64_t col_begin,
                          int64_t col_end, const GradientRows<scalar_t>& dst, Scratch<acc_t>& scratch) {
  constexpr int64_t L = kLanes<acc_t>;
  const int64_t rows = plan.rows, pitch = plan.block_cols;
  for (int64_t col = col_begin; col < col_end; col += pitch) {
    const int64_t n = std::min(pitch, col_end - col), padded = round_up(n, L);
    block_rows(src, group, rows, col, n, padded, pitch, scratch.buf.data(), scratch.zeros.data(), scratch.ptrs);
    // fp32/fp64 whole vectors go straight to dz (streamed when large and 16-byte aligned);
    // converted or ragged blocks go to scratch rows first, as do rows not asked for.
    const bool direct = std::is_same_v<scalar_t, acc_t> && n == padded;
    for (int64_t i0 = dst.first_row / kPairRows * kPairRows; i0 < dst.last_row; i0 += kPairRows) {
      acc_t* out[kPairRows];
      bool streaming = dst.streaming;
      for (int64_t t = 0; t < kPairRows; ++t) {
        const int64_t i = i0 + t;
        out[t] = scratch.out.data() + t * pitch;
        if (direct && i >= dst.first_row && i < dst.last_row) {
          out[t] = reinterpret_cast<acc_t*>(dst.row(group, i, plan) + col);
          streaming = streaming && reinterpret_cast<std::uintptr_t>(out[t]) % 16 == 0;
        } else {
          streaming = false;  // (a scratch row is reread at once)
        }
      }
      apply_pair_coefficients_vec(scratch.coeff.data(), scratch.ptrs.data(), i0, rows, padded, out, streaming);
      if (!direct) {
        for (int64_t i = std::max(i0, dst.first_row); i < std::min(i0 + kPairRows, dst.last_row); ++i) {
          store_row(dst.row(group, i, plan) + col, scratch.out.data() + (i - i0) * pitch, n, dst.streaming);
        }
      }
    }
  }
}

template <typename scalar_t>
GradientRows<scalar_t> gradient_rows(at::Tensor& dx, at::Tensor& dy, bool need_dx, bool need_dy, int64_t group_size) {
  const int64_t bytes = (dx.numel() + dy.numel()) * static_cast<int64_t>(sizeof(scalar_t));
  return {need_dx ? dx.data_ptr<scalar_t>() : nullptr, need_dy ? dy.data_ptr<scalar_t>() : nullptr,
          need_dx ? 0 : group_size, need_dy ? 2 * group_size : group_size, bytes >= kStreamingBytes};
}

// One task: columns [col_begin, col_end) of one group; index = group * num_splits + split.
struct Task {
  int64_t index, group, col_begin, col_end;
};

// Runs body(task, scratch) for every (group, column split) of the plan on the intra-op threads,
// each thread with its own scratch. Tasks are handed out a small chunk at a time as threads free
// up, not split evenly in advance: a thread the host slows down (say, a busy sibling of a shared
// VM core) then takes fewer instead of holding up the call. A task's result never depends on the
// thread that runs it.
template <typename acc_t, typename Body>
void run_tasks(const Plan& plan, const Body& body) {
  const int64_t num_tasks = plan.num_groups * plan.num_splits, threads = at::get_num_threads();
  const int64_t chunk = std::max<int64_t>(1, num_tasks / (threads * 16));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, (num_tasks + chunk - 1) / chunk), 1, [&](int64_t, int64_t) {
    Scratch<acc_t> scratch(plan);
    for (int64_t begin; (begin = next.fetch_add(chunk, std::memory_order_relaxed)) < num_tasks;) {
      for (int64_t index = begin; index < std::min(num_tasks, begin + chunk); ++index) {
        const auto [col_begin, col_end] = plan.columns(index % plan.num_splits);
        body(Task{index, index / plan.num_splits, col_begin, col_end}, scratch);
      }
    }
    fence_streaming_stores();
  });
}

// The forward. With `fused_grad` (unsplit plans only) each task also writes its group's dz for the
// upstream gradient (*fused_grad)[g], right after S, while the group's rows are
// still in cache: the backward then has nothing left to read when that gradient arrives.
template <typename scalar_t>
void forward_kernel(const at::Tensor& x, const at::Tensor& y, const at::Tensor& bandwidth, const at::Tensor& weight,
                    const Plan& plan, double eps, at::Tensor& loss, at::Tensor& sqdist, at::Tensor& mmd2,
                    at::Tensor& dmmd_db, const at::Tensor* fused_grad = nullptr,
                    GradientRows<scalar_t> fused_dst = {}) {
  using acc_t = at::opmath_type<scalar_t>;
  TORCH_INTERNAL_ASSERT(fused_grad == nullptr || plan.num_splits == 1);
  const GroupRows<scalar_t> src{x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.stride(0), y.stride(0),
                                plan.group_size};
  const int64_t rows = plan.rows, tile = rows * rows;
  // Partial S per (group, split); the unsplit case writes S in place.
  at::Tensor partial =
      plan.num_splits == 1 ? sqdist : at::empty({plan.num_groups, plan.num_splits, rows, rows}, sqdist.options());
  acc_t* partial_ptr = partial.data_ptr<acc_t>();
  acc_t* sqdist_ptr = sqdist.data_ptr<acc_t>();
  const acc_t* bandwidth_ptr = bandwidth.data_ptr<acc_t>();
  const acc_t* weight_ptr = weight.data_ptr<acc_t>();
  const GroupLosses<acc_t> losses{loss.data_ptr<acc_t>(), mmd2.data_ptr<acc_t>(), dmmd_db.data_ptr<acc_t>()};
  const acc_t eps_c = static_cast<acc_t>(eps), features = static_cast<acc_t>(plan.num_features);

  constexpr int64_t L = kLanes<acc_t>;
  const int64_t blocks = plan.padded_rows / kTile, pitch = plan.block_cols;
  run_tasks<acc_t>(plan, [&](const Task& task, Scratch<acc_t>& scratch) {
    const int64_t group = task.group, col_begin = task.col_begin, col_end = task.col_end;
    std::vector<acc_t>& lanes = scratch.lanes;
    std::fill(lanes.begin(), lanes.end(), acc_t(0));
    for (int64_t col = col_begin; col < col_end; col += pitch) {
      const int64_t n = std::min(pitch, col_end - col), padded = round_up(n, L);
      block_rows(src, group, rows, col, n, padded, pitch, scratch.buf.data(), scratch.zeros.data(), scratch.ptrs);
      for (int64_t bi = 0; bi < blocks; ++bi) {
        add_diagonal_tile_sqdist_vec(scratch.ptrs.data() + bi * kTile, padded,
                                     lanes.data() + (bi * blocks + bi) * kTile * kTile * L);
        for (int64_t bj = bi + 1; bj < blocks; ++bj) {
          for (int64_t half = 0; half < kTile; half += kHalfTile) {
            add_half_tile_sqdist_vec(scratch.ptrs.data() + bi * kTile + half, scratch.ptrs.data() + bj * kTile, padded,
                                     lanes.data() + ((bi * blocks + bj) * kTile + half) * kTile * L);
          }
        }
      }
    }
    acc_t* sq = partial_ptr + task.index * tile;
    bool all_finite = true;
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = i + 1; j < rows; ++j) {
        const int64_t tile_index = (i / kTile) * blocks + j / kTile;
        const int64_t pair = (i % kTile) * kTile + j % kTile;
        const acc_t s = sum_lanes(lanes.data() + (tile_index * kTile * kTile + pair) * L);
        sq[i * rows + j] = sq[j * rows + i] = s;
        all_finite = all_finite && std::isfinite(s);
      }
    }
    // S_ii is 0 for a finite row and NaN for a row holding Inf or NaN (whose loss must be NaN).
    // Such a row also makes its S_ij (j != i) Inf or NaN, so all-finite pairs mean all S_ii = 0.
    for (int64_t i = 0; i < rows; ++i) {
      sq[i * rows + i] = all_finite ? acc_t(0) : self_sqdist<acc_t>(src, group, i, col_begin, col_end);
    }
    if (fused_grad != nullptr) {
      const acc_t grad = fused_grad->data_ptr<acc_t>()[group * fused_grad->stride(0)];
      group_terms(sq, group, plan.group_size, bandwidth_ptr[group], weight_ptr[group], eps_c, features, losses, grad,
                  scratch.coeff.data(), scratch.terms.data());
      write_group_gradient(src, plan, group, col_begin, col_end, fused_dst, scratch);
    }
  });
  if (fused_grad != nullptr) return;

  at::parallel_for(0, plan.num_groups, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> work(2 * tile);
    for (int64_t group = begin; group < end; ++group) {
      acc_t* sq = sqdist_ptr + group * tile;
      if (plan.num_splits > 1) {  // sum the partials in split order
        const acc_t* parts = partial_ptr + group * plan.num_splits * tile;
        std::copy(parts, parts + tile, sq);
        for (int64_t split = 1; split < plan.num_splits; ++split) {
          for (int64_t e = 0; e < tile; ++e) sq[e] += parts[split * tile + e];
        }
      }
      group_terms(sq, group, plan.group_size, bandwidth_ptr[group], weight_ptr[group], eps_c, features, losses,
                  acc_t(0), static_cast<acc_t*>(nullptr), work.data());
    }
  });
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& y, const at::Tensor& sqdist,
                     const at::Tensor& bandwidth, const at::Tensor& weight, const Plan& plan, double eps,
                     const GradientRows<scalar_t>& dst) {
  using acc_t = at::opmath_type<scalar_t>;
  const GroupRows<scalar_t> src{x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.stride(0), y.stride(0),
                                plan.group_size};
  const int64_t rows = plan.rows;
  const acc_t* sqdist_ptr = sqdist.data_ptr<acc_t>();
  const acc_t* grad_ptr = grad_loss.data_ptr<acc_t>();
  const int64_t grad_stride = grad_loss.stride(0);
  const acc_t* bandwidth_ptr = bandwidth.data_ptr<acc_t>();
  const acc_t* weight_ptr = weight.data_ptr<acc_t>();
  const acc_t eps_c = static_cast<acc_t>(eps), features = static_cast<acc_t>(plan.num_features);

  run_tasks<acc_t>(plan, [&](const Task& task, Scratch<acc_t>& scratch) {
    const int64_t group = task.group;
    group_terms(sqdist_ptr + group * rows * rows, group, plan.group_size, bandwidth_ptr[group], weight_ptr[group],
                eps_c, features, GroupLosses<acc_t>{}, grad_ptr[group * grad_stride], scratch.coeff.data(),
                scratch.terms.data());
    write_group_gradient(src, plan, group, task.col_begin, task.col_end, dst, scratch);
  });
}

void check_inputs(const at::Tensor& x, const at::Tensor& y, const at::Tensor& bandwidth, const at::Tensor& weight,
                  int64_t group_size) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "mmd (native CPU): x and y must be CPU tensors");
  check_mmd_inputs(x, y, bandwidth, weight, group_size, "native");
}

// The geometry of a call on (B, D) inputs, in bandwidth's (the compute) dtype.
Plan plan_of(const at::Tensor& x, int64_t group_size, const at::Tensor& bandwidth) {
  return Plan(x.size(0), group_size, x.size(1), bandwidth.dtype().itemsize());
}

// (loss_g, S, MMD^2_g, dMMD^2_g/db), empty, in the compute dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_outputs(const Plan& plan,
                                                                           const at::Tensor& bandwidth) {
  const auto options = bandwidth.options();
  return {at::empty({plan.num_groups}, options), at::empty({plan.num_groups, plan.rows, plan.rows}, options),
          at::empty({plan.num_groups}, options), at::empty({plan.num_groups}, options)};
}

// Memory for large gradients, kept mapped between calls. With malloc, a freed gradient of
// many MiB often goes back to the kernel (glibc trims the heap's top, or munmaps it), and the
// next call faults in and zeroes every 4 KiB page again: on a VM that costs more than the
// kernel itself. Freed blocks wait here (at most 4 blocks and 1 GiB, most recent first) for a
// call of the same size; new blocks are 2 MiB aligned and asked to be huge pages (fewer
// faults, fewer TLB misses).
class GradientBlocks {
 public:
  static constexpr int64_t kMinBytes = int64_t(1) << 20;  // smaller ones stay in malloc's arenas
  static constexpr size_t kAlign = size_t(2) << 20;
  static constexpr size_t kMaxFree = 4;  // blocks kept, and their bytes at most:
  static constexpr size_t kMaxFreeBytes = size_t(1) << 30;

  static GradientBlocks& instance() {
    static GradientBlocks* blocks = new GradientBlocks;  // never destroyed: tensors may outlive exit
    return *blocks;
  }

  at::Tensor empty_like(const at::Tensor& t) {
    const auto bytes = static_cast<size_t>(round_up(t.numel() * t.element_size(), int64_t(kAlign)));
    void* block = take(bytes);
    return at::from_blob(block, t.sizes(), [this, bytes](void* p) { give(p, bytes); }, t.options());
  }

  size_t release() {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t released = free_bytes_;
    for (const auto& [bytes, block] : free_) std::free(block);
    free_.clear();
    free_bytes_ = 0;
    return released;
  }

 private:
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->first == bytes) {
          void* block = it->second;
          free_bytes_ -= bytes;
          free_.erase(it);
          return block;
        }
      }
    }
    void* block = std::aligned_alloc(kAlign, bytes);
    if (block == nullptr) throw std::bad_alloc();
#ifdef __linux__
    madvise(block, bytes, MADV_HUGEPAGE);  // a hint: without transparent huge pages, 4 KiB pages
#endif
    return block;
  }

  void give(void* block, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.insert(free_.begin(), {bytes, block});
    free_bytes_ += bytes;
    while (free_.size() > kMaxFree || free_bytes_ > kMaxFreeBytes) {
      std::free(free_.back().second);
      free_bytes_ -= free_.back().first;
      free_.pop_back();
    }
  }

  std::mutex mutex_;
  std::vector<std::pair<size_t, void*>> free_;  // (bytes, block), most recently freed first
  size_t free_bytes_ = 0;
};

at::Tensor gradient_like(const at::Tensor& t) {
  const bool large = t.numel() * t.element_size() >= GradientBlocks::kMinBytes;
  return large ? GradientBlocks::instance().empty_like(t) : at::empty(t.sizes(), t.options());
}

// (dx, dy) like x and y, or an empty tensor where not asked for.
std::pair<at::Tensor, at::Tensor> gradient_outputs(const at::Tensor& x, const at::Tensor& y, bool need_dx,
                                                   bool need_dy) {
  return {need_dx ? gradient_like(x) : at::empty({0}, x.options()),
          need_dy ? gradient_like(y) : at::empty({0}, y.options())};
}

}  // namespace

int64_t release_cached_gradients_cpu() { return static_cast<int64_t>(GradientBlocks::instance().release()); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mmd_forward_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& bandwidth, const at::Tensor& weight, int64_t group_size,
    double eps) {
  check_inputs(x, y, bandwidth, weight, group_size);
  const Plan plan = plan_of(x, group_size, bandwidth);
  at::Tensor loss, sqdist, mmd2, dmmd_db;
  std::tie(loss, sqdist, mmd2, dmmd_db) = forward_outputs(plan, bandwidth);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mmd_forward_cpu", [&] {
    forward_kernel<scalar_t>(x, y, bandwidth, weight, plan, eps, loss, sqdist, mmd2, dmmd_db);
  });
  return {loss, sqdist, mmd2, dmmd_db};
}

std::tuple<at::Tensor, at::Tensor> mmd_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& y, const at::Tensor& sqdist,
    const at::Tensor& bandwidth, const at::Tensor& weight, int64_t group_size, double eps, bool need_dx, bool need_dy) {
  check_inputs(x, y, bandwidth, weight, group_size);
  const Plan plan = plan_of(x, group_size, bandwidth);
  check_backward_inputs(grad_loss, sqdist, bandwidth, plan.num_groups, plan.rows, "native");
  at::Tensor dx, dy;
  std::tie(dx, dy) = gradient_outputs(x, y, need_dx, need_dy);
  if (need_dx || need_dy) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mmd_backward_cpu", [&] {
      backward_kernel<scalar_t>(grad_loss, x, y, sqdist, bandwidth, weight, plan, eps,
                                gradient_rows<scalar_t>(dx, dy, need_dx, need_dy, group_size));
    });
  }
  return {dx, dy};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mmd_forward_with_grad_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& bandwidth, const at::Tensor& weight, int64_t group_size,
    double eps, const at::Tensor& grad_loss, bool need_dx, bool need_dy) {
  check_inputs(x, y, bandwidth, weight, group_size);
  const Plan plan = plan_of(x, group_size, bandwidth);
  if (plan.num_splits > 1) {  // S needs every split before A is known: no cache to exploit, two passes
    auto [loss, sqdist, mmd2, dmmd_db] = mmd_forward_cpu(x, y, bandwidth, weight, group_size, eps);
    auto [dx, dy] = mmd_backward_cpu(grad_loss, x, y, sqdist, bandwidth, weight, group_size, eps, need_dx, need_dy);
    return {loss, sqdist, mmd2, dmmd_db, dx, dy};
  }
  check_grad_loss(grad_loss, bandwidth, plan.num_groups, "native");
  at::Tensor loss, sqdist, mmd2, dmmd_db, dx, dy;
  std::tie(loss, sqdist, mmd2, dmmd_db) = forward_outputs(plan, bandwidth);
  std::tie(dx, dy) = gradient_outputs(x, y, need_dx, need_dy);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mmd_forward_with_grad_cpu", [&] {
    forward_kernel<scalar_t>(x, y, bandwidth, weight, plan, eps, loss, sqdist, mmd2, dmmd_db, &grad_loss,
                             gradient_rows<scalar_t>(dx, dy, need_dx, need_dy, group_size));
  });
  return {loss, sqdist, mmd2, dmmd_db, dx, dy};
}

}  // namespace imm_kernels
