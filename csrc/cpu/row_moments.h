// The statistics of one row on the CPU: Welford moments per vector lane, merged into
// the row's (LayerNorm), the overflow rescue, and the mean square (RMSNorm). The math
// itself is layernorm_math.h's, shared with the CUDA kernels.
#pragma once

// Compiled only as part of row_kernels.cpp, once per instruction set (row_kernels.h),
// after CPU_CAPABILITY is set, so its code lands in that ISA's namespace.
#ifndef CPU_CAPABILITY
#error "included only by row_kernels.cpp"
#endif

#include <ATen/OpMathType.h>
#include <ATen/ceil_div.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../layernorm_math.h"
#include "row_chunks.h"

namespace layernorm_ext::cpu {
inline namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Per-lane Welford moments of whole chunks: every lane of every part has seen `steps`
// elements, so merges between two such states share one scalar count and share.
template <typename T>
struct LaneMoments {
  typename Chunk<T>::Parts mean, m2;
  int64_t steps;

  // Folds `other` (disjoint elements, same lanes) into this one: Chan's merge.
  void merge(const LaneMoments& other) {
    using acc_t = typename Chunk<T>::acc_t;
    const int64_t total = steps + other.steps;
    const acc_t share = static_cast<acc_t>(other.steps) / static_cast<acc_t>(total);
    for (int k = 0; k < Chunk<T>::kParts; ++k) {
      math::welford_merge(mean[k], m2[k], other.mean[k], other.m2[k],
                          static_cast<acc_t>(steps), share);
    }
    steps = total;
  }
};

// Elements of a row in one Welford run: long runs let rounding errors of the running
// mean pile up, so longer rows are cut into blocks whose moments are merged pairwise
// (a cascade, as torch's RowwiseMoments does): the error grows with log(n), not n.
constexpr int64_t kBlockSteps = 128;

// The moments of a row, in three steps (forward_rows, row_kernels.cpp), all of the row's
// values less a shift near its mean where they need one (row_shift; their moments are
// then those of the row, but for the mean, shift + the shifted mean): the running means
// then round to the spread's ulps, not the offset's. Unshifted, rows of a ramp 100..101
// (float32, N = 4096) had an rstd ~1800 ulps off (torch's: 2). The row's first value
// as the shift, whatever it was, gave ~100x torch's error in y where that value was an
// outlier (1000 among N(0, 1) values): the shifted values then round to its ulps;
// row_shift takes a value most of the first chunk is near (shift_of), or none. Where
// the row's mean then lies far from that shift (the first chunk was unlike the rest:
// math::needs_reshift), the row's moments are taken again less that mean
// (row_moments_less).
// - Whole chunks (whole_chunk_moments): Welford per lane in blocks of kBlockSteps chunks
//   (one reciprocal serves all lanes), blocks merged in a cascade.
// - The lanes merged pairwise (merge_lanes, or merge_lanes_of_rows in row_groups.h for a
//   group); equal counts there, so every merge has share 1/2 and no division.
// - The last partial chunk (with_partial_chunk): exact moments from two masked vector
//   passes, shifted by its first element (exact for constant data, no overflow near the
//   dtype's max), merged with Chan's combine.
// A shifted value overflows only where the row spans over half the dtype's range, and
// there its M2 would overflow anyway: the rescue (without_overflow) recomputes it.

// Whether at most max_far lanes of v are not near `reference` (math::near_first, as
// vectors); it stops at the first part past that (most rows near zero, at once).
template <typename Parts, typename acc_t>
bool mostly_near(const Parts& v, acc_t reference, int64_t max_far) {
  using Vec = typename Parts::value_type;
  const Vec reference_v(reference), band(std::abs(reference) / acc_t(math::kShiftRatio));
  int64_t far = 0;
  for (const Vec& part : v) {
    // zero_mask: a bit per lane where the comparison failed
    far += std::popcount(static_cast<unsigned>(((part - reference_v).abs() < band).zero_mask()));
    if (far > max_far) return false;
  }
  return true;
}

// The shift of a row from n of its values: the median of the first, middle and last of
// them where at most a quarter of the n are far from it (math::near_first), else 0.
// values(reference) gives the n values as vectors, any lanes past them equal to the
// reference (near). One outlier or a leading 0 cannot decide: judged on the first value
// alone, rows with one such value at their start were left unshifted, 90-340x torch's
// error (ramps at offsets 30-1000), and a shift by the mean of the first chunk took the
// outlier in. Rows near zero, or spread as widely as their offset, do not need a shift,
// and for them this costs a vector compare, not the subtraction (an always-on shift, by
// the chunk's mean, cost 11-16% of a cache-resident forward on one core). NaN or inf: no
// shift (the comparisons fail). Exact for constant rows. A sample decides for the row:
// where the first chunk is unlike the rest (a first chunk at an offset the rest lacks,
// or a run of zeros before a ramp), the shift is wrong or missing, and the row's
// moments are taken again (row_moments_less).
template <typename acc_t, typename Values>
acc_t shift_of(const Values& values, int64_t n, acc_t first, acc_t middle, acc_t last) {
  const acc_t median = std::max(std::min(first, middle), std::min(std::max(first, middle), last));
  return mostly_near(values(median), median, n / 4) ? median : acc_t(0);
}

// The shift of a row of at least one whole chunk: shift_of its first chunk.
template <typename T>
typename Chunk<T>::acc_t row_shift(const T* x) {
  using C = Chunk<T>;
  using acc_t = typename C::acc_t;
  const auto v = C::load_unordered(x);
  return shift_of([&](acc_t) -> const typename C::Parts& { return v; }, C::kSize,
                  static_cast<acc_t>(x[0]), static_cast<acc_t>(x[C::kSize / 2]),
                  static_cast<acc_t>(x[C::kSize - 1]));
}

// Welford per lane over `steps` whole chunks from x, less `shift` (kShifted): one
// reciprocal serves all lanes.
// Two runs, over the even and the odd chunks, merged at the end: each run's mean is a
// chain of dependent sub + fma per chunk, and a single run kept the core waiting on it
// (the bf16 forward's statistics pass ran at half speed). A function of its own so the
// running moments stay in registers.
template <bool kShifted, typename T>
LaneMoments<T> block_moments(const T* x, int64_t steps, typename Chunk<T>::acc_t shift) {
  using C = Chunk<T>;
  using acc_t = typename C::acc_t;
  using Vec = typename C::Vec;
  const Vec shift_v(shift);
  const auto shifted = [&](const Vec& value) {
    if constexpr (kShifted) {
      return value - shift_v;
    } else {
      return value;
    }
  };
  typename C::Parts mean_even{Vec(0), Vec(0)}, m2_even{Vec(0), Vec(0)};
  typename C::Parts mean_odd{Vec(0), Vec(0)}, m2_odd{Vec(0), Vec(0)};
  const int64_t pairs = steps / 2;
  for (int64_t step = 1; step <= pairs; ++step, x += 2 * C::kSize) {
    const auto even = C::load_unordered(x);
    const auto odd = C::load_unordered(x + C::kSize);
    const acc_t inv_step = acc_t(1) / static_cast<acc_t>(step);
    for (int k = 0; k < C::kParts; ++k) {
      math::welford_step(mean_even[k], m2_even[k], shifted(even[k]), inv_step);
      math::welford_step(mean_odd[k], m2_odd[k], shifted(odd[k]), inv_step);
    }
  }
  LaneMoments<T> moments{mean_even, m2_even, pairs};
  if (steps % 2 == 1) {  // the last chunk joins the even run
    const auto last = C::load_unordered(x);
    const acc_t inv_step = acc_t(1) / static_cast<acc_t>(pairs + 1);
    for (int k = 0; k < C::kParts; ++k) {
      math::welford_step(moments.mean[k], moments.m2[k], shifted(last[k]), inv_step);
    }
    moments.steps = pairs + 1;
  }
  if (pairs > 0) moments.merge(LaneMoments<T>{mean_odd, m2_odd, pairs});
  return moments;
}

// All-ones lanes for the first n <= kSize elements of a chunk, zero past them, per part.
template <typename T>
typename Chunk<T>::Parts valid_lanes(int64_t n) {
  using C = Chunk<T>;
  using Vec = typename C::Vec;
  typename C::Parts valid;
  for (int k = 0; k < C::kParts; ++k) {
    const int64_t lanes = std::clamp<int64_t>(n - k * C::kLanes, 0, C::kLanes);
    valid[k] = Vec::set(Vec(0), Vec(1), lanes) == Vec(1);
  }
  return valid;
}

// The shift of a row of n values shorter than one chunk, v (its lanes past `valid`
// zero), at x: shift_of the row.
template <typename T>
typename Chunk<T>::acc_t short_row_shift(const typename Chunk<T>::Parts& v,
                                         const typename Chunk<T>::Parts& valid, const T* x,
                                         int64_t n) {
  using C = Chunk<T>;
  using acc_t = typename C::acc_t;
  using Vec = typename C::Vec;
  const auto values = [&](acc_t reference) {
    typename C::Parts row;
    for (int k = 0; k < C::kParts; ++k) row[k] = Vec::blendv(Vec(reference), v[k], valid[k]);
    return row;
  };
  return shift_of(values, n, static_cast<acc_t>(x[0]), static_cast<acc_t>(x[n / 2]),
                  static_cast<acc_t>(x[n - 1]));
}

// term(part) of a chunk's parts, the lanes past `valid` zeroed, summed into one vector
// whose lane sum is the chunk's sum of term.
template <typename Parts, typename Term>
auto masked_terms(const Parts& v, const Parts& valid, const Term& term) {
  using Vec = typename Parts::value_type;
  Vec sum(0);
  for (size_t k = 0; k < v.size(); ++k) sum = sum + Vec::blendv(Vec(0), term(v[k]), valid[k]);
  return sum;
}

// Exact moments of the first `rest` lanes of a partial chunk v (the lanes past it are
// zero): two masked passes, shifted by its first element `shift` (exact for constant
// data, no overflow near the dtype's max).
template <typename T>
C10_ALWAYS_INLINE math::WelfordState<at::opmath_type<T>> partial_chunk_moments(
    const typename Chunk<T>::Parts& v, int64_t rest, at::opmath_type<T> shift) {
  using C = Chunk<T>;
  using acc_t = typename C::acc_t;
  using Vec = typename C::Vec;
  const auto add = [](Vec a, Vec b) { return a + b; };
  const auto valid = valid_lanes<T>(rest);
  const Vec shift_v(shift);
  const acc_t mean = shift + at::vec::vec_reduce_all(add, masked_terms(v, valid, [&](const Vec& e) {
                                return e - shift_v;
                              })) / static_cast<acc_t>(rest);
  const Vec mean_v(mean);
  const acc_t m2 = at::vec::vec_reduce_all(add, masked_terms(v, valid, [&](const Vec& e) {
    const Vec dev = e - mean_v;
    return dev * dev;
  }));
  return {mean, m2, rest};
}

// Lane l + width moved to lane l (and back), for merging all lanes of a vector at once.
// float vectors on AVX2/AVX-512 only: kWidth is half the lanes, then a quarter, ... 1.
template <int kWidth>
Vectorized<float> partner_lanes(const Vectorized<float>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  static_assert(kWidth == 8 || kWidth == 4 || kWidth == 2 || kWidth == 1);
  if constexpr (kWidth == 8) return _mm512_shuffle_f32x4(v, v, 0x4E);  // lane l ^ 8
  if constexpr (kWidth == 4) return _mm512_shuffle_f32x4(v, v, 0xB1);  // lane l ^ 4
  if constexpr (kWidth == 2) return _mm512_shuffle_ps(v, v, 0x4E);     // lane l ^ 2
  if constexpr (kWidth == 1) return _mm512_shuffle_ps(v, v, 0xB1);     // lane l ^ 1
#elif defined(CPU_CAPABILITY_AVX2)
  static_assert(kWidth == 4 || kWidth == 2 || kWidth == 1);
  if constexpr (kWidth == 4) return _mm256_permute2f128_ps(v, v, 0x01);
  if constexpr (kWidth == 2) return _mm256_shuffle_ps(v, v, 0x4E);
  if constexpr (kWidth == 1) return _mm256_shuffle_ps(v, v, 0xB1);
#else
  static_assert(kWidth < 0, "no lane shuffles for this instruction set");
  return v;  // not reached: the assertion fails wherever this is instantiated
#endif
}

// Merges the per-lane moments of whole chunks (equal counts everywhere, so share 1/2)
// into the row's: lane l with lane l + width for width = kSize/2, ..., 1, the first
// level being part 1 into part 0. For float on AVX2/AVX-512 each level is one vector
// merge (a few shuffles) instead of `width` scalar ones: the scalar tree cost more
// than the rest of a D = 128 row. Both compute the same operations, so the same bits.
template <typename T>
math::WelfordState<at::opmath_type<T>> merge_lanes(const LaneMoments<T>& lanes) {
  using C = Chunk<T>;
  using acc_t = typename C::acc_t;
  acc_t count = static_cast<acc_t>(lanes.steps);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    static_assert(C::kParts == 2);
    auto mean = lanes.mean[0], m2 = lanes.m2[0];
    const auto level = [&](const auto& partner_mean, const auto& partner_m2) {
      math::welford_merge(mean, m2, partner_mean, partner_m2, count, acc_t(0.5));
      count *= 2;
    };
    level(lanes.mean[1], lanes.m2[1]);
    constexpr int kLanes = C::kLanes;
    if constexpr (kLanes == 16) level(partner_lanes<8>(mean), partner_lanes<8>(m2));
    level(partner_lanes<4>(mean), partner_lanes<4>(m2));
    level(partner_lanes<2>(mean), partner_lanes<2>(m2));
    level(partner_lanes<1>(mean), partner_lanes<1>(m2));
#if defined(CPU_CAPABILITY_AVX512)
    return {_mm512_cvtss_f32(mean), _mm512_cvtss_f32(m2), lanes.steps * C::kSize};
#else
    return {_mm256_cvtss_f32(mean), _mm256_cvtss_f32(m2), lanes.steps * C::kSize};
#endif
  }
#endif
  std::array<acc_t, C::kSize> lane_mean, lane_m2;
  for (int k = 0; k < C::kParts; ++k) {
    lanes.mean[k].store(lane_mean.data() + k * C::kLanes);
    lanes.m2[k].store(lane_m2.data() + k * C::kLanes);
  }
  for (int64_t width = C::kSize / 2; width >= 1; width /= 2) {
    for (int64_t l = 0; l < width; ++l) {
      math::welford_merge(lane_mean[l], lane_m2[l], lane_mean[l + width], lane_m2[l + width],
                          count, acc_t(0.5));
    }
    count *= 2;
  }
  return {lane_mean[0], lane_m2[0], lanes.steps * C::kSize};
}

// Chunks [first, first + chunks) of a row in blocks of kSteps chunks,
// `block(first_chunk, steps)` each, merged pairwise (the first half a whole number of
// blocks): no sum has more than ceil(log2(blocks)) merges behind it. Recursive rather
// than a stack of pending blocks: that stack's 64 vectors-holding entries were zeroed
// (Vectorized's constructor) on every row. The callers take a row of one block inline
// (the common case). Block: a merge().
template <int64_t kSteps, typename Block, typename BlockFn>
Block cascade_blocks(int64_t first, int64_t chunks, const BlockFn& block) {
  if (chunks <= kSteps) return block(first, chunks);
  const int64_t left = (at::ceil_div(chunks, kSteps) + 1) / 2 * kSteps;
  Block sum = cascade_blocks<kSteps, Block>(first, left, block);
  sum.merge(cascade_blocks<kSteps, Block>(first + left, chunks - left, block));
  return sum;
}

// Per-lane moments of the first `chunks` > 0 whole chunks of a row, less `shift` (kShifted):
// blocks of kBlockSteps chunks merged in a cascade.
template <bool kShifted, typename T>
C10_ALWAYS_INLINE LaneMoments<T> whole_chunk_moments(const T* x, int64_t chunks,
                                                     typename Chunk<T>::acc_t shift) {
  const auto block = [&](int64_t first, int64_t steps) {
    return block_moments<kShifted>(x + first * Chunk<T>::kSize, steps, shift);
  };
  return chunks <= kBlockSteps ? block(0, chunks)
                               : cascade_blocks<kBlockSteps, LaneMoments<T>>(0, chunks, block);
}

// A row's moments from those of its whole chunks (`whole`, of the values less `shift`),
// with its partial chunk's combined in; the mean shifted back.
template <typename T>
C10_ALWAYS_INLINE math::WelfordState<at::opmath_type<T>> with_partial_chunk(
    math::WelfordState<at::opmath_type<T>> whole, const T* x, int64_t n,
    at::opmath_type<T> shift) {
  using C = Chunk<T>;
  using acc_t = at::opmath_type<T>;
  const int64_t j = n / C::kSize * C::kSize;  // start of the partial chunk
  if (j < n) {
    auto v = C::load(x + j, n - j);
    for (auto& part : v) part = part - typename C::Vec(shift);
    whole = math::welford_combine(
        whole, partial_chunk_moments<T>(v, n - j, static_cast<acc_t>(x[j]) - shift));
  }
  whole.mean = shift + whole.mean;
  return whole;
}

// The moments of a row of n >= kSize values at x, taken less `shift`: the second pass of
// a row whose first shift was poor (math::needs_reshift), less its mean from the first.
// Out of line, and the functions it shares with forward_rows' common path
// (whole_chunk_moments, with_partial_chunk, partial_chunk_moments) always inline: with
// this second caller, gcc called them out of line there, which cost 8-19% of the
// cache-resident float32 forwards of 4096x32 and 4096x40 (one core).
template <typename T>
C10_NOINLINE math::WelfordState<at::opmath_type<T>> row_moments_less(const T* x, int64_t n,
                                                                    at::opmath_type<T> shift) {
  using C = Chunk<T>;
  const auto lanes = whole_chunk_moments<true>(x, n / C::kSize, shift);
  return with_partial_chunk<T>(merge_lanes<T>(lanes), x, n, shift);
}

// The mean and variance of a row, given its fast moments `fast`, rescued from overflow
// where they need it (math::rescued_if_needed). Scalar: such rows are rare. Welford's
// update within blocks of kRescueBlock elements, the blocks combined by Chan's formula:
// one sequential update over a whole long row loses accuracy (4e-5 of rstd at 20000
// float32 elements), blocks keep it near the fast path's.
constexpr int64_t kRescueBlock = 256;

template <typename T>
math::MeanVariance<at::opmath_type<T>> without_overflow(
    const math::WelfordState<at::opmath_type<T>>& fast, const T* x, int64_t n) {
  using acc_t = at::opmath_type<T>;
  if (!math::overflowed(fast)) return {fast.mean, math::variance(fast)};
  math::WelfordState<acc_t> scaled{acc_t(0), acc_t(0), 0};
  for (int64_t begin = 0; begin < n; begin += kRescueBlock) {
    math::WelfordState<acc_t> block{acc_t(0), acc_t(0), 0};
    for (int64_t i = begin; i < std::min(n, begin + kRescueBlock); ++i) {
      block = math::welford_update(block, math::rescue_scaled(static_cast<acc_t>(x[i])));
    }
    scaled = math::welford_combine(scaled, block);
  }
  return math::rescued_if_needed(fast, scaled);
}

// Sum of squares of `steps` whole chunks from x, per lane: two sums, over the even and
// the odd chunks (two dependency chains, as in block_moments), added at the end. A
// function of its own so the running sums stay in registers.
template <typename T>
typename Chunk<T>::Parts block_sum_squares(const T* x, int64_t steps) {
  using C = Chunk<T>;
  using Vec = typename C::Vec;
  typename C::Parts even_sum{Vec(0), Vec(0)}, odd_sum{Vec(0), Vec(0)};
  for (int64_t step = 0; step + 1 < steps; step += 2, x += 2 * C::kSize) {
    const auto even = C::load_unordered(x);
    const auto odd = C::load_unordered(x + C::kSize);
    for (int k = 0; k < C::kParts; ++k) {
      even_sum[k] = at::vec::fmadd(even[k], even[k], even_sum[k]);
      odd_sum[k] = at::vec::fmadd(odd[k], odd[k], odd_sum[k]);
    }
  }
  if (steps % 2 == 1) {
    const auto last = C::load_unordered(x);
    for (int k = 0; k < C::kParts; ++k) even_sum[k] = at::vec::fmadd(last[k], last[k], even_sum[k]);
  }
  for (int k = 0; k < C::kParts; ++k) even_sum[k] = even_sum[k] + odd_sum[k];
  return even_sum;
}

// Per-lane sums of squares of whole chunks, for cascade_blocks.
template <typename T>
struct LaneSums {
  typename Chunk<T>::Parts sum;

  void merge(const LaneSums& other) {
    for (int k = 0; k < Chunk<T>::kParts; ++k) sum[k] = sum[k] + other.sum[k];
  }
};

// Chunks of a row whose squares a lane adds in two chains (block_sum_squares): sums of
// like-signed terms round the same way step after step, so a chain's error grows with
// its length. Blocks of kBlockSteps chunks (64-term chains) added into a running total
// gave rstd of a constant float32 row a relative error of 4.3e-7 at N = 4099 (AVX-512)
// and 2.7e-6 at N = 2^22 + 5 (torch's composite rms_norm: 6e-8 and 1.4e-7); these
// blocks, merged pairwise, 1.4e-7 at both.
constexpr int64_t kSquareBlockSteps = 64;

// mean(x^2) of one row, RMSNorm's statistic: per-lane sums over blocks of
// kSquareBlockSteps chunks merged in a cascade, then the lanes added pairwise; the
// partial chunk's lanes past its end load as zero.
template <typename T>
at::opmath_type<T> row_mean_square(const T* x, int64_t n) {
  using C = Chunk<T>;
  using Vec = typename C::Vec;
  const int64_t chunks = n / C::kSize;
  const auto block = [&](int64_t first, int64_t steps) {
    return LaneSums<T>{block_sum_squares(x + first * C::kSize, steps)};
  };
  // (No chunks: block_sum_squares's zeros.)
  auto total = chunks <= kSquareBlockSteps
                   ? block(0, chunks).sum
                   : cascade_blocks<kSquareBlockSteps, LaneSums<T>>(0, chunks, block).sum;
  const int64_t rest = n - chunks * C::kSize;
  if (rest > 0) {
    const auto v = C::load(x + chunks * C::kSize, rest);
    for (int k = 0; k < C::kParts; ++k) total[k] = at::vec::fmadd(v[k], v[k], total[k]);
  }
  const auto add = [](Vec a, Vec b) { return a + b; };
  return at::vec::vec_reduce_all(add, total[0] + total[1]) / static_cast<at::opmath_type<T>>(n);
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace layernorm_ext::cpu
