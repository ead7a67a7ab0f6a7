// Which CUDA kernel runs for a given row length and dtype, with how many threads:
// the one table of launch configurations. Plain C++ (host/device), so the host replay
// test (tests/cuda_replay/) checks the configurations the launcher really uses.
//
// Kernels (csrc/cuda/layernorm_cuda_{forward,backward}.cuh):
//   forward, rows in registers    a slice of kSmallSliceBytes (32), kLargeSliceBytes (128)
//                                 or (float32 rows over 32 KiB) kHugeSliceBytes (256) of
//                                 the row per thread, kept as loaded (8, 32 or 64
//                                 registers, whatever the dtype), `threads_per_row`
//                                 threads per row (1, or 8 .. 512: a sub-warp group, a
//                                 warp or a block), several rows per block when a row
//                                 needs fewer than kRowBlockThreads threads.
//   forward, a row per thread     rows of at most 128 bytes, 128 rows a block: x's span
//                                 copied into a shared-memory tile, each thread's row
//                                 normalized there, y's span copied out
//                                 (kStageRowsPerThread).
//   backward, a row per thread    the same rows: dy's and x's span copied into shared
//                                 memory as in the forward; a thread takes its row's
//                                 sums and dx there, and adds dgamma/dbeta of one column
//                                 or a pair over a share of the rows
//                                 (kStageBackwardRowsPerThread).
//   backward, rows in registers   kElemsBackward (16) elements per thread, dgamma/dbeta
//                                 accumulated in registers over every row of a slot;
//                                 kElemsBackwardLong (32) for rows up to 16384, which
//                                 read dy and x a second time (from L2) for dx. Loads
//                                 go in batches of kBackwardBatchPacks vectors.
//   forward, streaming            a block per row, any row length, two passes over the
//                                 row (the second one hits L2); float64 rows and rows
//                                 whose tensors disagree on 16-byte alignment use it too.
//   backward, streaming           the same rows, in two kernels: one reduces each row (a
//                                 block per row), one runs over columns (a thread per
//                                 16-byte pack of a slot's rows, dgamma/dbeta in
//                                 registers); see kColumnBlockThreads below.
#pragma once

#include <cstdint>

#include "../layernorm_math.h"  // LN_HOST_DEVICE

namespace layernorm_ext {
namespace cuda_config {

constexpr int kWarpSize = 32;
// Largest block of every kernel (their __launch_bounds__).
constexpr int kMaxBlockThreads = 512;
// Threads per block when several short rows share a block.
constexpr int kRowBlockThreads = 128;

// Forward: bytes of a row per thread, in 16-byte vectors. Sized in bytes, not elements:
// a memory-bound kernel's speed follows the bytes each SM has in flight. On an H100
// (2026-11-25) the forward with 32 elements per thread ran at 92-95% of the copy roof in
// float32 (128 bytes) and at 57-66% in bfloat16 (64 bytes), at the same occupancy.
constexpr int kSmallSliceBytes = 32;   // rows up to 32 * 32 bytes (256 fp32, 512 bf16)
constexpr int kLargeSliceBytes = 128;  // rows up to 128 * 512 bytes (32768 bf16; fp32: below)
constexpr int kSmallSliceVectors = kSmallSliceBytes / 16;
// Small slices always come in blocks of kRowBlockThreads (several rows each). Their
// kernel asks the compiler to fit this many blocks per SM (__launch_bounds__; at most
// 65536 / (8 * 128) = 64 registers a thread): left alone, nvcc 13.0 gave the 2-byte
// LayerNorm 72 registers, 28 resident warps an SM instead of 32. 9 blocks (56 registers)
// made the float16 LayerNorm spill once its row statistics took two sums (2026-12-04).
constexpr int kSmallSliceMinBlocksPerSM = 8;
// The same for a row per thread (128 rows a block; 65536 / (4 * 128) = 128 registers).
// Staged (below), its kernel loops over the row in the tile and takes 48-64 registers
// (nvcc 13.0, sm_80 and sm_90: 8-10 blocks an SM). As the register kernel's unrolled slots
// (until 2026-12-05) it took 89-96 at 5 blocks an SM and the 2-byte RMSNorm spilled on
// sm_80; read directly, without the tile (bench/ab/), 80-96 at 5, and 6 spilled. A block
// copies its rows in at once (up to 16 KiB; 10 KiB at float32 D = 20), so 4 still keep
// 40-64 KiB an SM in flight while they copy.
constexpr int kRowPerThreadMinBlocksPerSM = 4;
// A block of rows per thread moves its 128 rows (one span of memory) through shared
// memory: every thread copies 16-byte vectors of the span in and y's span out, so a
// warp's loads and stores cover whole lines. Read directly, thread t's vectors lie n
// elements apart: at D = 20 a warp's 16-byte store touches 32 sectors, a 2-byte one (bf16
// edges) 32 sectors for 64 bytes, and these rows ran at 26-46% of the copy roof on an
// H200 (2026-12-04), where torch.compile's coalesced kernel reached 94-101%. Its own
// kernel (forward_staged_rows_kernel) since 2026-12-05: the weight and bias read once a
// block into shared memory, loops over the row's vectors and edges (1,333 sm_90
// instructions in bf16, 3,802 as the register kernel's predicated slots).
// (Compiled and emulator-tested, not run on a GPU: bench/ab/ has the direct reads.)
constexpr bool kStageRowsPerThread = true;
// Staged blocks (forward and backward) copy their spans into the tiles with cp.async
// (sm_80 and later): 16 bytes from global to shared memory without a register, one
// instruction a vector, where a copy through registers takes a load, a store and their
// address arithmetic for each of a thread's 8 vector slots (about a fifth of the
// backward's instructions at bf16 D = 20, by a count of its sm_90 SASS), and the backward
// can have dy's and x's vectors in flight together (through registers both at once
// spilled). (Compiled and emulator-tested, not run on a GPU: bench/ab/ has the copy
// through registers.)
constexpr bool kAsyncStagedCopy = true;
// The persistent kernels (one wave of blocks, each looping over rows or spans) ask L2 for
// the next rows a thread group will read (prefetch_to_l2) right after issuing the loads of
// the current ones: a loop's loads wait for DRAM only while nothing else of the SM's is
// in flight, and the hardware cannot overlap a block's next rows with its current ones as
// it overlaps the blocks of a larger grid. (On the H200, 2026-12-04, the forward of bf16
// D = 1024 .. 8192 ran at 63-67% of the copy roof, the backward of bf16 at 54-72%.) At
// most two line prefetches a thread for a row of a large slice, no register held.
// (Compiled and emulator-tested, not run on a GPU: bench/ab/ has the kernels without.)
constexpr bool kPrefetchNextRows = true;
// The tile: 128 rows of up to 128 bytes, each padded by up to 16 (cuda_indexing::TileLayout).
constexpr int kRowTileBytes = kRowBlockThreads * (kLargeSliceBytes + 16);
constexpr int kLargeSliceVectors = kLargeSliceBytes / 16;
// Float32 rows over 256 large slices (32 KiB, D > 8192) take slices of 256 bytes in blocks
// of kHugeSliceThreads, kHugeSliceMinBlocksPerSM an SM, rather than 512-thread blocks of
// large slices: one of those fits an SM (84 registers), and it loads a row, reduces it and
// writes it with nothing else in flight there (on an H100, 2026-11-25: 66% of the copy
// roof at D = 16384, 92-95% up to D = 8192 with 256 threads and more blocks an SM).
// Float32 only: a 2-byte thread would sum 130 values (128, a head and a tail element),
// more than the overflow rescue allows (math::kRescueFactor); 2-byte rows up to 64 KiB
// keep large slices.
constexpr int kHugeSliceBytes = 256;
constexpr int kHugeSliceVectors = kHugeSliceBytes / 16;
constexpr int kHugeSliceThreads = 256;
constexpr int kHugeSliceMinBlocksPerSM = 2;
// Backward: elements per thread (its registers hold float32 values, whatever the dtype).
constexpr int kElemsBackward = 16;  // rows up to 16 * 512 = 8192 elements
// Backward, rows up to 32 * 512 = 16384: 32 columns of dgamma and dbeta per thread in
// registers leave no room to keep the row too. (These rows streamed before 2026-12-02,
// adding every row into a partial row in global memory: 8% of the copy roof on an H100.)
constexpr int kElemsBackwardLong = 32;
// Backward, rows of at most a large slice (128 bytes: float32 D <= 32, 2-byte D <= 64): a
// thread each, 128 rows a block, the block's span of dy and x copied into two tiles like
// the forward's (coalesced 16-byte vectors, 80-128 bytes a thread at once). In row groups
// of 4 (float32) or 8 (2-byte) threads (until 2026-12-04) a thread loaded one or two
// vectors, or one 2-byte head or tail element (bf16 D = 20: 8 threads for 20 elements,
// every other row starting mid-vector), and the H200 (2026-12-04) ran D = 20 at 49%
// (float32) and 16% (bfloat16) of the copy roof. dgamma/dbeta: thread t adds column
// t % D over the rows t / D, t / D + J, ... of each span (J = staged_column_phases(D, 1),
// 128 / D), rather than keep 2 D registers a thread (128 at bf16 D = 64), and a block
// adds its J phases into one partial row at the end; with kStagedUnits a unit of `width`
// columns (staged_column) over J = staged_column_phases(D, width) phases.
// (Compiled and emulator-tested, not run on a GPU: bench/ab/ has the row groups.)
constexpr bool kStageBackwardRowsPerThread = true;
// Its __launch_bounds__ floor, 96 registers a thread (no spills, sm_80 and sm_90, nvcc
// 13.0; 6 blocks, 80 registers, spilled): the two tiles take 37 KiB of shared memory a
// block, and 5 blocks fit an H100's 228 KiB (an A100's 164 KiB holds 4).
constexpr int kStagedBackwardMinBlocksPerSM = 5;
// Staged tiles are read in units of `width` adjacent elements, up to 8 bytes (2-byte
// dtypes: 4 or 2, float32: 2), where every row's elements lie at offsets that are
// multiples of the width (D and the spans' offset both are): the backward's column pass
// adds a unit of columns a thread (its dy and x in one load each, its rows' statistics
// loaded once for the unit: one column a thread issued 16 instructions an element in
// bf16 at D = 20, a quarter of the kernel's), both kernels' row passes take a row's head
// and tail elements a unit at a time (bf16 D = 20: 4 of its 20 elements, ~40% of a row
// pass's instructions one at a time), and the fp32 weight (and bias) in shared memory is
// read a unit of floats at a time (8 loads a bf16 vector otherwise). The kernels take the
// width as a template argument (launched by staged_unit_width). Not run on a GPU.
constexpr bool kStagedUnits = true;
constexpr int kStagedUnitBytes = 8;
LN_HOST_DEVICE constexpr int staged_unit_width(int elem_bytes, int64_t n, int64_t misalign) {
  int width = kStagedUnits ? kStagedUnitBytes / elem_bytes : 1;
  while (width > 1 && (n % width != 0 || misalign % width != 0)) width /= 2;
  return width < 1 ? 1 : width;
}
LN_HOST_DEVICE constexpr int staged_column_phases(int64_t n, int width) {
  return static_cast<int>(kRowBlockThreads / (n / width));
}

// Backward: 16-byte packs of dy and x a thread loads together, before it uses any
// (layernorm_cuda_backward.cuh). More put more bytes in flight, but each takes 8
// registers of the 128 a 512-thread block allows, where dgamma/dbeta take 32 or 64 and
// the kept row 32: with 4 (a float32 thread's whole kept row) nvcc 13.0 spilled.
constexpr int kBackwardBatchPacks = 2;
LN_HOST_DEVICE constexpr int backward_batch_packs(int slots) {
  return slots < kBackwardBatchPacks ? slots : kBackwardBatchPacks;
}

// Backward: a "slot" is one row group that accumulates dgamma/dbeta over the rows
// slot, slot + slots, slot + 2 * slots, ... into partial rows (dgamma, and dbeta for
// LayerNorm; fp32, fp64 for float64): the register kernel's blocks add their slots'
// into one (through shared memory), the streaming kernel's slots write theirs. Fewer
// slots mean less partial traffic, more slots more parallelism; the count depends on M,
// N, the dtype and the tensors' alignment, never on the GPU, so the order of the sums is
// the same on every GPU model (the terms' last bits may differ between architectures:
// FMA contraction per build, approximate rsqrt; csrc/README.md).
constexpr int64_t kMinRowsPerSlot = 16;
// At most max(kBackwardBlocks, kBackwardThreads / threads per block) blocks. Each block
// loops over its slots' rows, so more blocks than fit on the GPU at once cost a second
// wave; fewer leave it idle. The thread budget (2026-12-02, not yet measured) lets
// 128-thread blocks have 512: on an H100 the register backward ran at 47-68% of the copy
// roof with 256 of them (about 8 resident warps per SM, a quarter of the 64-warp limit);
// 512 blocks at ~128 registers a thread fill the 16 warps per SM the register file
// allows, in one wave on its 132 SMs. Larger blocks keep 256 (partial rows cost traffic);
// the streaming backward has its own count (column_slots).
constexpr int64_t kBackwardBlocks = 256;
constexpr int64_t kBackwardThreads = 65536;
// The register backward's blocks of several slots (groups of fewer than kRowBlockThreads
// threads, kRowBlockThreads / G rows a block, kElemsBackward elements a thread) hold at
// most kRowBlockThreads * kElemsBackward columns of slots' partial rows, twice for
// LayerNorm: 16 KiB of shared memory in float32.
constexpr int kSlotPartialEntries = 2 * kRowBlockThreads * kElemsBackward;

// Backward, streaming (rows too long for registers, float64, tensors of differing
// alignment): dy and x read twice from DRAM. First a block per row reduces it to the two
// row means dx needs (streaming_config's threads); then a grid over columns: each thread
// holds one "column unit" (a 16-byte pack, or a head or tail element) of every row of
// its slot, kColumnRowsInFlight rows at a time, writes dx and keeps its columns'
// dgamma/dbeta in registers. 5 row-sized transfers instead of 3, but none other per row:
// the one-kernel version before 2026-12-04 added every row into its slot's fp32 partial
// row in global memory and ran at 8-24% of the copy roof on an H100 (D = 16384).
constexpr int kColumnBlockThreads = 256;
constexpr int kColumnRowsInFlight = 4;
// Blocks aimed at (column blocks x slots): about eight per SM of an H100 (132 SMs). But
// at least kMinColumnSlots slots where there are rows for them: a thread adds its slot's
// rows one after another in fp32, so very long rows (few slots by the block count
// alone; one slot past 2^18 column units, float32 D ~ 2^20) would add thousands each.
constexpr int64_t kColumnBlocks = 1024;
constexpr int64_t kMinColumnSlots = 64;

// Parameter-gradient reduction: 32 columns x 16 slot lanes per block.
constexpr int kFinalizeColumns = 32;
constexpr int kFinalizeLanes = 16;

enum class Kind : int { kRegisters = 0, kStreaming = 1 };

struct LaunchConfig {
  Kind kind;
  int elems_per_thread;  // register kernels: the row slice a thread holds, in elements
  int threads_per_row;   // blockDim.x, a power of two
  int rows_per_block;    // blockDim.y
};

// Elements per 16-byte vector of an element of `elem_bytes` bytes. Also the fewest
// threads of a register kernel's row group but one: the group holds a row's head and tail
// (under a vector each) one element a thread; a thread alone on its row holds them all.
LN_HOST_DEVICE constexpr int vector_width(int elem_bytes) { return 16 / elem_bytes; }

LN_HOST_DEVICE constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Smallest power of two >= n, clamped to [lo, hi] (lo, hi powers of two).
LN_HOST_DEVICE constexpr int pow2_clamped(int64_t n, int lo, int hi) {
  int p = lo;
  while (p < hi && p < n) p *= 2;
  return p;
}

LN_HOST_DEVICE constexpr LaunchConfig with_rows_per_block(Kind kind, int elems, int threads) {
  return {kind, elems, threads, threads < kRowBlockThreads ? kRowBlockThreads / threads : 1};
}

LN_HOST_DEVICE constexpr LaunchConfig streaming_config(int64_t n, int elem_bytes) {
  // About four vectors per thread per pass, a block of 32 .. 512 threads per row.
  const int64_t per_thread = 4 * vector_width(elem_bytes);
  return {Kind::kStreaming, 0, pow2_clamped(ceil_div(n, per_thread), kWarpSize, kMaxBlockThreads),
          1};
}

// `vectorized`: every row tensor starts at the same offset from a 16-byte boundary, so
// rows split into the same head / 16-byte vectors / tail in all of them.
// float64 always streams: it need only be correct, and this keeps the build small.
// A row that fits one large slice (D <= 32 fp32, 64 bf16) has a thread to itself, 128
// rows a block: in groups of 8 threads most lanes would idle (D = 20 fp32: 5 of 8 hold
// a vector). Rows up to a warp's worth of small slices take them (more resident warps:
// fewer registers); longer rows the large slice, with the fewest threads (16 .. 512)
// that hold it; float32 rows over 32 KiB the huge slice (above).
LN_HOST_DEVICE constexpr LaunchConfig forward_config(int64_t n, int elem_bytes, bool vectorized) {
  if (vectorized && elem_bytes <= 4) {
    const int small = kSmallSliceBytes / elem_bytes, large = kLargeSliceBytes / elem_bytes;
    const int huge = kHugeSliceBytes / elem_bytes;
    const int vec = vector_width(elem_bytes);
    if (n <= large) return with_rows_per_block(Kind::kRegisters, large, 1);
    if (n <= int64_t(small) * kWarpSize) {
      return with_rows_per_block(Kind::kRegisters, small,
                                 pow2_clamped(ceil_div(n, small), vec, kWarpSize));
    }
    if (elem_bytes == 4 && n > int64_t(large) * kHugeSliceThreads &&
        n <= int64_t(huge) * kHugeSliceThreads) {
      return with_rows_per_block(Kind::kRegisters, huge, kHugeSliceThreads);
    }
    if (n <= int64_t(large) * kMaxBlockThreads) {
      return with_rows_per_block(
          Kind::kRegisters, large,
          pow2_clamped(ceil_div(n, large), vec, kMaxBlockThreads));
    }
  }
  return streaming_config(n, elem_bytes);
}

LN_HOST_DEVICE constexpr LaunchConfig backward_config(int64_t n, int elem_bytes, bool vectorized) {
  if (!vectorized || elem_bytes > 4 || n > int64_t(kElemsBackwardLong) * kMaxBlockThreads) {
    return streaming_config(n, elem_bytes);
  }
  // (D = 0 has no backward launch, and no column for a thread.)
  if (kStageBackwardRowsPerThread && n >= 1 && n <= kLargeSliceBytes / elem_bytes) {
    return with_rows_per_block(Kind::kRegisters, kLargeSliceBytes / elem_bytes, 1);
  }
  const int elems = n <= int64_t(kElemsBackward) * kMaxBlockThreads ? kElemsBackward
                                                                     : kElemsBackwardLong;
  // Short rows: as few threads as the head and tail allow (D = 20 float32: 4 threads, each
  // with up to two vectors, rather than 8 with at most one).
  return with_rows_per_block(
      Kind::kRegisters, elems,
      pow2_clamped(ceil_div(n, elems), vector_width(elem_bytes), kMaxBlockThreads));
}

// Rows r and r + period start at the same offset from a 16-byte boundary: the period
// of r * n modulo the vector width `vec` (a power of two).
LN_HOST_DEVICE constexpr int row_alignment_period(int64_t n, int vec) {
  int64_t a = n % vec, b = vec;  // vec / gcd(n mod vec, vec)
  while (a != 0) {
    const int64_t r = b % a;
    b = a;
    a = r;
  }
  return static_cast<int>(vec / b);
}

// The streaming backward's column units in a row of n elements, for any offset of the
// row from a 16-byte boundary: its packs and up to vec - 1 head and vec - 1 tail
// elements (n elements when the tensors are not vectorized), and its threads per block.
LN_HOST_DEVICE constexpr int64_t column_units(int64_t n, int vec, bool vectorized) {
  return vectorized ? n / vec + 2 * (vec - 1) : n;
}
LN_HOST_DEVICE constexpr int column_block_threads(int64_t units) {
  return pow2_clamped(units, kWarpSize, kColumnBlockThreads);
}
LN_HOST_DEVICE constexpr int64_t column_blocks(int64_t units) {
  return ceil_div(units > 0 ? units : 1, column_block_threads(units));
}

// Number of backward slots for m rows of n elements: a multiple of the alignment period,
// so every row of a slot splits into head / vectors / tail the same way, and a thread
// owns the same columns in all of them. Register kernels: also a multiple of
// rows_per_block (whole blocks), at most the block budget above. Streaming: enough for
// kColumnBlocks blocks, or kMinColumnSlots, at most one per kMinRowsPerSlot rows, and at
// most one a row.
LN_HOST_DEVICE constexpr int64_t round_slots(int64_t slots, int64_t cap, int64_t unit) {
  if (slots > cap) slots = cap;
  if (slots < 1) slots = 1;
  return ceil_div(slots, unit) * unit;
}

LN_HOST_DEVICE constexpr int64_t backward_slots(int64_t m, const LaunchConfig& c, int period) {
  const int64_t by_threads = kBackwardThreads / (int64_t(c.threads_per_row) * c.rows_per_block);
  const int64_t cap =
      (by_threads > kBackwardBlocks ? by_threads : kBackwardBlocks) * c.rows_per_block;
  return round_slots(ceil_div(m, kMinRowsPerSlot), cap,
                     c.rows_per_block > period ? c.rows_per_block : period);
}

// The row-per-thread backward's blocks for m rows, a partial row each: a block per span
// of 128 rows, at most kBackwardThreads / 128 (a function of m only, as the slots).
LN_HOST_DEVICE constexpr int64_t staged_backward_blocks(int64_t m) {
  const int64_t blocks = ceil_div(m, kRowBlockThreads);
  const int64_t cap = kBackwardThreads / kRowBlockThreads;
  return blocks < 1 ? 1 : blocks > cap ? cap : blocks;
}

LN_HOST_DEVICE constexpr int64_t column_slots(int64_t m, int64_t column_block_count,
                                              int period) {
  const int64_t by_blocks = ceil_div(kColumnBlocks, column_block_count);
  const int64_t slots = round_slots(ceil_div(m, kMinRowsPerSlot),
                                    by_blocks > kMinColumnSlots ? by_blocks : kMinColumnSlots,
                                    period);
  // Fewer rows than that: a slot a row, each split like itself. Rounded up to the period,
  // the empty slots' partial rows of zeros would make the workspace up to 32 times the
  // input (one bfloat16 row of 2^26 + 1 elements: 8 slots, 4 GiB).
  return m >= 1 && slots > m ? m : slots;
}

}  // namespace cuda_config
}  // namespace layernorm_ext
