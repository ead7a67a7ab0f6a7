// The CUDA kernels of layernorm_ext in overview, and their host-side launch, written
// against a launcher (layernorm_cuda.cu launches them on a stream; tests/cuda_emulator/
// runs them on the CPU).
//
// Forward. Rows up to 64 KiB live in registers: a group of threads per row (one thread
// for rows of at most 128 bytes, then 8 lanes of a warp up to a 512-thread block) loads
// the row once with 16-byte vectors, each thread a slice of 32, 128 or (float32 rows
// over 32 KiB) 256 bytes kept as loaded, takes the row's mean and variance in two passes
// over its registers, each a sum over the row in a fixed tree (the first of deviations
// from the row's first element: exact for rows of one value), and writes y from the
// same registers. Rows of at most 128 bytes have a thread each and go through shared
// memory: a block's 128 rows are one span, copied in (and y's out) with coalesced 16-byte
// vectors, each thread's row read there by loops. Longer rows, float64, and tensors whose
// 16-byte alignment differs stream: a block per row, a Welford pass and a normalize pass
// (the second one reads the row back from L2).
//
// Backward. A persistent grid of row groups ("slots", their count a function of M, N, the
// dtype and the alignment, never of the GPU).
// A slot's rows are slot, slot + slots, ...; they all split into head/vectors/tail the same
// way, so a thread owns the same columns in each of them and keeps its dgamma/dbeta
// contributions in registers across rows. Per row: dy and x read once from DRAM, two row
// sums, dx written once; at the end a block adds its slots' dgamma/dbeta into its partial
// row. Rows of at most 128 bytes have a thread each, their block's span of dy and x
// copied through shared memory as in the forward; there a thread adds a unit of columns'
// dgamma/dbeta (one, or up to 8 bytes of adjacent columns: cuda_config::kStagedUnits)
// over a share of the span's rows. Longer rows, float64 and tensors whose
// alignment differs stream, in two kernels: a block per row reduces it to the two row
// means dx needs, then a thread per 16-byte column pack (or per head or tail element, or
// per element when the tensors disagree on alignment) runs down a slot's rows, reading
// dy and x again, writing dx and keeping its dgamma/dbeta in registers; each slot writes
// its partial row. A small kernel adds the partial rows in a fixed order. No atomics
// anywhere: results are bitwise reproducible run to run, with the same order of sums on
// every GPU model.
//
// RMSNorm runs the same kernels with the template flag Norm::kRms (../layernorm_math.h):
// the statistic is the sum of x^2 instead of Welford moments, there is no mean, no bias
// and no dbeta, and the backward skips the row sum of g.
//
// Launch configurations: layernorm_cuda_config.h (one table). Element-to-thread mapping
// and the reduction order: layernorm_cuda_indexing.h, replayed on the CPU by the tests.
// The math (Welford/Chan, normalize, affine, input gradient): ../layernorm_math.h,
// shared with the CPU kernels.
//
// Files: layernorm_cuda_memory.cuh (vector I/O, tiles, copies), layernorm_cuda_device.cuh
// (parameter reads, reductions, arguments), layernorm_cuda_forward.cuh and
// layernorm_cuda_backward.cuh (the kernels); this one holds their host-side launch.
#pragma once

#include <ATen/ceil_div.h>

#include <algorithm>
#include <initializer_list>

#include "../layernorm.h"
#include "layernorm_cuda_backward.cuh"
#include "layernorm_cuda_config.h"
#include "layernorm_cuda_device.cuh"
#include "layernorm_cuda_forward.cuh"

namespace layernorm_ext {
namespace cuda_kernels {

using cuda_config::Kind;
using cuda_config::LaunchConfig;

constexpr int kMaxGridBlocks = 1 << 19;

// float64 rows always take the streaming kernels (see layernorm_cuda_config.h).
template <typename T>
constexpr bool kHasRegisterKernels = sizeof(T) <= 4;

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

// f(std::integral_constant<int, kUnit>{}) for width = cuda_config::staged_unit_width of
// the staged kernels' tensors: the kernel instance to launch.
template <typename T, typename F>
auto with_staged_unit(int width, F&& f) {
  // Without kStagedUnits staged_unit_width is 1: build no wider instances.
  constexpr int kMaxUnit =
      cuda_config::kStagedUnits
          ? std::max<int>(cuda_config::kStagedUnitBytes / int(sizeof(T)), 1)
          : 1;
  static_assert(kMaxUnit <= 4, "staged kernels have units of 1, 2 or 4 elements");
  if constexpr (kMaxUnit >= 4) {
    if (width == 4) return f(std::integral_constant<int, 4>{});
  }
  if constexpr (kMaxUnit >= 2) {
    if (width == 2) return f(std::integral_constant<int, 2>{});
  }
  TORCH_INTERNAL_ASSERT(width == 1, "layernorm_ext: no staged kernel of units of ", width);
  return f(std::integral_constant<int, 1>{});
}

// The forward kernel for a launch configuration (c.kind, c.elems_per_thread,
// c.threads_per_row == 1) and, for the staged kernel, its unit width.
template <Norm kNorm, typename T, typename P>
auto forward_kernel(const LaunchConfig& c, int staged_unit) {
  if constexpr (kHasRegisterKernels<T>) {
    constexpr int kVec = kVecOf<T>;
    constexpr int kSmall = cuda_config::kSmallSliceVectors;
    constexpr int kLarge = cuda_config::kLargeSliceVectors;
    constexpr int kHuge = cuda_config::kHugeSliceVectors;
    if (c.kind == Kind::kRegisters) {
      const bool small = c.elems_per_thread == kSmall * kVec, alone = c.threads_per_row == 1;
      if constexpr (sizeof(T) == 4) {  // huge slices: float32 only (cuda_config)
        static_assert(kForwardMaxThreads<kHuge, false> == cuda_config::kHugeSliceThreads);
        if (c.elems_per_thread == kHuge * kVec) {
          TORCH_INTERNAL_ASSERT(c.threads_per_row * c.rows_per_block ==
                                cuda_config::kHugeSliceThreads);  // __launch_bounds__
          return forward_registers_kernel<kNorm, T, P, kHuge, false>;
        }
      }
      TORCH_INTERNAL_ASSERT(small || c.elems_per_thread == kLarge * kVec);
      TORCH_INTERNAL_ASSERT(alone ? !small : c.threads_per_row >= kVec);  // the edge slots
      // __launch_bounds__ (kForwardMaxThreads)
      TORCH_INTERNAL_ASSERT(!(small || alone) ||
                            c.threads_per_row * c.rows_per_block == cuda_config::kRowBlockThreads);
      if (small) return forward_registers_kernel<kNorm, T, P, kSmall, false>;
      if (alone) {
        if constexpr (cuda_config::kStageRowsPerThread) {
          return with_staged_unit<T>(staged_unit, [](auto unit) {
            return forward_staged_rows_kernel<kNorm, T, P, decltype(unit)::value>;
          });
        } else {
          return forward_registers_kernel<kNorm, T, P, kLarge, true>;
        }
      }
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
  const auto kernel = forward_kernel<kNorm, T, P>(
      c, cuda_config::staged_unit_width(sizeof(T), a.cols, a.x_misalign));
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
  const int64_t units = cuda_config::column_units(cols, kVecOf<T>, a.vectorized);
  const int64_t blocks_per_slot = cuda_config::column_blocks(units);  // streaming only
  // Partial rows: the streaming kernel's a slot, the register kernels' a block.
  const bool row_per_thread = c.kind == Kind::kRegisters && c.threads_per_row == 1;
  const int64_t slots = c.kind == Kind::kStreaming
                            ? cuda_config::column_slots(rows, blocks_per_slot, period)
                        : row_per_thread ? cuda_config::staged_backward_blocks(rows)
                                         : cuda_config::backward_slots(rows, c, period);
  const int64_t partial_rows =
      c.kind == Kind::kStreaming || row_per_thread ? slots : slots / c.rows_per_block;
  TORCH_CHECK(c.kind != Kind::kStreaming || blocks_per_slot * slots < (int64_t(1) << 31),
              "layernorm_ext: rows of ", cols, " elements are too long for the CUDA backward");
  at::Tensor partial = at::empty({partial_rows, kParamGrads<kNorm>, cols}, args.rstd.options());
  a.partial = partial.mutable_data_ptr<acc_t>();
  a.row_means = nullptr;
  if (c.kind == Kind::kStreaming) {
    at::Tensor row_means = at::empty({rows, 2}, args.rstd.options());
    a.row_means = row_means.mutable_data_ptr<acc_t>();
    launch(backward_row_means_kernel<kNorm, T, P>,
           grid_of(std::min<int64_t>(rows, kMaxGridBlocks)), block_of(c), a);
    launch(backward_columns_kernel<kNorm, T, P>, grid_of(blocks_per_slot * slots),
           dim3(static_cast<unsigned>(cuda_config::column_block_threads(units))), a);
  } else if constexpr (kHasRegisterKernels<T>) {
    const dim3 grid = grid_of(partial_rows);
    // Several slots a block only where the block can add them up (kSlotPartialEntries).
    TORCH_INTERNAL_ASSERT(row_per_thread || c.rows_per_block == 1 ||
                          (c.elems_per_thread == cuda_config::kElemsBackward &&
                           c.rows_per_block * kParamGrads<kNorm> * cols <=
                               cuda_config::kSlotPartialEntries));
    if (row_per_thread) {
      TORCH_INTERNAL_ASSERT(c.rows_per_block == cuda_config::kRowBlockThreads);
      const int unit_width = cuda_config::staged_unit_width(sizeof(T), cols, a.x_misalign);
      with_staged_unit<T>(unit_width, [&](auto unit) {
        constexpr int kUnit = decltype(unit)::value;
        launch(backward_staged_rows_kernel<kNorm, T, P, kUnit>, grid_of(slots), block_of(c), a);
      });
    } else if (c.elems_per_thread == cuda_config::kElemsBackward) {
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
         partial.const_data_ptr<acc_t>(), partial_rows, cols,
         args.grad_weight.mutable_data_ptr<P>(),
         args.grad_bias.defined() ? args.grad_bias.mutable_data_ptr<P>() : nullptr);
}

}  // namespace cuda_kernels
}  // namespace layernorm_ext
