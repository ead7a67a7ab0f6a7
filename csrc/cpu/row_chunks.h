// A row as chunks of vectors: loads and stores (non-temporal ones for large outputs),
// prefetches, and half/bf16 parameters converted once per task. The building blocks of
// the CPU row kernels (row_kernels.cpp).
#pragma once

// Compiled only as part of row_kernels.cpp, once per instruction set (row_kernels.h),
// after CPU_CAPABILITY is set, so its code lands in that ISA's namespace.
#ifndef CPU_CAPABILITY
#error "included only by row_kernels.cpp"
#endif

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "row_kernels.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#define LN_HAVE_STREAM_STORES 1
#endif

namespace layernorm_ext::cpu {
inline namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Non-temporal store of one whole vector to an address aligned to its size. For outputs
// past the stream threshold (layernorm_cpu.cpp), which leave the cache anyway, this
// skips the read-for-ownership of every output line: a third of the forward's DRAM
// traffic.
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

#if defined(CPU_CAPABILITY_AVX512)
// setup.py compiles the AVX-512 object of row_kernels.cpp with -mavx512bf16 too; its
// instructions run only on CPUs that have them: kernel_table_AVX512() (row_kernels.cpp,
// reached only on AVX-512 CPUs) sets this flag before any kernel runs. GCC emits them
// only for the intrinsic below.
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
      const auto raw = n == kSize ? Vectorized<T>::loadu(p) : partial_reduced(p, n);
      auto [lo, hi] = at::vec::convert_to_float<T>(raw);
      return {lo, hi};
    } else {
      if (n == kSize) return {Vec::loadu(p), Vec::loadu(p + kLanes)};
      return {Vec::loadu(p, std::min(n, kLanes)),
              n > kLanes ? Vec::loadu(p + kLanes, n - kLanes) : Vec(0)};
    }
  }
  // n < kSize half/bf16 elements, the lanes past n zero. Not Vectorized<T>::loadu(p, n):
  // some ATen releases left those lanes unset there, and the reductions add every lane.
  static Vectorized<T> partial_reduced(const T* p, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
    return _mm512_maskz_loadu_epi16(static_cast<__mmask32>((uint64_t(1) << n) - 1), p);
#else
    alignas(64) uint16_t lanes[kSize] = {};
    std::memcpy(lanes, p, n * sizeof(T));
    return Vectorized<T>::loadu(lanes);
#endif
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

// Prefetches a chunk of n elements into L2 (one prefetch per 64-byte line); n, not a
// whole chunk, so that no pointer runs past a tensor's last row.
template <typename T, typename Count>
inline void prefetch_chunk(const T* p, Count n) {
  constexpr int64_t kLineElems = 64 / sizeof(T);
  for (int64_t e = 0; e < n; e += kLineElems) __builtin_prefetch(p + e, 0, 2);
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
// a whole number of 64-byte cache lines, and the row (or a chunk of it) starts on a
// line. Every streamed chunk then fills whole lines; a partly written line waits in a
// write-combining buffer, and the backward has a whole group of rows' lines open at
// once.
template <typename T>
bool can_stream(const T* row) {
#ifdef LN_HAVE_STREAM_STORES
  constexpr uintptr_t kLine = kCacheLineBytes;
  if constexpr (Chunk<T>::kSize * sizeof(T) % kLine != 0) return false;  // e.g. AVX2 bf16
  return reinterpret_cast<uintptr_t>(row) % kLine == 0;
#else
  (void)row;
  return false;
#endif
}

// Copies a span of `count` elements to dst from src, which lies at the same offset
// within a cache line: its whole lines with non-temporal stores, its partial first and
// last lines (which it shares with the rows around it) with plain ones.
template <typename T>
void copy_streaming(T* dst, const T* src, int64_t count) {
  constexpr int64_t kLine = kCacheLineBytes;
  auto* d = reinterpret_cast<char*>(dst);
  auto* s = reinterpret_cast<const char*>(src);
  int64_t bytes = count * int64_t(sizeof(T));
  const int64_t head =
      std::min<int64_t>(bytes, (kLine - reinterpret_cast<uintptr_t>(d) % kLine) % kLine);
  std::memcpy(d, s, head);
  d += head, s += head, bytes -= head;
  using Bits = Vectorized<float>;  // any vector: the bytes are copied as they are
  constexpr int64_t kVectorBytes = Bits::size() * int64_t(sizeof(float));
  static_assert(kLine % kVectorBytes == 0);
  for (; bytes >= kLine; d += kLine, s += kLine, bytes -= kLine) {
    for (int64_t v = 0; v < kLine; v += kVectorBytes) stream_store(d + v, Bits::loadu(s + v));
  }
  std::memcpy(d, s, bytes);
}

// A buffer of at least `bytes`, the calling thread's own, kept for its next calls: a
// heap allocation each call of a row kernel made the float32 backward of 6291456x20
// ~10% slower (its calls of ~800 rows each stage their last, partial group).
// (No std::unique_ptr: its inline destructor would be shared by the ISAs' objects.)
struct ThreadBuffer {
  char* data = nullptr;
  int64_t size = 0;
  ~ThreadBuffer() { delete[] data; }
};
inline char* thread_buffer(int64_t bytes) {
  thread_local ThreadBuffer buffer;
  if (buffer.size < bytes) {
    char* larger = new char[bytes];  // first: a failed allocation leaves the old one
    delete[] buffer.data;
    buffer.data = larger;
    buffer.size = bytes;
  }
  return buffer.data;
}

// Where a group of rows writes its outputs (y, dx). Rows whose whole chunks start on
// cache lines, and outputs not streamed, go straight to the output (whole chunks
// streamed where stream_chunk() says so). Other rows of a streamed output (rows whose
// bytes are no whole number of lines, as D = 100 or 1000 in float32, or rows shorter
// than a chunk) would fill their lines in parts, and the core reads every such line
// from DRAM before it writes it: half again the forward's traffic, a third more the
// backward's. Those go to a buffer that lies within a line as the output does, and
// finish() streams the group's lines from there, the copy in L1/L2. Groups of more
// than kMaxStagedBytes (rows past 128 KiB) are not worth a copy through L3: they write
// in place, streamed only where a row happens to start on a line.
template <typename T>
class OutputRows {
 public:
  static constexpr int64_t kMaxStagedBytes = 128 << 10;

  // out: the output's rows of `cols` elements, written in groups of up to max_rows.
  OutputRows(T* out, int64_t cols, int64_t max_rows, bool stream) : out_(out), cols_(cols) {
#ifdef LN_HAVE_STREAM_STORES
    constexpr int64_t kLine = kCacheLineBytes;
    const int64_t row_bytes = cols * int64_t(sizeof(T));
    const bool rows_on_lines = cols >= Chunk<T>::kSize && row_bytes % kLine == 0 &&
                               Chunk<T>::kSize * int64_t(sizeof(T)) % kLine == 0 &&
                               reinterpret_cast<uintptr_t>(out) % kLine == 0;
    if (stream && !rows_on_lines && max_rows * row_bytes <= kMaxStagedBytes) {
      staged_bytes_ = max_rows * row_bytes + 2 * kLine;
    }
#else
    (void)max_rows;
#endif
    // In place, the chunks that start on a line (can_stream): every chunk of rows on
    // lines, some of longer unstaged ones.
    stream_direct_ = stream && staged_bytes_ == 0;
  }
  // Starts the group whose first row is `first`.
  void start(int64_t first) {
    first_ = first;
    if (staged_bytes_ > 0) {
      constexpr uintptr_t kLine = kCacheLineBytes;
      const auto base = reinterpret_cast<uintptr_t>(thread_buffer(staged_bytes_));
      const uintptr_t offset = reinterpret_cast<uintptr_t>(out_ + first * cols_) % kLine;
      staged_ = reinterpret_cast<T*>((base + kLine - 1) / kLine * kLine + offset);
    }
  }
  // Where row r of the group goes.
  T* row(int64_t r) const {
    return staged_ ? staged_ + r * cols_ : out_ + (first_ + r) * cols_;
  }
  // Whether a whole chunk at p (in a row from row()) is to be streamed.
  bool stream_chunk(const T* p) const { return stream_direct_ && can_stream(p); }
  // Ends the group: writes out its first `rows` rows where they were staged.
  void finish(int64_t rows) const {
    if (staged_) copy_streaming(out_ + first_ * cols_, staged_, rows * cols_);
  }

 private:
  T* out_;
  int64_t cols_;
  int64_t first_ = 0;
  bool stream_direct_ = false;
  int64_t staged_bytes_ = 0;  // the buffer's size, where rows are staged
  T* staged_ = nullptr;  // row 0 of the group in the buffer
};

// A weight or bias row as acc_t values. half/bf16 parameters are converted once per
// call of a row kernel (one task, >= kElementsPerTask elements), not once per row: in
// the row loops their conversion costs as many vector instructions as the input's.
template <typename P>
class AccParam {
 public:
  using acc_t = at::opmath_type<P>;  // also the input's: see KernelTable's pairs (row_kernels.h)
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

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace layernorm_ext::cpu
