// Lets the CUDA kernel sources (csrc/cuda/layernorm_cuda_*.cuh) compile as host C++
// and run on the CPU emulator of emulator.cpp: CUDA's keywords become plain C++, and the
// built-ins a kernel uses (threadIdx and friends, __syncthreads, warp shuffles) call the
// emulator, which runs every thread of a block as a coroutine and resumes them together
// at each barrier, as a GPU would. Include it before the kernels.
//
// What this checks: the kernels' arithmetic, indexing, reductions and launch logic on the
// CPU, for every kernel variant; missing barriers, as far as running the threads between
// barriers in other orders (set_schedule) changes a result. What it cannot: timing, the
// GPU's memory model beyond that, and the device's own rounding (rsqrt, contracted
// multiply-adds). compute-sanitizer on a GPU covers the first two (scripts/gpu_check.py).
#pragma once

#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#define LN_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One block runs at a time, so a function's static array is its block's shared memory.
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct uint4 {
  unsigned x, y, z, w;
};

namespace emu {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// The running thread's coordinates.
const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
// The running thread's lane in its warp (threads numbered x fastest, then y, then z).
int lane();

// __syncthreads: waits until every thread of the block has arrived.
void sync_block();
// A warp shuffle: posts `bits`, waits until all 32 lanes of the warp have posted, and
// returns the bits lane `src_lane` posted. `kind` and `width` name the shuffle (down or
// indexed, segment width); lanes that meet at shuffles of another kind or width are a
// bug (divergent shuffles, undefined on a GPU), reported as a deadlock.
enum class ShuffleKind { kDown, kIndexed };
uint64_t warp_exchange(uint64_t bits, int src_lane, unsigned mask, ShuffleKind kind, int width);

// The order in which the threads of a block run between two barriers: by index, the
// reverse, or a fresh random permutation each time (seeded). A kernel that reads what
// another thread wrote without a barrier in between (a race on a GPU) sees different
// values under different orders, so running tests under several orders exposes it.
enum class Schedule { kInOrder, kReverse, kShuffled };
void set_schedule(Schedule schedule, uint64_t seed = 0);

// A vector access of `bytes` bytes at p: a GPU faults ("misaligned address") unless p is
// a multiple of `bytes`, where x86 would read or write on. Throws std::runtime_error then.
void check_aligned(const void* p, size_t bytes);

// Runs body() as every thread of every block of the grid, one block at a time. Throws
// std::runtime_error on a deadlock (threads of a block waiting at different barriers,
// or for threads that have exited) and on an exception thrown by a thread.
void launch(dim3 grid, dim3 block, const std::function<void()>& body);

template <typename V>
V shuffle_from(unsigned mask, V value, int src_lane, ShuffleKind kind, int width) {
  static_assert(std::is_trivially_copyable_v<V> && sizeof(V) <= sizeof(uint64_t));
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(V));
  bits = warp_exchange(bits, src_lane, mask, kind, width);
  std::memcpy(&value, &bits, sizeof(V));
  return value;
}

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())

inline void __syncthreads() { emu::sync_block(); }

// Whether pred holds in any thread of the block, as a barrier: one block runs at a time,
// so a static is its shared memory; barriers on both sides of each write keep the
// threads' orders (set_schedule) from mattering.
inline int __syncthreads_or(int pred) {
  static int any;
  emu::sync_block();  // every thread has read the previous call's result
  if (emu::thread_idx().x == 0 && emu::thread_idx().y == 0 && emu::thread_idx().z == 0) any = 0;
  emu::sync_block();
  if (pred) any = 1;
  emu::sync_block();
  return any;
}

// CUDA's semantics: within segments of `width` lanes, lane i reads lane i + delta of its
// segment (its own value past the segment's end) / lane src of its segment.
template <typename V>
V __shfl_down_sync(unsigned mask, V value, unsigned delta, int width = emu::kWarpSize) {
  const int lane = emu::lane();
  const int src = lane % width + static_cast<int>(delta) < width ? lane + static_cast<int>(delta)
                                                                  : lane;
  return emu::shuffle_from(mask, value, src, emu::ShuffleKind::kDown, width);
}

template <typename V>
V __shfl_sync(unsigned mask, V value, int src_lane, int width = emu::kWarpSize) {
  const int lane = emu::lane();
  return emu::shuffle_from(mask, value, lane / width * width + src_lane % width,
                           emu::ShuffleKind::kIndexed, width);
}

// Whether pred holds in any lane of the warp: every lane reads every lane's pred, with the
// full-warp shuffles' checks (a lane that diverged deadlocks, as on a GPU it is undefined).
inline int __any_sync(unsigned mask, int pred) {
  int any = 0;
  for (int src = 0; src < emu::kWarpSize; ++src) any |= __shfl_sync(mask, pred != 0, src);
  return any;
}
