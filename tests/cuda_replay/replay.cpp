// Host replay of the CUDA kernels' indexing and reduction order.
//
// Runs the very functions the kernels call (csrc/cuda/layernorm_cuda_indexing.h, with the
// launch table of layernorm_cuda_config.h) for every thread of a block, on the CPU:
//   1. for many row lengths, dtypes and alignments, every element of a row is visited
//      exactly once (the kernels load x/dy, store y/dx and write the dgamma/dbeta
//      partial columns through these visitors), and every 16-byte vector starts on a
//      16-byte boundary;
//   2. the group reductions give every thread of a row group each partial exactly once
//      (CUDA threads emulated by std::threads, warp shuffles and __syncthreads by
//      barriers, so the shuffle and shared-memory tree is the kernels' own code), and
//      no two threads touch a shared-memory entry between the same two barriers with
//      one of them writing (a deterministic race check, like compute-sanitizer's);
//   3. the dgamma/dbeta finalize adds every slot's partial row exactly once.
// Built and run by tests/test_cuda_static.py; prints a summary, exits 1 on failure.
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <utility>
#include <vector>

#include "cuda/layernorm_cuda_config.h"
#include "cuda/layernorm_cuda_indexing.h"

namespace cfg = layernorm_ext::cuda_config;
namespace idx = layernorm_ext::cuda_indexing;

namespace {

int failures = 0;
long checks = 0;

#define EXPECT(cond, ...)                          \
  do {                                             \
    ++checks;                                      \
    if (!(cond)) {                                 \
      std::fprintf(stderr, "FAIL: " __VA_ARGS__);  \
      std::fprintf(stderr, "\n");                  \
      if (++failures >= 25) std::exit(1);          \
    }                                              \
  } while (0)

// ---------------------------------------------------------------------------------------
// 1. Element coverage

struct RowCase {
  const char* direction;
  int elem_bytes;
  int64_t n;
  bool vectorized;
  int64_t misalign;  // of this row
};

void check_counts(const std::vector<int>& counts, const RowCase& c, int group) {
  for (int64_t e = 0; e < c.n; ++e) {
    EXPECT(counts[e] == 1, "%s elem_bytes=%d n=%lld vectorized=%d misalign=%lld G=%d: element %lld "
           "visited %d times", c.direction, c.elem_bytes, (long long)c.n, c.vectorized,
           (long long)c.misalign, group, (long long)e, counts[e]);
    if (counts[e] != 1) return;
  }
}

// A thread's packs, visited in batches of kBatch register slots as the kernel does (the
// forward: one batch of every slot).
template <int kSlots, int kEdgeSlots, int kBatch = kSlots>
void cover_register_row(const idx::RowSplit& s, const RowCase& c, int group) {
  std::vector<int> counts(c.n, 0);
  for (int t = 0; t < group; ++t) {
    for (int batch = 0; batch < kSlots / kBatch; ++batch) {
      idx::for_each_register_pack_of_batch<kSlots, kBatch>(batch, s, t, group, [&](int slot,
                                                                                   int e) {
        EXPECT(slot >= 0 && slot < kSlots, "register slot %d out of range", slot);
        EXPECT(slot / kBatch == batch, "slot %d visited in batch %d", slot, batch);
        EXPECT((c.misalign + e) % s.vec == 0, "%s n=%lld: pack at %d not 16-byte aligned",
               c.direction, (long long)c.n, e);
        for (int k = 0; k < s.vec; ++k) counts.at(e + k) += 1;
      });
    }
    int edges = 0;
    idx::for_each_register_edge<kEdgeSlots>(s, t, group, [&](int slot, int e) {
      EXPECT(slot >= 0 && slot < 2 * kEdgeSlots, "edge slot %d out of range", slot);
      counts.at(e) += 1;
      ++edges;
    });
    EXPECT(edges <= 2 * kEdgeSlots, "thread %d holds %d edge elements", t, edges);
  }
  check_counts(counts, c, group);
}

void cover_streamed_row(const idx::RowSplit& s, const RowCase& c, int group) {
  std::vector<int> counts(c.n, 0);
  for (int t = 0; t < group; ++t) {
    idx::for_each_streamed(
        s, t, group,
        [&](int64_t e) {
          EXPECT((c.misalign + e) % s.vec == 0, "%s n=%lld: pack at %lld not 16-byte aligned",
                 c.direction, (long long)c.n, (long long)e);
          for (int k = 0; k < s.vec; ++k) counts.at(e + k) += 1;
        },
        [&](int64_t e) { counts.at(e) += 1; });
  }
  check_counts(counts, c, group);
}

// A staged span's copy loop (idx::span_packs, idx::for_each_span_edge): the same
// coverage, each pack's stepped tile offset its layout's, each thread at most one head and
// one tail element.
void cover_span_parts(const idx::RowSplit& s, const idx::TileLayout& layout, const RowCase& c,
                      int threads) {
  std::vector<int> counts(c.n, 0);
  for (int t = 0; t < threads; ++t) {
    const idx::SpanPacks own = idx::span_packs(s, layout, t, threads);
    for (int i = 0; i < own.count; ++i) {
      const int e = own.first + i * own.stride, at = own.tile_first + i * own.tile_stride;
      EXPECT((c.misalign + e) % s.vec == 0, "%s n=%lld: pack at %d not 16-byte aligned",
             c.direction, (long long)c.n, e);
      EXPECT((c.misalign + at) % s.vec == 0, "%s n=%lld: pack at tile offset %d", c.direction,
             (long long)c.n, at);
      EXPECT(at == layout.at(e), "%s n=%lld: pack %d stepped to tile offset %d, not %d",
             c.direction, (long long)c.n, e, at, layout.at(e));
      for (int k = 0; k < s.vec; ++k) counts.at(e + k) += 1;
    }
    int edges = 0;
    idx::for_each_span_edge(s, t, [&](int e) {
      counts.at(e) += 1;
      ++edges;
    });
    EXPECT(edges <= 2, "%s n=%lld: thread %d copies %d edge elements", c.direction,
           (long long)c.n, t, edges);
  }
  check_counts(counts, c, threads);
}

// The streaming backward's column kernel: the units of every thread of every column
// block of a slot cover the row once, packs 16-byte aligned. `units` is what the
// launcher sizes the grid by (cfg::column_units).
void cover_column_row(const idx::RowSplit& s, const RowCase& c, int64_t units) {
  std::vector<int> counts(c.n, 0);
  const int threads = cfg::column_block_threads(units);
  const int64_t blocks = cfg::column_blocks(units);
  EXPECT(threads % cfg::kWarpSize == 0 && threads <= cfg::kColumnBlockThreads,
         "column block of %d threads", threads);
  EXPECT(s.packs + s.head + s.tail <= blocks * threads, "%s n=%lld: %lld units, %lld threads",
         c.direction, (long long)c.n, (long long)(s.packs + s.head + s.tail),
         (long long)(blocks * threads));
  for (int64_t u = 0; u < blocks * threads; ++u) {
    const idx::ColumnUnit unit = idx::column_unit(s, u);
    EXPECT(unit.count == 0 || unit.count == 1 || unit.count == s.vec, "unit of %d elements",
           unit.count);
    if (unit.count == s.vec) {
      EXPECT((c.misalign + unit.first) % s.vec == 0, "%s n=%lld: column pack at %lld not "
             "16-byte aligned", c.direction, (long long)c.n, (long long)unit.first);
    }
    for (int k = 0; k < unit.count; ++k) counts.at(unit.first + k) += 1;
  }
  check_counts(counts, c, threads);
}

void check_config(const cfg::LaunchConfig& c, const RowCase& rc, int vec) {
  const int threads = c.threads_per_row * c.rows_per_block;
  const int g = c.threads_per_row;
  EXPECT(g > 0 && (g & (g - 1)) == 0, "threads_per_row %d not a power of two", g);
  EXPECT(threads <= cfg::kMaxBlockThreads && threads % cfg::kWarpSize == 0,
         "%s n=%lld: block of %d threads", rc.direction, (long long)rc.n, threads);
  if (c.kind == cfg::Kind::kRegisters) {
    EXPECT(rc.vectorized && rc.elem_bytes <= 4, "register kernel for an unvectorized/fp64 row");
    // Groups narrower than a vector hold a head or tail element in more than one edge slot:
    // only a thread alone on its row (kRegisterEdgeSlots<vec, true>) has the slots for that.
    EXPECT(g >= vec || g == 1,
           "%s register group of %d threads < vector width %d", rc.direction, g, vec);
    EXPECT(c.elems_per_thread % vec == 0, "elems_per_thread %d", c.elems_per_thread);
    if (rc.direction[0] == 'f' && c.elems_per_thread * rc.elem_bytes == cfg::kSmallSliceBytes) {
      EXPECT(threads == cfg::kRowBlockThreads, "small-slice forward in a block of %d threads "
             "(its __launch_bounds__ want %d)", threads, cfg::kRowBlockThreads);
    }
    if (rc.direction[0] == 'f' && c.elems_per_thread * rc.elem_bytes == cfg::kHugeSliceBytes) {
      EXPECT(threads == cfg::kHugeSliceThreads && rc.elem_bytes == 4,
             "huge-slice forward in a block of %d threads of %d-byte elements", threads,
             rc.elem_bytes);
    }
    EXPECT(rc.n <= int64_t(g) * c.elems_per_thread, "%s n=%lld does not fit %d x %d",
           rc.direction, (long long)rc.n, g, c.elems_per_thread);
  } else {
    EXPECT(c.rows_per_block == 1, "streaming kernel with %d rows per block", c.rows_per_block);
  }
}

// Number of kernel variants each direction reached (to report coverage of the table).
std::set<std::pair<int, int>> variants_seen[2];

// A register kernel's row with the kernel's own edge slots (kRegisterEdgeSlots): a
// thread alone on its row (g = 1; forward or backward) holds 8 vectors; other groups one
// edge slot of each, which needs g >= vec.
template <int kVec>
void cover_register_kernel_row(const idx::RowSplit& s, const RowCase& rc, int g, int slots,
                               bool backward) {
  if (g == 1) {
    EXPECT(slots == 8, "no replay for a thread alone on its row with %d vectors", slots);
    return cover_register_row<8, idx::kRegisterEdgeSlots<kVec, true>>(s, rc, g);
  }
  constexpr int kEdgeSlots = idx::kRegisterEdgeSlots<kVec, false>;
  EXPECT(idx::register_edge_slots(g, kVec) <= kEdgeSlots,
         "groups of %d threads need more edge slots than the kernel holds", g);
  // The backward visits its packs in batches (cfg::backward_batch_packs).
  const auto cover = [&]<int kSlots>() {
    if (backward) {
      cover_register_row<kSlots, kEdgeSlots, cfg::backward_batch_packs(kSlots)>(s, rc, g);
    } else {
      cover_register_row<kSlots, kEdgeSlots>(s, rc, g);
    }
  };
  switch (slots) {
    case 1: return cover.template operator()<1>();
    case 2: return cover.template operator()<2>();
    case 4: return cover.template operator()<4>();
    case 8: return cover.template operator()<8>();
    case 16: return cover.template operator()<16>();
    default: EXPECT(false, "no replay for %d register slots", slots);
  }
}

void cover_row(const cfg::LaunchConfig& c, const RowCase& rc) {
  const int vec = cfg::vector_width(rc.elem_bytes);
  check_config(c, rc, vec);
  const idx::RowSplit s =
      rc.vectorized ? idx::split_row(rc.n, vec, rc.misalign) : idx::scalar_row(rc.n, vec);
  EXPECT(s.head >= 0 && s.head < vec + (rc.vectorized ? 0 : rc.n) && s.tail >= 0 &&
             s.tail < vec && s.head + s.packs * vec + s.tail == rc.n,
         "bad split of n=%lld", (long long)rc.n);
  // A variant is a kernel instantiation: the forward's are sized in vectors per thread
  // (and a thread alone on its row is one of them), the backward's in elements per thread.
  const bool backward = rc.direction[0] == 'b';
  const int size = backward ? c.elems_per_thread : c.elems_per_thread / vec;
  variants_seen[backward].insert({int(c.kind), c.threads_per_row == 1 ? -size : size});
  if (c.kind == cfg::Kind::kStreaming) {
    // The backward streams in two kernels: its row means like the forward, then columns.
    cover_streamed_row(s, rc, c.threads_per_row);
    if (backward) cover_column_row(s, rc, cfg::column_units(rc.n, vec, rc.vectorized));
    return;
  }
  const int slots = c.elems_per_thread / vec;
  switch (vec) {
    case 4: return cover_register_kernel_row<4>(s, rc, c.threads_per_row, slots, backward);
    case 8: return cover_register_kernel_row<8>(s, rc, c.threads_per_row, slots, backward);
    default: EXPECT(false, "no replay for vector width %d", vec);
  }
}

// Backward slots: whole blocks, and every row of a slot split like the slot's first row
// (the kernels keep a thread's dgamma/dbeta columns in registers across those rows).
void check_staged_backward(const cfg::LaunchConfig& c, int64_t n, int elem_bytes);

void check_backward_slots(const cfg::LaunchConfig& c, int64_t n, int elem_bytes, bool vectorized) {
  if (c.kind == cfg::Kind::kRegisters && c.threads_per_row == 1) {
    return check_staged_backward(c, n, elem_bytes);
  }
  const int vec = cfg::vector_width(elem_bytes);
  const int period = vectorized ? cfg::row_alignment_period(n, vec) : 1;
  const bool streaming = c.kind == cfg::Kind::kStreaming;
  // A register block of several slots adds their partial rows (LayerNorm: two) in shared
  // memory, kSlotPartialEntries of them.
  EXPECT(streaming || c.rows_per_block == 1 ||
             (c.elems_per_thread == cfg::kElemsBackward &&
              c.rows_per_block * 2 * n <= cfg::kSlotPartialEntries),
         "n=%lld: %d slots a block of %d elements a thread, %lld partial entries", (long long)n,
         c.rows_per_block, c.elems_per_thread, (long long)(c.rows_per_block * 2 * n));
  for (int64_t m : {1, 2, 7, 33, 300, 1000, 4096, 100000}) {
    // As the launcher counts them (layernorm_cuda_kernels.cuh, launch_backward).
    const int64_t slots =
        streaming ? cfg::column_slots(m, cfg::column_blocks(cfg::column_units(n, vec, vectorized)),
                                      period)
                  : cfg::backward_slots(m, c, period);
    EXPECT(!streaming || cfg::column_blocks(cfg::column_units(n, vec, vectorized)) * slots <
                             (int64_t(1) << 31),
           "n=%lld m=%lld: a column grid of more than 2^31 - 1 blocks", (long long)n,
           (long long)m);
    EXPECT(slots >= 1 && slots % c.rows_per_block == 0, "slots %lld for rows_per_block %d",
           (long long)slots, c.rows_per_block);
    // The streaming workspace, a partial row a slot, is bounded by the rows' own size.
    EXPECT(!streaming || slots <= m, "n=%lld m=%lld: %lld streaming slots", (long long)n,
           (long long)m, (long long)slots);
    if (!vectorized) continue;  // scalar rows: one split for all
    for (int64_t base = 0; base < vec; ++base) {
      for (int64_t row = 0; row < std::min<int64_t>(m, 3 * slots + 9); ++row) {
        const int64_t slot = row % slots;
        EXPECT(idx::row_misalign(base, row, n, vec) == idx::row_misalign(base, slot, n, vec),
               "elem_bytes=%d n=%lld m=%lld: row %lld splits unlike its slot %lld", elem_bytes,
               (long long)n, (long long)m,
               (long long)row, (long long)slot);
      }
    }
  }
}

int staged_edge_unit_rows = 0;  // rows whose head and tail were replayed in units too

// A staged block of rows a thread each (cfg::kStageRowsPerThread): the block's
// kRowBlockThreads threads, kRowTileSlots packs and one edge slot each, copy every element
// of its span once, packs 16-byte aligned in global memory and in the tile; the tile
// holds element c of row r where that row's thread reads it (TileLayout::row_start), within
// kRowTileBytes; and where the layout pads rows, the 8 threads of a 16-byte shared-memory
// wavefront read 8 different bank groups.
void cover_row_tiles() {
  int spans = 0, padded = 0;
  for (int elem_bytes : {2, 4}) {
    const int vec = cfg::vector_width(elem_bytes);
    for (int64_t n = 1; n <= 256; ++n) {
      const cfg::LaunchConfig c = cfg::forward_config(n, elem_bytes, true);
      const cfg::LaunchConfig bwd = cfg::backward_config(n, elem_bytes, true);
      const bool alone = c.kind == cfg::Kind::kRegisters && c.threads_per_row == 1;
      // Both directions stage the same rows (the backward, dy's and x's span alike).
      EXPECT(!cfg::kStageBackwardRowsPerThread ||
                 alone == (bwd.kind == cfg::Kind::kRegisters && bwd.threads_per_row == 1),
             "n=%lld: the forward and the backward stage different rows", (long long)n);
      if (!alone) continue;
      EXPECT(c.rows_per_block == cfg::kRowBlockThreads, "n=%lld: %d rows a block", (long long)n,
             c.rows_per_block);
      for (int64_t rows : {1, 2, 3, 31, 127, 128}) {
        for (int64_t base = 0; base < vec; ++base) {
          // A block's spans start a multiple of kRowBlockThreads rows in: the staged
          // kernels split every full span as the first.
          for (int64_t first : {1, 2, 3, 1000, 123456789}) {
            const idx::RowSplit at_0 = idx::span_split(cfg::kRowBlockThreads, n, vec, base, 0);
            const idx::RowSplit later = idx::span_split(cfg::kRowBlockThreads, n, vec, base,
                                                        first * cfg::kRowBlockThreads);
            EXPECT(at_0.head == later.head && at_0.packs == later.packs && at_0.tail == later.tail,
                   "n=%lld: the span at row %lld splits unlike the first", (long long)n,
                   (long long)(first * cfg::kRowBlockThreads));
          }
          for (int64_t first : {0, 1, 129}) {
            const idx::RowSplit span = idx::span_split(rows, n, vec, base, first);
            const int64_t misalign = idx::row_misalign(base, first, n, vec);
            const idx::TileLayout layout = idx::tile_layout(n, vec, misalign);
            // The copy in through registers (without cp.async), and the loop of the
            // asynchronous copy in and of the copy out.
            cover_register_row<idx::kRowTileSlots, 1>(
                span, {"staged rows", elem_bytes, rows * n, true, misalign},
                cfg::kRowBlockThreads);
            cover_span_parts(span, layout,
                             {"staged rows (loop)", elem_bytes, rows * n, true, misalign},
                             cfg::kRowBlockThreads);
            for (int t = 0; t < cfg::kRowBlockThreads; ++t) {
              const auto aligned_in_tile = [&](int e) {
                EXPECT((misalign + layout.at(e)) % vec == 0,
                       "n=%lld: a pack at tile element %d", (long long)n, layout.at(e));
              };
              idx::for_each_register_pack<idx::kRowTileSlots>(
                  span, t, cfg::kRowBlockThreads, [&](int, int e) { aligned_in_tile(e); });
            }
            for (int64_t r = 0; r < rows; ++r) {
              // The row's thread reads its vectors where its split (as in global memory)
              // puts them: 16-byte aligned in the tile too.
              const idx::RowSplit row_split =
                  idx::split_row(n, vec, idx::row_misalign(base, first + r, n, vec));
              const int start = layout.row_start(static_cast<int>(r), static_cast<int>(n));
              // Its thread's loops over the row (the staged kernels' StagedRow): each
              // element once, the vectors 16-byte aligned in the tile.
              const idx::StagedRow own = idx::staged_row(row_split, static_cast<int>(n));
              std::vector<int> row_counts(n, 0);
              own.for_each_vector([&](int e) {
                EXPECT((misalign + start + e) % vec == 0,
                       "n=%lld: row %lld's loop reads a vector at %d", (long long)n,
                       (long long)r, e);
                for (int k = 0; k < vec; ++k) row_counts.at(e + k) += 1;
              });
              std::vector<int> unit_counts = row_counts;  // the vectors', then edge units
              own.for_each_edge([&](int e) { row_counts.at(e) += 1; });
              for (int64_t col = 0; col < n; ++col) {
                EXPECT(row_counts[col] == 1, "n=%lld: row %lld's loops read element %lld %d times",
                       (long long)n, (long long)r, (long long)col, row_counts[col]);
              }
              // The head and tail in units (cuda_config::staged_unit_width): the same
              // elements, each unit aligned to its bytes in the tile and on one side of the
              // vectors, and the vectors a whole number of units in (the weight's loads).
              const int unit = cfg::staged_unit_width(elem_bytes, n, misalign);
              if (unit > 1) {
                ++staged_edge_unit_rows;
                own.for_each_edge(
                    [&](int e) {
                      EXPECT((misalign + start + e) % unit == 0 &&
                                 (e + unit <= own.head || e >= own.tail_begin),
                             "n=%lld: row %lld's edge unit of %d at %d (head %d, tail from %d)",
                             (long long)n, (long long)r, unit, e, own.head, own.tail_begin);
                      for (int k = 0; k < unit; ++k) unit_counts.at(e + k) += 1;
                    },
                    unit);
                EXPECT(unit_counts == row_counts, "n=%lld: row %lld's edge units miss elements",
                       (long long)n, (long long)r);
                own.for_each_vector([&](int e) {
                  EXPECT(e % unit == 0, "n=%lld: row %lld's vector at %d, units of %d",
                         (long long)n, (long long)r, e, unit);
                });
              }
              idx::for_each_register_pack<cfg::kLargeSliceVectors>(row_split, 0, 1, [&](int,
                                                                                       int e) {
                EXPECT((misalign + start + e) % vec == 0,
                       "n=%lld: row %lld's vector at %d not 16-byte aligned in the tile",
                       (long long)n, (long long)r, e);
              });
              for (int64_t col = 0; col < n; ++col) {
                const int at = layout.at(static_cast<int>(r * n + col));
                EXPECT(at == layout.row_start(static_cast<int>(r), static_cast<int>(n)) + col,
                       "n=%lld: element %lld of row %lld at tile element %d", (long long)n,
                       (long long)col, (long long)r, at);
                EXPECT((misalign + at + 1) * elem_bytes <= cfg::kRowTileBytes + 15,
                       "n=%lld: row %lld of %lld past the tile", (long long)n, (long long)r,
                       (long long)rows);
              }
            }
            if (layout.pad != 0) {
              ++padded;
              for (int64_t r0 = 0; r0 + 8 <= rows; r0 += 8) {
                std::set<int64_t> bank_groups;
                for (int64_t r = r0; r < r0 + 8; ++r) {
                  bank_groups.insert(layout.row_start(static_cast<int>(r), static_cast<int>(n)) *
                                     elem_bytes / 16 % 8);
                }
                EXPECT(bank_groups.size() == 8, "n=%lld: padded rows share banks", (long long)n);
              }
            }
            ++spans;
          }
        }
      }
    }
  }
  std::printf("coverage: %d staged spans of rows copied, %d with padded rows, %d rows' edges "
              "in units\n", spans, padded, staged_edge_unit_rows);
  EXPECT(!cfg::kStagedUnits || staged_edge_unit_rows > 0, "no row's edges replayed in units");
}

// The row-per-thread backward (cfg::kStageBackwardRowsPerThread): blocks of 128 rows,
// a grid that depends on m alone; every thread's rows split alike (spans 128 rows apart);
// the column threads (cuda_indexing::staged_column) add each element of a span of any
// row count exactly once, reading it where the tile holds it (padded or not), and the
// block adds every thread's column sums into its partial row once.
int staged_backward_cases = 0;
std::set<int> widths;  // columns a thread, over the cases

void check_staged_backward(const cfg::LaunchConfig& c, int64_t n, int elem_bytes) {
  const int vec = cfg::vector_width(elem_bytes);
  EXPECT(c.rows_per_block == cfg::kRowBlockThreads && n >= 1 &&
             n * elem_bytes <= cfg::kLargeSliceBytes,
         "n=%lld: a row per thread in blocks of %d rows", (long long)n, c.rows_per_block);
  for (int64_t m : {1, 2, 127, 128, 129, 700, 100000, 10000000}) {
    const int64_t blocks = cfg::staged_backward_blocks(m);
    EXPECT(blocks >= 1 && blocks <= cfg::kBackwardThreads / cfg::kRowBlockThreads &&
               (blocks - 1) * cfg::kRowBlockThreads < m,
           "m=%lld: %lld blocks", (long long)m, (long long)blocks);
    for (int64_t base = 0; base < vec; ++base) {
      for (int64_t b : {int64_t(0), blocks - 1}) {
        for (int t = 0; t < cfg::kRowBlockThreads; t += 7) {
          const int64_t row0 = b * cfg::kRowBlockThreads + t;
          const int64_t row1 = row0 + blocks * cfg::kRowBlockThreads;
          EXPECT(idx::row_misalign(base, row0, n, vec) == idx::row_misalign(base, row1, n, vec),
                 "n=%lld: thread %d's rows split unalike", (long long)n, t);
        }
      }
    }
  }
  // Every offset of the spans from a vector boundary: its tile layout, and its column
  // width (a unit of columns where the tile holds them aligned to the unit's bytes).
  for (int64_t misalign = 0; misalign < vec; ++misalign) {
    const idx::TileLayout layout = idx::tile_layout(n, vec, misalign);
    const int width = cfg::staged_unit_width(elem_bytes, n, misalign);
    EXPECT(width >= 1 && width * elem_bytes <= cfg::kStagedUnitBytes && n % width == 0 &&
               misalign % width == 0,
           "n=%lld: columns %d a thread", (long long)n, width);
    const int phases = cfg::staged_column_phases(n, width);
    EXPECT(phases >= 1 && phases * n <= width * cfg::kRowBlockThreads, "n=%lld: %d phases",
           (long long)n, phases);
    widths.insert(width);
    for (int rows : {1, 2, 5, 31, 127, 128}) {
      std::vector<int> counts(rows * n, 0);
      std::set<int> phase_sums;
      for (int t = 0; t < cfg::kRowBlockThreads; ++t) {
        const idx::StagedColumn col = idx::staged_column(t, n, width);
        EXPECT(col.phases == phases && col.width == width, "n=%lld: thread %d has %d phases",
               (long long)n, t, col.phases);
        if (!col.active()) continue;
        EXPECT(col.col >= 0 && col.col + width <= n && col.phase >= 0,
               "n=%lld: thread %d at column %d", (long long)n, t, col.col);
        // Where the tile holds the row's element col (the kernel's row stride): a unit
        // starts aligned to its bytes.
        col.for_each_row(rows, layout.row_start(1, static_cast<int>(n)), [&](int r, int at) {
          EXPECT(at == layout.at(static_cast<int>(r * n + col.col)),
                 "n=%lld: thread %d reads row %d at tile element %d (pad %d)", (long long)n, t,
                 r, at, layout.pad);
          EXPECT((misalign + at) % width == 0,
                 "n=%lld misalign=%lld: a unit at tile element %d", (long long)n,
                 (long long)misalign, at);
          for (int k = 0; k < width; ++k) counts.at(r * n + col.col + k) += 1;
        });
        // The entries of the block's phase sums it writes (its own: no two threads share
        // one).
        for (int k = 0; k < width; ++k) {
          const int entry = col.phase * static_cast<int>(n) + col.col + k;
          EXPECT(entry == t * width + k && !phase_sums.count(entry),
                 "n=%lld: thread %d writes phase sum %d", (long long)n, t, entry);
          phase_sums.insert(entry);
        }
      }
      for (size_t e = 0; e < counts.size(); ++e) {
        EXPECT(counts[e] == 1, "n=%lld rows=%d: element %zu added %d times", (long long)n, rows,
               e, counts[e]);
      }
      // Threads 0 .. n-1 each add their column's phases: every entry written is read once.
      // (The kernel's phase sums hold width * kRowBlockThreads entries.)
      const int entries = width * cfg::kRowBlockThreads;
      std::vector<int> reads(entries, 0);
      for (int c = 0; c < n; ++c) {
        for (int p = 0; p < phases; ++p) reads.at(p * n + c) += 1;
      }
      for (int e = 0; e < entries; ++e) {
        EXPECT(reads[e] == int(phase_sums.count(e)), "n=%lld: phase sum %d read %d times",
               (long long)n, e, reads[e]);
      }
    }
  }
  ++staged_backward_cases;
}

void replay_coverage() {
  const int64_t lengths[] = {0,    1,    2,    3,    4,    5,    7,     8,     9,     15,   16,
                             17,   20,   31,   63,   64,   65,   96,    127,   128,   129,  255,
                             256,  257,  511,  512,  513,  768,  1000,  1001,  1023,  1024, 1025,
                             2047, 2048, 2049, 4095, 4096, 4097, 8191,  8192,  8193,  12345,
                             16383, 16384, 16385, 24577, 32767, 32768, 32769, 65537, 100003};
  for (int elem_bytes : {2, 4, 8}) {
    const int vec = cfg::vector_width(elem_bytes);
    for (int64_t n : lengths) {
      for (bool vectorized : {true, false}) {
        const cfg::LaunchConfig fwd = cfg::forward_config(n, elem_bytes, vectorized);
        const cfg::LaunchConfig bwd = cfg::backward_config(n, elem_bytes, vectorized);
        for (int64_t base = 0; base < vec; ++base) {
          for (int64_t row = 0; row < vec; ++row) {
            const int64_t misalign = vectorized ? idx::row_misalign(base, row, n, vec) : 0;
            cover_row(fwd, {"forward", elem_bytes, n, vectorized, misalign});
            cover_row(bwd, {"backward", elem_bytes, n, vectorized, misalign});
          }
        }
        check_backward_slots(bwd, n, elem_bytes, vectorized);
      }
    }
  }
  std::printf("coverage: %zu forward and %zu backward kernel variants replayed\n",
              variants_seen[0].size(), variants_seen[1].size());
  std::printf("coverage: %d row-per-thread backward configurations, columns a thread:",
              staged_backward_cases);
  for (int width : widths) std::printf(" %d", width);
  std::printf("\n");
}

// ---------------------------------------------------------------------------------------
// 2 and 3. Reductions, with CUDA threads emulated by std::threads

// Which partials a value holds: counts[i] = times partial i was added in.
struct Contribution {
  std::vector<int> counts;
};

struct AddContributions {
  Contribution operator()(const Contribution& a, const Contribution& b) const {
    Contribution out = a;
    for (size_t i = 0; i < out.counts.size(); ++i) out.counts[i] += b.counts[i];
    return out;
  }
};

// One emulated block: blockDim = (group_size, groups).
struct EmulatedBlock {
  int group_size, groups;
  std::barrier<> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<Contribution> shuffle_slots;  // one per thread

  EmulatedBlock(int g, int r)
      : group_size(g), groups(r), block_barrier(g * r), shuffle_slots(g * r) {
    for (int w = 0; w < g * r / cfg::kWarpSize; ++w) {
      warp_barriers.push_back(std::make_unique<std::barrier<>>(cfg::kWarpSize));
    }
  }
};

// The `lanes` interface of cuda_indexing::group_allreduce for one emulated thread, with
// __shfl_*_sync semantics: a source lane outside the caller's segment of `width` lanes
// returns the caller's own value. `epoch` counts the block barriers this thread passed.
struct HostLanes {
  EmulatedBlock* block;
  int x, y;
  mutable long epoch = 0;

  int thread() const { return x; }
  int group() const { return y; }
  int group_size() const { return block->group_size; }
  void sync() const {
    block->block_barrier.arrive_and_wait();
    ++epoch;
  }

  int linear() const { return y * block->group_size + x; }
  Contribution exchange(const Contribution& v, int src_lane) const {
    const int lane = linear() % cfg::kWarpSize;
    const int warp_base = linear() - lane;
    std::barrier<>& warp = *block->warp_barriers[linear() / cfg::kWarpSize];
    block->shuffle_slots[linear()] = v;
    warp.arrive_and_wait();
    Contribution out = block->shuffle_slots[warp_base + src_lane];
    warp.arrive_and_wait();
    return out;
  }
  Contribution shfl_down(const Contribution& v, int offset, int width) const {
    const int lane = linear() % cfg::kWarpSize;
    return exchange(v, lane % width + offset < width ? lane + offset : lane);
  }
  Contribution shfl(const Contribution& v, int src, int width) const {
    const int lane = linear() % cfg::kWarpSize;
    return exchange(v, lane - lane % width + src);
  }
};

// Emulated shared memory that logs every access (thread, barrier epoch, read or write)
// and reports a hazard when two threads touch an entry in the same epoch and one writes.
struct SharedMemory {
  struct Access {
    int thread;
    long epoch;
    bool write;
  };
  std::vector<Contribution> data;
  std::vector<std::vector<Access>> log;
  std::mutex mutex;
  const char* what;

  SharedMemory(size_t n, int partials, const char* what_)
      : data(n, Contribution{std::vector<int>(partials, 0)}), log(n), what(what_) {}

  void record(size_t i, const HostLanes& by, bool write) {
    for (const Access& a : log.at(i)) {
      EXPECT(!(a.thread != by.linear() && a.epoch == by.epoch && (a.write || write)),
             "%s: threads %d and %d race on shared entry %zu between two barriers (%s)", what,
             a.thread, by.linear(), i, write ? "write" : "read");
    }
    log[i].push_back({by.linear(), by.epoch, write});
  }
};

// The S* a kernel indexes, for one emulated thread.
struct SharedRef {
  SharedMemory* memory;
  const HostLanes* lanes;
  size_t i;

  SharedRef& operator=(const Contribution& v) {
    std::lock_guard<std::mutex> lock(memory->mutex);
    memory->record(i, *lanes, true);
    memory->data[i] = v;
    return *this;
  }
  operator Contribution() const {
    std::lock_guard<std::mutex> lock(memory->mutex);
    memory->record(i, *lanes, false);
    return memory->data[i];
  }
};

struct SharedPointer {
  SharedMemory* memory;
  const HostLanes* lanes;
  size_t offset = 0;

  SharedRef operator[](size_t i) const { return {memory, lanes, offset + i}; }
};

void replay_group_allreduce(int group_size, int groups) {
  const int threads = group_size * groups;
  EmulatedBlock block(group_size, groups);
  SharedMemory scratch(idx::kReduceScratch, threads, "group_allreduce scratch");
  // Several calls in a row by the same threads, as the kernels make one per row: the
  // scratch must be safe to reuse (a missing barrier shows up as a wrong count here,
  // though only when the threads happen to interleave badly).
  constexpr int kCalls = 3;
  std::vector<std::vector<Contribution>> results(kCalls, std::vector<Contribution>(threads));
  std::vector<std::thread> workers;
  for (int y = 0; y < groups; ++y) {
    for (int x = 0; x < group_size; ++x) {
      workers.emplace_back([&, x, y] {
        HostLanes lanes{&block, x, y};
        const Contribution identity{std::vector<int>(threads, 0)};
        for (int call = 0; call < kCalls; ++call) {
          Contribution mine{std::vector<int>(threads, 0)};
          mine.counts[lanes.linear()] = call + 1;  // a different value in each call
          results[call][lanes.linear()] =
              idx::group_allreduce(mine, identity, AddContributions{}, lanes,
                                   SharedPointer{&scratch, &lanes});
        }
      });
    }
  }
  for (auto& w : workers) w.join();
  for (int call = 0; call < kCalls; ++call) {
    for (int y = 0; y < groups; ++y) {
      for (int x = 0; x < group_size; ++x) {
        const Contribution& r = results[call][y * group_size + x];
        for (int i = 0; i < threads; ++i) {
          const int expected = i / group_size == y ? call + 1 : 0;
          EXPECT(r.counts[i] == expected,
                 "group_allreduce G=%d R=%d call %d: thread (%d,%d) holds partial %d %d times",
                 group_size, groups, call, x, y, i, r.counts[i] / (call + 1));
          if (r.counts[i] != expected) return;
        }
      }
    }
  }
}

void replay_finalize(int64_t slots) {
  constexpr int kColumns = cfg::kFinalizeColumns, kLanes = cfg::kFinalizeLanes;
  EmulatedBlock block(kColumns, kLanes);
  SharedMemory sums(kColumns * kLanes, slots, "finalize sums");  // [lane][column]
  std::vector<std::thread> workers;
  for (int y = 0; y < kLanes; ++y) {
    for (int x = 0; x < kColumns; ++x) {
      workers.emplace_back([&, x, y] {
        HostLanes lanes{&block, x, y};
        Contribution sum{std::vector<int>(slots, 0)};
        idx::for_each_partial_slot(y, kLanes, slots, [&](int64_t s) { sum.counts.at(s) += 1; });
        const SharedPointer column{&sums, &lanes, size_t(x)};
        column[y * kColumns] = sum;
        idx::shared_tree_reduce(column, kColumns, y, kLanes, AddContributions{}, lanes);
      });
    }
  }
  for (auto& w : workers) w.join();
  for (int x = 0; x < kColumns; ++x) {
    for (int64_t s = 0; s < slots; ++s) {
      EXPECT(sums.data[x].counts[s] == 1, "finalize slots=%lld: column %d adds slot %lld %d times",
             (long long)slots, x, (long long)s, sums.data[x].counts[s]);
    }
  }
}

void replay_reductions() {
  // Every (G, rows per block) the launch table can produce, whatever the row length.
  std::set<std::pair<int, int>> shapes;
  for (int elem_bytes : {2, 4, 8}) {
    for (int64_t n = 0; n <= 70000; n = n < 64 ? n + 1 : n + n / 7) {
      for (bool vectorized : {true, false}) {
        for (const auto& c : {cfg::forward_config(n, elem_bytes, vectorized),
                              cfg::backward_config(n, elem_bytes, vectorized)}) {
          shapes.insert({c.threads_per_row, c.rows_per_block});
        }
      }
    }
  }
  for (const auto& [g, r] : shapes) replay_group_allreduce(g, r);
  std::printf("group_allreduce: %zu block shapes replayed:", shapes.size());
  for (const auto& [g, r] : shapes) std::printf(" %dx%d", g, r);
  std::printf("\n");
  for (int64_t slots : {1, 2, 15, 16, 17, 100, 256, 4096}) replay_finalize(slots);
  std::printf("finalize: 8 slot counts replayed\n");
}

}  // namespace

int main() {
  replay_coverage();
  replay_reductions();
  cover_row_tiles();
  std::printf("%ld checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
