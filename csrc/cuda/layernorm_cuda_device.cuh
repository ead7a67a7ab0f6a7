// Building blocks of the CUDA kernels (layernorm_cuda_forward.cuh,
// layernorm_cuda_backward.cuh): parameter reads, the reductions a row needs (Welford
// moments, sums) and their scaling against overflow, the kernels' arguments (filled by
// the host launch, layernorm_cuda_kernels.cuh), and the writes of y that both forwards
// share. Memory access (vectors, tiles, copies): layernorm_cuda_memory.cuh.
#pragma once

#include <ATen/OpMathType.h>

#include <type_traits>

#include "../layernorm_math.h"
#include "layernorm_cuda_config.h"
#include "layernorm_cuda_indexing.h"
#include "layernorm_cuda_memory.cuh"

namespace layernorm_ext {
namespace cuda_kernels {

using cuda_indexing::RowSplit;

// The parameter gradients a norm has: dgamma and dbeta (LayerNorm), dgamma (RMSNorm).
// Also the number of partial rows per backward slot.
template <Norm kNorm>
constexpr int kParamGrads = kNorm == Norm::kLayer ? 2 : 1;

constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------
// Parameter reads

// A weight or bias: absent (nullptr, read as `fill`), or a pointer whose first element
// is `misalign` elements past a 16-byte boundary.
template <typename P>
struct ParamRef {
  const P* ptr;
  int misalign;

  // Whether the columns `head`, `head + vec`, ... of a row split start 16-byte vectors.
  __device__ __forceinline__ bool vectors_at(int64_t head) const {
    return (misalign + head) % kVecOf<P> == 0;
  }
  // The same, and the parameter is present: load_param<true> may read it.
  __device__ __forceinline__ bool present_vectors_at(int64_t head) const {
    return ptr != nullptr && vectors_at(head);
  }
};

// Calls f(std::true_type{}) when `vectors` (every parameter the loop in f reads is
// present and starts a vector wherever the rows' vectors start: the usual case), else
// f(std::false_type{}). f passes the type on as load_param's kVectors: one branch, taken
// the same way by every thread (rows_split_alike), instead of a fallback in every
// vector's code. (Left to decide per vector, nvcc 13.0 predicated every way into the
// bf16 forward: a 16-byte load, 8 two-byte ones, their conversions and the fills for an
// absent parameter, all issued whichever applied.) kTwoCopies = false: f(std::false_type{})
// alone, for kernels where a second copy of the loop costs registers they lack. The
// backward's weight reads; the forwards choose among more copies (with_param_reads).
template <bool kTwoCopies = true, typename F>
__device__ __forceinline__ void with_param_vectors(bool vectors, F&& f) {
  if constexpr (!kTwoCopies) {
    (void)vectors;
    f(std::false_type{});
  } else if (vectors) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Parameter columns [col, col + kN) as acc_t. kVectors: the caller knows the parameter
// is present and starts a vector at col (present_vectors_at; `vector` and `fill` go
// unused). Else: `fill` if absent, vector loads if `vector`, else scalar loads.
template <bool kVectors = false, int kN, typename P, typename acc_t>
__device__ __forceinline__ void load_param(const ParamRef<P>& param, int64_t col, bool vector,
                                           acc_t fill, acc_t (&out)[kN]) {
  if constexpr (kVectors) {
    load_vector<kN>(param.ptr + col, out);
  } else if (param.ptr == nullptr) {
#pragma unroll
    for (int k = 0; k < kN; ++k) out[k] = fill;
  } else if (vector) {
    load_vector<kN>(param.ptr + col, out);
  } else {
#pragma unroll
    for (int k = 0; k < kN; ++k) out[k] = static_cast<acc_t>(param.ptr[col + k]);
  }
}

// How the writes of y read a parameter, fixed for a copy of their loop (with_param_reads):
// load_param's general reads, decided per vector; plain vector loads; or none, the
// parameter being absent (its fill).
enum class ParamRead { kGeneral, kVectors, kAbsent };

template <ParamRead kWeightRead, ParamRead kBiasRead>
struct ParamReads {
  static constexpr ParamRead kWeight = kWeightRead, kBias = kBiasRead;
};

template <ParamRead kRead, int kN, typename P, typename acc_t>
__device__ __forceinline__ void read_param(const ParamRef<P>& param, int64_t col, bool vector,
                                           acc_t fill, acc_t (&out)[kN]) {
  if constexpr (kRead == ParamRead::kAbsent) {
#pragma unroll
    for (int k = 0; k < kN; ++k) out[k] = fill;
  } else {
    load_param<kRead == ParamRead::kVectors>(param, col, vector, fill, out);
  }
}

template <typename P, typename acc_t>
__device__ __forceinline__ acc_t load_param(const ParamRef<P>& param, int64_t col, acc_t fill) {
  return param.ptr == nullptr ? fill : static_cast<acc_t>(param.ptr[col]);
}

// ---------------------------------------------------------------------------------------
// Reductions

template <typename acc_t>
using Welford = math::WelfordState<acc_t>;

template <typename acc_t>
struct SumPair {
  acc_t a, b;
};

// RMSNorm's row statistic: the sum of x^2.
template <typename acc_t>
struct RowSum {
  acc_t sum;
};

// What a forward reduces over a row: Welford moments (LayerNorm) or the sum of x^2.
template <Norm kNorm, typename acc_t>
using RowStats = std::conditional_t<kNorm == Norm::kLayer, Welford<acc_t>, RowSum<acc_t>>;

// The mean of `weight` values (a count, as a float), merged by the mean part of Chan's
// formula (math::merged_mean): the register forward's first reduction, before a plain
// sum of squared deviations from that mean. A side of weight 0 has mean 0, so merging it
// returns the other side's mean exactly.
template <typename acc_t>
struct WeightedMean {
  acc_t mean, weight;
};

struct WelfordCombine {
  template <typename acc_t>
  __device__ __forceinline__ Welford<acc_t> operator()(const Welford<acc_t>& x,
                                                       const Welford<acc_t>& y) const {
    return math::welford_combine(x, y);
  }
};

// y's share of the merged weight needs no exact rounding (equal means merge exactly
// whatever it is): on the GPU one approximate reciprocal of the weight (a count, never
// subnormal), where an IEEE division took ~10 instructions of a merge's ~26 (sm_90).
// The emulator divides exactly.
struct MeanCombine {
  template <typename acc_t>
  __device__ __forceinline__ WeightedMean<acc_t> operator()(const WeightedMean<acc_t>& x,
                                                            const WeightedMean<acc_t>& y) const {
    const acc_t weight = x.weight + y.weight;
    acc_t y_share = 0;
    if (weight > acc_t(0)) {
#if defined(__CUDA_ARCH__)
      if constexpr (std::is_same_v<acc_t, float>) {
        float inverse;
        asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(inverse) : "f"(weight));
        y_share = y.weight * inverse;
      } else {
        y_share = y.weight / weight;
      }
#else
      y_share = y.weight / weight;
#endif
    }
    return {math::merged_mean(x.mean, y.mean, y_share), weight};
  }
};

struct SumCombine {
  template <typename acc_t>
  __device__ __forceinline__ SumPair<acc_t> operator()(const SumPair<acc_t>& x,
                                                       const SumPair<acc_t>& y) const {
    return {x.a + y.a, x.b + y.b};
  }
  template <typename acc_t>
  __device__ __forceinline__ RowSum<acc_t> operator()(const RowSum<acc_t>& x,
                                                      const RowSum<acc_t>& y) const {
    return {x.sum + y.sum};
  }
};

template <typename acc_t, typename Op>
__device__ __forceinline__ Welford<acc_t> map_members(const Welford<acc_t>& s, Op op) {
  return {op(s.mean), op(s.m2), static_cast<int64_t>(op(static_cast<long long>(s.count)))};
}

template <typename acc_t, typename Op>
__device__ __forceinline__ WeightedMean<acc_t> map_members(const WeightedMean<acc_t>& s, Op op) {
  return {op(s.mean), op(s.weight)};
}

template <typename acc_t, typename Op>
__device__ __forceinline__ SumPair<acc_t> map_members(const SumPair<acc_t>& s, Op op) {
  return {op(s.a), op(s.b)};
}

template <typename acc_t, typename Op>
__device__ __forceinline__ RowSum<acc_t> map_members(const RowSum<acc_t>& s, Op op) {
  return {op(s.sum)};
}

// The CUDA side of the `lanes` interface of cuda_indexing::group_allreduce.
struct BlockLanes {
  __device__ __forceinline__ int thread() const { return threadIdx.x; }
  __device__ __forceinline__ int group() const { return threadIdx.y; }
  __device__ __forceinline__ int group_size() const { return blockDim.x; }
  __device__ __forceinline__ void sync() const { __syncthreads(); }

  template <typename S>
  __device__ __forceinline__ S shfl_down(const S& v, int offset, int width) const {
    return map_members(v, [=](auto m) { return __shfl_down_sync(kFullMask, m, offset, width); });
  }
  template <typename S>
  __device__ __forceinline__ S shfl(const S& v, int src, int width) const {
    return map_members(v, [=](auto m) { return __shfl_sync(kFullMask, m, src, width); });
  }
};

// Whether `flag` holds in any thread whose row group shares group_allreduce's shuffles
// or barriers with this thread's (register kernels, every thread of the block calls
// it): its warp where a group fits in one (a shuffle takes the whole warp, whatever
// groups it holds), the block where groups of several warps share one (barriers), else
// the group itself, the block's only one.
__device__ __forceinline__ bool any_sharing_reductions(bool flag) {
  if (blockDim.x <= cuda_config::kWarpSize) return __any_sync(kFullMask, flag);
  if (blockDim.y > 1) return __syncthreads_or(flag);
  return flag;
}

template <typename S, typename Combine>
__device__ __forceinline__ S group_allreduce(const S& value, const S& identity, Combine combine,
                                             S* scratch) {
  BlockLanes lanes;
  return cuda_indexing::group_allreduce(value, identity, combine, lanes, scratch);
}

// The forwards take LayerNorm's moments of x / kRescueFactor (math::rescue_scaled: a
// power of two, so exact but for subnormal results) and scale the mean and variance
// back at the end (math::rescue_unscaled). No partial sum, difference or merge can then
// overflow for finite x, even in rows spread over +-max: a thread sums at most 66 values
// (a 128-byte slice of a 2-byte dtype or a 256-byte one of float32, a head and a tail
// element), each at most max / 128. The scaling costs nothing: it folds into the fused
// multiply-adds.
static_assert(math::kRescueFactor >= cuda_config::kLargeSliceBytes / 2 + 2 &&
                  math::kRescueFactor >= cuda_config::kHugeSliceBytes / 4 + 2,
              "a thread's scaled partial sum of +-max values could overflow");
template <typename acc_t>
__device__ __forceinline__ acc_t scaled(acc_t x) {
  return x * math::rescue_scaled(acc_t(1));
}

// The two-pass moments below sum deviations from a shift, one of the values summed, and
// take mean = shift + sum / count: a constant row then sums zeros, so its mean is
// exactly its value and its M2 exactly 0, as with Welford's updates on the CPU. A plain
// sum / count may be an ulp off (0.1f summed four times), and rstd = 1 / sqrt(eps) made
// that ulp errors of 1e-4 to 4e-2 in y (float32, the register forwards, on an H200,
// 2026-12-04). The exactness holds but for rows of values so small that x / 128 or its
// half is subnormal (|x| < 2^-118 in float32), where the GPU's fused multiply-add may
// leave a deviation of one subnormal ulp.
//
// The register forwards shift by one of the row's first elements where most of them
// are near it (math::row_shift_value), which every thread of its group reads (a load
// instruction a warp each, with the slice's loads), else by 0, and sum half deviations,
// (scaled(x) - shift) / 2: two values of a row may differ by 2 max / 128, and halved
// each term stays within max / 128, as the static_assert above counts. The threads'
// means of half deviations are merged as such, and shifted back once: merged after the
// shift back, they rounded to the offset's ulps at every merge (a ramp 1000..1001 of 45
// floats: a mean 3 ulps off, 400x torch's error in y, on the emulator).
template <typename acc_t>
struct RowShift {
  acc_t half;  // scaled(x) / 2 of the shift

  __device__ __forceinline__ static RowShift at(acc_t x) { return {x * half_scale()}; }
  // The shift scaled(x) is (a row's scaled mean).
  __device__ __forceinline__ static RowShift of_scaled(acc_t scaled_x) {
    return {scaled_x / acc_t(2)};
  }
  __device__ __forceinline__ acc_t scaled() const { return acc_t(2) * half; }
  // One multiply-add; x * half_scale() is exact but for subnormal results.
  __device__ __forceinline__ acc_t half_deviation(acc_t x) const {
    return x * half_scale() - half;
  }
  __device__ __forceinline__ acc_t mean(acc_t mean_half_deviation) const {
    return acc_t(2) * (half + mean_half_deviation);
  }

 private:
  __device__ __forceinline__ static acc_t half_scale() {
    return math::rescue_scaled(acc_t(1)) / acc_t(2);
  }
};

// Moments of the kN values of one vector, scaled as above, less row_shift (a scaled
// math::row_shift_value): two-pass, the first pass shifted by the vector's first value
// (RowShift). Less the row's shift, the streaming forward's Chan merges of these means
// round to the spread's ulps, not the offset's (a ramp 1000..1001 of 16390 floats had 5x
// torch's error in y); with row_shift 0, the bits are those of the plain moments. (A
// plain sum / kN of equal values happens to be exact for the vector widths of today, 4
// floats or 8 two-byte values; of 8 floats it is not.)
template <int kN, typename acc_t>
__device__ __forceinline__ Welford<acc_t> scaled_vector_moments(const acc_t (&v)[kN],
                                                                acc_t row_shift) {
  const auto shift = RowShift<acc_t>::at(v[0]);
  acc_t sum = 0;  // of half deviations; the first value's is 0
#pragma unroll
  for (int k = 1; k < kN; ++k) sum += shift.half_deviation(v[k]);
  // shift.mean(sum / kN) - row_shift, with the shifts' difference taken first
  const acc_t mean = (scaled(v[0]) - row_shift) + acc_t(2) * (sum / static_cast<acc_t>(kN));
  acc_t m2 = 0;
#pragma unroll
  for (int k = 0; k < kN; ++k) {
    const acc_t d = (scaled(v[k]) - row_shift) - mean;
    m2 += d * d;
  }
  return {mean, m2, kN};
}

// A row's mean (0 for RMSNorm) and rstd from its threads' passes over their elements:
// the register forward's group of threads, or a staged row's thread alone.
// for_each_x(f) calls f(x) on each of the thread's elements (as acc_t); total(value,
// identity, combine) reduces a value over the row's threads and returns the row's;
// any_row(flag) is whether any row that shares those reductions has the flag (every
// thread of them calls it); shift is the row's math::row_shift_value (any value for
// RMSNorm).
//
// LayerNorm: two passes (all of scaled(x): see scaled() above), each a reduction over
// the row: the threads' means of half deviations (see RowShift) merged into the row's
// (MeanCombine), then the sum of squared deviations from it, each thread's times 1 / D (a
// weighted mean of values within max / 128: no partial sum overflows). A tree level
// costs ~15 instructions for the means and ~7 for the sum, where Chan's combine of the
// threads' moments took ~57 (a 64-bit count, its conversions, an IEEE division; sm_90
// SASS): in a short row most of a thread's instructions (float32 D = 128: 16 threads, 8
// elements each).
template <typename acc_t>
struct RowNormStats {
  acc_t mean, rstd;
};

template <Norm kNorm, typename acc_t, typename ForEachX, typename Total, typename AnyRow>
__device__ __forceinline__ RowNormStats<acc_t> row_norm_stats(acc_t shift_value, int64_t cols,
                                                              acc_t eps, ForEachX&& for_each_x,
                                                              Total&& total, AnyRow&& any_row) {
  if constexpr (kNorm == Norm::kRms) {
    // x^2 in two chains taken in turn (a swap, renaming in unrolled code): terms of one
    // sign round the same way step after step, and one chain of a thread's 64 squares
    // (float32 huge slices) gave a constant row's rstd a relative error of 4.3e-7 on the
    // emulator (D = 16383; torch's CPU rms_norm 6e-8). Four chains spilled there.
    acc_t sum = 0, other = 0;
    for_each_x([&](acc_t x) {
      const acc_t next = sum + x * x;
      sum = other, other = next;
    });
    sum += other;
    const RowSum<acc_t> row = total(RowSum<acc_t>{sum}, RowSum<acc_t>{0}, SumCombine{});
    return {acc_t(0), math::rstd_from_mean_square(row.sum / static_cast<acc_t>(cols), eps)};
  } else {
    // The row's scaled mean and variance, its values taken less `shift`.
    const auto scaled_moments = [&](const RowShift<acc_t>& shift) {
      acc_t sum = 0;  // of shift.half_deviation(x)
      int count = 0;
      for_each_x([&](acc_t x) {
        sum += shift.half_deviation(x);
        ++count;
      });
      const WeightedMean<acc_t> thread_mean{
          count > 0 ? sum / static_cast<acc_t>(count) : acc_t(0), static_cast<acc_t>(count)};
      // (A row of no elements: 0 + 0.)
      const acc_t scaled_mean =
          shift.mean(total(thread_mean, WeightedMean<acc_t>{0, 0}, MeanCombine{}).mean);
      acc_t m2 = 0;
      for_each_x([&](acc_t x) {
        const acc_t d = scaled(x) - scaled_mean;
        m2 += d * d;
      });
      const acc_t inv_cols = acc_t(1) / static_cast<acc_t>(cols);
      const acc_t scaled_var =
          total(RowSum<acc_t>{m2 * inv_cols}, RowSum<acc_t>{0}, SumCombine{}).sum;
      return math::MeanVariance<acc_t>{scaled_mean, scaled_var};
    };
    const RowShift<acc_t> shift = RowShift<acc_t>::at(shift_value);
    math::MeanVariance<acc_t> scaled_stats = scaled_moments(shift);
    // A row whose first elements misled its shift (math::needs_reshift) takes its
    // moments again, less its mean. The rows that share this one's reductions take the
    // second pass with it (any_row), and keep their first moments.
    const bool reshift = math::needs_reshift(scaled_stats.mean, scaled_stats.var, shift.scaled());
    if (any_row(reshift)) {
      const auto again = scaled_moments(RowShift<acc_t>::of_scaled(scaled_stats.mean));
      if (reshift) scaled_stats = again;
    }
    const auto stats = math::rescue_unscaled(scaled_stats);
    return {stats.mean, math::rstd_from_variance(stats.var, eps)};
  }
}

// ---------------------------------------------------------------------------------------
// Kernel arguments

template <typename T, typename P>
struct ForwardParams {
  using acc_t = at::opmath_type<T>;
  const T* x;
  ParamRef<P> weight, bias;
  T* y;
  acc_t* mean;  // null for RMSNorm
  acc_t* rstd;
  int64_t rows, cols;
  acc_t eps;
  int x_misalign;   // x and y: first element's offset from a 16-byte boundary
  bool vectorized;  // x and y agree on that offset (else: scalar streaming)
};

template <typename T, typename P>
struct BackwardParams {
  using acc_t = at::opmath_type<T>;
  const T* dy;
  const T* x;
  const acc_t* mean;  // null for RMSNorm
  const acc_t* rstd;
  ParamRef<P> weight;
  T* dx;
  acc_t* partial;  // [slots][kParamGrads][cols]: dgamma then (LayerNorm) dbeta partial rows
  acc_t* row_means;  // [rows][2]: mean(g), mean(g * xhat) (the streaming backward's)
  int64_t rows, cols;
  int x_misalign;   // dy, x and dx: first element's offset from a 16-byte boundary
  bool vectorized;  // dy, x and dx agree on that offset (else: scalar streaming)
};

template <typename Params>
__device__ __forceinline__ RowSplit row_split(const Params& a, int64_t row, int vec) {
  return a.vectorized ? cuda_indexing::split_row(
                            a.cols, vec, cuda_indexing::row_misalign(a.x_misalign, row, a.cols, vec))
                      : cuda_indexing::scalar_row(a.cols, vec);
}

// Saves a row's statistics (thread 0 of its group) and returns the center normalize()
// subtracts (math::normalize_center).
template <Norm kNorm, typename T, typename P, typename acc_t>
__device__ __forceinline__ acc_t save_row_stats(const ForwardParams<T, P>& a, int64_t row,
                                                acc_t mean, acc_t rstd) {
  if (threadIdx.x == 0) {
    if constexpr (kNorm == Norm::kLayer) a.mean[row] = mean;
    a.rstd[row] = rstd;
  }
  return math::normalize_center(mean, rstd);
}

// Whether the rows of `a` all split alike (a whole number of vectors each), so that a
// choice made from one row's split holds in all: the same in every thread of the grid,
// and a warp never runs both sides of a with_param_vectors.
template <template <typename, typename> class Params, typename T, typename P>
__device__ __forceinline__ bool rows_split_alike(const Params<T, P>& a) {
  return a.cols % kVecOf<T> == 0;
}

// Calls f(ParamReads<weight read, bias read>{}): the copy of the forward's loop over
// the writes of y that reads the parameters the norm applies (the weight; and the bias,
// LayerNorm) with the fewest instructions, by conditions the same in every thread (see
// with_param_vectors): none when both are absent (nn.LayerNorm(elementwise_affine=False));
// plain vector loads when the rows split alike and each present parameter starts a vector
// at their head (with bias=False, the weight's alone); else the general reads. (The
// general reads of an absent bias still cost their predicated loads and fills: nvcc 13.0
// issued every way of load_param, whichever applied.)
template <Norm kNorm, typename T, typename P, typename F>
__device__ __forceinline__ void with_param_reads(const ForwardParams<T, P>& a, int64_t head,
                                                 F&& f) {
  using R = ParamRead;
  const bool bias_absent = kNorm == Norm::kRms || a.bias.ptr == nullptr;
  if (a.weight.ptr == nullptr && bias_absent) {
    f(ParamReads<R::kAbsent, R::kAbsent>{});
  } else if (rows_split_alike(a) && a.weight.present_vectors_at(head) &&
             (kNorm == Norm::kRms || a.bias.present_vectors_at(head))) {
    f(ParamReads<R::kVectors, R::kVectors>{});
  } else if (kNorm == Norm::kLayer && rows_split_alike(a) &&
             a.weight.present_vectors_at(head) && bias_absent) {
    f(ParamReads<R::kVectors, R::kAbsent>{});
  } else {
    f(ParamReads<R::kGeneral, R::kGeneral>{});
  }
}

// y for one 16-byte vector of a row's x at element e (v, converted), and for one head or
// tail element: the writes of both forwards. center: save_row_stats's. Index: the
// register kernel's int or the streaming kernel's int64_t. Reads: with_param_reads's
// ParamReads; the general reads take the flags.
template <Norm kNorm, typename Reads, typename T, typename P, typename Index, typename acc_t,
          int kVec>
__device__ __forceinline__ void write_normalized_vector(const ForwardParams<T, P>& a, T* yr,
                                                        Index e, acc_t (&v)[kVec],
                                                        acc_t center, acc_t rstd,
                                                        bool weight_vectors, bool bias_vectors) {
  acc_t w[kVec], b[kVec] = {};
  read_param<Reads::kWeight>(a.weight, e, weight_vectors, acc_t(1), w);
  if constexpr (kNorm == Norm::kLayer) {
    read_param<Reads::kBias>(a.bias, e, bias_vectors, acc_t(0), b);
  }
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    v[k] = math::affine<kNorm>(math::normalize<kNorm>(v[k], center, rstd), w[k], b[k]);
  }
  store_vector<kVec>(yr + e, v);
}

template <Norm kNorm, typename T, typename P, typename Index, typename acc_t>
__device__ __forceinline__ void write_normalized_element(const ForwardParams<T, P>& a, T* yr,
                                                         Index e, acc_t x, acc_t center,
                                                         acc_t rstd) {
  const acc_t xhat = math::normalize<kNorm>(x, center, rstd);
  yr[e] = static_cast<T>(math::affine<kNorm>(xhat, load_param(a.weight, e, acc_t(1)),
                                             load_param(a.bias, e, acc_t(0))));
}

}  // namespace cuda_kernels
}  // namespace layernorm_ext
