// The CUDA backend: the kernels (layernorm_cuda_{forward,backward}.cuh, launched through
// layernorm_cuda_kernels.cuh) on the current stream of the input's device, registered as
// the operators' CUDA implementations.
// c10's CUDA headers only: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers
// that a bare CUDA toolkit may lack.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "layernorm_cuda_kernels.cuh"

namespace layernorm_ext {
namespace {

// Blocks of `kernel` (with `threads` threads) that the current device runs at once,
// from the occupancy calculator, asked once per kernel, block size and device.
int64_t resident_blocks(const void* kernel, int threads) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int>, int64_t> known;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::tuple<const void*, int, int> key{kernel, threads, device};
  const std::lock_guard<std::mutex> lock(mutex);
  if (const auto found = known.find(key); found != known.end()) return found->second;
  // Cached only once both queries succeed: a query that throws leaves nothing behind.
  int per_sm = 0, sms = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return known.emplace(key, std::max<int64_t>(int64_t(per_sm) * sms, 1)).first->second;
}

// launch(kernel, grid, block, args...) for cuda_kernels::launch_forward/backward: on
// `stream`, then torch's check of the launch.
struct StreamLaunch {
  cudaStream_t stream;

  template <typename... KernelArgs, typename... Args>
  void operator()(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, Args&&... args) const {
    kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename... KernelArgs>
  int64_t resident_blocks(void (*kernel)(KernelArgs...), dim3 block) const {
    return layernorm_ext::resident_blocks(reinterpret_cast<const void*>(kernel),
                                          static_cast<int>(block.x * block.y * block.z));
  }
};

// The kernel launchers for run_forward/run_backward (layernorm.h), under a device guard.
struct ForwardKernel {
  template <typename NormTag, typename InputTag, typename ParamTag>
  void operator()(NormTag, InputTag, ParamTag, const ForwardArgs& args) const {
    const c10::cuda::OptionalCUDAGuard guard(args.input.device());
    cuda_kernels::launch_forward<NormTag::value, typename InputTag::type, typename ParamTag::type>(
        args, StreamLaunch{c10::cuda::getCurrentCUDAStream()});
  }
};

struct BackwardKernel {
  template <typename NormTag, typename InputTag, typename ParamTag>
  void operator()(NormTag, InputTag, ParamTag, const BackwardArgs& args) const {
    const c10::cuda::OptionalCUDAGuard guard(args.input.device());
    cuda_kernels::launch_backward<NormTag::value, typename InputTag::type, typename ParamTag::type>(
        args, StreamLaunch{c10::cuda::getCurrentCUDAStream()});
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(layernorm_ext, CUDA, m) {
  m.impl("forward", &layer_norm_forward<ForwardKernel>);
  m.impl("backward", &layer_norm_backward<BackwardKernel>);
  m.impl("rms_forward", &rms_norm_forward<ForwardKernel>);
  m.impl("rms_backward", &rms_norm_backward<BackwardKernel>);
}

}  // namespace layernorm_ext
