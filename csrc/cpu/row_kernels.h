// Row kernels of the CPU backend, compiled once per x86 instruction set.
//
// csrc/cpu/row_kernels.cpp is built for DEFAULT, AVX2 and AVX512 (setup.py adds the
// -m flags and CPU_CAPABILITY, as ATen does for its own CPU kernels), so one build runs
// everywhere and uses wide vectors where the machine has them. Each build exports a
// KernelTable; layernorm_cpu.cpp picks one at run time by at::get_cpu_capability(),
// which also honours ATEN_CPU_CAPABILITY. Only raw pointers cross this boundary, so the
// ISA-specific objects need no ATen tensor code.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <tuple>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

#include "../layernorm_math.h"

namespace layernorm_ext::cpu {

// Bytes in a cache line: the streamed stores fill whole ones (can_stream), and tasks of
// short rows start on one (layernorm_cpu.cpp).
constexpr int64_t kCacheLineBytes = 64;

template <typename T, typename P>
struct ForwardRows {
  using acc_t = at::opmath_type<T>;
  const T* x;
  T* y;
  const P* weight;  // may be null
  const P* bias;    // may be null
  acc_t* mean;  // null for RMSNorm
  acc_t* rstd;
  int64_t rows;  // all of the tensor's: a call's prefetches may run past its last row
  int64_t cols;
  acc_t eps;
  bool stream_output;  // write y with non-temporal stores, unfenced (see below)
};

template <typename T, typename P>
struct BackwardRows {
  using acc_t = at::opmath_type<T>;
  const T* dy;
  const T* x;
  const acc_t* mean;  // null for RMSNorm
  const acc_t* rstd;
  const P* weight;  // may be null
  T* dx;
  int64_t rows;  // all of the tensor's: a call's prefetches may run past its last row
  int64_t cols;
  bool stream_output;  // write dx with non-temporal stores, unfenced (see below)
};

template <typename T, typename P>
struct NormRowKernels {
  using acc_t = at::opmath_type<T>;
  // Normalizes rows [begin, end) and writes their mean (LayerNorm) and rstd.
  void (*forward)(const ForwardRows<T, P>&, int64_t begin, int64_t end);
  // Writes dx of rows [begin, end) and adds their dgamma (and, for LayerNorm, dbeta;
  // RMSNorm passes null) terms to the caller's partial rows (cols elements each).
  void (*backward)(const BackwardRows<T, P>&, int64_t begin, int64_t end, acc_t* dgamma,
                   acc_t* dbeta);
};

// Orders the row kernels' non-temporal stores (stream_output) before whatever the
// calling thread does next. The kernels leave it to their caller, which fences once a
// parallel task: the backward calls its kernel once a chunk of rows, and a fence a
// chunk cost ~10% at 3407872x20 float32 (2-core Xeon; line-aligned chunks of 820 rows).
// Called by layernorm_cpu.cpp only, outside the ISA-specific objects.
inline void fence_streamed_stores() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_sfence();
#endif
}

// The same row kernels compiled for each norm (layernorm_math.h's Norm flag).
template <typename T, typename P>
struct RowKernels {
  NormRowKernels<T, P> layer;  // Norm::kLayer
  NormRowKernels<T, P> rms;    // Norm::kRms

  const NormRowKernels<T, P>& operator[](Norm norm) const {
    return norm == Norm::kRms ? rms : layer;
  }
};

// One entry per supported (input, parameter) element-type pair.
using KernelTable =
    std::tuple<RowKernels<float, float>, RowKernels<double, double>,
               RowKernels<c10::Half, c10::Half>, RowKernels<c10::Half, float>,
               RowKernels<c10::BFloat16, c10::BFloat16>, RowKernels<c10::BFloat16, float>>;

const KernelTable& kernel_table_DEFAULT();
const KernelTable& kernel_table_AVX2();
const KernelTable& kernel_table_AVX512();

}  // namespace layernorm_ext::cpu
