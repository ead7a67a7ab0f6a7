// The CUDA backend's kernels and launch logic (csrc/cuda/layernorm_cuda_kernels.cuh and
// the kernel headers it includes), compiled for the CPU and run on the emulator, behind
// the same host code as the real operators (layernorm.h: checks, allocation, dtype dispatch). A Python module for
// tests/test_cuda_emulated.py: layer_norm_forward(...) etc. take CPU tensors and
// return what the CUDA operators would return.
#include "cuda_emulation.h"  // first: makes the CUDA sources host C++

#include <torch/extension.h>

#include <stdexcept>
#include <string>
#include <utility>

#include "cuda/layernorm_cuda_kernels.cuh"

namespace layernorm_ext {
namespace {

struct EmulatedLaunch {
  template <typename... KernelArgs, typename... Args>
  void operator()(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, Args&&... args) const {
    emu::launch(grid, block, [&] { kernel(args...); });
  }

  // A device that runs 3 blocks at once: the forwards' blocks then loop over several row
  // groups in the tests, as they do on a GPU.
  template <typename... KernelArgs>
  int64_t resident_blocks(void (*)(KernelArgs...), dim3) const {
    return 3;
  }
};

struct ForwardKernel {
  template <typename NormTag, typename InputTag, typename ParamTag>
  void operator()(NormTag, InputTag, ParamTag, const ForwardArgs& args) const {
    cuda_kernels::launch_forward<NormTag::value, typename InputTag::type, typename ParamTag::type>(
        args, EmulatedLaunch{});
  }
};

struct BackwardKernel {
  template <typename NormTag, typename InputTag, typename ParamTag>
  void operator()(NormTag, InputTag, ParamTag, const BackwardArgs& args) const {
    cuda_kernels::launch_backward<NormTag::value, typename InputTag::type, typename ParamTag::type>(
        args, EmulatedLaunch{});
  }
};

// The launch configuration the CUDA launcher picks: (kind, elems per thread, threads per
// row, rows per block), for tests that want to know which kernel variant a case reached.
std::tuple<std::string, int, int, int> config_of(bool backward, int64_t cols, int elem_bytes,
                                                 bool vectorized) {
  const auto c = backward ? cuda_config::backward_config(cols, elem_bytes, vectorized)
                          : cuda_config::forward_config(cols, elem_bytes, vectorized);
  return {c.kind == cuda_config::Kind::kStreaming ? "streaming" : "registers", c.elems_per_thread,
          c.threads_per_row, c.rows_per_block};
}

// The emulator's own checks, so that they are known to fire. Lane i's value after one
// shuffle of the lane numbers: __shfl_down_sync(delta = arg, width) or, `indexed`,
// __shfl_sync(src_lane = arg, width).
std::vector<int64_t> shuffled_lanes(bool indexed, int arg, int width) {
  std::vector<int64_t> out(emu::kWarpSize);
  emu::launch(dim3(1), dim3(emu::kWarpSize), [&] {
    const int lane = static_cast<int>(threadIdx.x);
    out[lane] = indexed ? __shfl_sync(emu::kFullMask, lane, arg, width)
                        : __shfl_down_sync(emu::kFullMask, lane, arg, width);
  });
  return out;
}

// A kernel whose lanes shuffle with different widths: undefined on a GPU, an error here.
void divergent_shuffle() {
  emu::launch(dim3(1), dim3(emu::kWarpSize), [] {
    const int lane = static_cast<int>(threadIdx.x);
    __shfl_down_sync(emu::kFullMask, lane, 1, lane < 16 ? 16 : 32);
  });
}

// A racy kernel: thread 1 reads what thread 0 writes to shared memory, without a
// barrier in between. What it reads depends on the schedule.
int64_t racy_read() {
  int64_t read = -1;
  emu::launch(dim3(1), dim3(emu::kWarpSize), [&] {
    __shared__ int64_t cell;
    if (threadIdx.x == 0) cell = 0;
    __syncthreads();
    if (threadIdx.x == 0) cell = 1;
    if (threadIdx.x == 1) read = cell;
  });
  return read;
}

void set_schedule(const std::string& name, int64_t seed) {
  emu::Schedule s;
  if (name == "in_order") {
    s = emu::Schedule::kInOrder;
  } else if (name == "reverse") {
    s = emu::Schedule::kReverse;
  } else if (name == "shuffled") {
    s = emu::Schedule::kShuffled;
  } else {
    throw std::invalid_argument("schedule: in_order, reverse or shuffled, not " + name);
  }
  emu::set_schedule(s, static_cast<uint64_t>(seed));
}

// A kernel whose odd threads skip a __syncthreads: undefined on a GPU, an error here.
void divergent_barrier() {
  emu::launch(dim3(1), dim3(64), [] {
    if (threadIdx.x % 2 == 0) __syncthreads();
  });
}

}  // namespace
}  // namespace layernorm_ext

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace layernorm_ext;
  m.doc() = "layernorm_ext's CUDA kernels run on a CPU emulator (tests only)";
  m.def("layer_norm_forward", &layer_norm_forward<ForwardKernel>);
  m.def("layer_norm_backward", &layer_norm_backward<BackwardKernel>);
  m.def("rms_norm_forward", &rms_norm_forward<ForwardKernel>);
  m.def("rms_norm_backward", &rms_norm_backward<BackwardKernel>);
  m.def("config_of", &config_of);
  m.def("shuffled_lanes", &shuffled_lanes, pybind11::arg("indexed"), pybind11::arg("arg"),
        pybind11::arg("width"));
  m.def("divergent_barrier", &divergent_barrier);
  m.def("divergent_shuffle", &divergent_shuffle);
  m.def("racy_read", &racy_read);
  m.def("set_schedule", &set_schedule, pybind11::arg("name"), pybind11::arg("seed") = 0);
}
