// The CPU emulator behind cuda_emulation.h: a block's threads are coroutines
// on one OS thread. Each runs until it waits (at __syncthreads or a warp shuffle) or
// exits; when no thread can run, the waits that every participant has reached are
// released (a shuffle's values exchanged), and anything else is a deadlock: a bug that
// would hang or be undefined on a GPU, reported as an exception.
//
// A thread starts on its own stack through ucontext (setcontext), once a launch, and
// from then on switches with _setjmp/_longjmp, which, unlike swapcontext, do not save
// and restore the signal mask: a system call at every switch, most of the emulator's
// time before. glibc's fortified longjmp refuses a jump onto another stack; this file
// needs none of it (checked below the includes). A thread never switches inside a catch
// block (the C++ runtime's exception state is per OS thread), so kernels must not call
// __syncthreads or a shuffle there; none does. (Jumps between stacks would also break
// under CET shadow stacks, which this toolchain does not turn on.)
#undef _FORTIFY_SOURCE
#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <exception>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_emulation.h"

#if defined(__USE_FORTIFY_LEVEL) && __USE_FORTIFY_LEVEL > 0
#error "build emulator.cpp without _FORTIFY_SOURCE: its longjmp refuses to switch stacks"
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

namespace emu {
namespace {

enum class State { kReady, kAtBlockBarrier, kAtShuffle, kExited };

struct Thread {
  ucontext_t start;  // its first run: thread_main on its own stack
  jmp_buf resume;    // where it waits, once started
  bool started = false;
  void* asan_fake_stack = nullptr;
  dim3 index;
  State state = State::kReady;
  uint64_t posted = 0;   // shuffle: the value this lane offers
  int src_lane = 0;      // shuffle: the lane whose value it wants
  unsigned mask = 0;
  ShuffleKind kind = ShuffleKind::kDown;
  int width = 0;
  uint64_t received = 0;
};

constexpr size_t kStackBytes = size_t(256) << 10;

struct Launch {
  dim3 grid, block, block_index;
  const std::function<void()>* body = nullptr;
  std::vector<Thread> threads;
  size_t current = 0;
  jmp_buf scheduler;
  std::exception_ptr error;
  // The scheduler's stack, as AddressSanitizer reported it at a thread's first run.
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_bytes = 0;
  void* asan_fake_stack = nullptr;
};

Launch* active = nullptr;  // the launch being run (one at a time: launch_mutex)
std::mutex launch_mutex;
// The threads' stacks, kept from launch to launch (the pages a thread touched stay
// mapped: no page faults at every launch). Guarded by launch_mutex.
std::vector<std::unique_ptr<char[]>> stacks;
Schedule schedule = Schedule::kInOrder;
std::mt19937_64 shuffle_rng;

Thread& running() { return active->threads[active->current]; }

// Under AddressSanitizer (make test-sanitize) every jump to another stack is announced
// as a fiber switch: ASan then knows which stack runs, and clears the frames a jump leaves
// (else it warns that it cannot, and stale poison could give false reports).
#if defined(__SANITIZE_ADDRESS__)
void before_switch(void** fake_stack, const void* bottom, size_t bytes) {
  __sanitizer_start_switch_fiber(fake_stack, bottom, bytes);
}
void after_switch(void* fake_stack, const void** old_bottom, size_t* old_bytes) {
  __sanitizer_finish_switch_fiber(fake_stack, old_bottom, old_bytes);
}
#else
void before_switch(void**, const void*, size_t) {}
void after_switch(void*, const void**, size_t*) {}
#endif

void wait_as(State state) {
  Thread& self = running();
  self.state = state;
  if (_setjmp(self.resume) == 0) {
    // A thread that exits the launch's last block is never resumed: ASan may free its
    // fake stack (nullptr), which it would otherwise keep for the switch back.
    const bool last_switch =
        state == State::kExited && active->block_index.x + 1 == active->grid.x;
    before_switch(last_switch ? nullptr : &self.asan_fake_stack, active->scheduler_stack,
                  active->scheduler_stack_bytes);
    _longjmp(active->scheduler, 1);
  }
  after_switch(self.asan_fake_stack, nullptr, nullptr);
}

// A thread runs the body once for each block of the launch: having exited one block, it
// waits to be resumed for the next (its stack left as it was: nothing to restart).
void thread_main() {
  after_switch(nullptr, &active->scheduler_stack, &active->scheduler_stack_bytes);
  for (;;) {
    try {
      (*active->body)();
    } catch (...) {
      if (!active->error) active->error = std::current_exception();
    }
    wait_as(State::kExited);
  }
}

// Runs thread t until it waits or exits. Its own frame (never inlined) changes no local
// between its _setjmp and the jump back, so no local anywhere needs to be volatile.
__attribute__((noinline)) void resume(Launch& l, Thread& t) {
  if (_setjmp(l.scheduler) != 0) {  // back from t
    after_switch(l.asan_fake_stack, nullptr, nullptr);
    return;
  }
  before_switch(&l.asan_fake_stack, t.start.uc_stack.ss_sp, t.start.uc_stack.ss_size);
  if (t.started) _longjmp(t.resume, 1);
  t.started = true;
  setcontext(&t.start);
}

const char* name_of(State s) {
  switch (s) {
    case State::kReady: return "ready";
    case State::kAtBlockBarrier: return "__syncthreads";
    case State::kAtShuffle: return "shuffle";
    case State::kExited: return "exited";
  }
  return "?";
}

[[noreturn]] void deadlock(const Launch& l, const char* why) {
  std::ostringstream msg;
  msg << "cuda emulator: deadlock in block " << l.block_index.x << " (" << why << "); threads:";
  for (size_t i = 0; i < l.threads.size(); ++i) {
    if (i == 64) {
      msg << " ...";
      break;
    }
    msg << " " << i << ":" << name_of(l.threads[i].state);
  }
  throw std::runtime_error(msg.str());
}

// Releases every warp whose 32 lanes all wait at a shuffle; true if one was.
bool release_shuffles(Launch& l) {
  bool released = false;
  for (size_t first = 0; first < l.threads.size(); first += kWarpSize) {
    Thread* lanes = &l.threads[first];
    int waiting = 0;
    for (int i = 0; i < kWarpSize; ++i) waiting += lanes[i].state == State::kAtShuffle;
    if (waiting == 0) continue;
    if (waiting < kWarpSize) continue;  // the others may still arrive; checked by the caller
    for (int i = 0; i < kWarpSize; ++i) {
      if (lanes[i].mask != kFullMask) deadlock(l, "a shuffle without the full warp mask");
      if (lanes[i].kind != lanes[0].kind || lanes[i].width != lanes[0].width) {
        deadlock(l, "lanes of a warp at shuffles of different kinds or widths");
      }
      const int src = lanes[i].src_lane;
      if (src < 0 || src >= kWarpSize) deadlock(l, "a shuffle from a lane outside the warp");
      lanes[i].received = lanes[src].posted;
    }
    for (int i = 0; i < kWarpSize; ++i) lanes[i].state = State::kReady;
    released = true;
  }
  return released;
}

void run_block(Launch& l) {
  const size_t n = l.threads.size();
  for (Thread& t : l.threads) t.state = State::kReady;
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), size_t(0));
  if (schedule == Schedule::kReverse) std::reverse(order.begin(), order.end());
  for (;;) {
    if (schedule == Schedule::kShuffled) std::shuffle(order.begin(), order.end(), shuffle_rng);
    for (const size_t i : order) {
      if (l.threads[i].state != State::kReady) continue;
      l.current = i;
      resume(l, l.threads[i]);
      if (l.error) std::rethrow_exception(l.error);
    }
    size_t exited = 0, at_barrier = 0;
    for (const Thread& t : l.threads) {
      exited += t.state == State::kExited;
      at_barrier += t.state == State::kAtBlockBarrier;
    }
    if (exited == n) return;
    if (release_shuffles(l)) continue;
    if (at_barrier == n) {
      for (Thread& t : l.threads) t.state = State::kReady;
      continue;
    }
    deadlock(l, exited > 0 ? "threads wait for threads that have exited"
                           : "threads wait at different barriers");
  }
}

}  // namespace

const dim3& thread_idx() { return running().index; }
const dim3& block_idx() { return active->block_index; }
const dim3& block_dim() { return active->block; }
const dim3& grid_dim() { return active->grid; }
int lane() { return static_cast<int>(active->current % kWarpSize); }

void set_schedule(Schedule s, uint64_t seed) {
  std::lock_guard<std::mutex> lock(launch_mutex);
  schedule = s;
  shuffle_rng.seed(seed);
}

void sync_block() { wait_as(State::kAtBlockBarrier); }

uint64_t warp_exchange(uint64_t bits, int src_lane, unsigned mask, ShuffleKind kind, int width) {
  Thread& self = running();
  self.posted = bits;
  self.src_lane = src_lane;
  self.mask = mask;
  self.kind = kind;
  self.width = width;
  wait_as(State::kAtShuffle);
  return running().received;
}

void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    std::ostringstream message;
    message << "cuda emulator: misaligned address: a " << bytes << "-byte access at " << p;
    throw std::runtime_error(message.str());
  }
}

void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  const size_t threads = size_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || threads % kWarpSize != 0) {
    throw std::runtime_error("cuda emulator: a block of " + std::to_string(threads) +
                             " threads (the kernels launch whole warps, at most 1024)");
  }
  if (grid.y != 1 || grid.z != 1) throw std::runtime_error("cuda emulator: 1-D grids only");
  std::lock_guard<std::mutex> lock(launch_mutex);
  Launch l;
  l.grid = grid;
  l.block = block;
  l.body = &body;
  l.threads.resize(threads);
  while (stacks.size() < threads) stacks.emplace_back(new char[kStackBytes]);
  for (size_t i = 0; i < threads; ++i) {
    Thread& t = l.threads[i];
    t.index = dim3(static_cast<unsigned>(i % block.x),
                   static_cast<unsigned>(i / block.x % block.y),
                   static_cast<unsigned>(i / (size_t(block.x) * block.y)));
    getcontext(&t.start);
    t.start.uc_stack.ss_sp = stacks[i].get();
    t.start.uc_stack.ss_size = kStackBytes;
    t.start.uc_link = nullptr;  // thread_main never returns
    makecontext(&t.start, thread_main, 0);
  }
  active = &l;
  try {
    for (unsigned b = 0; b < grid.x; ++b) {
      l.block_index = dim3(b);
      run_block(l);
    }
  } catch (...) {
    active = nullptr;
    throw;
  }
  active = nullptr;
}

}  // namespace emu
