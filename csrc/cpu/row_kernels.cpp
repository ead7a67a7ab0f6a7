// The CPU row kernels; see row_kernels.h for how this file is built once per ISA.
// Their parts, compiled only as part of this file: row_chunks.h (vector loads and stores
// of a row), row_moments.h (one row's statistics), row_groups.h (rows in groups).
//
// Forward, per row: Welford statistics, then y, while the row is still in L1/L2, so
// x comes from DRAM once. Backward, per row: the two row sums, then dx and the
// dgamma/dbeta terms, again with dy and x cache-resident. Every value is converted to
// the accumulation type (float for half/bf16) in registers; nothing is materialized.
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT  // the build without ISA flags
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <functional>
#include <optional>
#include <type_traits>

#include "../layernorm_math.h"
#include "row_chunks.h"
#include "row_groups.h"
#include "row_kernels.h"
#include "row_moments.h"

#define LN_CONCAT_(a, b) a##b
#define LN_CONCAT(a, b) LN_CONCAT_(a, b)

namespace layernorm_ext::cpu {
inline namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// All-ones lanes where both a and b are finite (x - x is 0 for finite x, NaN otherwise).
template <typename Vec>
Vec both_finite(const Vec& a, const Vec& b) {
  return ((a - a) == Vec(0)) & ((b - b) == Vec(0));
}

// Forward of rows shorter than one chunk (D < Chunk<T>::kSize), a group of rows at a
// time: their statistics as vectors of rows (lane_sums, RowColumn), then their outputs
// (on AVX-512, whole groups from contiguous vectors: GroupLayout). LayerNorm's moments
// are shifted by a value x0 (exact for constant rows): mean = x0 + sum(x - x0) / n, then
// - float/double input: x0 = short_row_shift (an element most are near, else 0: an
//   outlier first element rounded the others' deviations to its ulps, 9-14x torch's
//   error in their y at D = 18..27), and m2 = sum((x - mean)^2), a second pass over
//   the rows;
// - half/bf16 input: x0 the first element, m2 = sum((x - x0)^2) - sum(x - x0) *
//   (mean - x0), from the same pass (838861x20 bf16: 1.3x). With x0 in the row,
//   sum((x - x0)^2) <= n * m2 (Samuelson's inequality), so the subtraction cancels at
//   most log2(n) < 5 bits: m2 keeps some 16 of float's 24 bits, where the output has 8
//   (bf16) or 11 (half).
//   Rows whose sums are not finite (overflow, NaN, inf) take the two-pass moments and
//   the overflow rescue; the others keep the one-pass ones, whatever their group holds.
template <Norm kNorm, typename T, typename P>
void forward_short_rows(const ForwardRows<T, P>& a, int64_t begin, int64_t end) {
  using C = Chunk<T>;
  using PC = Chunk<P>;
  using acc_t = typename C::acc_t;
  using Vec = typename C::Vec;
  constexpr bool kOnePass = kNorm == Norm::kLayer && C::kReduced;
  const int64_t N = a.cols;
  const auto wv = PC::load_or(a.weight, N, acc_t(1));
  const auto bv = PC::load_or(a.bias, N, acc_t(0));
#if defined(CPU_CAPABILITY_AVX512)
  constexpr bool kContiguous = std::is_same_v<acc_t, float>;
  std::optional<GroupLayout> layout;  // for the whole groups
  if constexpr (kContiguous) {
    if (end - begin >= kGroupRows) layout.emplace(a.weight, a.bias, N);
  }
#endif
  const int64_t ahead = std::max<int64_t>(1, kShortRowsAhead / (N * int64_t(sizeof(T))));
  const auto valid = valid_lanes<T>(N);
  OutputRows<T> out(a.y, N, kGroupRows, a.stream_output);
  std::array<Vec, kGroupRows> terms, squares;
  alignas(64) std::array<acc_t, kGroupRows> shifts{}, means{}, row_stats{};
  const Vec n_v(static_cast<acc_t>(N));
  for (int64_t first = begin; first < end; first += kGroupRows) {
    const int64_t rows = std::min(kGroupRows, end - first);
    const auto row_x = [&](int64_t r) { return a.x + (first + r) * N; };
    for (int64_t r = 0; r < rows; ++r) {
      if (first + r + ahead < a.rows) prefetch_short_row(row_x(r) + ahead * N, N);
      const auto v = C::load(row_x(r), N);
      if constexpr (kNorm == Norm::kRms) {
        terms[r] = Vec(0);  // no mask: the lanes past N load as zero
        for (int k = 0; k < C::kParts; ++k) terms[r] = terms[r] + v[k] * v[k];
      } else {
        shifts[r] = kOnePass ? static_cast<acc_t>(row_x(r)[0])
                             : short_row_shift<T>(v, valid, row_x(r), N);
        const Vec shift(shifts[r]);
        terms[r] = masked_terms(v, valid, [&](const Vec& e) { return e - shift; });
        if constexpr (kOnePass) {
          squares[r] = masked_terms(v, valid, [&](const Vec& e) {
            const Vec dev = e - shift;
            return dev * dev;
          });
        }
      }
    }
    // RMSNorm: mean(x^2); LayerNorm: sum(x - x0) / n, the mean less its shift.
    const auto sums = lane_sums(terms, rows);
    const auto quotients = sums.map([&](const Vec& sum) { return sum / n_v; });
    RowColumn<acc_t> stats = quotients, mean_of_rows;
    if constexpr (kNorm == Norm::kLayer) {
      mean_of_rows = RowColumn<acc_t>::load(shifts.data()).zip(quotients, std::plus<>());
      bool done = false;
      RowColumn<acc_t> one_pass, one_pass_finite;
      if constexpr (kOnePass) {
        const auto sum_squares = lane_sums(squares, rows);
        one_pass = sum_squares.zip(sums.zip(quotients, std::multiplies<>()), std::minus<>());
        stats = one_pass;
        done = mean_of_rows.all_finite(rows) && sum_squares.all_finite(rows);
        if (!done) one_pass_finite = mean_of_rows.zip(sum_squares, both_finite<Vec>);
      }
      if (!done) {
        for (int64_t r = 0; r < rows; ++r) {
          const Vec mean = mean_of_rows.broadcast(r);
          terms[r] = masked_terms(C::load(row_x(r), N), valid, [&](const Vec& e) {
            const Vec dev = e - mean;
            return dev * dev;
          });
        }
        stats = lane_sums(terms, rows);
        if constexpr (kOnePass) {  // only the rows that need them: a row's own sums decide
          for (size_t i = 0; i < stats.v.size(); ++i) {
            stats.v[i] = Vec::blendv(stats.v[i], one_pass.v[i], one_pass_finite.v[i]);
          }
        }
      }
      if (!mean_of_rows.all_finite(rows) || !stats.all_finite(rows)) {
        // the rare groups whose moments overflowed: their rows' mean and variance
        mean_of_rows.store(means.data(), rows);
        stats.store(row_stats.data(), rows);  // m2 in, the variance out
        for (int64_t r = 0; r < rows; ++r) {
          const auto rescued = without_overflow(
              math::WelfordState<acc_t>{means[r], row_stats[r], N}, row_x(r), N);
          means[r] = rescued.mean;
          row_stats[r] = rescued.var;
        }
        mean_of_rows = RowColumn<acc_t>::load(means.data());
        stats = RowColumn<acc_t>::load(row_stats.data());
      } else {
        stats = stats.map([&](const Vec& m2) { return m2 / n_v; });
      }
      mean_of_rows.store(a.mean + first, rows);
    }
    const auto rstds = rstd_of_rows<kNorm>(stats, a.eps);
    rstds.store(a.rstd + first, rows);
    const auto centers =
        kNorm == Norm::kRms ? RowColumn<acc_t>::zeros() : centers_of_rows(mean_of_rows, rstds);
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kContiguous) {
      if (rows == kGroupRows) {
        layout->template write_outputs<kNorm>(row_x(0), a.y + first * N, N, centers.v[0],
                                             rstds.v[0], a.stream_output);
        continue;
      }
    }
#endif
    out.start(first);
    for (int64_t r = 0; r < rows; ++r) {
      const Vec center = centers.broadcast(r), rstd = rstds.broadcast(r);
      typename C::Parts yv;
      const auto xv = C::load(row_x(r), N);
      for (int k = 0; k < C::kParts; ++k) {
        yv[k] = math::affine<kNorm>(math::normalize<kNorm>(xv[k], center, rstd), wv[k], bv[k]);
      }
      C::store(out.row(r), yv, N);  // N < kSize: no whole chunk to stream
    }
    out.finish(rows);
  }
}

// The outputs of a group of long rows (forward_rows), chunk by chunk over its rows:
// each weight/bias chunk loaded once a group. A function of its own: inlined, it made
// the row-by-row loop of shorter rows ~5% slower (bf16 D = 128).
template <Norm kNorm, typename T, typename P>
C10_NOINLINE void write_outputs_by_chunk(const ForwardRows<T, P>& a, int64_t first, int64_t rows,
                                         int64_t end, const at::opmath_type<T>* means,
                                         const RowColumn<at::opmath_type<T>>& rstds,
                                         const AccParam<P>& weight, const AccParam<P>& bias,
                                         const OutputRows<T>& out) {
  using C = Chunk<T>;
  using AC = Chunk<at::opmath_type<T>>;
  using acc_t = typename C::acc_t;
  using Vec = typename C::Vec;
  const int64_t N = a.cols;
  std::array<Vec, kGroupRows> rstd_vs, mean_vs;
  for (int64_t r = 0; r < rows; ++r) {
    rstd_vs[r] = rstds.broadcast(r);
    mean_vs[r] = Vec(math::normalize_center(means[r], first_lane(rstd_vs[r])));
  }
  for_each_chunk<T>(N, [&](int64_t j, auto n) {
    const auto wv = AC::load_or(weight.from(j), n, acc_t(1));
    const auto bv = AC::load_or(bias.from(j), n, acc_t(0));
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t offset = (first + r) * N + j;
      if (first + r + rows < end) prefetch_chunk(a.x + offset + rows * N, n);  // as forward_rows
      const auto xv = C::load(a.x + offset, n);
      typename C::Parts yv;
      for (int k = 0; k < C::kParts; ++k) {
        yv[k] = math::affine<kNorm>(math::normalize<kNorm>(xv[k], mean_vs[r], rstd_vs[r]),
                                    wv[k], bv[k]);
      }
      T* y = out.row(r) + j;
      C::store_row(y, yv, n, out.stream_chunk(y));
    }
  });
}

// Forward of rows [begin, end). LayerNorm: Welford moments, then y = xhat * w + b.
// RMSNorm: mean(x^2), then y = x * rstd * w (no mean, no bias).
template <Norm kNorm, typename T, typename P>
void forward_rows(const ForwardRows<T, P>& a, int64_t begin, int64_t end) {
  using C = Chunk<T>;
  using AC = Chunk<at::opmath_type<T>>;
  using acc_t = typename C::acc_t;
  using Vec = typename C::Vec;
  static_assert(C::kSize == AC::kSize);
  const int64_t N = a.cols;
  if (N > 0 && N < C::kSize) return forward_short_rows<kNorm>(a, begin, end);
  const AccParam<P> weight(a.weight, N), bias(a.bias, N);
  // Rows whose weight and bias (as acc_t) take 32 KiB or more (kLongParamBytes each)
  // write their outputs chunk by chunk over the group's rows, loading each parameter
  // chunk once a group: row by row, they pushed the row out of L1 and were read from
  // L2 again for every row. 2-core Xeon, 2^26 elements, medians of 6 alternated
  // processes: bf16 D = 4096 12.7 -> 10.8 ms, 16384 13.5 -> 10.8, float32 D = 8192
  // 19.9 -> 16.0; the same bits. Shorter rows keep the row-by-row order, faster for
  // them (bf16 D = 768: 11.7 against 13.8 ms by chunk).
  const bool by_chunk = N * int64_t(sizeof(acc_t)) >= kLongParamBytes;
  const int64_t group_rows = by_chunk ? shared_param_group_rows_for<T>(N) : group_rows_for<T>(N);
  // stats: the variance (LayerNorm), mean(x^2) (RMSNorm)
  alignas(64) std::array<acc_t, kGroupRows> means{}, stats{};
  std::array<LaneMoments<T>, kGroupRows> lanes;
  const int64_t chunks = N / C::kSize;
  OutputRows<T> out(a.y, N, group_rows, a.stream_output);
  for (int64_t first = begin; first < end; first += group_rows) {
    const int64_t rows = std::min(group_rows, end - first);
    if constexpr (kNorm == Norm::kRms) {
      for (int64_t r = 0; r < rows; ++r) stats[r] = row_mean_square(a.x + (first + r) * N, N);
    } else {
      // Per-lane moments of every row's whole chunks (N >= kSize here, or 0), their
      // lanes merged for the whole group, then each row's partial chunk; all of a row's
      // values less its shift (row_moments.h).
      std::array<acc_t, kGroupRows> shifts{};
      if (chunks > 0) {
        for (int64_t r = 0; r < rows; ++r) {
          shifts[r] = row_shift(a.x + (first + r) * N);
          lanes[r] = shifts[r] != acc_t(0)
                         ? whole_chunk_moments<true>(a.x + (first + r) * N, chunks, shifts[r])
                         : whole_chunk_moments<false>(a.x + (first + r) * N, chunks, acc_t(0));
        }
        merge_lanes_of_rows(lanes, rows, means.data(), stats.data());
      } else {
        means.fill(acc_t(0)), stats.fill(acc_t(0));
      }
      for (int64_t r = 0; r < rows; ++r) {
        const T* x = a.x + (first + r) * N;
        const math::WelfordState<acc_t> whole{means[r], stats[r], chunks * C::kSize};
        const auto row = without_overflow(with_partial_chunk(whole, x, N, shifts[r]), x, N);
        means[r] = row.mean;
        stats[r] = row.var;
        a.mean[first + r] = means[r];
      }
      // The rows whose shift was poor (math::needs_reshift, rare): their moments again,
      // less their mean. Judged a vector of rows at a time: a row at a time, in the loop
      // above, the check cost ~8% of the float32 4096x32 forward (one core).
      for (uint32_t poor = rows_needing_reshift(RowColumn<acc_t>::load(means.data()),
                                                RowColumn<acc_t>::load(stats.data()),
                                                RowColumn<acc_t>::load(shifts.data()), rows);
           poor != 0; poor &= poor - 1) {
        const int64_t r = std::countr_zero(poor);
        const T* x = a.x + (first + r) * N;
        const auto row = without_overflow(row_moments_less(x, N, means[r]), x, N);
        means[r] = row.mean;
        stats[r] = row.var;
        a.mean[first + r] = means[r];
      }
    }
    const auto rstds = rstd_of_rows<kNorm>(RowColumn<acc_t>::load(stats.data()), a.eps);
    rstds.store(a.rstd + first, rows);
    // While the group's outputs are written, the next group's input is prefetched into
    // L2 (the same offset, one group ahead): the hardware prefetcher restarts at every
    // group's first pass, which cost ~15% at D = 16384 in bf16.
    out.start(first);
    if (by_chunk) {
      write_outputs_by_chunk<kNorm>(a, first, rows, end, means.data(), rstds, weight, bias, out);
      out.finish(rows);
      continue;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const T* x = a.x + (first + r) * N;
      T* y = out.row(r);
      const bool prefetch = first + r + rows < end;  // (no pointer past the rows)
      const Vec rstd_v = rstds.broadcast(r);
      const Vec mean_v(math::normalize_center(means[r], first_lane(rstd_v)));
      const bool stream = out.stream_chunk(y);
      for_each_chunk<T>(N, [&](int64_t j, auto n) {
        if (prefetch) prefetch_chunk(x + rows * N + j, n);
        const auto xv = C::load(x + j, n);
        const auto wv = AC::load_or(weight.from(j), n, acc_t(1));
        const auto bv = AC::load_or(bias.from(j), n, acc_t(0));
        typename C::Parts yv;
        for (int k = 0; k < C::kParts; ++k) {
          yv[k] = math::affine<kNorm>(math::normalize<kNorm>(xv[k], mean_v, rstd_v), wv[k], bv[k]);
        }
        C::store_row(y + j, yv, n, stream);
      });
    }
    out.finish(rows);
  }
}

// x of a row's chunk for the backward's row sums: the lanes past the row's end (n) set
// to the row's center, so that their xhat is 0. Loaded as zeros, their xhat would be
// -center * rstd, which overflows to inf in a row far from 0 with a tiny spread (1e33
// with eps 1e-12), and g * xhat = 0 * inf would make the row's sums, and its dx, NaN.
// Free for whole chunks (n a compile-time kSize).
template <typename Parts, typename Vec>
Parts with_centered_tail(Parts xv, const Parts& valid, const Vec& center) {
  for (size_t k = 0; k < xv.size(); ++k) xv[k] = Vec::blendv(center, xv[k], valid[k]);
  return xv;
}
template <typename T, typename Parts, typename Vec, typename Count>
Parts with_centered_tail(Parts xv, Count n, const Vec& center) {
  return n < Chunk<T>::kSize ? with_centered_tail(xv, valid_lanes<T>(n), center) : xv;
}

// One chunk of the backward, shared by both row paths below. Pass 1 adds the chunk's
// g = dy * w and g * xhat to the row sums (tail lanes: g = 0 and, by
// with_centered_tail, xhat = 0).
template <Norm kNorm, typename Parts, typename Vec>
void add_row_sums(const Parts& dyv, const Parts& xv, const Parts& wv, const Vec& mean_v,
                  const Vec& rstd_v, Vec& sum_g, Vec& sum_g_xhat) {
  for (size_t k = 0; k < dyv.size(); ++k) {
    const Vec g = dyv[k] * wv[k];
    if constexpr (kNorm == Norm::kLayer) sum_g = sum_g + g;
    sum_g_xhat = math::mul_add(g, math::normalize<kNorm>(xv[k], mean_v, rstd_v), sum_g_xhat);
  }
}

// Pass 2: the chunk's dx, and its dgamma/dbeta terms added to dgv/dbv.
template <Norm kNorm, typename Parts, typename Vec>
void chunk_grads(const Parts& dyv, const Parts& xv, const Parts& wv, const Vec& mean_v,
                 const Vec& rstd_v, const Vec& mean_g, const Vec& mean_g_xhat, Parts& dxv,
                 Parts& dgv, Parts& dbv) {
  for (size_t k = 0; k < dyv.size(); ++k) {
    const Vec xhat = math::normalize<kNorm>(xv[k], mean_v, rstd_v);
    dxv[k] = math::input_grad<kNorm>(dyv[k] * wv[k], xhat, rstd_v, mean_g, mean_g_xhat);
    dgv[k] = math::mul_add(dyv[k], xhat, dgv[k]);
    if constexpr (kNorm == Norm::kLayer) dbv[k] = dbv[k] + dyv[k];
  }
}

// Backward of rows that fit in one chunk (D <= Chunk<T>::kSize, e.g. 32 floats with
// AVX-512), a group of rows at a time, as forward_short_rows: each row's two sums, the
// group's lane sums as vectors of rows (lane_sums, RowColumn), then dx and the
// dgamma/dbeta terms. On AVX-512 a whole group's dx is written from contiguous vectors
// (GroupLayout), with the dgamma/dbeta terms summed per lane of those vectors across
// groups and added to their columns at the end; other groups go row by row, with the
// terms in registers. A row's dx is the same either way.
template <Norm kNorm, typename T, typename P>
void backward_short_rows(const BackwardRows<T, P>& a, int64_t begin, int64_t end,
                         at::opmath_type<T>* dgamma, at::opmath_type<T>* dbeta) {
  using C = Chunk<T>;
  using PC = Chunk<P>;
  using AC = Chunk<at::opmath_type<T>>;
  using acc_t = typename C::acc_t;
  using Vec = typename C::Vec;
  const int64_t N = a.cols;
  const auto wv = PC::load_or(a.weight, N, acc_t(1));
  auto dgv = AC::load(dgamma, N);
  typename AC::Parts dbv;
  if constexpr (kNorm == Norm::kLayer) dbv = AC::load(dbeta, N);
#if defined(CPU_CAPABILITY_AVX512)
  constexpr bool kContiguous = std::is_same_v<acc_t, float>;
  std::optional<GroupLayout> layout;
  std::array<Vec, GroupLayout::kVectors> dgamma_lanes, dbeta_lanes;
  bool contiguous_used = false;
  if constexpr (kContiguous) {
    if (end - begin >= kGroupRows) layout.emplace(a.weight, static_cast<const P*>(nullptr), N);
    dgamma_lanes.fill(Vec(0));
    dbeta_lanes.fill(Vec(0));
  }
#endif
  const int64_t ahead = std::max<int64_t>(1, kShortRowsAhead / (N * int64_t(sizeof(T))));
  const Vec n_v(static_cast<acc_t>(N));
  const auto valid = valid_lanes<T>(N);
  OutputRows<T> out(a.dx, N, kGroupRows, a.stream_output);
  std::array<Vec, kGroupRows> g_terms, g_xhat_terms;
  for (int64_t first = begin; first < end; first += kGroupRows) {
    const int64_t rows = std::min(kGroupRows, end - first);
    const auto rstds = RowColumn<acc_t>::load(a.rstd + first, rows);
    const auto centers = kNorm == Norm::kRms
                             ? RowColumn<acc_t>::zeros()
                             : centers_of_rows(RowColumn<acc_t>::load(a.mean + first, rows), rstds);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = first + r;
      // Bounded by the tensor's rows, not the call's: a call is one chunk (~800 rows at
      // D = 20), whose first rows went unprefetched otherwise (3407872x20 on a 2-core
      // Xeon, medians of 5 alternated processes: RMSNorm float32 36.1 -> 34.6 ms,
      // LayerNorm bf16 26.9 -> 25.9, float32 36.8 -> 36.3).
      if (row + ahead < a.rows) {
        prefetch_short_row(a.dy + (row + ahead) * N, N);
        prefetch_short_row(a.x + (row + ahead) * N, N);
      }
      // lanes past N: dy is zero, so g = 0 there, and x the center
      const Vec center = centers.broadcast(r);
      const auto dyv = C::load(a.dy + row * N, N);
      const auto xv = with_centered_tail(C::load(a.x + row * N, N), valid, center);
      g_terms[r] = Vec(0), g_xhat_terms[r] = Vec(0);
      add_row_sums<kNorm>(dyv, xv, wv, center, rstds.broadcast(r), g_terms[r],
                          g_xhat_terms[r]);
    }
    const auto mean_gs = lane_sums(g_terms, rows).map([&](const Vec& sum) { return sum / n_v; });
    const auto mean_g_xhats =
        lane_sums(g_xhat_terms, rows).map([&](const Vec& sum) { return sum / n_v; });
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kContiguous) {
      if (rows == kGroupRows) {
        contiguous_used = true;
        const int64_t offset = first * N;
        const int64_t elements = kGroupRows * N;
        for (int64_t e = 0; e < elements; e += C::kSize) {
          const int64_t n = std::min(C::kSize, elements - e);
          const auto dyv = C::load(a.dy + offset + e, n);
          const auto xv = C::load(a.x + offset + e, n);
          typename C::Parts dxv;
          for (int k = 0; k < C::kParts; ++k) {  // chunk_grads, one vector at a time
            const int64_t vector = e / 16 + k;
            using One = std::array<Vec, 1>;
            One dx, dg{dgamma_lanes[vector]}, db{dbeta_lanes[vector]};
            chunk_grads<kNorm>(One{dyv[k]}, One{xv[k]}, One{layout->weight(vector)},
                               layout->of_rows(vector, centers.v[0]),
                               layout->of_rows(vector, rstds.v[0]),
                               layout->of_rows(vector, mean_gs.v[0]),
                               layout->of_rows(vector, mean_g_xhats.v[0]), dx, dg, db);
            dxv[k] = dx[0], dgamma_lanes[vector] = dg[0], dbeta_lanes[vector] = db[0];
          }
          T* dx = a.dx + offset + e;
          C::store_row(dx, dxv, n, a.stream_output && can_stream(dx));
        }
        continue;
      }
    }
#endif
    out.start(first);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = first + r;
      typename C::Parts dxv;
      chunk_grads<kNorm>(C::load(a.dy + row * N, N), C::load(a.x + row * N, N), wv,
                         centers.broadcast(r), rstds.broadcast(r), mean_gs.broadcast(r),
                         mean_g_xhats.broadcast(r), dxv, dgv, dbv);
      T* dx = out.row(r);
      C::store_row(dx, dxv, N, out.stream_chunk(dx));
    }
    out.finish(rows);
  }
  AC::store(dgamma, dgv, N);
  if constexpr (kNorm == Norm::kLayer) AC::store(dbeta, dbv, N);
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (kContiguous) {
    if (contiguous_used) {
      GroupLayout::add_to_columns(dgamma_lanes, N, dgamma);
      if constexpr (kNorm == Norm::kLayer) GroupLayout::add_to_columns(dbeta_lanes, N, dbeta);
    }
  }
#endif
}

// Backward of rows [begin, end); RMSNorm (dbeta null) skips mean(g) and dbeta.
template <Norm kNorm, typename T, typename P>
void backward_rows(const BackwardRows<T, P>& a, int64_t begin, int64_t end,
                   at::opmath_type<T>* dgamma, at::opmath_type<T>* dbeta) {
  using C = Chunk<T>;
  using AC = Chunk<at::opmath_type<T>>;
  using acc_t = typename C::acc_t;
  using Vec = typename C::Vec;
  const int64_t N = a.cols;
  if (N <= C::kSize) return backward_short_rows<kNorm>(a, begin, end, dgamma, dbeta);
  const AccParam<P> weight(a.weight, N);
  const auto add = [](Vec u, Vec v) { return u + v; };
  // Rows in groups, as in forward_rows: first pass 1 of every row of the group (their
  // dependency chains overlap), then pass 2 chunk by chunk over the group's rows, so
  // that each dgamma/dbeta chunk is loaded and stored once per group, not once per
  // row. Each element still adds its rows' terms in row order: the same bits.
  const int64_t group_rows = shared_param_group_rows_for<T>(N);
  std::array<acc_t, kGroupRows> centers, rstds, mean_gs, mean_g_xhats;
  OutputRows<T> out(a.dx, N, group_rows, a.stream_output);
  for (int64_t first = begin; first < end; first += group_rows) {
    const int64_t rows = std::min(group_rows, end - first);

    // Pass 1: row sums of g = dy * w and g * xhat.
    for (int64_t r = 0; r < rows; ++r) {
      const T* dy = a.dy + (first + r) * N;
      const T* x = a.x + (first + r) * N;
      rstds[r] = a.rstd[first + r];
      centers[r] = math::row_center<kNorm>(a.mean, first + r, rstds[r]);
      const Vec mean_v(centers[r]), rstd_v(rstds[r]);
      Vec sum_g(0), sum_g_xhat(0);
      for_each_chunk<T>(N, [&](int64_t j, auto n) {
        const auto dyv = C::load(dy + j, n);
        const auto xv = with_centered_tail<T>(C::load(x + j, n), n, mean_v);
        const auto wv = AC::load_or(weight.from(j), n, acc_t(1));
        add_row_sums<kNorm>(dyv, xv, wv, mean_v, rstd_v, sum_g, sum_g_xhat);
      });
      mean_gs[r] = at::vec::vec_reduce_all(add, sum_g) / static_cast<acc_t>(N);
      mean_g_xhats[r] = at::vec::vec_reduce_all(add, sum_g_xhat) / static_cast<acc_t>(N);
    }

    // Pass 2, rows in cache: dx, and the dgamma/dbeta terms. The next group is
    // prefetched as in forward_rows: 10-25% for long rows. Rows under 512 bytes went
    // without while their groups held 16 rows (131072x128 bf16 on a Zen 4, A/B in one
    // process: 1.2-1.8x the time with); in groups of 4, a 2-core Xeon gains from it
    // too (2^26 elements, medians of 3-5 processes: bf16 D = 128 23.5 -> 21.8 ms, fp16
    // 128 26.6 -> 22.7, float32 100 38.6 -> 34.2; not timed on a Zen 4 since).
    out.start(first);
    for_each_chunk<T>(N, [&](int64_t j, auto n) {
      const auto wv = AC::load_or(weight.from(j), n, acc_t(1));
      auto dgv = AC::load(dgamma + j, n);
      typename AC::Parts dbv;
      if constexpr (kNorm == Norm::kLayer) dbv = AC::load(dbeta + j, n);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t offset = (first + r) * N + j;
        if (first + r + rows < end) {  // the next group's rows, as in forward_rows
          prefetch_chunk(a.dy + offset + rows * N, n);
          prefetch_chunk(a.x + offset + rows * N, n);
        }
        typename C::Parts dxv;
        chunk_grads<kNorm>(C::load(a.dy + offset, n), C::load(a.x + offset, n), wv,
                           Vec(centers[r]), Vec(rstds[r]), Vec(mean_gs[r]), Vec(mean_g_xhats[r]),
                           dxv, dgv, dbv);
        T* dx = out.row(r) + j;
        C::store_row(dx, dxv, n, out.stream_chunk(dx));
      }
      AC::store(dgamma + j, dgv, n);
      if constexpr (kNorm == Norm::kLayer) AC::store(dbeta + j, dbv, n);
    });
    out.finish(rows);
  }
}

template <typename T, typename P>
RowKernels<T, P> row_kernels() {
  return {{&forward_rows<Norm::kLayer, T, P>, &backward_rows<Norm::kLayer, T, P>},
          {&forward_rows<Norm::kRms, T, P>, &backward_rows<Norm::kRms, T, P>}};
}

}  // namespace
}  // namespace CPU_CAPABILITY

const KernelTable& LN_CONCAT(kernel_table_, CPU_CAPABILITY)() {
#if defined(CPU_CAPABILITY_AVX512)
  static const bool bf16_checked = [] {
    __builtin_cpu_init();
    has_avx512_bf16 = __builtin_cpu_supports("avx512bf16") != 0;
    return true;
  }();
  (void)bf16_checked;
#endif
  static const KernelTable table{
      row_kernels<float, float>(),         row_kernels<double, double>(),
      row_kernels<c10::Half, c10::Half>(), row_kernels<c10::Half, float>(),
      row_kernels<c10::BFloat16, c10::BFloat16>(), row_kernels<c10::BFloat16, float>()};
  return table;
}

}  // namespace layernorm_ext::cpu
