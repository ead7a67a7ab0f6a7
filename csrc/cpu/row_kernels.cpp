// The CPU row kernels; see row_kernels.h for how this file is built once per ISA.
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
#include <cstdint>
#include <functional>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#define LN_HAVE_STREAM_STORES 1
#endif

#include "../layernorm_math.h"
#include "row_kernels.h"

#define LN_CONCAT_(a, b) a##b
#define LN_CONCAT(a, b) LN_CONCAT_(a, b)

namespace layernorm_ext::cpu {
inline namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Non-temporal store of one whole vector to an address aligned to its size. For outputs
// larger than the last-level cache this skips the read-for-ownership of every output
// line: a third of the forward's DRAM traffic.
template <typename V>
void stream_store(void* p, const V& v) {
#if defined(CPU_CAPABILITY_AVX512)
  using S = typename V::value_type;
  if constexpr (std::is_same_v<S, float>) _mm512_stream_ps(static_cast<float*>(p), v);
  else if constexpr (std::is_same_v<S, double>) _mm512_stream_pd(static_cast<double*>(p), v);
  else _mm512_stream_si512(static_cast<__m512i*>(p), v);  // packed half/bf16
#elif defined(CPU_CAPABILITY_AVX2)
  using S = typename V::value_type;
  if constexpr (std::is_same_v<S, float>) _mm256_stream_ps(static_cast<float*>(p), v);
  else if constexpr (std::is_same_v<S, double>) _mm256_stream_pd(static_cast<double*>(p), v);
  else _mm256_stream_si256(static_cast<__m256i*>(p), v);
#else
  v.store(p);
#endif
}

// Orders the non-temporal stores before whatever the calling thread does next.
inline void stream_fence() {
#ifdef LN_HAVE_STREAM_STORES
  _mm_sfence();
#endif
}

#if defined(CPU_CAPABILITY_AVX512)
// setup.py compiles this object with -mavx512bf16 too; its instructions run only on
// CPUs that have them: kernel_table_AVX512() (reached only on AVX-512 CPUs) sets this
// flag before any kernel runs. GCC emits them only for the intrinsic below.
bool has_avx512_bf16 = false;
#endif

// Packs two float vectors into one vector of half/bf16. bf16 on CPUs with AVX512-BF16:
// one vcvtne2ps2bf16 (round to nearest even, as torch's conversion) instead of ~16
// integer instructions, the largest cost of a bf16 forward. That instruction flushes
// denormal floats to zero, so a chunk holding one takes torch's conversion. (NaN
// keeps its sign there and becomes 0x7FC0-like, where torch's vector conversion
// writes 0xFFFF: still NaN, other bits.)
template <typename T>
Vectorized<T> pack_reduced(const Vectorized<float>& lo, const Vectorized<float>& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    constexpr int kDenormal = 0x20;  // vfpclassps category
    if (has_avx512_bf16 &&
        (_mm512_fpclass_ps_mask(lo, kDenormal) | _mm512_fpclass_ps_mask(hi, kDenormal)) == 0) {
      return Vectorized<T>((__m512i)_mm512_cvtne2ps_pbh(hi, lo));  // lo -> lanes 0..15
    }
  }
#endif
  return at::vec::convert_from_float<T>(lo, hi);
}

// Elements of T moved kParts accumulation-type vectors at a time. For half/bf16 that
// is exactly one Vectorized<T>; for float/double, two vectors give two independent
// dependency chains in the reductions.
template <typename T>
struct Chunk {
  using acc_t = at::opmath_type<T>;
  using Vec = Vectorized<acc_t>;
  static constexpr int kParts = 2;
  static constexpr int64_t kLanes = Vec::size();
  static constexpr int64_t kSize = kParts * kLanes;
  static constexpr bool kReduced = !std::is_same_v<T, acc_t>;
  using Parts = std::array<Vec, kParts>;

  static_assert(!kReduced || Vectorized<T>::size() == kSize);

  // Loads n <= kSize elements; the lanes past n are zero.
  static Parts load(const T* p, int64_t n = kSize) {
    if constexpr (kReduced) {
      const auto raw = n == kSize ? Vectorized<T>::loadu(p) : Vectorized<T>::loadu(p, n);
      auto [lo, hi] = at::vec::convert_to_float<T>(raw);
      return {lo, hi};
    } else {
      if (n == kSize) return {Vec::loadu(p), Vec::loadu(p + kLanes)};
      return {Vec::loadu(p, std::min(n, kLanes)),
              n > kLanes ? Vec::loadu(p + kLanes, n - kLanes) : Vec(0)};
    }
  }
  // Loads a whole chunk for a reduction, where the order of the elements over the lanes
  // does not matter. bf16 widens each 32-bit lane's two halves in place (one shift, one
  // mask) instead of in order (five instructions): the even elements go to part 0, the
  // odd ones to part 1.
  static Parts load_unordered(const T* p) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
#if defined(CPU_CAPABILITY_AVX512)
      const __m512i raw = Vectorized<T>::loadu(p);
      return {_mm512_castsi512_ps(_mm512_slli_epi32(raw, 16)),
              _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(0xffff0000)))};
#elif defined(CPU_CAPABILITY_AVX2)
      const __m256i raw = Vectorized<T>::loadu(p);
      return {_mm256_castsi256_ps(_mm256_slli_epi32(raw, 16)),
              _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(0xffff0000)))};
#endif
    }
    return load(p);
  }
  // Loads a parameter chunk, or `fill` everywhere when the parameter is absent.
  static Parts load_or(const T* p, int64_t n, acc_t fill) {
    return p ? load(p, n) : Parts{Vec(fill), Vec(fill)};
  }
  // Stores kSize elements with non-temporal stores; p as can_stream() requires.
  static void store_stream(T* p, const Parts& v) {
    if constexpr (kReduced) {
      stream_store(p, pack_reduced<T>(v[0], v[1]));
    } else {
      stream_store(p, v[0]);
      stream_store(p + kLanes, v[1]);
    }
  }
  // Stores the first n <= kSize elements; streams whole chunks when `stream`.
  static void store_row(T* p, const Parts& v, int64_t n, bool stream) {
    stream && n == kSize ? store_stream(p, v) : store(p, v, n);
  }
  // Stores the first n <= kSize elements.
  static void store(T* p, const Parts& v, int64_t n = kSize) {
    if constexpr (kReduced) {
      const auto packed = pack_reduced<T>(v[0], v[1]);
      n == kSize ? packed.store(p) : packed.store(p, n);
    } else if (n == kSize) {
      v[0].store(p);
      v[1].store(p + kLanes);
    } else {
      v[0].store(p, std::min(n, kLanes));
      if (n > kLanes) v[1].store(p + kLanes, n - kLanes);
    }
  }
};

// Prefetches a chunk into L2 (one prefetch per 64-byte line).
template <typename T>
inline void prefetch_chunk(const T* p) {
  constexpr int64_t kLineElems = 64 / sizeof(T);
  for (int64_t e = 0; e < Chunk<T>::kSize; e += kLineElems) __builtin_prefetch(p + e, 0, 2);
}

// Prefetches a row of at most one chunk (128 bytes: up to three lines) into L2. The
// short-row paths call it a fixed distance ahead (kShortRowsAhead bytes of rows).
template <typename T>
inline void prefetch_short_row(const T* row, int64_t cols) {
  __builtin_prefetch(row, 0, 2);
  __builtin_prefetch(row + cols / 2, 0, 2);
  __builtin_prefetch(row + cols - 1, 0, 2);
}
constexpr int64_t kShortRowsAhead = 2048;

// Whether a row's whole chunks may be streamed: the ISA has stream stores, a chunk is
// a whole number of 64-byte cache lines, and the row starts on a line. Every streamed
// chunk then fills whole lines; a partly written line waits in a write-combining
// buffer, and the backward has a whole group of rows' lines open at once.
template <typename T>
bool can_stream(const T* row) {
#ifdef LN_HAVE_STREAM_STORES
  constexpr uintptr_t kLine = 64;
  if constexpr (Chunk<T>::kSize * sizeof(T) % kLine != 0) return false;  // e.g. AVX2 bf16
  return reinterpret_cast<uintptr_t>(row) % kLine == 0;
#else
  (void)row;
  return false;
#endif
}

// A weight or bias row as acc_t values. half/bf16 parameters are converted once per
// call of a row kernel (one task, >= kElementsPerTask elements), not once per row: in
// the row loops their conversion costs as many vector instructions as the input's.
template <typename P>
class AccParam {
 public:
  using acc_t = at::opmath_type<P>;  // also the input's: see KernelTable's pairs
  AccParam(const P* param, int64_t n) {
    if constexpr (std::is_same_v<P, acc_t>) {
      data_ = param;
    } else if (param != nullptr) {
      buffer_.resize(n);
      using PC = Chunk<P>;
      for (int64_t j = 0; j < n; j += PC::kSize) {
        const int64_t len = std::min(PC::kSize, n - j);
        Chunk<acc_t>::store(buffer_.data() + j, PC::load(param + j, len), len);
      }
      data_ = buffer_.data();
    }
  }
  // The parameter from element j on, or null when it is absent.
  const acc_t* from(int64_t j) const { return data_ ? data_ + j : nullptr; }

 private:
  std::vector<acc_t> buffer_;
  const acc_t* data_ = nullptr;
};

// Calls body(j, n) for each chunk [j, j + n) of a row of `cols` elements: the whole
// chunks with n a compile-time kSize (no length checks in the loads and stores of the
// hot loop), then the partial chunk, if any, with its run-time length.
template <typename T, typename Body>
inline void for_each_chunk(int64_t cols, const Body& body) {
  constexpr int64_t kSize = Chunk<T>::kSize;
  int64_t j = 0;
  for (; j + kSize <= cols; j += kSize) body(j, std::integral_constant<int64_t, kSize>{});
  if (j < cols) body(j, cols - j);
}

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

// The moments of a row, in three steps (forward_rows):
// - Whole chunks (whole_chunk_moments): Welford per lane in blocks of kBlockSteps chunks
//   (one reciprocal serves all lanes), blocks merged in a cascade.
// - The lanes merged pairwise (merge_lanes, or merge_lanes_of_rows for a group); equal
//   counts there, so every merge has share 1/2 and no division.
// - The last partial chunk (with_partial_chunk): exact moments from two masked vector
//   passes, shifted by its first element (exact for constant data, no overflow near the
//   dtype's max), merged with Chan's combine.

// Welford per lane over `steps` whole chunks from x: one reciprocal serves all lanes.
// Two runs, over the even and the odd chunks, merged at the end: each run's mean is a
// chain of dependent sub + fma per chunk, and a single run kept the core waiting on it
// (the bf16 forward's statistics pass ran at half speed). A function of its own so the
// running moments stay in registers.
template <typename T>
LaneMoments<T> block_moments(const T* x, int64_t steps) {
  using C = Chunk<T>;
  using acc_t = typename C::acc_t;
  using Vec = typename C::Vec;
  typename C::Parts mean_even{Vec(0), Vec(0)}, m2_even{Vec(0), Vec(0)};
  typename C::Parts mean_odd{Vec(0), Vec(0)}, m2_odd{Vec(0), Vec(0)};
  const int64_t pairs = steps / 2;
  for (int64_t step = 1; step <= pairs; ++step, x += 2 * C::kSize) {
    const auto even = C::load_unordered(x);
    const auto odd = C::load_unordered(x + C::kSize);
    const acc_t inv_step = acc_t(1) / static_cast<acc_t>(step);
    for (int k = 0; k < C::kParts; ++k) {
      math::welford_step(mean_even[k], m2_even[k], even[k], inv_step);
      math::welford_step(mean_odd[k], m2_odd[k], odd[k], inv_step);
    }
  }
  LaneMoments<T> moments{mean_even, m2_even, pairs};
  if (steps % 2 == 1) {  // the last chunk joins the even run
    const auto last = C::load_unordered(x);
    const acc_t inv_step = acc_t(1) / static_cast<acc_t>(pairs + 1);
    for (int k = 0; k < C::kParts; ++k) {
      math::welford_step(moments.mean[k], moments.m2[k], last[k], inv_step);
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
math::WelfordState<at::opmath_type<T>> partial_chunk_moments(const typename Chunk<T>::Parts& v,
                                                            int64_t rest,
                                                            at::opmath_type<T> shift) {
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

// Per-lane moments of the first `chunks` > 0 whole chunks of a row: blocks of
// kBlockSteps chunks merged in a cascade.
template <typename T>
LaneMoments<T> whole_chunk_moments(const T* x, int64_t chunks) {
  using C = Chunk<T>;
  using Moments = LaneMoments<T>;
  Moments lanes = block_moments(x, std::min(chunks, kBlockSteps));
  if (chunks > kBlockSteps) {
    // cascade[d] holds a pending block; counts strictly decrease with d.
    std::array<Moments, 64> cascade;
    cascade[0] = lanes;
    int depth = 1;
    for (int64_t done = kBlockSteps; done < chunks; done += kBlockSteps) {
      cascade[depth++] =
          block_moments(x + done * C::kSize, std::min(kBlockSteps, chunks - done));
      while (depth >= 2 && cascade[depth - 2].steps == cascade[depth - 1].steps) {
        cascade[depth - 2].merge(cascade[depth - 1]);
        --depth;
      }
    }
    for (int d = depth - 1; d >= 1; --d) cascade[d - 1].merge(cascade[d]);
    lanes = cascade[0];
  }
  return lanes;
}

// A row's moments from those of its whole chunks (`whole`), with its partial chunk's
// combined in.
template <typename T>
math::WelfordState<at::opmath_type<T>> with_partial_chunk(
    math::WelfordState<at::opmath_type<T>> whole, const T* x, int64_t n) {
  using C = Chunk<T>;
  const int64_t j = n / C::kSize * C::kSize;  // start of the partial chunk
  if (j == n) return whole;
  const auto v = C::load(x + j, n - j);
  return math::welford_combine(
      whole, partial_chunk_moments<T>(v, n - j, static_cast<at::opmath_type<T>>(x[j])));
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

// mean(x^2) of one row, RMSNorm's statistic. Per-lane sums over blocks of kBlockSteps
// chunks, added block by block into a running total (so no lane adds more than
// kBlockSteps terms to a large partial sum), then the lanes added pairwise; the
// partial chunk's lanes past its end load as zero.
template <typename T>
at::opmath_type<T> row_mean_square(const T* x, int64_t n) {
  using C = Chunk<T>;
  using Vec = typename C::Vec;
  const int64_t chunks = n / C::kSize;
  typename C::Parts total{Vec(0), Vec(0)};
  for (int64_t done = 0; done < chunks; done += kBlockSteps) {
    const auto block = block_sum_squares(x + done * C::kSize, std::min(kBlockSteps, chunks - done));
    for (int k = 0; k < C::kParts; ++k) total[k] = total[k] + block[k];
  }
  const int64_t rest = n - chunks * C::kSize;
  if (rest > 0) {
    const auto v = C::load(x + chunks * C::kSize, rest);
    for (int k = 0; k < C::kParts; ++k) total[k] = at::vec::fmadd(v[k], v[k], total[k]);
  }
  const auto add = [](Vec a, Vec b) { return a + b; };
  return at::vec::vec_reduce_all(add, total[0] + total[1]) / static_cast<at::opmath_type<T>>(n);
}

// The forward goes through rows in groups of up to kGroupRows (and kGroupBytes of
// input): first the statistics of every row of the group, then their outputs, the rows
// still in L1. A row's statistics are one long dependency chain (lane merges, square
// root, division); rows of a group do not depend on each other, so the core overlaps
// their chains. 1966080x128 bf16, 2 threads: 51% -> 63% of the copy roof.
constexpr int64_t kGroupRows = 16;
constexpr int64_t kGroupBytes = 16 << 10;

// Rows per group for rows of `cols` elements of T (the backward groups rows the same way).
template <typename T>
int64_t group_rows_for(int64_t cols) {
  return std::clamp<int64_t>(kGroupBytes / std::max<int64_t>(1, cols * int64_t(sizeof(T))), 1,
                             kGroupRows);
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
  using acc_t = at::opmath_type<T>;
#if defined(CPU_CAPABILITY_AVX512)
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

// All-ones lanes where both a and b are finite (x - x is 0 for finite x, NaN otherwise).
template <typename Vec>
Vec both_finite(const Vec& a, const Vec& b) {
  return ((a - a) == Vec(0)) & ((b - b) == Vec(0));
}

// Forward of rows shorter than one chunk (D < Chunk<T>::kSize), a group of rows at a
// time: their statistics as vectors of rows (lane_sums, RowColumn), then their outputs
// (on AVX-512, whole groups from contiguous vectors: GroupLayout). LayerNorm's moments
// are shifted by each row's first element x0 (exact for constant rows): mean = x0 +
// sum(x - x0) / n, then
// - float/double input: m2 = sum((x - mean)^2), a second pass over the rows;
// - half/bf16 input: m2 = sum((x - x0)^2) - sum(x - x0) * (mean - x0), from the same
//   pass (838861x20 bf16: 1.3x). With x0 in the row, sum((x - x0)^2) <= n * m2
//   (Samuelson's inequality), so the subtraction cancels at most log2(n) < 5 bits: m2
//   keeps some 16 of float's 24 bits, where the output has 8 (bf16) or 11 (half).
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
  std::array<Vec, kGroupRows> terms, squares;
  alignas(64) std::array<acc_t, kGroupRows> shifts{}, means{}, row_stats{};
  const Vec n_v(static_cast<acc_t>(N));
  for (int64_t first = begin; first < end; first += kGroupRows) {
    const int64_t rows = std::min(kGroupRows, end - first);
    const auto row_x = [&](int64_t r) { return a.x + (first + r) * N; };
    for (int64_t r = 0; r < rows; ++r) {
      if (first + r + ahead < end) prefetch_short_row(row_x(r) + ahead * N, N);
      const auto v = C::load(row_x(r), N);
      if constexpr (kNorm == Norm::kRms) {
        terms[r] = Vec(0);  // no mask: the lanes past N load as zero
        for (int k = 0; k < C::kParts; ++k) terms[r] = terms[r] + v[k] * v[k];
      } else {
        shifts[r] = static_cast<acc_t>(row_x(r)[0]);
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
    for (int64_t r = 0; r < rows; ++r) {
      const Vec center = centers.broadcast(r), rstd = rstds.broadcast(r);
      typename C::Parts yv;
      const auto xv = C::load(row_x(r), N);
      for (int k = 0; k < C::kParts; ++k) {
        yv[k] = math::affine<kNorm>(math::normalize<kNorm>(xv[k], center, rstd), wv[k], bv[k]);
      }
      C::store_row(a.y + (first + r) * N, yv, N, false);  // N < kSize: no whole chunk to stream
    }
  }
  if (a.stream_output) stream_fence();
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
  const int64_t group_rows = group_rows_for<T>(N);
  // stats: the variance (LayerNorm), mean(x^2) (RMSNorm)
  alignas(64) std::array<acc_t, kGroupRows> means{}, stats{};
  std::array<LaneMoments<T>, kGroupRows> lanes;
  const int64_t chunks = N / C::kSize;
  for (int64_t first = begin; first < end; first += group_rows) {
    const int64_t rows = std::min(group_rows, end - first);
    if constexpr (kNorm == Norm::kRms) {
      for (int64_t r = 0; r < rows; ++r) stats[r] = row_mean_square(a.x + (first + r) * N, N);
    } else {
      // Per-lane moments of every row's whole chunks (N >= kSize here, or 0), their
      // lanes merged for the whole group, then each row's partial chunk.
      if (chunks > 0) {
        for (int64_t r = 0; r < rows; ++r) lanes[r] = whole_chunk_moments(a.x + (first + r) * N, chunks);
        merge_lanes_of_rows(lanes, rows, means.data(), stats.data());
      } else {
        means.fill(acc_t(0)), stats.fill(acc_t(0));
      }
      for (int64_t r = 0; r < rows; ++r) {
        const T* x = a.x + (first + r) * N;
        const math::WelfordState<acc_t> whole{means[r], stats[r], chunks * C::kSize};
        const auto row = without_overflow(with_partial_chunk(whole, x, N), x, N);
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
    const bool prefetch = first + rows < end;
    for (int64_t r = 0; r < rows; ++r) {
      const T* x = a.x + (first + r) * N;
      T* y = a.y + (first + r) * N;
      const Vec rstd_v = rstds.broadcast(r);
      const Vec mean_v(math::normalize_center(means[r], first_lane(rstd_v)));
      const bool stream = a.stream_output && can_stream(y);
      for_each_chunk<T>(N, [&](int64_t j, auto n) {
        if (prefetch) prefetch_chunk(x + rows * N + j);
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
  }
  if (a.stream_output) stream_fence();
}

// One chunk of the backward, shared by both row paths below. Pass 1 adds the chunk's
// g = dy * w and g * xhat to the row sums (zero-filled tail lanes have g = 0).
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
  std::array<Vec, kGroupRows> g_terms, g_xhat_terms;
  for (int64_t first = begin; first < end; first += kGroupRows) {
    const int64_t rows = std::min(kGroupRows, end - first);
    const int64_t offset = first * N;
    const auto rstds = RowColumn<acc_t>::load(a.rstd + first, rows);
    const auto centers = kNorm == Norm::kRms
                             ? RowColumn<acc_t>::zeros()
                             : centers_of_rows(RowColumn<acc_t>::load(a.mean + first, rows), rstds);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = first + r;
      if (row + ahead < end) {
        prefetch_short_row(a.dy + (row + ahead) * N, N);
        prefetch_short_row(a.x + (row + ahead) * N, N);
      }
      // lanes past N are zero, so g = 0 there
      const auto dyv = C::load(a.dy + row * N, N);
      const auto xv = C::load(a.x + row * N, N);
      g_terms[r] = Vec(0), g_xhat_terms[r] = Vec(0);
      add_row_sums<kNorm>(dyv, xv, wv, centers.broadcast(r), rstds.broadcast(r), g_terms[r],
                          g_xhat_terms[r]);
    }
    const auto mean_gs = lane_sums(g_terms, rows).map([&](const Vec& sum) { return sum / n_v; });
    const auto mean_g_xhats =
        lane_sums(g_xhat_terms, rows).map([&](const Vec& sum) { return sum / n_v; });
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kContiguous) {
      if (rows == kGroupRows) {
        contiguous_used = true;
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
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = first + r;
      typename C::Parts dxv;
      chunk_grads<kNorm>(C::load(a.dy + row * N, N), C::load(a.x + row * N, N), wv,
                         centers.broadcast(r), rstds.broadcast(r), mean_gs.broadcast(r),
                         mean_g_xhats.broadcast(r), dxv, dgv, dbv);
      T* dx = a.dx + row * N;
      C::store_row(dx, dxv, N, a.stream_output && can_stream(dx));
    }
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
  if (a.stream_output) stream_fence();
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
  const int64_t group_rows = group_rows_for<T>(N);
  std::array<acc_t, kGroupRows> centers, rstds, mean_gs, mean_g_xhats;
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
        const auto xv = C::load(x + j, n);
        const auto wv = AC::load_or(weight.from(j), n, acc_t(1));
        add_row_sums<kNorm>(dyv, xv, wv, mean_v, rstd_v, sum_g, sum_g_xhat);
      });
      mean_gs[r] = at::vec::vec_reduce_all(add, sum_g) / static_cast<acc_t>(N);
      mean_g_xhats[r] = at::vec::vec_reduce_all(add, sum_g_xhat) / static_cast<acc_t>(N);
    }

    // Pass 2, rows in cache: dx, and the dgamma/dbeta terms. The next group is
    // prefetched as in forward_rows, but only for rows of at least 512 bytes: for
    // shorter ones it made the backward slower (131072x128 bf16 on a Zen 4, A/B in one
    // process: 1.2-1.8x the time without), where for longer ones it gains 10-25%.
    const bool prefetch = first + rows < end && N * int64_t(sizeof(T)) >= 512;
    for_each_chunk<T>(N, [&](int64_t j, auto n) {
      const auto wv = AC::load_or(weight.from(j), n, acc_t(1));
      auto dgv = AC::load(dgamma + j, n);
      typename AC::Parts dbv;
      if constexpr (kNorm == Norm::kLayer) dbv = AC::load(dbeta + j, n);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t offset = (first + r) * N + j;
        if (prefetch) {  // the next group's rows, as in forward_rows
          prefetch_chunk(a.dy + offset + rows * N);
          prefetch_chunk(a.x + offset + rows * N);
        }
        typename C::Parts dxv;
        chunk_grads<kNorm>(C::load(a.dy + offset, n), C::load(a.x + offset, n), wv,
                           Vec(centers[r]), Vec(rstds[r]), Vec(mean_gs[r]), Vec(mean_g_xhats[r]),
                           dxv, dgv, dbv);
        C::store_row(a.dx + offset, dxv, n, a.stream_output && can_stream(a.dx + offset));
      }
      AC::store(dgamma + j, dgv, n);
      if constexpr (kNorm == Norm::kLayer) AC::store(dbeta + j, dbv, n);
    });
  }
  if (a.stream_output) stream_fence();
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
