// How the CUDA kernels move data: 16-byte vector loads and stores between global memory
// and registers, a staged tile's units and 16-byte accesses in shared memory, the
// asynchronous copy into it (sm_80 on), L2 prefetch hints, and the copy of a staged
// block's span of rows (layernorm_cuda_forward.cuh, layernorm_cuda_backward.cuh). Every
// vector access is aligned to its size, as a GPU needs; the emulator checks it.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "layernorm_cuda_config.h"
#include "layernorm_cuda_indexing.h"

namespace layernorm_ext {
namespace cuda_kernels {

using cuda_indexing::RowSplit;

template <typename T>
constexpr int kVecOf = 16 / static_cast<int>(sizeof(T));

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
#if defined(LN_CUDA_EMULATION)
  V v;  // the host compiler may assume a V* never points at float storage: a memcpy
  memcpy(&v, p, sizeof(v));
  return v;
#else
  return *reinterpret_cast<const V*>(p);
#endif
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

}  // namespace cuda_kernels
}  // namespace layernorm_ext
