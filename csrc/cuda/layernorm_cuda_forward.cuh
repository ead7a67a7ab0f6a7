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

template <Norm kNorm, typename T, typename P, int kVectors, bool kRowPerThread>
__global__ void __launch_bounds__(kForwardMaxThreads<kVectors, kRowPerThread>,
                                  kForwardMinBlocks<kVectors, kRowPerThread>)
    forward_registers_kernel(const ForwardParams<T, P> a) {
  using acc_t = at::opmath_type<T>;
  constexpr int kVec = kVecOf<T>;
  constexpr int kEdgeSlots = cuda_indexing::kRegisterEdgeSlots<kVec, kRowPerThread>;
  __shared__ WeightedMean<acc_t> mean_scratch[cuda_indexing::kReduceScratch];
  __shared__ RowSum<acc_t> sum_scratch[cuda_indexing::kReduceScratch];
  const int t = kRowPerThread ? 0 : threadIdx.x;
  const int group = kRowPerThread ? 1 : blockDim.x;
  const int64_t rows_per_block = blockDim.y;

  // The loop bound is the block's first row, so every thread runs every iteration
  // (the reductions shuffle across rows and sync the block).
  for (int64_t first = blockIdx.x * rows_per_block; first < a.rows;
       first += gridDim.x * rows_per_block) {
    const int64_t row = first + threadIdx.y;
    const bool valid = row < a.rows;
    const RowSplit s = row_split(a, row, kVec);
    const T* const xr = a.x + row * a.cols;
    T* const yr = a.y + row * a.cols;
    // The group's next row, before this one's loads, while the least is live (after
    // them, the float32 RMSNorm of huge slices spilled on sm_80). From the second row on,
    // this row's lines are in L2 or on their way: the order of the requests matters little.
    const int64_t next_row = row + gridDim.x * rows_per_block;
    prefetch_next(a.x, next_row * a.cols, next_row < a.rows ? a.cols : 0, t, group);
    uint4 packs[kVectors];
    acc_t edge[2 * kEdgeSlots];
    acc_t shift = 0;
    if (valid) {
      // All loads first, then the sums: every vector of the slice is in flight at once.
      cuda_indexing::for_each_register_pack<kVectors>(
          s, t, group, [&](int i, int e) { packs[i] = load_raw(xr + e); });
      cuda_indexing::for_each_register_edge<kEdgeSlots>(
          s, t, group, [&](int i, int e) { edge[i] = static_cast<acc_t>(xr[e]); });
      if (kNorm == Norm::kLayer) shift = math::row_shift_value<acc_t>(xr, a.cols);
    }
    // The thread's elements, from its registers: its vectors', then its edge elements.
    const auto for_each_x = [&](auto&& f) {
      if (!valid) return;
      cuda_indexing::for_each_register_pack<kVectors>(s, t, group, [&](int i, int) {
        acc_t v[kVec];
        unpack<T>(packs[i], v);
#pragma unroll
        for (int k = 0; k < kVec; ++k) f(v[k]);
      });
      cuda_indexing::for_each_register_edge<kEdgeSlots>(s, t, group,
                                                        [&](int i, int) { f(edge[i]); });
    };
    // The row's total of this thread's partial statistics (kRowPerThread: they are it).
    const auto row_total = [&](const auto& value, const auto& identity, auto combine) {
      if constexpr (kRowPerThread) {
        return value;
      } else if constexpr (std::is_same_v<std::decay_t<decltype(value)>, WeightedMean<acc_t>>) {
        return group_allreduce(value, identity, combine, mean_scratch);
      } else {
        return group_allreduce(value, identity, combine, sum_scratch);
      }
    };
    const RowNormStats<acc_t> stats =
        row_norm_stats<kNorm>(shift, a.cols, a.eps, for_each_x, row_total, [](bool flag) {
          if constexpr (kRowPerThread) {
            return flag;
          } else {
            return any_sharing_reductions(flag);
          }
        });
    acc_t mean = stats.mean;
    const acc_t rstd = stats.rstd;
    if (valid) {
      mean = save_row_stats<kNorm>(a, row, mean, rstd);
      const bool weight_vectors = a.weight.vectors_at(s.head);
      const bool bias_vectors = a.bias.vectors_at(s.head);
      with_param_reads<kNorm>(a, s.head, [&](auto reads) {
        cuda_indexing::for_each_register_pack<kVectors>(s, t, group, [&](int i, int e) {
          acc_t v[kVec];
          unpack<T>(packs[i], v);
          write_normalized_vector<kNorm, decltype(reads)>(
              a, yr, e, v, mean, rstd, weight_vectors, bias_vectors);
        });
      });
      cuda_indexing::for_each_register_edge<kEdgeSlots>(s, t, group, [&](int i, int e) {
        write_normalized_element<kNorm>(a, yr, e, edge[i], mean, rstd);
      });
    }
  }
}

// ---------------------------------------------------------------------------------------
// Forward, a row per thread staged through shared memory (rows of at most 128 bytes:
// cuda_config's kStageRowsPerThread). blockDim = (1, kRowBlockThreads): thread t has row
// first + t of each span of 128 rows. The block copies x's span into a tile with
// coalesced 16-byte vectors; each thread takes its row's statistics and writes y over its
// row there, by loops over the row (cuda_indexing::StagedRow); the block copies y's span
// out. The weight and bias are read once a block, into shared memory as acc_t. kUnit:
// cuda_config::staged_unit_width of the tensors (the row's head and tail, the weight
// and the bias are read kUnit elements a load).

template <Norm kNorm, typename T, typename P, int kUnit>
__global__ void __launch_bounds__(cuda_config::kRowBlockThreads,
                                  cuda_config::kRowPerThreadMinBlocksPerSM)
    forward_staged_rows_kernel(const ForwardParams<T, P> a) {
  using acc_t = at::opmath_type<T>;
  constexpr int kVec = kVecOf<T>;
  constexpr int kRows = cuda_config::kRowBlockThreads;
  // A span may start up to 15 bytes into the tile.
  __shared__ __align__(16) uint4 tile[cuda_config::kRowTileBytes / 16 + 1];
  constexpr int kMaxCols = cuda_config::kLargeSliceBytes / 2;
  static_assert(sizeof(T) >= 2, "rows of at most kMaxCols elements");
  // Read kUnit at a time: a row's vectors and edge units start a multiple of kUnit in.
  __shared__ __align__(16) acc_t weight[kMaxCols];  // 1 where absent
  __shared__ __align__(16) acc_t bias[kMaxCols];    // 0 where absent (and for RMSNorm)
  const int t = threadIdx.y;
  const int n = static_cast<int>(a.cols);
  if (t < n) {  // the first barrier publishes them
    weight[t] = load_param(a.weight, t, acc_t(1));
    bias[t] = kNorm == Norm::kLayer ? load_param(a.bias, t, acc_t(0)) : acc_t(0);
  }
  // Spans start a multiple of kRows rows apart: every span starts a.x_misalign elements
  // past a vector boundary, and every row of this thread splits alike (forward_config
  // gives a thread its own row only in vectorized tensors). The span's split is computed
  // anew each span: kept, as the backward keeps it, it cost 16 registers (2-byte
  // LayerNorm: 80, 6 blocks an SM instead of 8) to save ~70 warp-instructions a span.
  const cuda_indexing::TileLayout layout = cuda_indexing::tile_layout(a.cols, kVec, a.x_misalign);
  T* const staged = reinterpret_cast<T*>(tile) + a.x_misalign;
  T* const xr = staged + layout.row_start(t, n);  // the thread's row in the tile; y too
  const cuda_indexing::StagedRow own =
      cuda_indexing::staged_row(row_split(a, int64_t(blockIdx.x) * kRows + t, kVec), n);

  for (int64_t first = int64_t(blockIdx.x) * kRows; first < a.rows;
       first += int64_t(gridDim.x) * kRows) {
    const int rows = static_cast<int>(a.rows - first < kRows ? a.rows - first : kRows);
    const bool valid = t < rows;
    const RowSplit span = cuda_indexing::span_split(rows, a.cols, kVec, a.x_misalign, first);
    __syncthreads();  // the previous span's copy out of the tile is done
    copy_span<true>(a.x + first * a.cols, staged, span, layout, t, kRows);
    const int64_t next = first + int64_t(gridDim.x) * kRows;  // the block's next span
    prefetch_next(a.x, next * a.cols, (a.rows - next < kRows ? a.rows - next : kRows) * a.cols,
                  t, kRows);
    wait_async_copies();
    __syncthreads();
    if (valid) {
      const auto for_each_x = [&](auto&& f) {
        own.for_each_vector([&](int e) {
          acc_t v[kVec];
          unpack<T>(load_shared_16_bytes(xr + e), v);
#pragma unroll
          for (int k = 0; k < kVec; ++k) f(v[k]);
        });
        own.for_each_edge(
            [&](int e) {
              acc_t v[kUnit];
              load_tile_unit<kUnit>(xr + e, v);
#pragma unroll
              for (int k = 0; k < kUnit; ++k) f(v[k]);
            },
            kUnit);
      };
      const acc_t shift = kNorm == Norm::kLayer ? math::row_shift_value<acc_t>(xr, n) : acc_t(0);
      const RowNormStats<acc_t> stats = row_norm_stats<kNorm>(
          shift, a.cols, a.eps, for_each_x,
          [](const auto& value, const auto&, auto) { return value; },  // the thread's row
          [](bool flag) { return flag; });
      const acc_t center = save_row_stats<kNorm>(a, first + t, stats.mean, stats.rstd);
      // y of the kN elements v at e (a vector, or a unit of the head or tail).
      const auto to_y = [&](int e, auto& v) {
        constexpr int kN = sizeof(v) / sizeof(acc_t);
        acc_t w[kN], b[kN];
        load_tile_units<kUnit>(weight + e, w);
        load_tile_units<kUnit>(bias + e, b);
#pragma unroll
        for (int k = 0; k < kN; ++k) {
          v[k] = math::affine<kNorm>(math::normalize<kNorm>(v[k], center, stats.rstd), w[k], b[k]);
        }
      };
      own.for_each_vector([&](int e) {
        acc_t v[kVec];
        unpack<T>(load_shared_16_bytes(xr + e), v);
        to_y(e, v);
        store_vector<kVec, true>(xr + e, v);
      });
      own.for_each_edge(
          [&](int e) {
            acc_t v[kUnit];
            load_tile_unit<kUnit>(xr + e, v);
            to_y(e, v);
            store_tile_unit<kUnit>(xr + e, v);
          },
          kUnit);
    }
    __syncthreads();  // every row of the span is written to the tile
    copy_span<false>(static_cast<const T*>(staged), a.y + first * a.cols, span, layout, t, kRows);
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
      // x^2 a vector at a time, the vectors' sums in runs of kSquareRun, the runs' into
      // the thread's: terms of one sign round the same way step after step, and one
      // chain of a thread's squares (2048 at D = 2^20) gave a constant row's rstd a
      // relative error of 2.4e-6 on the emulator (torch's CPU rms_norm: 6e-8).
      constexpr int kSquareRun = 16;
      acc_t run = 0, runs = 0;
      int run_length = 0;
      const auto add = [&](acc_t squares) {
        run += squares;
        if (++run_length == kSquareRun) runs += run, run = 0, run_length = 0;
      };
      cuda_indexing::for_each_streamed(
          s, t, group,
          [&](int64_t e) {
            acc_t v[kVec];
            load_vector(xr + e, v);
            acc_t squares = 0;
#pragma unroll
            for (int k = 0; k < kVec; ++k) squares += v[k] * v[k];
            add(squares);
          },
          [&](int64_t e) {
            const acc_t v = static_cast<acc_t>(xr[e]);
            add(v * v);
          });
      const RowSum<acc_t> local{runs + run};
      const RowSum<acc_t> total = group_allreduce(local, RowSum<acc_t>{0}, SumCombine{}, scratch);
      rstd = math::rstd_from_mean_square(total.sum / static_cast<acc_t>(a.cols), a.eps);
    } else {
      // The moments of scaled(x) less a scaled shift, which is added back to the mean.
      const auto scaled_moments = [&](acc_t row_shift) {
        Welford<acc_t> local{0, 0, 0};
        cuda_indexing::for_each_streamed(
            s, t, group,
            [&](int64_t e) {
              acc_t v[kVec];
              load_vector(xr + e, v);
              local = math::welford_combine(local, scaled_vector_moments(v, row_shift));
            },
            [&](int64_t e) {
              local = math::welford_update(local, scaled(static_cast<acc_t>(xr[e])) - row_shift);
            });
        Welford<acc_t> row =
            group_allreduce(local, Welford<acc_t>{0, 0, 0}, WelfordCombine{}, scratch);
        row.mean += row_shift;
        return row;
      };
      // Less the row's shift (row_shift_value); where its first elements misled that
      // (math::needs_reshift), again less the mean, reading the row once more (the
      // block's only row: every thread takes the same branch).
      const acc_t row_shift = scaled(math::row_shift_value<acc_t>(xr, a.cols));
      Welford<acc_t> row = scaled_moments(row_shift);
      if (math::needs_reshift(row.mean, math::variance(row), row_shift)) {
        row = scaled_moments(row.mean);
      }
      const auto stats = math::rescue_unscaled(row);
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
