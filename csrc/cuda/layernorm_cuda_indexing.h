// Which elements each CUDA thread touches, and the order in which threads combine
// their partial results. Plain C++ templates (host/device): the kernels call them, and
// the host replay test (tests/cuda_replay/) runs the same code for every thread of a
// block on the CPU to check that every element is read and written exactly once and
// every partial result is combined exactly once.
//
// A row of n elements is split as its tensors lie in memory: a head of elements up to
// the first 16-byte boundary, then whole 16-byte vectors ("packs"), then a tail. The
// split depends on the row's offset from a 16-byte boundary, which changes from row to
// row when n is not a multiple of the vector width; the body is vectorized either way.
#pragma once

#include <cstdint>

#include "../layernorm_math.h"  // LN_HOST_DEVICE
#include "layernorm_cuda_config.h"

#if defined(__CUDACC__)
#define LN_UNROLL _Pragma("unroll")
#else
#define LN_UNROLL
#endif

namespace layernorm_ext {
namespace cuda_indexing {

struct RowSplit {
  int64_t head;   // elements [0, head) before the first vector boundary
  int64_t packs;  // then `packs` vectors of `vec` elements
  int64_t tail;   // then the last `tail` elements
  int vec;

  LN_HOST_DEVICE int64_t tail_begin() const { return head + packs * vec; }
};

// Offset (in elements, 0 <= offset < vec) of row `row` from a vector boundary, for a
// tensor of rows of n elements whose first element is `base_misalign` elements past one.
LN_HOST_DEVICE int64_t row_misalign(int64_t base_misalign, int64_t row, int64_t n, int vec) {
  return (base_misalign + (row % vec) * (n % vec)) % vec;
}

// The split of a row that starts `misalign` elements past a vector boundary.
LN_HOST_DEVICE RowSplit split_row(int64_t n, int vec, int64_t misalign) {
  int64_t head = (vec - misalign) % vec;
  if (head > n) head = n;
  const int64_t packs = (n - head) / vec;
  return {head, packs, n - head - packs * vec, vec};
}

// Every element as head: the scalar path, for rows that cannot be vectorized.
LN_HOST_DEVICE RowSplit scalar_row(int64_t n, int vec) { return {n, 0, 0, vec}; }

// Register-resident rows: thread t of a group of G threads holds the packs t, t + G, ...
// in register slots 0 .. kSlots-1 (f(slot, first element)), and the head and tail
// elements t, t + G, ... in edge slots j and kEdgeSlots + j (f(edge slot, element)). A
// head or tail has fewer than vec elements, so one edge slot of each suffices when
// G >= vec; a thread alone on its row (G = 1) needs vec - 1.
// The slot index is a compile-time constant after unrolling, so register arrays indexed
// by it stay in registers. Register-resident rows are short (cuda_config), so element
// indices are ints: fewer registers than 64-bit ones.
template <int kSlots, typename F>
LN_HOST_DEVICE void for_each_register_pack(const RowSplit& s, int t, int group, F&& f) {
  const int head = static_cast<int>(s.head);
  const int packs = static_cast<int>(s.packs);
  LN_UNROLL
  for (int i = 0; i < kSlots; ++i) {
    const int p = i * group + t;
    if (p < packs) f(i, head + p * s.vec);
  }
}

// The packs of register slots [batch * kBatch, (batch + 1) * kBatch) alone. A kernel
// that loads a batch of packs in full before it uses any visits batches 0, 1, ... in
// turn; `batch` is a constant once its loop is unrolled, and the filter costs nothing.
template <int kSlots, int kBatch, typename F>
LN_HOST_DEVICE void for_each_register_pack_of_batch(int batch, const RowSplit& s, int t,
                                                    int group, F&& f) {
  static_assert(kSlots % kBatch == 0, "whole batches");
  for_each_register_pack<kSlots>(s, t, group, [&](int i, int e) {
    if (i / kBatch == batch) f(i, e);
  });
}

template <int kEdgeSlots = 1, typename F>
LN_HOST_DEVICE void for_each_register_edge(const RowSplit& s, int t, int group, F&& f) {
  LN_UNROLL
  for (int j = 0; j < kEdgeSlots; ++j) {
    const int e = t + j * group;
    if (e < s.head) f(j, e);
    if (e < s.tail) f(kEdgeSlots + j, static_cast<int>(s.tail_begin()) + e);
  }
}

// Edge slots a register kernel needs for groups of `group` threads (see above).
LN_HOST_DEVICE constexpr int register_edge_slots(int group, int vec) {
  return group >= vec ? 1 : (vec - 1 + group - 1) / group;
}

// The edge slots the forward register kernel holds: a thread alone on its row
// (kRowPerThread) needs vec - 1; its other groups have at least vec threads, one each.
// The kernel and the host replay of its indexing both take this one constant.
template <int kVec, bool kRowPerThread>
inline constexpr int kRegisterEdgeSlots = kRowPerThread ? register_edge_slots(1, kVec) : 1;

// A block of short rows staged through shared memory (cuda_config::kStageRowsPerThread):
// rows [first, first + rows) of n elements are one span of memory, which splits like a
// row of rows * n elements; every thread of the block copies its packs and edge elements
// of it (for_each_register_pack with kRowTileSlots slots, for_each_register_edge with
// one, over the block's threads), and a thread then reads its row from the tile.
LN_HOST_DEVICE RowSplit span_split(int64_t rows, int64_t n, int vec, int64_t base_misalign,
                                   int64_t first) {
  return split_row(rows * n, vec, row_misalign(base_misalign, first, n, vec));
}
inline constexpr int kRowTileSlots = cuda_config::kLargeSliceVectors;

// A staged row's own elements, as its thread reads them from the tile: its vectors
// (for_each_vector), and its head and tail elements as one loop of units (for_each_edge).
// Rows of a warp often have as many edge elements (bf16 D = 20 on a vector boundary or 4
// past one: 4 each, as head or as tail, one unit of 4); where they do not (bf16 D = 20 at
// other offsets: 12 and 4, alternately, in units of 2 or 1), a warp runs the longest
// loop. Loops, not the register kernels' slots: unrolled and predicated, all 8 vector
// slots and 14 edge slots of a bf16 row took their issue slots whatever the row's length.
struct StagedRow {
  int head, tail_begin, edges, vec;

  template <typename F>
  LN_HOST_DEVICE void for_each_vector(F&& f) const {
#if defined(__CUDACC__)
#pragma unroll 2
#endif
    for (int e = head; e < tail_begin; e += vec) f(e);
  }
  // In units of `width` elements (f(first element of each)), where the head and tail are
  // whole units (cuda_config::staged_unit_width).
  template <typename F>
  LN_HOST_DEVICE void for_each_edge(F&& f, int width = 1) const {
    for (int i = 0; i < edges; i += width) f(i < head ? i : i + (tail_begin - head));
  }
};

LN_HOST_DEVICE StagedRow staged_row(const RowSplit& s, int n) {
  const int head = static_cast<int>(s.head), tail_begin = static_cast<int>(s.tail_begin());
  return {head, tail_begin, head + n - tail_begin, s.vec};
}

// Where the tile holds element e of a staged span (the span starts `misalign` elements
// into the tile, at its offset from a 16-byte boundary in global memory; 0 from the ops,
// whose outputs are fresh, but the launcher takes any offset x and y share). A warp's
// 16-byte shared-memory reads go 8 threads at a time, each 8 over the 32 banks only if
// their rows start an odd number of vectors apart: rows of 2, 4 or 8 whole vectors from
// a vector boundary (float32 D = 8, 16, 32; 2-byte D = 16, 32, 64) would share banks 2,
// 4 or 8 ways, so the tile pads each with one vector. Other rows lie back to back: rows
// of an odd number of vectors (float32 D = 20) share none; rows of a part vector can
// (2-8 ways: bf16 D = 63 rows start 128 bytes apart; padding them would split the
// copy's vectors across rows). Int indices: a tile holds at most kRowTileBytes.
struct TileLayout {
  int pad;        // elements after each row in the tile: 0, or a vector's
  int row_shift;  // padded rows: log2 of n (a power of two)

  LN_HOST_DEVICE int at(int e) const { return e + (e >> row_shift) * pad; }
  LN_HOST_DEVICE int row_start(int row, int n) const { return row * (n + pad); }
};

LN_HOST_DEVICE TileLayout tile_layout(int64_t n, int vec, int64_t misalign) {
  if (misalign != 0 || n < 2 * vec || (n & (n - 1)) != 0) return {0, 0};
  int shift = 0;
  while ((int64_t(1) << shift) < n) ++shift;
  return {vec, shift};
}

// A staged span's copy with a loop (not the register slots, whose unrolled predicates and
// 64-bit addresses cost more issue slots than the copy): thread t of `threads` has the
// span's packs t, t + threads, ...: `count` packs, the first at element `first` (tile
// offset `tile_first`), each next `stride` elements on (`tile_stride` in the tile); and
// its head and tail element t (for_each_span_edge), since a span's head and tail are
// shorter than a vector and a block has more threads than a vector has elements. The
// copy steps its pointers by these constants: computed from each pack's index, its
// 64-bit and layout arithmetic took ~14 instructions a pack. layout.at is linear over a
// stride: a padded row's n is a power of two (tile_layout) of at most 8 vectors (a staged
// row's 128 bytes), so it divides the stride, `threads` vectors: a stride holds whole rows (the host replay
// checks every pack's offset). Int indices: a span fits a tile.
struct SpanPacks {
  int count, first, tile_first, stride, tile_stride;
};

LN_HOST_DEVICE SpanPacks span_packs(const RowSplit& span, const TileLayout& layout, int t,
                                    int threads) {
  const int first = static_cast<int>(span.head) + t * span.vec;
  const int stride = threads * span.vec;
  return {(static_cast<int>(span.packs) - t + threads - 1) / threads, first, layout.at(first),
          stride, layout.at(stride)};
}

template <typename F>
LN_HOST_DEVICE void for_each_span_edge(const RowSplit& span, int t, F&& element) {
  if (t < span.head) element(t);
  if (t < span.tail) element(static_cast<int>(span.tail_begin()) + t);
}

// The row-per-thread backward's dgamma/dbeta: thread t of a staged block of
// kRowBlockThreads rows of n elements adds `width` adjacent columns (a unit:
// cuda_config::staged_unit_width), columns col .. col + width - 1 with col = (t % units)
// * width for units = n / width, over rows phase, phase + phases, ... of each span (phase
// = t / units, phases = cuda_config::staged_column_phases(n, width)); the threads from
// phases * units on add none. Consecutive threads read consecutive elements of the tile.
// Entries phase * n + col + k (= t * width + k) of the block's phase sums are thread t's;
// thread c < n adds the phases of column c in order.
struct StagedColumn {
  int col, phase, phases, width;
  int full_span_rows;  // rows it adds of a full span (kRowBlockThreads rows)

  LN_HOST_DEVICE bool active() const { return phase < phases; }
  // Rows phase, phase + phases, ... below `rows`.
  LN_HOST_DEVICE int count_rows(int rows) const {
    return rows > phase ? (rows - phase + phases - 1) / phases : 0;
  }
  // The same, a full span's count kept: the loop's trip count took a division a span.
  LN_HOST_DEVICE int rows_of(int rows) const {
    return rows == cuda_config::kRowBlockThreads ? full_span_rows : count_rows(rows);
  }
  // Rows [0, rows) of a span, each once over the block's active threads: f(row, offset of
  // its element col in a tile whose rows start row_stride elements apart).
  template <typename F>
  LN_HOST_DEVICE void for_each_row(int rows, int row_stride, F&& f) const {
    const int count = rows_of(rows);
    int r = phase, at = phase * row_stride + col;
#if defined(__CUDACC__)
#pragma unroll 4
#endif
    for (int i = 0; i < count; ++i, r += phases, at += phases * row_stride) f(r, at);
  }
};

LN_HOST_DEVICE StagedColumn staged_column(int t, int64_t n, int width) {
  const int units = static_cast<int>(n) / width;
  StagedColumn column{t % units * width, t / units, cuda_config::staged_column_phases(n, width),
                      width, 0};
  column.full_span_rows = column.count_rows(cuda_config::kRowBlockThreads);
  return column;
}

// Streaming rows: thread t of G visits the packs t, t + G, ... (pack(first element)),
// then the head and tail elements t, t + G, ... (element(index)). Any row length.
template <typename FPack, typename FElement>
LN_HOST_DEVICE void for_each_streamed(const RowSplit& s, int t, int group, FPack&& pack,
                                      FElement&& element) {
#if defined(__CUDACC__)
#pragma unroll 4
#endif
  for (int64_t p = t; p < s.packs; p += group) pack(s.head + p * s.vec);
  for (int64_t e = t; e < s.head; e += group) element(e);
  for (int64_t e = t; e < s.tail; e += group) element(s.tail_begin() + e);
}

// The streaming backward's column units: unit u of a row is its pack u (u < packs), then
// its head elements, then its tail elements; units past those hold nothing (count 0).
// Thread t of block column c holds unit c * blockDim.x + t of every row of its slot.
struct ColumnUnit {
  int64_t first;  // first element
  int count;      // elements: vec (a pack), 1 (head or tail) or 0
};

LN_HOST_DEVICE ColumnUnit column_unit(const RowSplit& s, int64_t u) {
  if (u < s.packs) return {s.head + u * s.vec, s.vec};
  u -= s.packs;
  if (u < s.head) return {u, 1};
  u -= s.head;
  if (u < s.tail) return {s.tail_begin() + u, 1};
  return {0, 0};
}

// Scratch entries group_allreduce needs: one per warp, then one result per group.
constexpr int kReduceScratch =
    cuda_config::kMaxBlockThreads / cuda_config::kWarpSize +
    cuda_config::kMaxBlockThreads / (2 * cuda_config::kWarpSize);

// Reduces `value` over the threads of a row group (threads x = 0 .. G-1 of block row y)
// and returns the total to each of them. The order of combination is fixed, so results
// are bitwise reproducible; `combine` need not be commutative (Chan's Welford combine
// is not, in rounding).
//
// `lanes` is the execution environment (a CUDA block, or the host replay):
//   thread() = threadIdx.x, group() = threadIdx.y, group_size() = blockDim.x,
//   shfl_down(v, offset, width) and shfl(v, src_lane, width) as __shfl_*_sync over the
//   full warp, sync() = __syncthreads().
// `scratch` is shared memory of kReduceScratch entries (an S*, or the host replay's
// checked stand-in).
// Requirements: G is a power of two, the block has a multiple of 32 threads, G * blockDim.y
// <= kMaxBlockThreads, and every thread of the block calls this (it may sync the block).
template <typename S, typename Combine, typename Lanes, typename Scratch>
LN_HOST_DEVICE S group_allreduce(S value, const S& identity, Combine combine, Lanes& lanes,
                                 Scratch scratch) {
  constexpr int kWarp = cuda_config::kWarpSize;
  const int group_size = lanes.group_size();
  const int width = group_size < kWarp ? group_size : kWarp;
  // Tree within each warp (or sub-warp group): lane 0 of each segment ends with its total.
  for (int offset = width / 2; offset > 0; offset /= 2) {
    value = combine(value, lanes.shfl_down(value, offset, width));
  }
  if (group_size <= kWarp) return lanes.shfl(value, 0, width);

  // Across the group's warps: lane 0 of each warp posts its total, the group's first
  // warp reduces them, and everyone reads the group's result.
  const int linear = lanes.group() * group_size + lanes.thread();
  const int lane = linear % kWarp;
  const int warp = linear / kWarp;
  const int warps = group_size / kWarp;
  const int first_warp = lanes.group() * warps;
  const int result_slot = kReduceScratch - 1 - lanes.group();
  if (lane == 0) scratch[warp] = value;
  lanes.sync();
  if (warp == first_warp) {
    value = identity;
    if (lane < warps) value = scratch[first_warp + lane];
    for (int offset = warps / 2; offset > 0; offset /= 2) {
      value = combine(value, lanes.shfl_down(value, offset, warps));
    }
    if (lane == 0) scratch[result_slot] = value;
  }
  lanes.sync();
  // No barrier needed before the next call: it writes the warp slots, which were last
  // read before the barrier above, and the result slot only after its own first barrier.
  value = scratch[result_slot];
  return value;
}

// Parameter-gradient reduction: lane `lane` of `lanes` sums the partial rows
// lane, lane + lanes, ... in increasing order; f(slot).
template <typename F>
LN_HOST_DEVICE void for_each_partial_slot(int lane, int lanes, int64_t slots, F&& f) {
  for (int64_t s = lane; s < slots; s += lanes) f(s);
}

// Then the lanes' sums, values[lane * stride] in shared memory, are added by a fixed tree
// into values[0]. Every lane calls it (it syncs); `lanes` is a power of two.
template <typename Values, typename Combine, typename Lanes>
LN_HOST_DEVICE void shared_tree_reduce(Values values, int stride, int lane, int lanes,
                                       Combine combine, Lanes& sync_lanes) {
  sync_lanes.sync();
  for (int half = lanes / 2; half > 0; half /= 2) {
    if (lane < half) {
      values[lane * stride] = combine(values[lane * stride], values[(lane + half) * stride]);
    }
    sync_lanes.sync();
  }
}

}  // namespace cuda_indexing
}  // namespace layernorm_ext
