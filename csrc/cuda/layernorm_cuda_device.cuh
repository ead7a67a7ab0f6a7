// Building blocks of the CUDA kernels (layernorm_cuda_forward.cuh,
// layernorm_cuda_backward.cuh): 16-byte vector loads and stores, parameter reads, the
// reductions a row needs (Welford moments, sums) and their scaling against overflow, the
// kernels' arguments (filled by the host launch, layernorm_cuda_kernels.cuh), and the
// writes of y that both forwards share.
#pragma once

#include <ATen/OpMathType.h>

#include <cstring>
#include <type_traits>

#include "../layernorm_math.h"
#include "layernorm_cuda_config.h"
#include "layernorm_cuda_indexing.h"

namespace layernorm_ext {
namespace cuda_kernels {

using cuda_indexing::RowSplit;

// The parameter gradients a norm has: dgamma and dbeta (LayerNorm), dgamma (RMSNorm).
// Also the number of partial rows per backward slot.
template <Norm kNorm>
constexpr int kParamGrads = kNorm == Norm::kLayer ? 2 : 1;

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
constexpr int kVecOf = 16 / static_cast<int>(sizeof(T));

// ---------------------------------------------------------------------------------------
// 16-byte vector I/O

// p is a multiple of kBytes, as a vector access of kBytes needs: a GPU faults otherwise
// ("misaligned address"); x86 would not, so the emulator checks each access.
template <size_t kBytes>
__device__ __forceinline__ void expect_aligned(const void* p) {
#if defined(LN_CUDA_EMULATION)
  emu::check_aligned(p, kBytes);
#else
  (void)p;
#endif
}

// *p read as a V (a vector of sizeof(V) bytes): one load.
template <typename V>
__device__ __forceinline__ V load_aligned(const void* p) {
  expect_aligned<sizeof(V)>(p);
  return *reinterpret_cast<const V*>(p);
}

// A 16-byte vector as loaded (a uint4), and its elements as acc_t. The register forward
// keeps rows this way and converts where it uses them: a thread then holds the same bytes
// of a row in the same registers whatever the dtype (a bf16 conversion is one shift).
template <typename T>
__device__ __forceinline__ uint4 load_raw(const T* __restrict__ p) {
  return load_aligned<uint4>(p);
}

__device__ __forceinline__ float float_from_bits(uint32_t bits) {
  float value;
  memcpy(&value, &bits, sizeof(value));
  return value;
}

// The two elements of a 32-bit word of a 2-byte dtype.
template <typename T, typename acc_t>
__device__ __forceinline__ void unpack_word(uint32_t word, acc_t (&out)[2]) {
  static_assert(sizeof(T) == 2, "a word holds two 2-byte elements");
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    // A bfloat16's bits are the high half of its float's: a word's first element takes
    // one shift, its second one mask (the generic conversion moves the second element's
    // half down first, then shifts it: two instructions).
    out[0] = float_from_bits(word << 16);
    out[1] = float_from_bits(word & 0xffff0000u);
  } else {
    T values[2];
    memcpy(values, &word, sizeof(word));
    out[0] = static_cast<acc_t>(values[0]);
    out[1] = static_cast<acc_t>(values[1]);
  }
}

template <typename T, typename acc_t>
__device__ __forceinline__ void unpack(const uint4& raw, acc_t (&out)[kVecOf<T>]) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      acc_t pair[2];
      unpack_word<T>(words[k], pair);
      out[2 * k] = pair[0];
      out[2 * k + 1] = pair[1];
    }
  } else {
    T values[kVecOf<T>];
    memcpy(values, &raw, sizeof(raw));
#pragma unroll
    for (int k = 0; k < kVecOf<T>; ++k) out[k] = static_cast<acc_t>(values[k]);
  }
}

// Loads kN elements from p (16-byte aligned; kN * sizeof(T) a multiple of 16) as acc_t.
template <int kN, typename T, typename acc_t>
__device__ __forceinline__ void load_vector(const T* __restrict__ p, acc_t (&out)[kN]) {
  constexpr int kPerChunk = kVecOf<T>;
  static_assert(kN % kPerChunk == 0, "whole 16-byte chunks");
#pragma unroll
  for (int c = 0; c < kN / kPerChunk; ++c) {
    acc_t chunk[kPerChunk];
    unpack<T>(load_raw(p + c * kPerChunk), chunk);
#pragma unroll
    for (int k = 0; k < kPerChunk; ++k) out[c * kPerChunk + k] = chunk[k];
  }
}

// kWidth adjacent elements that start at a multiple of their size in bytes: one load or
// store. A staged tile's unit (cuda_config::staged_unit_width, up to 8 bytes), or kWidth
// floats of a staged kernel's weight or bias (up to 16 bytes).
template <int kWidth, typename T>
struct alignas(kWidth * sizeof(T)) TileUnit {
  T values[kWidth];
};

// The unit at p as acc_t, into out[0 .. kWidth).
template <int kWidth, typename T, typename acc_t>
__device__ __forceinline__ void load_tile_unit(const T* p, acc_t* out) {
  const auto unit = load_aligned<TileUnit<kWidth, T>>(p);
  if constexpr (sizeof(T) == 2 && kWidth % 2 == 0) {  // by words: unpack_word's conversion
#pragma unroll
    for (int w = 0; w < kWidth / 2; ++w) {
      uint32_t word;
      memcpy(&word, unit.values + 2 * w, sizeof(word));
      acc_t pair[2];
      unpack_word<T>(word, pair);
      out[2 * w] = pair[0];
      out[2 * w + 1] = pair[1];
    }
  } else {
#pragma unroll
    for (int k = 0; k < kWidth; ++k) out[k] = static_cast<acc_t>(unit.values[k]);
  }
}

template <int kWidth, typename T, typename acc_t>
__device__ __forceinline__ void store_tile_unit(T* p, const acc_t* in) {
  TileUnit<kWidth, T> unit;
#pragma unroll
  for (int k = 0; k < kWidth; ++k) unit.values[k] = static_cast<T>(in[k]);
  expect_aligned<sizeof(unit)>(p);
  *reinterpret_cast<TileUnit<kWidth, T>*>(p) = unit;
}

// kN values at p (shared memory, p a unit's start) a unit of kWidth at a time: a staged
// kernel's weight (and bias) for a vector of its row, as acc_t.
template <int kWidth, int kN, typename V>
__device__ __forceinline__ void load_tile_units(const V* p, V (&out)[kN]) {
  static_assert(kN % kWidth == 0, "whole units");
#pragma unroll
  for (int k = 0; k < kN; k += kWidth) load_tile_unit<kWidth>(p + k, out + k);
}

#if !defined(LN_CUDA_EMULATION)
__device__ __forceinline__ unsigned shared_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
#endif

// A 16-byte load from shared memory (a staged block of rows), read where it is used:
// a volatile load the compiler neither merges with another nor keeps in registers across
// the row's passes, which would make it the register kernel's kept row again (and spilled
// nvcc 13.0's rows per thread at the 96 registers of 5 blocks an SM). The "memory"
// clobbers keep it and the shared stores of y in program order with the other accesses.
__device__ __forceinline__ uint4 load_shared_16_bytes(const void* p) {
  uint4 v;
#if defined(LN_CUDA_EMULATION)
  expect_aligned<sizeof(v)>(p);
  memcpy(&v, p, sizeof(v));
#else
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(shared_address(p))
               : "memory");
#endif
  return v;
}

// One 16-byte global store. Written in PTX because the compiler splits a plain uint4
// store into four 4-byte stores in some kernels (seen with nvcc 13.0 in the forward).
// No "memory" clobber: nothing in these kernels reads back what it stores, and without
// it the compiler may still hoist the next vector's loads above this store.
// kShared: p is in shared memory (a staged block of rows; see load_shared_16_bytes).
template <bool kShared = false>
__device__ __forceinline__ void store_16_bytes(void* p, const uint4& v) {
#if defined(LN_CUDA_EMULATION)
  expect_aligned<sizeof(v)>(p);
  memcpy(p, &v, sizeof(v));
#else
  if constexpr (kShared) {
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};" ::"r"(shared_address(p)),
                 "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
  } else {
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y),
                 "r"(v.z), "r"(v.w));
  }
#endif
}

// Stores kN values as T to p (16-byte aligned; kN * sizeof(T) a multiple of 16).
template <int kN, bool kShared = false, typename T, typename acc_t>
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
    store_16_bytes<kShared>(p + c * kPerChunk, raw);
  }
}

// cp.async (global to shared memory without a register) exists from sm_80 on; the
// emulator stands in for it with a memcpy. Older GPUs copy staged spans through registers.
#if defined(LN_CUDA_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
#define LN_HAS_ASYNC_COPY 1
#else
#define LN_HAS_ASYNC_COPY 0
#endif

// 16 bytes from global to shared memory (cuda_config::kAsyncStagedCopy). The thread sees
// them after wait_async_copies(), the block after that and a barrier.
__device__ __forceinline__ void copy_16_bytes_async(void* shared, const void* global) {
#if defined(LN_CUDA_EMULATION)
  expect_aligned<16>(shared);
  expect_aligned<16>(global);
  memcpy(shared, global, 16);
#elif LN_HAS_ASYNC_COPY
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(shared_address(shared)),
               "l"(global)
               : "memory");
#else
  (void)shared, (void)global;
  __trap();  // not reached: copy_span copies through registers there
#endif
}

__device__ __forceinline__ void wait_async_copies() {
#if !defined(LN_CUDA_EMULATION) && LN_HAS_ASYNC_COPY
  asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}

// Asks L2 to fetch [begin, end) of global memory (end > begin), the lines of 128 bytes it
// touches divided among `threads` threads (thread t: lines t, t + threads, ...), ahead of
// a loop's next loads (cuda_config::kPrefetchNextRows). A hint: no register waits for it,
// and the emulator skips it.
__device__ __forceinline__ void prefetch_to_l2(const void* begin, const void* end, int t,
                                               int threads) {
#if !defined(LN_CUDA_EMULATION)
  constexpr uintptr_t kLine = 128;
  const uintptr_t first = reinterpret_cast<uintptr_t>(begin) / kLine;
  const uintptr_t last = (reinterpret_cast<uintptr_t>(end) - 1) / kLine;
  // One or two lines a thread: unrolled, nvcc 13.0 made 35 copies of the loop's body.
#pragma unroll 1
  for (uintptr_t line = first + t; line <= last; line += threads) {
    asm volatile("prefetch.L2 [%0];" ::"l"(line * kLine));
  }
#else
  (void)begin, (void)end, (void)t, (void)threads;
#endif
}

// The same for a thread group's next row or span of a persistent loop: elements [first,
// first + count) of `tensor`, when count > 0 and kPrefetchNextRows.
template <typename T>
__device__ __forceinline__ void prefetch_next(const T* tensor, int64_t first, int64_t count,
                                              int t, int threads) {
  if (cuda_config::kPrefetchNextRows && count > 0) {
    prefetch_to_l2(tensor + first, tensor + first + count, t, threads);
  }
}

// Copies a staged block's span of rows (cuda_indexing::span_split) between global memory
// and the tile (element e at layout.at(e)), which start at the same offset from a 16-byte
// boundary: thread t of `threads` its packs and edge elements.
// Into the tile with kAsyncStagedCopy, the packs may still be in flight on return: the
// caller calls wait_async_copies() before the barrier that hands the tile to the block.
template <bool kToShared, typename T>
__device__ __forceinline__ void copy_span(const T* from, T* to, const RowSplit& span,
                                          const cuda_indexing::TileLayout& layout, int t,
                                          int threads) {
  constexpr bool kAsync = kToShared && cuda_config::kAsyncStagedCopy && LN_HAS_ASYNC_COPY;
  if constexpr (!kToShared || kAsync) {
    // A loop: an async copy's issue, or a store's, waits for no other vector's load.
    const cuda_indexing::SpanPacks own = cuda_indexing::span_packs(span, layout, t, threads);
    const T* src = from + (kToShared ? own.first : own.tile_first);
    T* dst = to + (kToShared ? own.tile_first : own.first);
    const int src_stride = kToShared ? own.stride : own.tile_stride;
    const int dst_stride = kToShared ? own.tile_stride : own.stride;
#pragma unroll 4
    for (int i = 0; i < own.count; ++i, src += src_stride, dst += dst_stride) {
      if constexpr (kAsync) {
        copy_16_bytes_async(dst, src);
      } else {
        store_16_bytes(dst, load_raw(src));
      }
    }
    // A branch the whole block takes alike: without it nvcc predicated the edge copies
    // into every span (~67 warp-instructions a span, even where spans have no edges).
    if (span.head != 0 || span.tail != 0) [[unlikely]] {
      cuda_indexing::for_each_span_edge(span, t, [&](int e) {
        if constexpr (kToShared) {
          to[layout.at(e)] = from[e];
        } else {
          to[e] = from[layout.at(e)];
        }
      });
    }
    return;
  }
  // Into the tile through registers: all loads before any store.
  constexpr int kSlots = cuda_indexing::kRowTileSlots;
  uint4 packs[kSlots];
  T edge[2];
  cuda_indexing::for_each_register_pack<kSlots>(
      span, t, threads, [&](int i, int e) { packs[i] = load_raw(from + e); });
  cuda_indexing::for_each_register_edge(span, t, threads,
                                        [&](int i, int e) { edge[i] = from[e]; });
  cuda_indexing::for_each_register_pack<kSlots>(span, t, threads, [&](int i, int e) {
    store_16_bytes<true>(to + layout.at(e), packs[i]);
  });
  cuda_indexing::for_each_register_edge(span, t, threads,
                                        [&](int i, int e) { to[layout.at(e)] = edge[i]; });
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
// The register forward shifts by the row's first element, which every thread of its
// group reads (one load instruction a warp, with the slice's loads), and sums half
// deviations, (scaled(x) - shift) / 2: two values of a row may differ by 2 max / 128,
// and halved each term stays within max / 128, as the static_assert above counts.
template <typename acc_t>
struct RowShift {
  acc_t half;  // scaled(x) / 2 of the row's first element; 0 in a row of no elements

  __device__ __forceinline__ static RowShift at(acc_t x) { return {x * half_scale()}; }
  // One multiply-add; x * half_scale() is exact but for subnormal results.
  __device__ __forceinline__ acc_t half_deviation(acc_t x) const {
    return x * half_scale() - half;
  }
  __device__ __forceinline__ acc_t mean(acc_t half_deviation_sum, int count) const {
    return acc_t(2) * (half + half_deviation_sum / static_cast<acc_t>(count));
  }

 private:
  __device__ __forceinline__ static acc_t half_scale() {
    return math::rescue_scaled(acc_t(1)) / acc_t(2);
  }
};

// Moments of the kN values of one vector, scaled as above: two-pass, the first pass
// shifted by the first value (RowShift). (A plain sum / kN of equal values happens to be
// exact for the vector widths of today, 4 floats or 8 two-byte values; of 8 floats it is
// not.)
template <int kN, typename acc_t>
__device__ __forceinline__ Welford<acc_t> scaled_vector_moments(const acc_t (&v)[kN]) {
  const auto shift = RowShift<acc_t>::at(v[0]);
  acc_t sum = 0;  // of half deviations; the first value's is 0
#pragma unroll
  for (int k = 1; k < kN; ++k) sum += shift.half_deviation(v[k]);
  const acc_t mean = shift.mean(sum, kN);
  acc_t m2 = 0;
#pragma unroll
  for (int k = 0; k < kN; ++k) m2 += (scaled(v[k]) - mean) * (scaled(v[k]) - mean);
  return {mean, m2, kN};
}

// A row's mean (0 for RMSNorm) and rstd from its threads' passes over their elements:
// the register forward's group of threads, or a staged row's thread alone.
// for_each_x(f) calls f(x) on each of the thread's elements (as acc_t); total(value,
// identity, combine) reduces a value over the row's threads and returns the row's;
// first_x is the row's first element (RowShift; any value for RMSNorm).
//
// LayerNorm: two passes (all of scaled(x): see scaled() above), each a reduction over
// the row: the threads' means (shifted sums, see RowShift) merged into the row's
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

template <Norm kNorm, typename acc_t, typename ForEachX, typename Total>
__device__ __forceinline__ RowNormStats<acc_t> row_norm_stats(acc_t first_x, int64_t cols,
                                                              acc_t eps, ForEachX&& for_each_x,
                                                              Total&& total) {
  if constexpr (kNorm == Norm::kRms) {
    acc_t sum = 0;  // of x^2
    for_each_x([&](acc_t x) { sum += x * x; });
    const RowSum<acc_t> row = total(RowSum<acc_t>{sum}, RowSum<acc_t>{0}, SumCombine{});
    return {acc_t(0), math::rstd_from_mean_square(row.sum / static_cast<acc_t>(cols), eps)};
  } else {
    const RowShift<acc_t> shift = RowShift<acc_t>::at(first_x);
    acc_t sum = 0;  // of shift.half_deviation(x)
    int count = 0;
    for_each_x([&](acc_t x) {
      sum += shift.half_deviation(x);
      ++count;
    });
    const WeightedMean<acc_t> thread_mean{count > 0 ? shift.mean(sum, count) : acc_t(0),
                                          static_cast<acc_t>(count)};
    const acc_t scaled_mean = total(thread_mean, WeightedMean<acc_t>{0, 0}, MeanCombine{}).mean;
    acc_t m2 = 0;
    for_each_x([&](acc_t x) {
      const acc_t d = scaled(x) - scaled_mean;
      m2 += d * d;
    });
    const acc_t inv_cols = acc_t(1) / static_cast<acc_t>(cols);
    const acc_t scaled_var =
        total(RowSum<acc_t>{m2 * inv_cols}, RowSum<acc_t>{0}, SumCombine{}).sum;
    const auto stats = math::rescue_unscaled(math::MeanVariance<acc_t>{scaled_mean, scaled_var});
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
