// The backward kernels: rows in registers, rows streamed (two kernels), and the small
// kernel that adds the slots' dgamma/dbeta partial rows (layernorm_cuda_kernels.cuh
// launches them).
#pragma once

#include "layernorm_cuda_device.cuh"

namespace layernorm_ext {
namespace cuda_kernels {

// ---------------------------------------------------------------------------------------
// Backward, rows in registers. blockDim = (G, rows per block); slot = blockIdx.x *
// blockDim.y + threadIdx.y handles rows slot, slot + slots, ... with slots = gridDim.x *
// blockDim.y, a multiple of the rows' alignment period (cuda_config::backward_slots).
// At the end a block adds its slots' dgamma/dbeta into one partial row.
// kElemsBackward per thread: the row's g and xhat stay in registers for dx.
// kElemsBackwardLong (rows up to 16384): only dgamma/dbeta stay; dx reads the row again.
//
// A thread loads its packs of dy and x in batches of kBackwardBatchPacks, each batch in
// full before any of its values is used: a use waits for its load, and so does every
// instruction after it, the next pack's loads included. (Loading and using pack by pack,
// as this kernel did until 2026-12-04, cost a row one memory round trip per pack, and one
// more for its rstd, which is now read after the first batch's loads.)

template <Norm kNorm, typename T, typename P, int kElems>
__global__ void __launch_bounds__(cuda_config::kMaxBlockThreads, 1)
    backward_registers_kernel(const BackwardParams<T, P> a) {
  using acc_t = at::opmath_type<T>;
  constexpr int kVec = kVecOf<T>;
  constexpr int kSlots = kElems / kVec;
  constexpr bool kKeepRow = kElems <= cuda_config::kElemsBackward;
  constexpr int kKeptSlots = kKeepRow ? kSlots : 1;
  constexpr int kBatch = cuda_config::backward_batch_packs(kSlots);
  __shared__ SumPair<acc_t> scratch[cuda_indexing::kReduceScratch];
  // The slots' partial rows of a block of several (cuda_config::kSlotPartialEntries): only
  // groups of fewer than kRowBlockThreads threads, which hold kElemsBackward each, share one.
  __shared__ acc_t slot_partials[kKeepRow ? cuda_config::kSlotPartialEntries : 1];
  const int t = threadIdx.x;
  const int group = blockDim.x;
  const int64_t rows_per_block = blockDim.y;
  const int64_t slots = gridDim.x * rows_per_block;
  const int64_t slot = blockIdx.x * rows_per_block + threadIdx.y;
  const acc_t inv_cols = acc_t(1) / static_cast<acc_t>(a.cols);
  // The same split for every row of this slot: this thread owns the same columns.
  const RowSplit s = row_split(a, slot, kVec);
  const bool weight_vectors = a.weight.vectors_at(s.head);
  // Whether the weight is present and vector-aligned in every row's columns: the loop
  // over a row's batches then reads it with plain vector loads (with_param_vectors).
  // Two-byte dtypes only, where a weight vector's scalar fallback costs the most, and not
  // in the second reads of long rows: with two copies of those loops too, the float32
  // and the long float16 kernels, at their 128 registers, spilled (nvcc 13.0, sm_90).
  constexpr bool kWeightCopies = sizeof(T) == 2;
  const bool weight_present_vectors = rows_split_alike(a) && a.weight.present_vectors_at(s.head);

  const auto for_each_batch_pack = [&](int b, auto&& f) {
    cuda_indexing::for_each_register_pack_of_batch<kSlots, kBatch>(b, s, t, group, f);
  };

  acc_t dgamma[kSlots][kVec], dbeta[kSlots][kVec], dgamma_edge[2], dbeta_edge[2];
  acc_t w_edge[2];  // the same columns in every row: loaded once
  cuda_indexing::for_each_register_pack<kSlots>(s, t, group, [&](int i, int) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) dgamma[i][k] = dbeta[i][k] = 0;
  });
  cuda_indexing::for_each_register_edge(s, t, group, [&](int i, int e) {
    dgamma_edge[i] = dbeta_edge[i] = 0;
    w_edge[i] = load_param(a.weight, e, acc_t(1));
  });

  for (int64_t first = blockIdx.x * rows_per_block; first < a.rows; first += slots) {
    const int64_t row = first + threadIdx.y;
    const bool valid = row < a.rows;
    const T* dyr = a.dy + row * a.cols;
    const T* xr = a.x + row * a.cols;
    T* dxr = a.dx + row * a.cols;

    // Batch b's dy and x as loaded.
    uint4 dy_raw[kBatch], x_raw[kBatch];
    const auto load_batch = [&](int b) {
      for_each_batch_pack(b, [&](int i, int e) {
        dy_raw[i % kBatch] = load_raw(dyr + e);
        x_raw[i % kBatch] = load_raw(xr + e);
      });
    };
    // dy, xhat and g = dy * w of pack i (at column e) of the loaded batch. The weight is
    // read here, from L1 or L2, with every row: held in registers for all the rows of the
    // slot, it made nvcc spill. `vectors`: with_param_vectors's choice, a constant once
    // inlined (a bool: passed on as the type, it crashed nvcc 13.0's front end).
    acc_t rstd = 0, center = 0;
    const auto unpack_pack = [&](bool vectors, int i, int e, acc_t(&dy)[kVec],
                                 acc_t(&xhat_pack)[kVec], acc_t(&g_pack)[kVec]) {
      acc_t w[kVec];
      if (vectors) {
        load_param<true>(a.weight, e, weight_vectors, acc_t(1), w);
      } else {
        load_param(a.weight, e, weight_vectors, acc_t(1), w);
      }
      unpack<T>(dy_raw[i % kBatch], dy);
      unpack<T>(x_raw[i % kBatch], xhat_pack);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        xhat_pack[k] = math::normalize<kNorm>(xhat_pack[k], center, rstd);
        g_pack[k] = dy[k] * w[k];
      }
    };

    // g = dy * w and xhat stay in registers between the row sums and dx (kKeepRow);
    // rows too long for that keep only dgamma/dbeta and read dy and x again for dx.
    acc_t g[kKeptSlots][kVec], xhat[kKeptSlots][kVec], g_edge[2], xhat_edge[2];
    SumPair<acc_t> sums{0, 0};
    if (valid) {
      with_param_vectors<kWeightCopies>(weight_present_vectors, [&](auto vectors) {
        T dy_edge_raw[2], x_edge_raw[2];
#pragma unroll
        for (int b = 0; b < kSlots / kBatch; ++b) {
          load_batch(b);
          if (b == 0) {
            cuda_indexing::for_each_register_edge(s, t, group, [&](int i, int e) {
              dy_edge_raw[i] = dyr[e];
              x_edge_raw[i] = xr[e];
            });
            rstd = a.rstd[row];
            center = math::row_center<kNorm>(a.mean, row, rstd);
            const int64_t next_row = row + slots;  // the slot's next
            const int64_t next_count = next_row < a.rows ? a.cols : 0;
            prefetch_next(a.dy, next_row * a.cols, next_count, t, group);
            prefetch_next(a.x, next_row * a.cols, next_count, t, group);
          }
          for_each_batch_pack(b, [&](int i, int e) {
            const int kept = kKeepRow ? i : 0;
            acc_t dy[kVec];
            unpack_pack(decltype(vectors)::value, i, e, dy, xhat[kept], g[kept]);
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
        }
        cuda_indexing::for_each_register_edge(s, t, group, [&](int i, int) {
          const acc_t dy = static_cast<acc_t>(dy_edge_raw[i]);
          xhat_edge[i] = math::normalize<kNorm>(static_cast<acc_t>(x_edge_raw[i]), center, rstd);
          g_edge[i] = dy * w_edge[i];
          dgamma_edge[i] += dy * xhat_edge[i];
          if constexpr (kNorm == Norm::kLayer) {
            dbeta_edge[i] += dy;
            sums.a += g_edge[i];
          }
          sums.b += g_edge[i] * xhat_edge[i];
        });
      });
    }
    sums = group_allreduce(sums, SumPair<acc_t>{0, 0}, SumCombine{}, scratch);
    if (!valid) continue;
    const acc_t mean_g = sums.a * inv_cols;
    const acc_t mean_g_xhat = sums.b * inv_cols;
#pragma unroll
    for (int b = 0; b < kSlots / kBatch; ++b) {
      if constexpr (!kKeepRow) load_batch(b);  // from L2: the row was read moments ago
      for_each_batch_pack(b, [&](int i, int e) {
        const int kept = kKeepRow ? i : 0;
        if constexpr (!kKeepRow) {
          acc_t dy[kVec];
          unpack_pack(false, i, e, dy, xhat[0], g[0]);
        }
        acc_t dx[kVec];
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          dx[k] = math::input_grad<kNorm>(g[kept][k], xhat[kept][k], rstd, mean_g, mean_g_xhat);
        }
        store_vector(dxr + e, dx);
      });
    }
    cuda_indexing::for_each_register_edge(s, t, group, [&](int i, int e) {
      dxr[e] = static_cast<T>(
          math::input_grad<kNorm>(g_edge[i], xhat_edge[i], rstd, mean_g, mean_g_xhat));
    });
  }

  // This slot's partial rows, every column (zeros for a slot without rows): the block's
  // own in a.partial when it is the block's one slot, else in slot_partials, which the
  // block then adds up in order into its partial rows. (A partial row a slot gave the
  // finalize kernel 16 times as many rows to add at D = 128, from 4 blocks.)
  const int64_t entries = kParamGrads<kNorm> * a.cols;
  const bool shared_rows = kKeepRow && rows_per_block > 1;  // the same in the whole block
  acc_t* partial_dgamma = shared_rows ? slot_partials + threadIdx.y * entries
                                      : a.partial + int64_t(blockIdx.x) * entries;
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
  if (shared_rows) {
    __syncthreads();
    acc_t* const partial = a.partial + int64_t(blockIdx.x) * entries;
    const int threads = group * static_cast<int>(rows_per_block);
    for (int c = static_cast<int>(threadIdx.y) * group + t; c < entries; c += threads) {
      acc_t sum = slot_partials[c];
      for (int y = 1; y < rows_per_block; ++y) sum += slot_partials[y * entries + c];
      partial[c] = sum;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward, a row per thread (rows of at most 128 bytes: cuda_config's
// kStageBackwardRowsPerThread). blockDim = (1, kRowBlockThreads): thread t has row
// first + t of each span of 128 rows. dy's and x's spans are copied into shared-memory
// tiles with coalesced 16-byte vectors (as the forward's rows per thread); then each
// thread
//   - adds dgamma/dbeta of its unit of kUnit columns (cuda_indexing::staged_column)
//     over its share of the span's rows, in registers across the block's spans;
//   - takes its row's two sums from the tiles, and after a barrier writes dx over its
//     row of the x tile;
// and the block copies dx's span out. At the end the block adds its columns' phases into
// its one partial row. kUnit: cuda_config::staged_unit_width of the tensors.

template <Norm kNorm, typename T, typename P, int kUnit>
__global__ void __launch_bounds__(cuda_config::kRowBlockThreads,
                                  cuda_config::kStagedBackwardMinBlocksPerSM)
    backward_staged_rows_kernel(const BackwardParams<T, P> a) {
  using acc_t = at::opmath_type<T>;
  constexpr int kVec = kVecOf<T>;
  constexpr int kRows = cuda_config::kRowBlockThreads;
  // A span may start up to 15 bytes into a tile (see the forward's).
  constexpr int kTileVectors = cuda_config::kRowTileBytes / 16 + 1;
  __shared__ __align__(16) uint4 dy_tile[kTileVectors];
  __shared__ __align__(16) uint4 x_tile[kTileVectors];
  __shared__ SumPair<acc_t> rows_stats[kRows];  // of the span's rows: center, rstd
  // The weight as acc_t (1 where absent), read once a block: a thread's vector of it then
  // costs kVec / kUnit shared loads, where load_param issued a vector load and a scalar
  // fallback.
  __shared__ __align__(16) acc_t weight[cuda_config::kLargeSliceBytes / 2];
  const int t = threadIdx.y;
  const int n = static_cast<int>(a.cols);
  const acc_t inv_cols = acc_t(1) / static_cast<acc_t>(a.cols);
  const cuda_indexing::StagedColumn column = cuda_indexing::staged_column(t, a.cols, kUnit);
  acc_t dgamma[kUnit] = {}, dbeta[kUnit] = {};  // of the thread's columns
  if (t < n) weight[t] = load_param(a.weight, t, acc_t(1));  // the first barrier publishes it
  // Spans start a multiple of kRows rows apart, and kRows is a multiple of the vector
  // width: every span starts a.x_misalign elements past a vector boundary (the tiles'
  // layout is the same for all, all full spans split alike), and every row of this
  // thread splits alike. (backward_config gives a thread its own row only in vectorized
  // tensors.)
  const cuda_indexing::TileLayout layout = cuda_indexing::tile_layout(a.cols, kVec, a.x_misalign);
  T* const staged_dy = reinterpret_cast<T*>(dy_tile) + a.x_misalign;
  T* const staged_x = reinterpret_cast<T*>(x_tile) + a.x_misalign;
  const RowSplit s = row_split(a, int64_t(blockIdx.x) * kRows + t, kVec);
  const T* const dyr = staged_dy + layout.row_start(t, n);  // the thread's row in the tiles
  T* const xr = staged_x + layout.row_start(t, n);
  const cuda_indexing::StagedRow own = cuda_indexing::staged_row(s, n);
  // Kept (registers are not what limits this kernel's blocks: its tiles are).
  const RowSplit full_span = cuda_indexing::span_split(kRows, a.cols, kVec, a.x_misalign, 0);

  for (int64_t first = int64_t(blockIdx.x) * kRows; first < a.rows;
       first += int64_t(gridDim.x) * kRows) {
    const int64_t row = first + t;
    const int rows = static_cast<int>(a.rows - first < kRows ? a.rows - first : kRows);
    const bool valid = t < rows;
    const RowSplit span = rows == kRows ? full_span
                                        : cuda_indexing::span_split(rows, a.cols, kVec,
                                                                    a.x_misalign, first);
    acc_t rstd = 0, mean = 0;
    if (valid) {  // loaded with the copies, used after them
      rstd = a.rstd[row];
      if constexpr (kNorm == Norm::kLayer) mean = a.mean[row];
    }
    __syncthreads();  // the previous span's tiles and statistics are no longer read
    // Through registers (without kAsyncStagedCopy) one tensor after the other: both at
    // once (16 vectors a thread) spilled 200-360 bytes at 128 registers (nvcc 13.0).
    copy_span<true>(a.dy + first * a.cols, staged_dy, span, layout, t, kRows);
    copy_span<true>(a.x + first * a.cols, staged_x, span, layout, t, kRows);
    const int64_t next = first + int64_t(gridDim.x) * kRows;  // the block's next span
    const int64_t next_count = (a.rows - next < kRows ? a.rows - next : kRows) * a.cols;
    prefetch_next(a.dy, next * a.cols, next_count, t, kRows);
    prefetch_next(a.x, next * a.cols, next_count, t, kRows);
    // The center after the copies: before them, each warp waited for its mean and rstd
    // to arrive before it issued a copy.
    const acc_t center = kNorm == Norm::kLayer ? math::normalize_center(mean, rstd) : acc_t(0);
    rows_stats[t] = {center, rstd};
    wait_async_copies();
    __syncthreads();

    if (column.active()) {
      column.for_each_row(rows, layout.row_start(1, n), [&](int r, int at) {
        const SumPair<acc_t> stats = rows_stats[r];  // once for the unit
        acc_t dy[kUnit], x[kUnit];
        load_tile_unit<kUnit>(staged_dy + at, dy);
        load_tile_unit<kUnit>(staged_x + at, x);
#pragma unroll
        for (int k = 0; k < kUnit; ++k) {
          dgamma[k] += dy[k] * math::normalize<kNorm>(x[k], stats.a, stats.b);
          if constexpr (kNorm == Norm::kLayer) dbeta[k] += dy[k];
        }
      });
    }

    // The thread's row: g = dy * w and xhat of its vector at e, or of a unit of its head
    // or tail. (Every row's vectors and edge units start a multiple of kUnit elements in,
    // so the weight's units are aligned too.)
    const auto scale_terms = [&](int e, auto& g, auto& xhat) {
      constexpr int kN = sizeof(g) / sizeof(acc_t);
      acc_t w[kN];
      load_tile_units<kUnit>(weight + e, w);
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        g[k] *= w[k];
        xhat[k] = math::normalize<kNorm>(xhat[k], center, rstd);
      }
    };
    const auto vector_terms = [&](int e, acc_t(&g)[kVec], acc_t(&xhat)[kVec]) {
      unpack<T>(load_shared_16_bytes(dyr + e), g);
      unpack<T>(load_shared_16_bytes(xr + e), xhat);
      scale_terms(e, g, xhat);
    };
    const auto unit_terms = [&](int e, acc_t(&g)[kUnit], acc_t(&xhat)[kUnit]) {
      load_tile_unit<kUnit>(dyr + e, g);
      load_tile_unit<kUnit>(xr + e, xhat);
      scale_terms(e, g, xhat);
    };
    SumPair<acc_t> sums{0, 0};  // of g (LayerNorm only) and of g * xhat
    const auto add = [&](acc_t g, acc_t xhat) {
      if constexpr (kNorm == Norm::kLayer) sums.a += g;
      sums.b += g * xhat;
    };
    if (valid) {
      own.for_each_vector([&](int e) {
        acc_t g[kVec], xhat[kVec];
        vector_terms(e, g, xhat);
#pragma unroll
        for (int k = 0; k < kVec; ++k) add(g[k], xhat[k]);
      });
      own.for_each_edge(
          [&](int e) {
            acc_t g[kUnit], xhat[kUnit];
            unit_terms(e, g, xhat);
#pragma unroll
            for (int k = 0; k < kUnit; ++k) add(g[k], xhat[k]);
          },
          kUnit);
    }
    __syncthreads();  // every column of the span is read before dx overwrites x

    if (valid) {
      const acc_t mean_g = sums.a * inv_cols;
      const acc_t mean_g_xhat = sums.b * inv_cols;
      own.for_each_vector([&](int e) {
        acc_t g[kVec], xhat[kVec];
        vector_terms(e, g, xhat);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          g[k] = math::input_grad<kNorm>(g[k], xhat[k], rstd, mean_g, mean_g_xhat);
        }
        store_vector<kVec, true>(xr + e, g);
      });
      own.for_each_edge(
          [&](int e) {
            acc_t g[kUnit], xhat[kUnit];
            unit_terms(e, g, xhat);
#pragma unroll
            for (int k = 0; k < kUnit; ++k) {
              g[k] = math::input_grad<kNorm>(g[k], xhat[k], rstd, mean_g, mean_g_xhat);
            }
            store_tile_unit<kUnit>(xr + e, g);
          },
          kUnit);
    }
    __syncthreads();  // every row's dx is in the x tile
    copy_span<false>(static_cast<const T*>(staged_x), a.dx + first * a.cols, span, layout, t,
                     kRows);
  }

  // The block's one partial row: its column phases added in order (a partial row each
  // would leave the finalize kernel 128 / D times as many to add). dy's tile holds them:
  // its last reads came before the loop's last barrier.
  SumPair<acc_t>* const phase_sums = reinterpret_cast<SumPair<acc_t>*>(dy_tile);
  // kUnit a thread at most.
  static_assert(kUnit * kRows * sizeof(SumPair<acc_t>) <= sizeof(dy_tile),
                "phase sums fit the tile");
  if (column.active()) {
    SumPair<acc_t>* const sums = phase_sums + column.phase * n + column.col;
#pragma unroll
    for (int k = 0; k < kUnit; ++k) sums[k] = {dgamma[k], dbeta[k]};
  }
  __syncthreads();
  if (t < n) {
    SumPair<acc_t> sum = phase_sums[t];
    for (int phase = 1; phase < column.phases; ++phase) {
      sum = SumCombine{}(sum, phase_sums[phase * n + t]);
    }
    acc_t* const partial_dgamma = a.partial + int64_t(blockIdx.x) * kParamGrads<kNorm> * a.cols;
    partial_dgamma[t] = sum.a;
    if constexpr (kNorm == Norm::kLayer) partial_dgamma[a.cols + t] = sum.b;
  }
}

// ---------------------------------------------------------------------------------------
// Backward, streaming: any row length, in two kernels (cuda_config::kColumnBlockThreads).
// First a block per row reduces it to the two row means dx needs, mean(g) (LayerNorm
// only) and mean(g * xhat), into a.row_means.

template <Norm kNorm, typename T, typename P>
__global__ void __launch_bounds__(cuda_config::kMaxBlockThreads, 1)
    backward_row_means_kernel(const BackwardParams<T, P> a) {
  using acc_t = at::opmath_type<T>;
  constexpr int kVec = kVecOf<T>;
  __shared__ SumPair<acc_t> scratch[cuda_indexing::kReduceScratch];
  const acc_t inv_cols = acc_t(1) / static_cast<acc_t>(a.cols);

  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const RowSplit s = row_split(a, row, kVec);
    const bool weight_vectors = a.weight.vectors_at(s.head);
    const T* dyr = a.dy + row * a.cols;
    const T* xr = a.x + row * a.cols;
    const acc_t rstd = a.rstd[row];
    const acc_t center = math::row_center<kNorm>(a.mean, row, rstd);
    SumPair<acc_t> sums{0, 0};  // of g (LayerNorm only) and of g * xhat
    const auto add = [&](acc_t dy, acc_t x, acc_t w) {
      const acc_t g = dy * w;
      if constexpr (kNorm == Norm::kLayer) sums.a += g;
      sums.b += g * math::normalize<kNorm>(x, center, rstd);
    };
    cuda_indexing::for_each_streamed(
        s, threadIdx.x, blockDim.x,
        [&](int64_t e) {
          acc_t dy[kVec], x[kVec], w[kVec];
          load_vector(dyr + e, dy);
          load_vector(xr + e, x);
          load_param(a.weight, e, weight_vectors, acc_t(1), w);
#pragma unroll
          for (int k = 0; k < kVec; ++k) add(dy[k], x[k], w[k]);
        },
        [&](int64_t e) {
          add(static_cast<acc_t>(dyr[e]), static_cast<acc_t>(xr[e]),
              load_param(a.weight, e, acc_t(1)));
        });
    sums = group_allreduce(sums, SumPair<acc_t>{0, 0}, SumCombine{}, scratch);
    if (threadIdx.x == 0) {
      a.row_means[2 * row] = sums.a * inv_cols;
      a.row_means[2 * row + 1] = sums.b * inv_cols;
    }
  }
}

// Then a grid over columns: blocks_per_slot blocks a slot, each thread one column unit
// (cuda_indexing::column_unit) of every row of the slot. A unit of kWidth elements (a
// 16-byte pack, or one head or tail element) at column `col`: dx of each row, and the
// unit's dgamma/dbeta over the slot's rows into the slot's partial rows.
template <typename T, int kWidth>
using UnitBits = std::conditional_t<kWidth == 1, T, uint4>;

template <Norm kNorm, int kWidth, typename T, typename P>
__device__ __forceinline__ void backward_column_unit(const BackwardParams<T, P>& a,
                                                     int64_t col, bool weight_vector,
                                                     int64_t slot, int64_t slots) {
  using acc_t = at::opmath_type<T>;
  constexpr int kRows = cuda_config::kColumnRowsInFlight;
  const auto unpack_unit = [](const UnitBits<T, kWidth>& bits, acc_t(&out)[kWidth]) {
    if constexpr (kWidth == 1) {
      out[0] = static_cast<acc_t>(bits);
    } else {
      unpack<T>(bits, out);
    }
  };
  acc_t w[kWidth], dgamma[kWidth], dbeta[kWidth];
  if constexpr (kWidth == 1) {
    w[0] = load_param(a.weight, col, acc_t(1));
  } else {
    load_param(a.weight, col, weight_vector, acc_t(1), w);
  }
#pragma unroll
  for (int k = 0; k < kWidth; ++k) dgamma[k] = dbeta[k] = 0;

  for (int64_t first = slot; first < a.rows; first += kRows * slots) {
    // kRows rows' dy and x in flight before any is used, then their statistics.
    UnitBits<T, kWidth> dy_bits[kRows], x_bits[kRows];
    acc_t rstd[kRows], center[kRows], mean_g[kRows], mean_g_xhat[kRows];
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      const int64_t row = first + j * slots;
      if (row < a.rows) {
        dy_bits[j] = load_aligned<UnitBits<T, kWidth>>(a.dy + row * a.cols + col);
        x_bits[j] = load_aligned<UnitBits<T, kWidth>>(a.x + row * a.cols + col);
      }
    }
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      const int64_t row = first + j * slots;
      if (row < a.rows) {
        rstd[j] = a.rstd[row];
        mean_g[j] = a.row_means[2 * row];
        mean_g_xhat[j] = a.row_means[2 * row + 1];
        center[j] = math::row_center<kNorm>(a.mean, row, rstd[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      const int64_t row = first + j * slots;
      if (row >= a.rows) break;
      acc_t dy[kWidth], x[kWidth];
      unpack_unit(dy_bits[j], dy);
      unpack_unit(x_bits[j], x);
#pragma unroll
      for (int k = 0; k < kWidth; ++k) {
        const acc_t xhat = math::normalize<kNorm>(x[k], center[j], rstd[j]);
        dgamma[k] += dy[k] * xhat;
        if constexpr (kNorm == Norm::kLayer) dbeta[k] += dy[k];
        x[k] = math::input_grad<kNorm>(dy[k] * w[k], xhat, rstd[j], mean_g[j], mean_g_xhat[j]);
      }
      T* dx = a.dx + row * a.cols + col;
      if constexpr (kWidth == 1) {
        *dx = static_cast<T>(x[0]);
      } else {
        store_vector(dx, x);
      }
    }
  }

  acc_t* partial_dgamma = a.partial + slot * kParamGrads<kNorm> * a.cols + col;
#pragma unroll
  for (int k = 0; k < kWidth; ++k) {
    partial_dgamma[k] = dgamma[k];
    if constexpr (kNorm == Norm::kLayer) partial_dgamma[a.cols + k] = dbeta[k];
  }
}

template <Norm kNorm, typename T, typename P>
__global__ void __launch_bounds__(cuda_config::kColumnBlockThreads)
    backward_columns_kernel(const BackwardParams<T, P> a) {
  constexpr int kVec = kVecOf<T>;
  const int64_t blocks_per_slot =
      cuda_config::column_blocks(cuda_config::column_units(a.cols, kVec, a.vectorized));
  const int64_t slot = blockIdx.x / blocks_per_slot;
  const int64_t slots = gridDim.x / blocks_per_slot;
  // Every row of a slot splits like the slot's first row (cuda_config::column_slots).
  const RowSplit s = row_split(a, slot, kVec);
  const cuda_indexing::ColumnUnit unit = cuda_indexing::column_unit(
      s, (blockIdx.x % blocks_per_slot) * static_cast<int64_t>(blockDim.x) + threadIdx.x);
  if (unit.count == kVec) {
    backward_column_unit<kNorm, kVec>(a, unit.first, a.weight.vectors_at(s.head), slot, slots);
  } else if (unit.count == 1) {
    backward_column_unit<kNorm, 1>(a, unit.first, false, slot, slots);
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

}  // namespace cuda_kernels
}  // namespace layernorm_ext
