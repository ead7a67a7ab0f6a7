// Rows shorter than a few KiB go through the kernels in groups: a group's per-row values
// as vectors of rows (RowColumn), their lane reductions as one transposing tree on
// AVX-512, and, for rows shorter than one chunk, a group's outputs from contiguous
// vectors (GroupLayout).
#pragma once

// Compiled only as part of row_kernels.cpp, once per instruction set (row_kernels.h),
// after CPU_CAPABILITY is set, so its code lands in that ISA's namespace.
#ifndef CPU_CAPABILITY
#error "included only by row_kernels.cpp"
#endif

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>

#include "../layernorm_math.h"
#include "row_chunks.h"
#include "row_moments.h"

namespace layernorm_ext::cpu {
inline namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// The forward goes through rows in groups of up to kGroupRows (and kGroupBytes of
// input; for long rows, and the backward's rows longer than a chunk, see
// shared_param_group_rows_for below): first the statistics of every row of the group,
// then their outputs, the rows still in L1 or L2. A row's statistics are one long
// dependency chain (lane merges, square root, division); rows of a group do not depend
// on each other, so the core overlaps their chains. 1966080x128 bf16, 2 threads: 51% ->
// 63% of the copy roof.
constexpr int64_t kGroupRows = 16;
constexpr int64_t kGroupBytes = 16 << 10;

// Rows per group for rows of `cols` elements of T.
template <typename T>
int64_t group_rows_for(int64_t cols) {
  return std::clamp<int64_t>(kGroupBytes / std::max<int64_t>(1, cols * int64_t(sizeof(T))), 1,
                             kGroupRows);
}

// Groups whose outputs are written chunk by chunk over their rows, each weight/bias
// (dgamma/dbeta) chunk loaded once a group: the backward's, and the forward's where
// the parameters fill L1 (row_kernels.cpp). kSharedParamRows rows, or as many as fit
// in kSharedParamGroupBytes of input (2 for rows of 64 KiB, 1 from 128 KiB). With one
// row of 16-32 KiB a group, the backward loaded and stored its dgamma/dbeta chunks for
// every row (2-core Xeon, 2^26 elements, medians of 5 alternated processes: bf16
// D = 8192 20.8 -> 17.3 ms, float32 D = 4096 30.5 -> 26.6); bounded at 512 KiB, the
// longest rows slowed (bf16 D = 65536 22 -> 27 ms). More rows for shorter ones (the
// forward's kGroupBytes, up to 16 rows) made the bf16/fp16 backward slower: medians of
// 5 processes each, bf16 D = 768 18.6 against 17.1 ms with 4 rows, 1024 18.3 against
// 16.7, fp16 1024 17.6 against 16.1; float32 the same either way.
constexpr int64_t kSharedParamRows = 4;
constexpr int64_t kSharedParamGroupBytes = 128 << 10;
// The forward's groups go chunk by chunk where one parameter, as acc_t, takes this
// much or more (D >= 4096; 2048 in double): weight and bias then fill two thirds of a
// 48 KiB L1. With fewer parameters the order is no slower (2^26 elements, medians of 6:
// RMSNorm bf16 D = 4096 9.3 -> 8.7 ms, float32 16384 16.3 -> 15.4; LayerNorm without
// weight and bias, bf16 D = 4096 10.3 -> 9.3), so D alone decides.
constexpr int64_t kLongParamBytes = 16 << 10;

template <typename T>
int64_t shared_param_group_rows_for(int64_t cols) {
  const int64_t row_bytes = std::max<int64_t>(1, cols * int64_t(sizeof(T)));
  return std::clamp<int64_t>(kSharedParamGroupBytes / row_bytes, 1, kSharedParamRows);
}

// Lane 0 of v.
template <typename acc_t>
acc_t first_lane(const Vectorized<acc_t>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) return _mm512_cvtss_f32(v);
#endif
  alignas(64) acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  return lanes[0];
}

// One value per row of a group (a mean, a statistic, an rstd), as vectors of rows: row
// r in lane r % kLanes of vector r / kLanes. Held in registers between a group's
// phases: per-row arrays written by scalar or masked stores and read back as vectors,
// or the reverse, defeat store-to-load forwarding, and the core then waits for the
// stores to commit (at D = 20 that wait was a quarter of the forward's time).
template <typename acc_t>
struct RowColumn {
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kLanes = Vec::size();
  static_assert(kGroupRows % kLanes == 0);
  std::array<Vec, kGroupRows / kLanes> v;

  // From kGroupRows values (those past a group's rows are ignored, but read).
  static RowColumn load(const acc_t* p) {
    RowColumn c;
    for (size_t i = 0; i < c.v.size(); ++i) c.v[i] = Vec::loadu(p + i * kLanes);
    return c;
  }
  static RowColumn zeros() {
    RowColumn c;
    c.v.fill(Vec(0));
    return c;
  }
  // From `rows` values; the rows past them are zero.
  static RowColumn load(const acc_t* p, int64_t rows) {
    RowColumn c;
    for (size_t i = 0; i < c.v.size(); ++i) {
      const int64_t lanes = std::clamp<int64_t>(rows - int64_t(i) * kLanes, 0, kLanes);
      c.v[i] = lanes > 0 ? Vec::loadu(p + i * kLanes, lanes) : Vec(0);
    }
    return c;
  }
  void store(acc_t* p, int64_t rows) const {
    for (int64_t r = 0; r < rows; r += kLanes) {
      v[r / kLanes].store(p + r, std::min<int64_t>(kLanes, rows - r));
    }
  }
  // Row r's value in every lane.
  Vec broadcast(int64_t r) const {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc_t, float>) {
      return _mm512_permutexvar_ps(_mm512_set1_epi32(static_cast<int>(r % kLanes)), v[r / kLanes]);
    }
#endif
    return Vec(value(r));
  }
  acc_t value(int64_t r) const {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc_t, float>) return first_lane(broadcast(r));
#endif
    alignas(64) acc_t lanes[kLanes];
    v[r / kLanes].store(lanes);
    return lanes[r % kLanes];
  }
  template <typename F>
  RowColumn map(const F& f) const {
    RowColumn c;
    for (size_t i = 0; i < v.size(); ++i) c.v[i] = f(v[i]);
    return c;
  }
  // f(this row's value, other's), row by row.
  template <typename F>
  RowColumn zip(const RowColumn& other, const F& f) const {
    RowColumn c;
    for (size_t i = 0; i < v.size(); ++i) c.v[i] = f(v[i], other.v[i]);
    return c;
  }
  // Whether the values of rows [0, rows) are all finite.
  bool all_finite(int64_t rows) const {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc_t, float>) {
      static_assert(kLanes == kGroupRows);
      constexpr int kNonFinite = 0x01 | 0x08 | 0x10 | 0x80;  // vfpclassps: NaN, +inf, -inf
      const __mmask16 live = static_cast<__mmask16>((uint32_t(1) << rows) - 1);
      return (_mm512_fpclass_ps_mask(v[0], kNonFinite) & live) == 0;
    }
#endif
    alignas(64) std::array<acc_t, kGroupRows> values;
    for (size_t i = 0; i < v.size(); ++i) v[i].store(values.data() + i * kLanes);
    return std::all_of(values.begin(), values.begin() + rows,
                       [](acc_t value) { return math::is_finite(value); });
  }
};

// A bit per row of [0, rows) of a group whose moments need taking again
// (math::needs_reshift), given their means, variances and shifts: a vector of rows at a
// time.
template <typename acc_t>
uint32_t rows_needing_reshift(const RowColumn<acc_t>& means, const RowColumn<acc_t>& vars,
                              const RowColumn<acc_t>& shifts, int64_t rows) {
  static_assert(kGroupRows <= 32);
  constexpr int64_t kLanes = RowColumn<acc_t>::kLanes;
  uint32_t bits = 0;
  for (size_t i = 0; i < means.v.size(); ++i) {
    // zero_mask: a bit per lane where the comparison failed
    const auto failed = static_cast<uint32_t>(
        math::needs_reshift(means.v[i], vars.v[i], shifts.v[i]).zero_mask());
    bits |= (~failed & ((uint32_t(1) << kLanes) - 1)) << (i * kLanes);
  }
  return rows >= 32 ? bits : bits & ((uint32_t(1) << rows) - 1);
}

// math::normalize_center of a group's rows, a vector at a time: each row's mean, or 0
// where its rstd is 0.
template <typename acc_t>
RowColumn<acc_t> centers_of_rows(const RowColumn<acc_t>& means, const RowColumn<acc_t>& rstds) {
  using Vec = Vectorized<acc_t>;
  return means.zip(rstds, [](const Vec& mean, const Vec& rstd) {
    return Vec::blendv(mean, Vec(0), rstd == Vec(0));
  });
}

// rstd of a group's rows from their statistic (LayerNorm: the variance, as
// math::rstd_from_variance; RMSNorm: mean(x^2), as math::rstd_from_mean_square), a vector
// of rows at a time: a short row's square root and division are its longest latencies,
// and one vector instruction does 8-16 rows' (the same bits: IEEE square root and
// division round the same way in both forms).
template <Norm kNorm, typename acc_t>
RowColumn<acc_t> rstd_of_rows(const RowColumn<acc_t>& stat, acc_t eps) {
  using Vec = Vectorized<acc_t>;
  return stat.map([&](Vec var) {
    if constexpr (kNorm == Norm::kLayer) {
      var = Vec::blendv(var, Vec(0), var < Vec(0));  // NaN stays NaN
    }
    return Vec(1) / (var + Vec(eps)).sqrt();
  });
}

#if defined(CPU_CAPABILITY_AVX512)
// Reduces the lanes of 16 rows' states at once. A state is kN float vectors (a sum: 1;
// Welford moments: mean and m2). Each level pairs two vectors of rows: shuffles gather
// the lower lanes of every row's live lanes in `lower` and the upper ones in `upper`,
// and combine(level, lower, upper) merges them: lanes l and l + 8 of a row at level 0,
// then l + 4, l + 2, l + 1, as merge_lanes and vec_reduce_all pair them. Where 16 lane
// reductions take 4 shuffles and 4 dependent steps each, the tree takes 30 shuffles and
// 15 steps for all 16 rows, independent within a level. It leaves row p in lane
// 4 * (p % 4) + p / 4, so the rows enter in that (self-inverse) order, and every lane
// of the result holds its own row's state.
template <size_t kN, typename Combine>
std::array<__m512, kN> transposing_tree(const std::array<std::array<__m512, kN>, 16>& rows,
                                        const Combine& combine) {
  using State = std::array<__m512, kN>;
  constexpr int kOrder[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
  const auto pair = [&](int level, const State& a, const State& b, auto lower_of, auto upper_of) {
    State lower, upper;
    for (size_t k = 0; k < kN; ++k) lower[k] = lower_of(a[k], b[k]), upper[k] = upper_of(a[k], b[k]);
    return combine(level, lower, upper);
  };
  // 128-bit blocks (0, 1 | 0, 1) and (2, 3 | 2, 3), then (0, 2 | 0, 2) and (1, 3 | 1, 3).
  const auto blocks_01 = [](__m512 a, __m512 b) { return _mm512_shuffle_f32x4(a, b, 0x44); };
  const auto blocks_23 = [](__m512 a, __m512 b) { return _mm512_shuffle_f32x4(a, b, 0xEE); };
  const auto blocks_02 = [](__m512 a, __m512 b) { return _mm512_shuffle_f32x4(a, b, 0x88); };
  const auto blocks_13 = [](__m512 a, __m512 b) { return _mm512_shuffle_f32x4(a, b, 0xDD); };
  // The same within each block, on lanes.
  const auto lanes_01 = [](__m512 a, __m512 b) { return _mm512_shuffle_ps(a, b, 0x44); };
  const auto lanes_23 = [](__m512 a, __m512 b) { return _mm512_shuffle_ps(a, b, 0xEE); };
  const auto lanes_02 = [](__m512 a, __m512 b) { return _mm512_shuffle_ps(a, b, 0x88); };
  const auto lanes_13 = [](__m512 a, __m512 b) { return _mm512_shuffle_ps(a, b, 0xDD); };
  State level8[8], level4[4], level2[2];
  for (int i = 0; i < 8; ++i) {
    level8[i] = pair(0, rows[kOrder[2 * i]], rows[kOrder[2 * i + 1]], blocks_01, blocks_23);
  }
  for (int i = 0; i < 4; ++i) level4[i] = pair(1, level8[2 * i], level8[2 * i + 1], blocks_02, blocks_13);
  for (int i = 0; i < 2; ++i) level2[i] = pair(2, level4[2 * i], level4[2 * i + 1], lanes_01, lanes_23);
  return pair(3, level2[0], level2[1], lanes_02, lanes_13);
}
#endif

// Lane sums of a group's vectors: row r's value is the sum of the lanes of terms[r] for
// r < rows (the terms past `rows` are ignored): on AVX-512 as one transposing tree
// (the statistics of rows shorter than one chunk were half the forward's time at
// D = 20), elsewhere each vector alone.
template <typename Vec>
RowColumn<typename Vec::value_type> lane_sums(std::array<Vec, kGroupRows>& terms, int64_t rows) {
  using acc_t = typename Vec::value_type;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    static_assert(kGroupRows == 16 && Vec::size() == 16);
    std::array<std::array<__m512, 1>, 16> states;
    for (int64_t r = 0; r < kGroupRows; ++r) states[r][0] = r < rows ? terms[r] : Vec(0);
    const auto add = [](int, const auto& lower, const auto& upper) {
      return std::array<__m512, 1>{_mm512_add_ps(lower[0], upper[0])};
    };
    return {Vec(transposing_tree(states, add)[0])};
  }
#endif
  const auto add = [](Vec u, Vec v) { return u + v; };
  alignas(64) std::array<acc_t, kGroupRows> sums{};
  for (int64_t r = 0; r < rows; ++r) sums[r] = at::vec::vec_reduce_all(add, terms[r]);
  return RowColumn<acc_t>::load(sums.data());
}

// The moments of a group's rows from their per-lane moments (all with the same steps):
// on AVX-512 the lane merges of merge_lanes as one transposing tree for the whole
// group, the same merges of the same operands in the same order, so the same bits
// (at D = 128 the lane merges were the larger part of a row's statistics); elsewhere
// merge_lanes row by row.
template <typename T>
void merge_lanes_of_rows(const std::array<LaneMoments<T>, kGroupRows>& lanes, int64_t rows,
                         at::opmath_type<T>* means, at::opmath_type<T>* m2s) {
#if defined(CPU_CAPABILITY_AVX512)
  using acc_t = at::opmath_type<T>;
  if constexpr (std::is_same_v<acc_t, float>) {
    using Vec = Vectorized<float>;
    static_assert(Chunk<T>::kParts == 2 && Chunk<T>::kLanes == 16);
    const acc_t steps = static_cast<acc_t>(lanes[0].steps);
    std::array<std::array<__m512, 2>, 16> states;
    for (int64_t r = 0; r < kGroupRows; ++r) {
      if (r >= rows) {
        states[r] = {Vec(0), Vec(0)};
        continue;
      }
      Vec mean = lanes[r].mean[0], m2 = lanes[r].m2[0];  // part 1 into part 0, as merge_lanes
      math::welford_merge(mean, m2, lanes[r].mean[1], lanes[r].m2[1], steps, acc_t(0.5));
      states[r] = {mean, m2};
    }
    const auto merge = [&](int level, const auto& lower, const auto& upper) {
      Vec mean = lower[0], m2 = lower[1];
      const acc_t count = steps * static_cast<acc_t>(2 << level);  // each lane's count
      math::welford_merge(mean, m2, Vec(upper[0]), Vec(upper[1]), count, acc_t(0.5));
      return std::array<__m512, 2>{mean, m2};
    };
    const auto total = transposing_tree(states, merge);
    Vec(total[0]).store(means, rows);
    Vec(total[1]).store(m2s, rows);
    return;
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const auto moments = merge_lanes<T>(lanes[r]);
    means[r] = moments.mean;
    m2s[r] = moments.m2;
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// A whole group of rows shorter than one chunk, as it lies in memory: kGroupRows rows of
// N < 32 elements are N vectors of 16 floats, and lane l of vector k is column
// (16k + l) % N of row (16k + l) / N. Per vector, one permute picks each lane's row
// statistic from the group's RowColumn (16 rows: one vector), and the weight and bias
// patterns are built once per call. Written this way, a group's outputs take a third of
// the instructions of row-by-row outputs, which load, convert and store every short row
// as a whole vector with the lanes past N wasted (838861x20 bf16 forward: 1.45x).
class GroupLayout {
 public:
  // A group of up to 32 columns is up to 32 vectors (odd N: one more, half past it).
  static constexpr int64_t kVectors = 32;

  // Built per call, so cheap for small tensors (no divisions): the vectors a group of
  // `cols` <= 32 columns reaches, the last of them partly past the group.
  template <typename P>
  GroupLayout(const P* weight, const P* bias, int64_t cols) {
    static_assert(kGroupRows == 16 && Vectorized<float>::size() == 16);
    int32_t row = 0;
    int64_t col = 0;
    for (int64_t k = 0; k < std::min(cols + 1, kVectors); ++k) {
      alignas(64) int32_t rows[16];
      alignas(64) float weights[16], biases[16];
      for (int64_t l = 0; l < 16; ++l) {
        rows[l] = std::min<int32_t>(row, kGroupRows - 1);
        weights[l] = weight ? static_cast<float>(weight[col]) : 1.0f;
        biases[l] = bias ? static_cast<float>(bias[col]) : 0.0f;
        if (++col == cols) col = 0, ++row;
      }
      row_[k] = Vectorized<int32_t>::loadu(rows);
      weight_[k] = Vectorized<float>::loadu(weights);
      bias_[k] = Vectorized<float>::loadu(biases);
    }
  }

  // Each lane's row value in vector `vector` of the group, from a vector of rows.
  Vectorized<float> of_rows(int64_t vector, const Vectorized<float>& rows) const {
    return _mm512_permutexvar_ps(row_[vector], rows);
  }
  const Vectorized<float>& weight(int64_t vector) const { return weight_[vector]; }

  // y of a whole group from x, given its rows' centers (normalize_center) and rstds:
  // the same operations as the row-by-row outputs, so the same values (and bits, but
  // for how bf16 encodes a NaN: pack_reduced picks its conversion per chunk).
  template <Norm kNorm, typename T>
  void write_outputs(const T* x, T* y, int64_t cols, const Vectorized<float>& centers,
                     const Vectorized<float>& rstds, bool stream) const {
    using C = Chunk<T>;
    const int64_t elements = kGroupRows * cols;
    for (int64_t e = 0; e < elements; e += C::kSize) {
      const int64_t n = std::min(C::kSize, elements - e);
      const auto xv = C::load(x + e, n);
      typename C::Parts yv;
      for (int k = 0; k < C::kParts; ++k) {
        const int64_t vector = e / 16 + k;
        yv[k] = math::affine<kNorm>(
            math::normalize<kNorm>(xv[k], of_rows(vector, centers), of_rows(vector, rstds)),
            weight_[vector], bias_[vector]);
      }
      C::store_row(y + e, yv, n, stream && can_stream(y + e));
    }
  }

  // Adds per-lane sums over groups (one vector per vector of a group, as a group's
  // elements lie) to a row of `cols` columns: column c gets every lane holding column c,
  // in vector then lane order.
  static void add_to_columns(const std::array<Vectorized<float>, kVectors>& lanes, int64_t cols,
                             float* out) {
    alignas(64) float values[16];
    int64_t col = 0;
    for (int64_t k = 0; k < cols; ++k) {  // a group's 16 * cols elements: cols vectors
      lanes[k].store(values);
      for (int64_t l = 0; l < 16; ++l) {
        out[col] += values[l];
        if (++col == cols) col = 0;
      }
    }
  }

 private:
  std::array<Vectorized<int32_t>, kVectors> row_;
  std::array<Vectorized<float>, kVectors> weight_, bias_;
};
#endif

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace layernorm_ext::cpu
