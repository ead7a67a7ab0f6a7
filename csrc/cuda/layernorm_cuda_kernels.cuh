// CUDA kernels of layernorm_ext and their host-side launch, written against a launcher
// (layernorm_cuda.cu launches them on a stream; tests/cuda_emulator/ runs them on the CPU).
//
// Forward. Rows up to 64 KiB live in registers: a group of threads per row (one thread
// for rows of at most 128 bytes, then 8 lanes of a warp up to a 512-thread block) loads
// the row once with 16-byte vectors, each thread a slice of 32 or 128 bytes kept as
// loaded, computes each thread's mean and M2 from its registers (two-pass: exact for a
// handful of values), combines the threads' moments with Chan's formula in a fixed
// tree, and writes y from the same registers. Longer rows,
// float64, and tensors whose 16-byte alignment differs stream: a block per row, a
// Welford pass and a normalize pass (the second one reads the row back from L2).
//
// Backward. A persistent grid of row groups ("slots", count a function of M and N only).
// A slot's rows are slot, slot + slots, ...; they all split into head/vectors/tail the same
// way, so a thread owns the same columns in each of them and keeps its dgamma/dbeta
// contributions in registers across rows (streaming kernel, rows over 16384 elements: in
// its own fp32 partial row in global memory). Per row: dy and x read once from DRAM, two
// row sums, dx written once. Each slot
// writes one fp32 partial row; a small kernel adds the partial rows in a fixed order. No
// atomics anywhere: results are bitwise reproducible, on every GPU model.
//
// RMSNorm runs the same kernels with the template flag Norm::kRms (../layernorm_math.h):
// the statistic is the sum of x^2 instead of Welford moments, there is no mean, no bias
// and no dbeta, and the backward skips the row sum of g.
//
// Launch configurations: layernorm_cuda_config.h (one table). Element-to-thread mapping
// and the reduction order: layernorm_cuda_indexing.h, replayed on the CPU by the tests.
// The math (Welford/Chan, normalize, affine, input gradient): ../layernorm_math.h,
// shared with the CPU kernels.
#pragma once

#include <ATen/ceil_div.h>

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <type_traits>

#include "../layernorm.h"
#include "../layernorm_math.h"
#include "layernorm_cuda_config.h"
#include "layernorm_cuda_indexing.h"

namespace layernorm_ext {
namespace cuda_kernels {

using cuda_config::Kind;
using cuda_config::LaunchConfig;
using cuda_indexing::RowSplit;

// The parameter gradients a norm has: dgamma and dbeta (LayerNorm), dgamma (RMSNorm).
// Also the number of partial rows per backward slot.
template <Norm kNorm>
constexpr int kParamGrads = kNorm == Norm::kLayer ? 2 : 1;

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxGridBlocks = 1 << 19;

template <typename T>
constexpr int kVecOf = 16 / static_cast<int>(sizeof(T));

// float64 rows always take the streaming kernels (see layernorm_cuda_config.h).
template <typename T>
constexpr bool kHasRegisterKernels = sizeof(T) <= 4;

// ---------------------------------------------------------------------------------------
// 16-byte vector I/O

// Loads kN elements from p (16-byte aligned; kN * sizeof(T) a multiple of 16) as acc_t.
template <int kN, typename T, typename acc_t>
__device__ __forceinline__ void load_vector(const T* __restrict__ p, acc_t (&out)[kN]) {
  constexpr int kPerChunk = kVecOf<T>;
  static_assert(kN % kPerChunk == 0, "whole 16-byte chunks");
#pragma unroll
  for (int c = 0; c < kN / kPerChunk; ++c) {
    const uint4 raw = reinterpret_cast<const uint4*>(p)[c];
    T values[kPerChunk];
    memcpy(values, &raw, sizeof(raw));
#pragma unroll
    for (int k = 0; k < kPerChunk; ++k) out[c * kPerChunk + k] = static_cast<acc_t>(values[k]);
  }
}

// A 16-byte vector as loaded (a uint4), and its elements as acc_t. The register forward
// keeps rows this way and converts where it uses them: a thread then holds the same bytes
// of a row in the same registers whatever the dtype (a bf16 conversion is one shift).
template <typename T>
__device__ __forceinline__ uint4 load_raw(const T* __restrict__ p) {
  return *reinterpret_cast<const uint4*>(p);
}

template <typename T, typename acc_t>
__device__ __forceinline__ void unpack(const uint4& raw, acc_t (&out)[kVecOf<T>]) {
  T values[kVecOf<T>];
  memcpy(values, &raw, sizeof(raw));
#pragma unroll
  for (int k = 0; k < kVecOf<T>; ++k) out[k] = static_cast<acc_t>(values[k]);
}

// One 16-byte global store. Written in PTX because the compiler splits a plain uint4
// store into four 4-byte stores in some kernels (seen with nvcc 13.0 in the forward).
// No "memory" clobber: nothing in these kernels reads back what it stores, and without
// it the compiler may still hoist the next vector's loads above this store.
__device__ __forceinline__ void store_16_bytes(void* p, const uint4& v) {
#if defined(LN_CUDA_EMULATION)
  memcpy(p, &v, sizeof(v));
#else
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z),
               "r"(v.w));
#endif
}

// Stores kN values as T to p (16-byte aligned; kN * sizeof(T) a multiple of 16).
template <int kN, typename T, typename acc_t>
__device__ __forceinline__ void store_vector(T* __restrict__ p, const acc_t (&in)[kN]) {
  constexpr int kPerChunk = kVecOf<T>;
  static_assert(kN % kPerChunk == 0, "whole 16-byte chunks");
#pragma unroll
  for (int c = 0; c < kN / kPerChunk; ++c) {
    T values[kPerChunk];
#pragma unroll
    for (int k = 0; k < kPerChunk; ++k) values[k] = static_cast<T>(in[c * kPerChunk + k]);
    uint4 raw;
    memcpy(&raw, values, sizeof(raw));
    store_16_bytes(p + c * kPerChunk, raw);
  }
}

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
};

// Parameter columns [col, col + kN) as acc_t: vector loads when aligned, else scalar.
template <int kN, typename P, typename acc_t>
__device__ __forceinline__ void load_param(const ParamRef<P>& param, int64_t col, bool vector,
                                           acc_t fill, acc_t (&out)[kN]) {
  if (param.ptr == nullptr) {
#pragma unroll
    for (int k = 0; k < kN; ++k) out[k] = fill;
  } else if (vector) {
    load_vector<kN>(param.ptr + col, out);
  } else {
#pragma unroll
    for (int k = 0; k < kN; ++k) out[k] = static_cast<acc_t>(param.ptr[col + k]);
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

struct WelfordCombine {
  template <typename acc_t>
  __device__ __forceinline__ Welford<acc_t> operator()(const Welford<acc_t>& x,
                                                       const Welford<acc_t>& y) const {
    return math::welford_combine(x, y);
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
// (a 128-byte slice of a 2-byte dtype, a head and a tail element), each at most
// max / 128. The scaling costs nothing: it folds into the fused multiply-adds.
static_assert(math::kRescueFactor >= cuda_config::kLargeSliceBytes / 2 + 2,
              "a thread's scaled partial sum of +-max values could overflow");
template <typename acc_t>
__device__ __forceinline__ acc_t scaled(acc_t x) {
  return x * math::rescue_scaled(acc_t(1));
}

// Moments of the kN values of one vector, scaled as above: two-pass, exact up to
// rounding.
template <int kN, typename acc_t>
__device__ __forceinline__ Welford<acc_t> scaled_vector_moments(const acc_t (&v)[kN]) {
  acc_t sum = 0;
#pragma unroll
  for (int k = 0; k < kN; ++k) sum += scaled(v[k]);
  const acc_t mean = sum / acc_t(kN);
  acc_t m2 = 0;
#pragma unroll
  for (int k = 0; k < kN; ++k) m2 += (scaled(v[k]) - mean) * (scaled(v[k]) - mean);
  return {mean, m2, kN};
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

// y for one 16-byte vector of a row's x at element e (v, converted), and for one head or
// tail element: the writes of both forwards. center: save_row_stats's. Index: the
// register kernel's int or the streaming kernel's int64_t.
template <Norm kNorm, typename T, typename P, typename Index, typename acc_t, int kVec>
__device__ __forceinline__ void write_normalized_vector(const ForwardParams<T, P>& a, T* yr,
                                                        Index e, acc_t (&v)[kVec],
                                                        acc_t center, acc_t rstd,
                                                        bool weight_vectors, bool bias_vectors) {
  acc_t w[kVec], b[kVec];
  load_param(a.weight, e, weight_vectors, acc_t(1), w);
  load_param(a.bias, e, bias_vectors, acc_t(0), b);
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    v[k] = math::affine<kNorm>(math::normalize<kNorm>(v[k], center, rstd), w[k], b[k]);
  }
  store_vector(yr + e, v);
}

template <Norm kNorm, typename T, typename P, typename Index, typename acc_t>
__device__ __forceinline__ void write_normalized_element(const ForwardParams<T, P>& a, T* yr,
                                                         Index e, acc_t x, acc_t center,
                                                         acc_t rstd) {
  const acc_t xhat = math::normalize<kNorm>(x, center, rstd);
  yr[e] = static_cast<T>(math::affine<kNorm>(xhat, load_param(a.weight, e, acc_t(1)),
                                             load_param(a.bias, e, acc_t(0))));
}

// ---------------------------------------------------------------------------------------
// Forward, rows in registers. blockDim = (threads per row G, rows per block); each
// thread holds up to kVectors 16-byte vectors of its row (cuda_config's slices).
// kRowPerThread: G = 1, a thread holds a whole row and reduces nothing with the others.

// Its __launch_bounds__ (threads, blocks per SM): small slices and rows per thread come
// in blocks of kRowBlockThreads, with cuda_config's occupancy floors.
template <int kVectors, bool kRowPerThread>
constexpr bool kFixedBlock = kVectors == cuda_config::kSmallSliceVectors || kRowPerThread;

template <int kVectors, bool kRowPerThread>
constexpr int kForwardMaxThreads =
    kFixedBlock<kVectors, kRowPerThread> ? cuda_config::kRowBlockThreads
                                         : cuda_config::kMaxBlockThreads;

template <int kVectors, bool kRowPerThread>
constexpr int kForwardMinBlocks = kRowPerThread ? cuda_config::kRowPerThreadMinBlocksPerSM
                                  : kVectors == cuda_config::kSmallSliceVectors
                                      ? cuda_config::kSmallSliceMinBlocksPerSM
                                      : 1;

template <Norm kNorm, typename T, typename P, int kVectors, bool kRowPerThread>
__global__ void __launch_bounds__(kForwardMaxThreads<kVectors, kRowPerThread>,
                                  kForwardMinBlocks<kVectors, kRowPerThread>)
    forward_registers_kernel(const ForwardParams<T, P> a) {
  using acc_t = at::opmath_type<T>;
  constexpr int kVec = kVecOf<T>;
  constexpr int kEdgeSlots = cuda_indexing::kRegisterEdgeSlots<kVec, kRowPerThread>;
  __shared__ RowStats<kNorm, acc_t> scratch[cuda_indexing::kReduceScratch];
  const int t = kRowPerThread ? 0 : threadIdx.x;
  const int group = kRowPerThread ? 1 : blockDim.x;
  const int64_t rows_per_block = blockDim.y;
  // The row's total of this thread's partial statistics (kRowPerThread: they are it).
  const auto row_total = [&](const auto& value, const auto& identity, auto combine) {
    if constexpr (kRowPerThread) {
      return value;
    } else {
      return group_allreduce(value, identity, combine, scratch);
    }
  };

  // The loop bound is the block's first row, so every thread runs every iteration
  // (the reductions shuffle across rows and sync the block).
  for (int64_t first = blockIdx.x * rows_per_block; first < a.rows;
       first += gridDim.x * rows_per_block) {
    const int64_t row = first + threadIdx.y;
    const bool valid = row < a.rows;
    const RowSplit s = row_split(a, row, kVec);
    const T* xr = a.x + row * a.cols;
    T* yr = a.y + row * a.cols;

    uint4 packs[kVectors];
    acc_t edge[2 * kEdgeSlots];
    acc_t sum = 0;  // of scaled(x) (LayerNorm) or of x^2 (RMSNorm)
    int count = 0;
    const auto term = [](acc_t x) { return kNorm == Norm::kRms ? x * x : scaled(x); };
    if (valid) {
      // All loads first, then the sums: every vector of the slice is in flight at once.
      cuda_indexing::for_each_register_pack<kVectors>(
          s, t, group, [&](int i, int e) { packs[i] = load_raw(xr + e); });
      cuda_indexing::for_each_register_edge<kEdgeSlots>(
          s, t, group, [&](int i, int e) { edge[i] = static_cast<acc_t>(xr[e]); });
      cuda_indexing::for_each_register_pack<kVectors>(s, t, group, [&](int i, int) {
        acc_t v[kVec];
        unpack<T>(packs[i], v);
#pragma unroll
        for (int k = 0; k < kVec; ++k) sum += term(v[k]);
        count += kVec;
      });
      cuda_indexing::for_each_register_edge<kEdgeSlots>(s, t, group, [&](int i, int) {
        sum += term(edge[i]);
        count += 1;
      });
    }
    acc_t mean = 0, rstd;
    if constexpr (kNorm == Norm::kRms) {
      const RowSum<acc_t> total = row_total(RowSum<acc_t>{sum}, RowSum<acc_t>{0}, SumCombine{});
      rstd = math::rstd_from_mean_square(total.sum / static_cast<acc_t>(a.cols), a.eps);
    } else {
      // This thread's moments, two-pass from registers, then Chan's combine over the row
      // (all of scaled(x), see there).
      const acc_t local_mean = count > 0 ? sum / static_cast<acc_t>(count) : acc_t(0);
      acc_t m2 = 0;
      const auto add_deviation = [&](acc_t x) {
        const acc_t d = scaled(x) - local_mean;
        m2 += d * d;
      };
      if (valid) {
        cuda_indexing::for_each_register_pack<kVectors>(s, t, group, [&](int i, int) {
          acc_t v[kVec];
          unpack<T>(packs[i], v);
#pragma unroll
          for (int k = 0; k < kVec; ++k) add_deviation(v[k]);
        });
        cuda_indexing::for_each_register_edge<kEdgeSlots>(
            s, t, group, [&](int i, int) { add_deviation(edge[i]); });
      }
      const auto stats = math::rescue_unscaled(row_total(
          Welford<acc_t>{local_mean, m2, count}, Welford<acc_t>{0, 0, 0}, WelfordCombine{}));
      mean = stats.mean;
      rstd = math::rstd_from_variance(stats.var, a.eps);
    }
    if (!valid) continue;
    mean = save_row_stats<kNorm>(a, row, mean, rstd);
    const bool weight_vectors = a.weight.vectors_at(s.head);
    const bool bias_vectors = a.bias.vectors_at(s.head);
    cuda_indexing::for_each_register_pack<kVectors>(s, t, group, [&](int i, int e) {
      acc_t v[kVec];
      unpack<T>(packs[i], v);
      write_normalized_vector<kNorm>(a, yr, e, v, mean, rstd, weight_vectors, bias_vectors);
    });
    cuda_indexing::for_each_register_edge<kEdgeSlots>(s, t, group, [&](int i, int e) {
      write_normalized_element<kNorm>(a, yr, e, edge[i], mean, rstd);
    });
  }
}

// ---------------------------------------------------------------------------------------
// Forward, streaming: a block per row, any row length. Pass 1 Welford (per vector two-pass,
// Chan's combine into the thread's moments), pass 2 the normalized row.

template <Norm kNorm, typename T, typename P>
__global__ void __launch_bounds__(cuda_config::kMaxBlockThreads, 1)
    forward_streaming_kernel(const ForwardParams<T, P> a) {
  using acc_t = at::opmath_type<T>;
  constexpr int kVec = kVecOf<T>;
  __shared__ RowStats<kNorm, acc_t> scratch[cuda_indexing::kReduceScratch];
  const int t = threadIdx.x;
  const int group = blockDim.x;

  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const RowSplit s = row_split(a, row, kVec);
    const T* xr = a.x + row * a.cols;
    T* yr = a.y + row * a.cols;

    acc_t mean = 0, rstd;
    if constexpr (kNorm == Norm::kRms) {
      RowSum<acc_t> local{0};
      cuda_indexing::for_each_streamed(
          s, t, group,
          [&](int64_t e) {
            acc_t v[kVec];
            load_vector(xr + e, v);
#pragma unroll
            for (int k = 0; k < kVec; ++k) local.sum += v[k] * v[k];
          },
          [&](int64_t e) {
            const acc_t v = static_cast<acc_t>(xr[e]);
            local.sum += v * v;
          });
      const RowSum<acc_t> total = group_allreduce(local, RowSum<acc_t>{0}, SumCombine{}, scratch);
      rstd = math::rstd_from_mean_square(total.sum / static_cast<acc_t>(a.cols), a.eps);
    } else {
      Welford<acc_t> local{0, 0, 0};
      cuda_indexing::for_each_streamed(
          s, t, group,
          [&](int64_t e) {
            acc_t v[kVec];
            load_vector(xr + e, v);
            local = math::welford_combine(local, scaled_vector_moments(v));
          },
          [&](int64_t e) {
            local = math::welford_update(local, scaled(static_cast<acc_t>(xr[e])));
          });
      const auto stats = math::rescue_unscaled(
          group_allreduce(local, Welford<acc_t>{0, 0, 0}, WelfordCombine{}, scratch));
      mean = stats.mean;
      rstd = math::rstd_from_variance(stats.var, a.eps);
    }
    mean = save_row_stats<kNorm>(a, row, mean, rstd);
    const bool weight_vectors = a.weight.vectors_at(s.head);
    const bool bias_vectors = a.bias.vectors_at(s.head);
    cuda_indexing::for_each_streamed(
        s, t, group,
        [&](int64_t e) {
          acc_t v[kVec];
          load_vector(xr + e, v);
          write_normalized_vector<kNorm>(a, yr, e, v, mean, rstd, weight_vectors, bias_vectors);
        },
        [&](int64_t e) {
          write_normalized_element<kNorm>(a, yr, e, static_cast<acc_t>(xr[e]), mean, rstd);
        });
  }
}

// ---------------------------------------------------------------------------------------
// Backward, rows in registers. blockDim = (G, rows per block); slot = blockIdx.x *
// blockDim.y + threadIdx.y handles rows slot, slot + slots, ... with slots = gridDim.x *
// blockDim.y, a multiple of the rows' alignment period (cuda_config::backward_slots).
// kElemsBackward per thread: the row's g and xhat stay in registers for dx.
// kElemsBackwardLong (rows up to 16384): only dgamma/dbeta stay; dx reads the row again.

template <Norm kNorm, typename T, typename P, int kElems>
__global__ void __launch_bounds__(cuda_config::kMaxBlockThreads, 1)
    backward_registers_kernel(const BackwardParams<T, P> a) {
  using acc_t = at::opmath_type<T>;
  constexpr int kVec = kVecOf<T>;
  constexpr int kSlots = kElems / kVec;
  constexpr bool kKeepRow = kElems <= cuda_config::kElemsBackward;
  constexpr int kKeptSlots = kKeepRow ? kSlots : 1;
  __shared__ SumPair<acc_t> scratch[cuda_indexing::kReduceScratch];
  const int t = threadIdx.x;
  const int group = blockDim.x;
  const int64_t rows_per_block = blockDim.y;
  const int64_t slots = gridDim.x * rows_per_block;
  const int64_t slot = blockIdx.x * rows_per_block + threadIdx.y;
  const acc_t inv_cols = acc_t(1) / static_cast<acc_t>(a.cols);
  // The same split for every row of this slot: this thread owns the same columns.
  const RowSplit s = row_split(a, slot, kVec);

  acc_t dgamma[kSlots][kVec], dbeta[kSlots][kVec], dgamma_edge[2], dbeta_edge[2];
  cuda_indexing::for_each_register_pack<kSlots>(s, t, group, [&](int i, int) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) dgamma[i][k] = dbeta[i][k] = 0;
  });
  cuda_indexing::for_each_register_edge(
      s, t, group, [&](int i, int) { dgamma_edge[i] = dbeta_edge[i] = 0; });
  const bool weight_vectors = a.weight.vectors_at(s.head);

  for (int64_t first = blockIdx.x * rows_per_block; first < a.rows; first += slots) {
    const int64_t row = first + threadIdx.y;
    const bool valid = row < a.rows;
    const T* dyr = a.dy + row * a.cols;
    const T* xr = a.x + row * a.cols;
    T* dxr = a.dx + row * a.cols;

    // g = dy * w and xhat stay in registers between the row sums and dx (kKeepRow);
    // rows too long for that keep only dgamma/dbeta and read dy and x again for dx.
    acc_t g[kKeptSlots][kVec], xhat[kKeptSlots][kVec], g_edge[2], xhat_edge[2];
    SumPair<acc_t> sums{0, 0};
    const acc_t rstd = valid ? a.rstd[row] : acc_t(0);
    const acc_t mean = valid ? math::row_center<kNorm>(a.mean, row, rstd) : acc_t(0);
    // dy, xhat and g of the pack at column e.
    const auto load_pack = [&](int64_t e, acc_t(&dy)[kVec], acc_t(&xhat_pack)[kVec],
                               acc_t(&g_pack)[kVec]) {
      acc_t w[kVec];
      load_vector(dyr + e, dy);
      load_vector(xr + e, xhat_pack);
      load_param(a.weight, e, weight_vectors, acc_t(1), w);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        xhat_pack[k] = math::normalize<kNorm>(xhat_pack[k], mean, rstd);
        g_pack[k] = dy[k] * w[k];
      }
    };
    if (valid) {
      cuda_indexing::for_each_register_pack<kSlots>(s, t, group, [&](int i, int e) {
        const int kept = kKeepRow ? i : 0;
        acc_t dy[kVec];
        load_pack(e, dy, xhat[kept], g[kept]);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          dgamma[i][k] += dy[k] * xhat[kept][k];
          if constexpr (kNorm == Norm::kLayer) {
            dbeta[i][k] += dy[k];
            sums.a += g[kept][k];
          }
          sums.b += g[kept][k] * xhat[kept][k];
        }
      });
      cuda_indexing::for_each_register_edge(s, t, group, [&](int i, int e) {
        const acc_t dy = static_cast<acc_t>(dyr[e]);
        xhat_edge[i] = math::normalize<kNorm>(static_cast<acc_t>(xr[e]), mean, rstd);
        g_edge[i] = dy * load_param(a.weight, e, acc_t(1));
        dgamma_edge[i] += dy * xhat_edge[i];
        if constexpr (kNorm == Norm::kLayer) {
          dbeta_edge[i] += dy;
          sums.a += g_edge[i];
        }
        sums.b += g_edge[i] * xhat_edge[i];
      });
    }
    sums = group_allreduce(sums, SumPair<acc_t>{0, 0}, SumCombine{}, scratch);
    if (!valid) continue;
    const acc_t mean_g = sums.a * inv_cols;
    const acc_t mean_g_xhat = sums.b * inv_cols;
    cuda_indexing::for_each_register_pack<kSlots>(s, t, group, [&](int i, int e) {
      const int kept = kKeepRow ? i : 0;
      if constexpr (!kKeepRow) {
        acc_t dy[kVec];
        load_pack(e, dy, xhat[0], g[0]);  // from L2: the row was read moments ago
      }
      acc_t dx[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        dx[k] = math::input_grad<kNorm>(g[kept][k], xhat[kept][k], rstd, mean_g, mean_g_xhat);
      }
      store_vector(dxr + e, dx);
    });
    cuda_indexing::for_each_register_edge(s, t, group, [&](int i, int e) {
      dxr[e] = static_cast<T>(
          math::input_grad<kNorm>(g_edge[i], xhat_edge[i], rstd, mean_g, mean_g_xhat));
    });
  }

  // This slot's partial rows, every column (zeros for a slot without rows).
  acc_t* partial_dgamma = a.partial + slot * kParamGrads<kNorm> * a.cols;
  acc_t* partial_dbeta = partial_dgamma + a.cols;  // LayerNorm only
  cuda_indexing::for_each_register_pack<kSlots>(s, t, group, [&](int i, int e) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      partial_dgamma[e + k] = dgamma[i][k];
      if constexpr (kNorm == Norm::kLayer) partial_dbeta[e + k] = dbeta[i][k];
    }
  });
  cuda_indexing::for_each_register_edge(s, t, group, [&](int i, int e) {
    partial_dgamma[e] = dgamma_edge[i];
    if constexpr (kNorm == Norm::kLayer) partial_dbeta[e] = dbeta_edge[i];
  });
}

// ---------------------------------------------------------------------------------------
// Backward, streaming: a block per slot (gridDim.x slots), any row length. dgamma/dbeta
// accumulate in the slot's partial row; each column of it belongs to one thread.

template <Norm kNorm, typename T, typename P>
__global__ void __launch_bounds__(cuda_config::kMaxBlockThreads, 1)
    backward_streaming_kernel(const BackwardParams<T, P> a) {
  using acc_t = at::opmath_type<T>;
  constexpr int kVec = kVecOf<T>;
  __shared__ SumPair<acc_t> scratch[cuda_indexing::kReduceScratch];
  const int t = threadIdx.x;
  const int group = blockDim.x;
  const int64_t slot = blockIdx.x;
  const acc_t inv_cols = acc_t(1) / static_cast<acc_t>(a.cols);
  const RowSplit s = row_split(a, slot, kVec);
  const bool weight_vectors = a.weight.vectors_at(s.head);
  acc_t* partial_dgamma = a.partial + slot * kParamGrads<kNorm> * a.cols;
  acc_t* partial_dbeta = partial_dgamma + a.cols;  // LayerNorm only

  cuda_indexing::for_each_streamed(
      s, t, group,
      [&](int64_t e) {
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          partial_dgamma[e + k] = 0;
          if constexpr (kNorm == Norm::kLayer) partial_dbeta[e + k] = 0;
        }
      },
      [&](int64_t e) {
        partial_dgamma[e] = 0;
        if constexpr (kNorm == Norm::kLayer) partial_dbeta[e] = 0;
      });

  for (int64_t row = slot; row < a.rows; row += gridDim.x) {
    const T* dyr = a.dy + row * a.cols;
    const T* xr = a.x + row * a.cols;
    T* dxr = a.dx + row * a.cols;
    const acc_t rstd = a.rstd[row];
    const acc_t mean = math::row_center<kNorm>(a.mean, row, rstd);

    // dy, x and w of the vector at column e (both passes; the second one hits L2).
    const auto load_vectors = [&](int64_t e, acc_t(&dy)[kVec], acc_t(&x)[kVec],
                                  acc_t(&w)[kVec]) {
      load_vector(dyr + e, dy);
      load_vector(xr + e, x);
      load_param(a.weight, e, weight_vectors, acc_t(1), w);
    };
    SumPair<acc_t> sums{0, 0};  // of g (LayerNorm only) and of g * xhat
    cuda_indexing::for_each_streamed(
        s, t, group,
        [&](int64_t e) {
          acc_t dy[kVec], x[kVec], w[kVec];
          load_vectors(e, dy, x, w);
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            const acc_t g = dy[k] * w[k];
            if constexpr (kNorm == Norm::kLayer) sums.a += g;
            sums.b += g * math::normalize<kNorm>(x[k], mean, rstd);
          }
        },
        [&](int64_t e) {
          const acc_t g = static_cast<acc_t>(dyr[e]) * load_param(a.weight, e, acc_t(1));
          if constexpr (kNorm == Norm::kLayer) sums.a += g;
          sums.b += g * math::normalize<kNorm>(static_cast<acc_t>(xr[e]), mean, rstd);
        });
    sums = group_allreduce(sums, SumPair<acc_t>{0, 0}, SumCombine{}, scratch);
    const acc_t mean_g = sums.a * inv_cols;
    const acc_t mean_g_xhat = sums.b * inv_cols;
    cuda_indexing::for_each_streamed(
        s, t, group,
        [&](int64_t e) {
          acc_t dy[kVec], x[kVec], w[kVec];
          load_vectors(e, dy, x, w);
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            const acc_t xhat = math::normalize<kNorm>(x[k], mean, rstd);
            partial_dgamma[e + k] += dy[k] * xhat;
            if constexpr (kNorm == Norm::kLayer) partial_dbeta[e + k] += dy[k];
            x[k] = math::input_grad<kNorm>(dy[k] * w[k], xhat, rstd, mean_g, mean_g_xhat);
          }
          store_vector(dxr + e, x);
        },
        [&](int64_t e) {
          const acc_t dy = static_cast<acc_t>(dyr[e]);
          const acc_t xhat = math::normalize<kNorm>(static_cast<acc_t>(xr[e]), mean, rstd);
          partial_dgamma[e] += dy * xhat;
          if constexpr (kNorm == Norm::kLayer) partial_dbeta[e] += dy;
          dxr[e] = static_cast<T>(math::input_grad<kNorm>(
              dy * load_param(a.weight, e, acc_t(1)), xhat, rstd, mean_g, mean_g_xhat));
        });
  }
}

// ---------------------------------------------------------------------------------------
// dgamma/dbeta = the sum of the slots' partial rows, in a fixed order (RMSNorm: dgamma
// only). blockDim = (kFinalizeColumns, kFinalizeLanes).

template <Norm kNorm, typename acc_t, typename P>
__global__ void __launch_bounds__(cuda_config::kFinalizeColumns * cuda_config::kFinalizeLanes)
    finalize_param_grads_kernel(const acc_t* __restrict__ partial, int64_t slots, int64_t cols,
                                P* __restrict__ grad_weight, P* __restrict__ grad_bias) {
  constexpr int kGrads = kParamGrads<kNorm>;
  constexpr int kColumns = cuda_config::kFinalizeColumns;
  constexpr int kLanes = cuda_config::kFinalizeLanes;
  __shared__ SumPair<acc_t> sums[kLanes][kColumns];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColumns + threadIdx.x;
  SumPair<acc_t> sum{0, 0};
  if (col < cols) {
    cuda_indexing::for_each_partial_slot(threadIdx.y, kLanes, slots, [&](int64_t s) {
      sum.a += partial[s * kGrads * cols + col];
      if constexpr (kNorm == Norm::kLayer) sum.b += partial[s * kGrads * cols + cols + col];
    });
  }
  sums[threadIdx.y][threadIdx.x] = sum;
  BlockLanes lanes;
  cuda_indexing::shared_tree_reduce(&sums[0][threadIdx.x], kColumns, threadIdx.y, kLanes,
                                    SumCombine{}, lanes);
  if (threadIdx.y == 0 && col < cols) {
    grad_weight[col] = static_cast<P>(sums[0][threadIdx.x].a);
    if constexpr (kNorm == Norm::kLayer) grad_bias[col] = static_cast<P>(sums[0][threadIdx.x].b);
  }
}

// ---------------------------------------------------------------------------------------
// Host side

// Offset in elements of `t`'s first element from a 16-byte boundary (0 for an absent
// tensor). CUDA kernels, ours and torch's, need element-aligned pointers; only external
// memory (from_blob, DLPack) can break that, so it gets an error instead of a fault.
template <typename T>
int misalign_of(const at::Tensor& t) {
  if (!t.defined()) return 0;
  const auto address = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  TORCH_CHECK(address % sizeof(T) == 0, "layernorm_ext: a CUDA tensor of ", t.scalar_type(),
              " starts at an address that is not a multiple of its element size");
  return static_cast<int>((address / sizeof(T)) % kVecOf<T>);
}

// The common misalignment of row tensors, or -1 when they differ.
template <typename T>
int common_misalign(std::initializer_list<const at::Tensor*> tensors) {
  const int first = misalign_of<T>(**tensors.begin());
  for (const at::Tensor* t : tensors) {
    if (misalign_of<T>(*t) != first) return -1;
  }
  return first;
}

template <typename P>
ParamRef<P> param_ref(const at::Tensor& t) {
  if (!t.defined()) return {nullptr, 0};
  return {t.const_data_ptr<P>(), misalign_of<P>(t)};
}

inline dim3 block_of(const LaunchConfig& c) {
  return dim3(static_cast<unsigned>(c.threads_per_row), static_cast<unsigned>(c.rows_per_block));
}

inline dim3 grid_of(int64_t blocks) { return dim3(static_cast<unsigned>(blocks)); }

// The launchers below run a kernel through `launch(kernel, grid, block, args...)`: a
// stream launch with its error check on the GPU (layernorm_cuda.cu), the CPU emulator
// in the tests (tests/cuda_emulator/). `launch.resident_blocks(kernel, block)` is how
// many blocks of that kernel the device runs at once.

// The forward kernel for a launch configuration (c.kind, c.elems_per_thread,
// c.threads_per_row == 1).
template <Norm kNorm, typename T, typename P>
auto forward_kernel(const LaunchConfig& c) {
  if constexpr (kHasRegisterKernels<T>) {
    constexpr int kVec = kVecOf<T>;
    constexpr int kSmall = cuda_config::kSmallSliceVectors;
    constexpr int kLarge = cuda_config::kLargeSliceVectors;
    if (c.kind == Kind::kRegisters) {
      const bool small = c.elems_per_thread == kSmall * kVec, alone = c.threads_per_row == 1;
      TORCH_INTERNAL_ASSERT(small || c.elems_per_thread == kLarge * kVec);
      TORCH_INTERNAL_ASSERT(alone ? !small : c.threads_per_row >= kVec);  // the edge slots
      // __launch_bounds__ (kForwardMaxThreads)
      TORCH_INTERNAL_ASSERT(!(small || alone) ||
                            c.threads_per_row * c.rows_per_block == cuda_config::kRowBlockThreads);
      if (small) return forward_registers_kernel<kNorm, T, P, kSmall, false>;
      if (alone) return forward_registers_kernel<kNorm, T, P, kLarge, true>;
      return forward_registers_kernel<kNorm, T, P, kLarge, false>;
    }
  }
  TORCH_INTERNAL_ASSERT(c.kind == Kind::kStreaming,
                        "layernorm_ext: no register kernel for this dtype");
  return forward_streaming_kernel<kNorm, T, P>;
}

template <Norm kNorm, typename T, typename P, typename Launch>
void launch_forward(const ForwardArgs& args, const Launch& launch) {
  using acc_t = at::opmath_type<T>;
  ForwardParams<T, P> a;
  a.x = args.input.const_data_ptr<T>();
  a.weight = param_ref<P>(args.weight);
  a.bias = param_ref<P>(args.bias);
  a.y = args.output.mutable_data_ptr<T>();
  a.mean = args.mean.defined() ? args.mean.mutable_data_ptr<acc_t>() : nullptr;
  a.rstd = args.rstd.mutable_data_ptr<acc_t>();
  a.rows = args.shape.rows;
  a.cols = args.shape.cols;
  a.eps = static_cast<acc_t>(args.eps);
  const int misalign = common_misalign<T>({&args.input, &args.output});
  a.vectorized = misalign >= 0;
  a.x_misalign = a.vectorized ? misalign : 0;

  const LaunchConfig c = cuda_config::forward_config(a.cols, sizeof(T), a.vectorized);
  const auto kernel = forward_kernel<kNorm, T, P>(c);
  // One wave of resident blocks, each looping over row groups, rather than a block per
  // row group: on an H100 (2026-11-25) the forwards of short rows cost a near-constant
  // 2.2-3 ns per block (fp32 D = 128 and bf16 D = 20 / 128), whatever the bytes a block
  // moved. Rows are independent, so the result does not depend on the grid.
  const int64_t blocks = std::min({at::ceil_div<int64_t>(a.rows, c.rows_per_block),
                                   int64_t(kMaxGridBlocks),
                                   launch.resident_blocks(kernel, block_of(c))});
  launch(kernel, grid_of(std::max<int64_t>(blocks, 1)), block_of(c), a);
}

template <Norm kNorm, typename T, typename P, typename Launch>
void launch_backward(const BackwardArgs& args, const Launch& launch) {
  using acc_t = at::opmath_type<T>;
  const int64_t rows = args.shape.rows, cols = args.shape.cols;
  if (rows == 0) {
    args.grad_weight.zero_();
    if (args.grad_bias.defined()) args.grad_bias.zero_();
    return;
  }
  BackwardParams<T, P> a;
  a.dy = args.grad_out.const_data_ptr<T>();
  a.x = args.input.const_data_ptr<T>();
  a.mean = args.mean.defined() ? args.mean.const_data_ptr<acc_t>() : nullptr;
  a.rstd = args.rstd.const_data_ptr<acc_t>();
  a.weight = param_ref<P>(args.weight);
  a.dx = args.grad_input.mutable_data_ptr<T>();
  a.rows = rows;
  a.cols = cols;
  const int misalign = common_misalign<T>({&args.grad_out, &args.input, &args.grad_input});
  a.vectorized = misalign >= 0;
  a.x_misalign = a.vectorized ? misalign : 0;

  const LaunchConfig c = cuda_config::backward_config(cols, sizeof(T), a.vectorized);
  const int period = a.vectorized ? cuda_config::row_alignment_period(cols, kVecOf<T>) : 1;
  const int64_t slots = cuda_config::backward_slots(rows, cols, c, period);
  at::Tensor partial = at::empty({slots, kParamGrads<kNorm>, cols}, args.rstd.options());
  a.partial = partial.mutable_data_ptr<acc_t>();
  const dim3 grid = grid_of(slots / c.rows_per_block);
  if (c.kind == Kind::kStreaming) {
    launch(backward_streaming_kernel<kNorm, T, P>, grid, block_of(c), a);
  } else if constexpr (kHasRegisterKernels<T>) {
    if (c.elems_per_thread == cuda_config::kElemsBackward) {
      launch(backward_registers_kernel<kNorm, T, P, cuda_config::kElemsBackward>, grid,
             block_of(c), a);
    } else {
      TORCH_INTERNAL_ASSERT(c.elems_per_thread == cuda_config::kElemsBackwardLong);
      launch(backward_registers_kernel<kNorm, T, P, cuda_config::kElemsBackwardLong>, grid,
             block_of(c), a);
    }
  } else {
    TORCH_INTERNAL_ASSERT(false, "layernorm_ext: no register kernel for this dtype");
  }

  launch(finalize_param_grads_kernel<kNorm, acc_t, P>,
         grid_of(at::ceil_div<int64_t>(cols, cuda_config::kFinalizeColumns)),
         dim3(cuda_config::kFinalizeColumns, cuda_config::kFinalizeLanes),
         partial.const_data_ptr<acc_t>(), slots, cols, args.grad_weight.mutable_data_ptr<P>(),
         args.grad_bias.defined() ? args.grad_bias.mutable_data_ptr<P>() : nullptr);
}

}  // namespace cuda_kernels
}  // namespace layernorm_ext
