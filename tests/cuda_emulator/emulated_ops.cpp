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

// A tensor of out's shape and dtype whose start is as far past a 16-byte boundary as
// like's. The ops allocate their outputs on one, so through them the vectorized kernels
// only see tensors that all start on one; the *_outputs_like_input entry points below
// run them on tensors that all start mid-vector, as a caller with such outputs would.
at::Tensor at_misalignment_of(const at::Tensor& like, const at::Tensor& out) {
  const int64_t elem = like.element_size(), vec = 16 / elem;
  const auto misalign = [&](const at::Tensor& t) {
    return static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.const_data_ptr()) / elem % vec);
  };
  at::Tensor storage = at::empty({out.numel() + vec}, out.options());
  const int64_t shift = (misalign(like) - misalign(storage) + vec) % vec;
  return storage.narrow(0, shift, out.numel()).view(out.sizes());
}

// kOutputsLikeInput: the kernels write y (dx) at the input's misalignment, copied into
// the op's output afterwards.
template <bool kOutputsLikeInput>
struct ForwardKernel {
  template <typename NormTag, typename InputTag, typename ParamTag>
  void operator()(NormTag, InputTag, ParamTag, const ForwardArgs& args) const {
    ForwardArgs launched = args;
    if (kOutputsLikeInput) launched.output = at_misalignment_of(args.input, args.output);
    cuda_kernels::launch_forward<NormTag::value, typename InputTag::type, typename ParamTag::type>(
        launched, EmulatedLaunch{});
    if (kOutputsLikeInput) args.output.copy_(launched.output);
  }
};

template <bool kOutputsLikeInput>
struct BackwardKernel {
  template <typename NormTag, typename InputTag, typename ParamTag>
  void operator()(NormTag, InputTag, ParamTag, const BackwardArgs& args) const {
    BackwardArgs launched = args;
    if (kOutputsLikeInput) launched.grad_input = at_misalignment_of(args.input, args.grad_input);
    cuda_kernels::launch_backward<NormTag::value, typename InputTag::type, typename ParamTag::type>(
        launched, EmulatedLaunch{});
    if (kOutputsLikeInput) args.grad_input.copy_(launched.grad_input);
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

// The unit width the staged kernels read their tiles in, for rows of cols elements whose
// tensors start `misalign` elements past a 16-byte boundary.
int staged_unit_of(int elem_bytes, int64_t cols, int64_t misalign) {
  return cuda_config::staged_unit_width(elem_bytes, cols, misalign);
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

// A 16-byte load `elements` (0 to 4) floats past a 16-byte boundary: a fault on a GPU
// unless 0 or 4, an error here. Returns the first float loaded.
float vector_load_at(int elements) {
  if (elements < 0 || elements > 4) throw std::invalid_argument("vector_load_at: 0 to 4");
  alignas(16) float values[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  float first = 0;
  emu::launch(dim3(1), dim3(emu::kWarpSize), [&] {
    const uint4 v = cuda_kernels::load_raw(values + elements);
    if (threadIdx.x == 0) memcpy(&first, &v.x, sizeof(first));
  });
  return first;
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
  m.def("layer_norm_forward", &layer_norm_forward<ForwardKernel<false>>);
  m.def("layer_norm_backward", &layer_norm_backward<BackwardKernel<false>>);
  m.def("rms_norm_forward", &rms_norm_forward<ForwardKernel<false>>);
  m.def("rms_norm_backward", &rms_norm_backward<BackwardKernel<false>>);
  m.def("layer_norm_forward_outputs_like_input", &layer_norm_forward<ForwardKernel<true>>);
  m.def("layer_norm_backward_outputs_like_input", &layer_norm_backward<BackwardKernel<true>>);
  m.def("rms_norm_forward_outputs_like_input", &rms_norm_forward<ForwardKernel<true>>);
  m.def("rms_norm_backward_outputs_like_input", &rms_norm_backward<BackwardKernel<true>>);
  m.def("config_of", &config_of);
  m.def("staged_unit_of", &staged_unit_of);
  m.attr("staged_units") = cuda_config::kStagedUnits;
  m.def("shuffled_lanes", &shuffled_lanes, pybind11::arg("indexed"), pybind11::arg("arg"),
        pybind11::arg("width"));
  m.def("divergent_barrier", &divergent_barrier);
  m.def("divergent_shuffle", &divergent_shuffle);
  m.def("racy_read", &racy_read);
  m.def("vector_load_at", &vector_load_at);
  m.def("set_schedule", &set_schedule, pybind11::arg("name"), pybind11::arg("seed") = 0);
}
