// The forward kernels: rows in registers, and rows streamed a block per row
// (layernorm_cuda_config.h picks one per row length and dtype; layernorm_cuda_kernels.cuh
// launches it).
#pragma once

#include "layernorm_cuda_device.cuh"

namespace layernorm_ext {
namespace cuda_kernels {

// ---------------------------------------------------------------------------------------
// Forward, rows in registers. blockDim = (threads per row G, rows per block); each
// thread holds up to kVectors 16-byte vectors of its row (cuda_config's slices).
// kRowPerThread: G = 1, a thread holds a whole row and reduces nothing with the others.

// Its __launch_bounds__ (threads, blocks per SM): small slices and rows per thread come
// in blocks of kRowBlockThreads, huge slices of kHugeSliceThreads, with cuda_config's
// occupancy floors.
template <int kVectors, bool kRowPerThread>
constexpr bool kFixedBlock = kVectors == cuda_config::kSmallSliceVectors || kRowPerThread;

template <int kVectors, bool kRowPerThread>
constexpr int kForwardMaxThreads =
    kFixedBlock<kVectors, kRowPerThread>      ? cuda_config::kRowBlockThreads
    : kVectors == cuda_config::kHugeSliceVectors ? cuda_config::kHugeSliceThreads
                                              : cuda_config::kMaxBlockThreads;

template <int kVectors, bool kRowPerThread>
constexpr int kForwardMinBlocks = kRowPerThread ? cuda_config::kRowPerThreadMinBlocksPerSM
                                  : kVectors == cuda_config::kSmallSliceVectors
                                      ? cuda_config::kSmallSliceMinBlocksPerSM
                                  : kVectors == cuda_config::kHugeSliceVectors
                                      ? cuda_config::kHugeSliceMinBlocksPerSM
                                      : 1;

// The register forward's vector i of its row, at p: kept in registers (packs), or, for a
// staged block of rows, read from the tile.
template <bool kStaged, int kN, typename T>
__device__ __forceinline__ uint4 kept_or_staged(const uint4 (&packs)[kN], int i, const T* p) {
  if constexpr (kStaged) {
    return load_shared_16_bytes(p);
  } else {
    return packs[i];
  }
}

template <Norm kNorm, typename T, typename P, int kVectors, bool kRowPerThread>
__global__ void __launch_bounds__(kForwardMaxThreads<kVectors, kRowPerThread>,
                                  kForwardMinBlocks<kVectors, kRowPerThread>)
    forward_registers_kernel(const ForwardParams<T, P> a) {
  using acc_t = at::opmath_type<T>;
  constexpr int kVec = kVecOf<T>;
  constexpr int kEdgeSlots = cuda_indexing::kRegisterEdgeSlots<kVec, kRowPerThread>;
  __shared__ WeightedMean<acc_t> mean_scratch[cuda_indexing::kReduceScratch];
  __shared__ RowSum<acc_t> sum_scratch[cuda_indexing::kReduceScratch];
  // A thread alone on its row reads and writes it in a staged block of rows (see
  // cuda_config::kStageRowsPerThread); a span may start up to 15 bytes into the tile.
  constexpr bool kStaged = kRowPerThread && cuda_config::kStageRowsPerThread;
  __shared__ __align__(16) uint4 tile[kStaged ? cuda_config::kRowTileBytes / 16 + 1 : 1];
  const int t = kRowPerThread ? 0 : threadIdx.x;
  const int group = kRowPerThread ? 1 : blockDim.x;
  const int64_t rows_per_block = blockDim.y;
  const acc_t inv_cols = acc_t(1) / static_cast<acc_t>(a.cols);
  // The row's total of this thread's partial statistics (kRowPerThread: they are it).
  const auto row_total = [&](const auto& value, const auto& identity, auto combine,
                             auto* scratch) {
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
    RowSplit span{};
    cuda_indexing::TileLayout layout{};
    T* staged = nullptr;  // the span's first element in the tile
    if constexpr (kStaged) {
      // forward_config gives a thread its own row only in vectorized tensors, so the
      // tile keeps the span's offset from a 16-byte boundary and a row splits there as
      // in global memory (s).
      const int64_t misalign = cuda_indexing::row_misalign(a.x_misalign, first, a.cols, kVec);
      const int64_t rows_left = a.rows - first;
      span = cuda_indexing::span_split(rows_left < rows_per_block ? rows_left : rows_per_block,
                                       a.cols, kVec, a.x_misalign, first);
      layout = cuda_indexing::tile_layout(a.cols, kVec, misalign);
      staged = reinterpret_cast<T*>(tile) + misalign;
      __syncthreads();  // the previous rows' copy out of the tile is done
      copy_span<true>(a.x + first * a.cols, staged, span, layout, threadIdx.y, rows_per_block);
      wait_async_copies();
      __syncthreads();
      xr = staged + layout.row_start(threadIdx.y, static_cast<int>(a.cols));
      yr = staged + layout.row_start(threadIdx.y, static_cast<int>(a.cols));
    }

    uint4 packs[kVectors];
    acc_t edge[2 * kEdgeSlots];
    acc_t sum = 0;  // of shift.half_deviation(x) (LayerNorm) or of x^2 (RMSNorm)
    int count = 0;
    RowShift<acc_t> shift{0};
    const auto term = [&](acc_t x) {
      return kNorm == Norm::kRms ? x * x : shift.half_deviation(x);
    };
    // The row's vector in slot i (at element e): as loaded into registers, or (staged)
    // read from the tile at each use (through a function: a lambda that read `packs`
    // itself made nvcc 13.0 warn that it was used before it was set).
    const auto vector_at = [&](int i, int e) { return kept_or_staged<kStaged>(packs, i, xr + e); };
    if (valid) {
      // All loads first, then the sums: every vector of the slice is in flight at once.
      if constexpr (!kStaged) {
        cuda_indexing::for_each_register_pack<kVectors>(
            s, t, group, [&](int i, int e) { packs[i] = load_raw(xr + e); });
      }
      cuda_indexing::for_each_register_edge<kEdgeSlots>(
          s, t, group, [&](int i, int e) { edge[i] = static_cast<acc_t>(xr[e]); });
      if constexpr (kNorm == Norm::kLayer) shift = RowShift<acc_t>::of(xr, a.cols);
      cuda_indexing::for_each_register_pack<kVectors>(s, t, group, [&](int i, int e) {
        acc_t v[kVec];
        unpack<T>(vector_at(i, e), v);
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
      const RowSum<acc_t> total =
          row_total(RowSum<acc_t>{sum}, RowSum<acc_t>{0}, SumCombine{}, sum_scratch);
      rstd = math::rstd_from_mean_square(total.sum / static_cast<acc_t>(a.cols), a.eps);
    } else {
      // Two passes over the registers (all of scaled(x): see scaled() in
      // layernorm_cuda_device.cuh), each a reduction over the row: the threads' means
      // (shifted sums, see RowShift) merged into the row's (MeanCombine), then the sum of
      // squared deviations from it, each thread's times 1 / D (a weighted mean of values
      // within max / 128: no partial sum overflows). A tree level costs ~15 instructions
      // for the means and ~7 for the sum, where Chan's combine of the threads' moments
      // took ~57 (a 64-bit count, its conversions, an IEEE division; sm_90 SASS): in a
      // short row most of a thread's instructions (float32 D = 128: 16 threads, 8
      // elements each).
      const WeightedMean<acc_t> thread_mean{count > 0 ? shift.mean(sum, count) : acc_t(0),
                                            static_cast<acc_t>(count)};
      const acc_t scaled_mean =
          row_total(thread_mean, WeightedMean<acc_t>{0, 0}, MeanCombine{}, mean_scratch).mean;
      acc_t m2 = 0;
      const auto add_deviation = [&](acc_t x) {
        const acc_t d = scaled(x) - scaled_mean;
        m2 += d * d;
      };
      if (valid) {
        cuda_indexing::for_each_register_pack<kVectors>(s, t, group, [&](int i, int e) {
          acc_t v[kVec];
          unpack<T>(vector_at(i, e), v);
#pragma unroll
          for (int k = 0; k < kVec; ++k) add_deviation(v[k]);
        });
        cuda_indexing::for_each_register_edge<kEdgeSlots>(
            s, t, group, [&](int i, int) { add_deviation(edge[i]); });
      }
      const acc_t scaled_var =
          row_total(RowSum<acc_t>{m2 * inv_cols}, RowSum<acc_t>{0}, SumCombine{}, sum_scratch)
              .sum;
      const auto stats =
          math::rescue_unscaled(math::MeanVariance<acc_t>{scaled_mean, scaled_var});
      mean = stats.mean;
      rstd = math::rstd_from_variance(stats.var, a.eps);
    }
    if (valid) {
      mean = save_row_stats<kNorm>(a, row, mean, rstd);
      const bool weight_vectors = a.weight.vectors_at(s.head);
      const bool bias_vectors = a.bias.vectors_at(s.head);
      with_param_reads<kNorm>(a, s.head, [&](auto reads) {
        cuda_indexing::for_each_register_pack<kVectors>(s, t, group, [&](int i, int e) {
          acc_t v[kVec];
          unpack<T>(vector_at(i, e), v);
          write_normalized_vector<kNorm, decltype(reads), kStaged>(
              a, yr, e, v, mean, rstd, weight_vectors, bias_vectors);
        });
      });
      cuda_indexing::for_each_register_edge<kEdgeSlots>(s, t, group, [&](int i, int e) {
        write_normalized_element<kNorm>(a, yr, e, edge[i], mean, rstd);
      });
    }
    if constexpr (kStaged) {
      __syncthreads();  // every row of the block is written to the tile
      copy_span<false>(static_cast<const T*>(staged), a.y + first * a.cols, span, layout,
                       threadIdx.y, rows_per_block);
    }
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
    with_param_reads<kNorm>(a, s.head, [&](auto reads) {
      cuda_indexing::for_each_streamed(
          s, t, group,
          [&](int64_t e) {
            acc_t v[kVec];
            load_vector(xr + e, v);
            write_normalized_vector<kNorm, decltype(reads)>(
                a, yr, e, v, mean, rstd, weight_vectors, bias_vectors);
          },
          [&](int64_t e) {
            write_normalized_element<kNorm>(a, yr, e, static_cast<acc_t>(xr[e]), mean, rstd);
          });
    });
  }
}

}  // namespace cuda_kernels
}  // namespace layernorm_ext
