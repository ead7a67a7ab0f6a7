// The LayerNorm math, written once for both backends.
//
// Every function here is a host/device template over the value type V, so the same
// code runs on scalars (CPU tails, CUDA threads) and on at::vec::Vectorized lanes
// (CPU main loops). Keeping the formulas in one place keeps the CPU and CUDA results
// consistent with each other and with torch.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LN_HOST_DEVICE inline
#endif

namespace layernorm_ext {

// Which normalization a kernel computes: one template flag selects it everywhere.
//   kLayer: y = (x - mean) * rstd * w + b,  rstd = 1 / sqrt(var(x) + eps)
//   kRms:   y = x * rstd * w,               rstd = 1 / sqrt(mean(x^2) + eps)
// RMSNorm is LayerNorm with the mean fixed at zero and no bias, so the kernels share
// every pass and skip, at compile time, what RMSNorm does not need.
enum class Norm { kLayer, kRms };

namespace math {
// In the CPU row kernels, compiled once per instruction set (csrc/cpu/row_kernels.h), the
// math lands in that ISA's namespace, as ATen's at::vec does: an inline function the
// compiler keeps out of line would otherwise be defined with AVX2 code in one object and
// baseline code in another, and the linker would keep one copy for both (an AVX
// instruction in the baseline kernels, or the other way round).
#ifdef CPU_CAPABILITY
inline namespace CPU_CAPABILITY {
#endif

// Running moments of a set of samples: mean and M2 = sum((x - mean)^2).
template <typename acc_t>
struct WelfordState {
  acc_t mean;
  acc_t m2;
  int64_t count;
};

// a * b + c with a single rounding where the hardware fuses it. The fusions are
// written out rather than left to the compiler: the CPU row kernels are compiled with
// -ffp-contract=off (setup.py), so that a product is never fused in one place and
// rounded in another. For a one-element row, g - mean(g) must then be exactly zero.
// V = at::vec::Vectorized finds at::vec::fmadd by argument-dependent lookup.
LN_HOST_DEVICE float fmadd(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return a * b + c;  // host scalars are not fused (no caller on the CPU today)
#endif
}
LN_HOST_DEVICE double fmadd(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return a * b + c;
#endif
}
template <typename V>
LN_HOST_DEVICE V mul_add(const V& a, const V& b, const V& c) {
  return fmadd(a, b, c);
}

// Welford's update for one more sample; `inv_count` is 1 / (samples seen, x included).
// Taking the reciprocal as an argument lets vector lanes that share a count share it.
template <typename V, typename S>
LN_HOST_DEVICE void welford_step(V& mean, V& m2, const V& x, S inv_count) {
  const V delta = x - mean;
  mean = mul_add(delta, V(inv_count), mean);
  m2 = mul_add(delta, x - mean, m2);
}

template <typename acc_t>
LN_HOST_DEVICE WelfordState<acc_t> welford_update(WelfordState<acc_t> s, acc_t x) {
  s.count += 1;
  welford_step(s.mean, s.m2, x, acc_t(1) / static_cast<acc_t>(s.count));
  return s;
}

// The mean part of Chan's merge (below): the mean of set a merged with set b's, given
// b's share of the merged count. Equal means merge exactly (a row of one value keeps
// its value), whatever the share.
template <typename V, typename S>
LN_HOST_DEVICE V merged_mean(const V& mean, const V& mean_b, S b_share) {
  return mean + (mean_b - mean) * V(b_share);
}

// Chan et al.'s merge of set b into set a, given n_a and b's share of the merged count,
// b_share = n_b / (n_a + n_b). Callers that know the share (equal counts: 1/2) skip the
// division; V may be a scalar or a vector of independent lanes.
template <typename V, typename S>
LN_HOST_DEVICE void welford_merge(V& mean, V& m2, const V& mean_b, const V& m2_b, S n_a,
                                  S b_share) {
  const V delta = mean_b - mean;
  mean = merged_mean(mean, mean_b, b_share);
  m2 = m2 + m2_b + delta * delta * V(n_a * b_share);
}

// Chan's combine of two disjoint sets. Not symmetric in rounding, so callers combine
// in a fixed order to stay bitwise reproducible.
template <typename acc_t>
LN_HOST_DEVICE WelfordState<acc_t> welford_combine(WelfordState<acc_t> a,
                                                   const WelfordState<acc_t>& b) {
  if (b.count == 0) return a;
  if (a.count == 0) return b;
  const int64_t count = a.count + b.count;
  welford_merge(a.mean, a.m2, b.mean, b.m2, static_cast<acc_t>(a.count),
                static_cast<acc_t>(b.count) / static_cast<acc_t>(count));
  a.count = count;
  return a;
}

template <typename acc_t>
LN_HOST_DEVICE acc_t reciprocal_sqrt(acc_t v) {
#if defined(__CUDA_ARCH__)
  return ::rsqrt(v);
#else
  return acc_t(1) / std::sqrt(v);
#endif
}

// rstd = 1 / sqrt(max(var, 0) + eps) with the biased variance, as torch. eps may be
// zero or negative: the inf/NaN that follows is torch's behaviour too. NaN inputs and
// empty rows (0 / 0) keep var = NaN, since the comparison lets NaN through.
template <typename acc_t>
LN_HOST_DEVICE acc_t rstd_from_variance(acc_t var, acc_t eps) {
  return reciprocal_sqrt((var < acc_t(0) ? acc_t(0) : var) + eps);
}

template <typename acc_t>
LN_HOST_DEVICE acc_t variance(const WelfordState<acc_t>& s) {
  return s.m2 / static_cast<acc_t>(s.count);
}

// A row's statistics as the forwards save and use them.
template <typename acc_t>
struct MeanVariance {
  acc_t mean, var;
};

// rstd = 1 / sqrt(mean(x^2) + eps), RMSNorm's statistic. NaN inputs and empty rows
// (0 / 0) give NaN, as torch's rms_norm.
template <typename acc_t>
LN_HOST_DEVICE acc_t rstd_from_mean_square(acc_t mean_square, acc_t eps) {
  return reciprocal_sqrt(mean_square + eps);
}

template <typename acc_t>
LN_HOST_DEVICE bool is_finite(acc_t v) {
#if defined(__CUDA_ARCH__)
  return ::isfinite(v);
#else
  return std::isfinite(v);
#endif
}

// Whether x is near `first`, a candidate shift of a row's values before their moments
// are taken: where most of its first values lie within |first| / kShiftRatio of one of
// them (an offset over ~4x their spread), the running means of unshifted values would
// round to the offset's ulps (a sorted row 100..101 of 4096 floats: rstd ~1800 ulps
// off), and a shift near the row's values costs nothing in accuracy (one near its first
// values only can: row_moments.h's shift_of). Elsewhere the forwards take the values as
// they are: a shift by a value far from the others (an outlier first value, 1000 among
// N(0, 1)) rounds every shifted value to its ulps, 10-100x torch's error in y. NaN or
// inf: false (the comparison fails). The CPU tests a row's first vector chunk, or the
// whole of a shorter row (row_moments.h), the CUDA forwards its first few elements
// (row_shift_value).
constexpr int kShiftRatio = 4;

template <typename acc_t>
LN_HOST_DEVICE bool near_first(acc_t x, acc_t first) {
  const acc_t distance = x > first ? x - first : first - x;
  return distance < (first < acc_t(0) ? -first : first) / acc_t(kShiftRatio);
}

// Whether a row's moments, taken less `shift`, are worth taking again less their mean:
// where the mean lies over kReshiftDeviations standard deviations from the shift, the
// shifted values round to ulps of that distance, not of the spread. The shift rules
// judge from a row's first values, and rows whose first values are unlike the rest (a
// first chunk at an offset the rest lacks, zeros before a ramp) got a wrong or no
// shift: up to 36x torch's error in the statistics (float32 CPU, N = 4096). Closer than
// that, the moments are within a few ulps, as torch's unshifted ones; and the rules
// decline many rows a little past 4 deviations (N(5, 1): about half on the CPU), which
// a bar of 4 took again, at 13-45% of their forward (CPU). NaN or inf: false (the
// comparison fails). On vectors, a mask.
constexpr int kReshiftDeviations = 8;

template <typename V>
LN_HOST_DEVICE auto needs_reshift(const V& mean, const V& var, const V& shift) {
  const V distance = mean - shift;
  return distance * distance > V(kReshiftDeviations * kReshiftDeviations) * var;
}

// The shift of a row of n elements at x (the CUDA forwards'), from its first
// kShiftProbes: the first of them, or else the second, where it is finite and all but
// one of the others are near it (one outlier cannot decide); else 0. (The CPU tests
// vectors of elements at once: on scalars, the float32 forward of rows of 20 took 1.8x
// as long.)
constexpr int kShiftProbes = 4;

template <typename acc_t, typename T>
LN_HOST_DEVICE acc_t row_shift_value(const T* x, int64_t n) {
  const int probes = n < kShiftProbes ? static_cast<int>(n) : kShiftProbes;
  acc_t values[kShiftProbes];
  for (int k = 0; k < kShiftProbes; ++k) values[k] = k < probes ? static_cast<acc_t>(x[k]) : 0;
  for (int candidate = 0; candidate < 2 && candidate < probes; ++candidate) {
    int near = 0;
    for (int k = 0; k < kShiftProbes; ++k) {
      near += k != candidate && k < probes && near_first(values[k], values[candidate]);
    }
    if (is_finite(values[candidate]) && near >= probes - 2) return values[candidate];
  }
  return acc_t(0);
}

// Overflow rescue, for rows of finite values that span more than half the dtype's
// range: there a partial sum or some x - mean overflows, and the moments come out with a
// non-finite mean or M2. The moments of x / kRescueFactor keep every sum and difference
// finite: the factor is a power of two, so the division is exact but for subnormal
// results, and large enough that a sum of up to 128 such values stays finite (a CUDA
// thread sums up to 66: a 128-byte slice of bfloat16 and a head and tail element). The
// CUDA forwards take every row's moments that way (free there, see
// layernorm_cuda_device.cuh); the CPU takes them again, by Welford's update, only for
// rows whose fast moments overflowed (rescued_if_needed). The mean is then finite, as a
// mean of finite values is. The variance is M2 scaled back and divided by n where that
// M2 is finite, else M2 / n scaled back: rows whose M2 = n * variance overflows while
// their variance does not (+-6e17 at n = 1024 in float32; torch gives rstd 0 there) get
// their rstd, as long as the scaled M2 is finite (n * variance < kRescueFactor^2 * max:
// every such row of up to 16384 elements). Beyond that the variance is inf: rstd 0, see
// normalize_center. The price of scaling every row on CUDA: squared deviations of
// x / 128 turn subnormal where a float32 row's standard deviation is below ~1e-17, and
// rstd loses digits there (~1e-6 relative at 1e-18), which matters with eps = 0 alone.
// Rows holding NaN or inf keep NaN/inf, as torch's.
constexpr int kRescueFactor = 128;

template <typename acc_t>
LN_HOST_DEVICE acc_t rescue_scaled(acc_t x) {
  return x * (acc_t(1) / acc_t(kRescueFactor));
}

template <typename acc_t>
LN_HOST_DEVICE MeanVariance<acc_t> rescue_unscaled(const WelfordState<acc_t>& scaled) {
  const acc_t factor(kRescueFactor);
  const acc_t m2 = scaled.m2 * (factor * factor);
  const acc_t var = is_finite(m2) ? m2 / static_cast<acc_t>(scaled.count)
                                  : variance(scaled) * (factor * factor);
  return {scaled.mean * factor, var};
}

// The same for a mean and a variance taken of x / kRescueFactor directly.
template <typename acc_t>
LN_HOST_DEVICE MeanVariance<acc_t> rescue_unscaled(const MeanVariance<acc_t>& scaled) {
  const acc_t factor(kRescueFactor);
  return {scaled.mean * factor, scaled.var * (factor * factor)};
}

// Whether a row's fast moments overflowed (or its data holds NaN/inf).
template <typename acc_t>
LN_HOST_DEVICE bool overflowed(const WelfordState<acc_t>& fast) {
  return !is_finite(fast.mean) || !is_finite(fast.m2);
}

// The statistics to keep: the rescued ones where the fast moments overflowed and the
// rescue did not (every element finite).
template <typename acc_t>
LN_HOST_DEVICE MeanVariance<acc_t> rescued_if_needed(const WelfordState<acc_t>& fast,
                                                     const WelfordState<acc_t>& scaled) {
  if (overflowed(fast) && is_finite(scaled.mean)) return rescue_unscaled(scaled);
  return {fast.mean, variance(fast)};
}

// The value normalize() subtracts from a row: its mean, or 0 in a row whose rstd is 0.
// rstd is 0 only when the variance overflowed to inf (finite values spread over more
// than half the dtype's range; or eps = inf). There x - mean itself may overflow, and
// inf * 0 would give NaN. With center 0, xhat = x * 0 = 0 and y = bias: the value of
// the formula at rstd = 0, and what torch's CPU form x * rstd - mean * rstd gives when
// its own statistics stay finite (they often overflow to NaN there; the exact answer
// would be a finite xhat of order 1). The mean returned to the caller stays the mean.
template <typename acc_t>
LN_HOST_DEVICE acc_t normalize_center(acc_t mean, acc_t rstd) {
  return rstd == acc_t(0) ? acc_t(0) : mean;
}

// normalize_center of row `row` of a saved mean array (the backward's, the short-row
// forward's); RMSNorm has no mean (its array is null): 0.
template <Norm kNorm, typename acc_t>
LN_HOST_DEVICE acc_t row_center(const acc_t* mean, int64_t row, acc_t rstd) {
  if constexpr (kNorm == Norm::kRms) {
    (void)mean, (void)row, (void)rstd;
    return acc_t(0);
  } else {
    return normalize_center(mean[row], rstd);
  }
}

// xhat = (x - mean) * rstd; RMSNorm (kRms) has no mean: xhat = x * rstd. Callers pass
// normalize_center(mean, rstd) as the mean.
template <Norm kNorm = Norm::kLayer, typename V>
LN_HOST_DEVICE V normalize(const V& x, const V& mean, const V& rstd) {
  if constexpr (kNorm == Norm::kRms) {
    (void)mean;
    return x * rstd;
  } else {
    return (x - mean) * rstd;
  }
}

// y = xhat * w + b; callers pass w = 1 and b = 0 for the missing affine parts.
// RMSNorm (kRms) has no bias: y = xhat * w (no "+ 0", which would turn -0 into +0).
template <Norm kNorm = Norm::kLayer, typename V>
LN_HOST_DEVICE V affine(const V& xhat, const V& w, const V& b) {
  if constexpr (kNorm == Norm::kRms) {
    (void)b;
    return xhat * w;
  } else {
    return mul_add(xhat, w, b);
  }
}

// Input gradient of one element. With g = dy * w and the row means
// mean_g = mean(g), mean_g_xhat = mean(g * xhat):
//   LayerNorm: dx = rstd * (g - mean_g - xhat * mean_g_xhat)
//   RMSNorm:   dx = rstd * (g - xhat * mean_g_xhat)
// (RMSNorm: d rstd / d x_i = -rstd^3 x_i / N, so dx_i = rstd g_i - rstd^3 x_i mean(g x),
// and rstd^3 x_i mean(g x) = rstd xhat_i mean(g xhat). No mean, so no mean_g term;
// callers may pass anything for mean_g.)
template <Norm kNorm = Norm::kLayer, typename V>
LN_HOST_DEVICE V input_grad(const V& g, const V& xhat, const V& rstd, const V& mean_g,
                            const V& mean_g_xhat) {
  if constexpr (kNorm == Norm::kRms) {
    (void)mean_g;
    return rstd * (g - xhat * mean_g_xhat);
  } else {
    return rstd * (g - mean_g - xhat * mean_g_xhat);
  }
}

#ifdef CPU_CAPABILITY
}  // namespace CPU_CAPABILITY
#endif
}  // namespace math
}  // namespace layernorm_ext
