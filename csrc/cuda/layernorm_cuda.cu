// CUDA kernels. Correct and sound first; speed is tuned separately.
//
// Forward: a block per row (grid-stride over rows), Welford per thread, Chan combine
// across the block, then the normalized row. Backward: a fixed-size grid of blocks,
// each owning a set of rows; per row two block sums, then dx, with dgamma/dbeta added
// to the block's fp32 partial row (every column of it belongs to one thread, so no
// atomics); a second kernel sums the partial rows in a fixed order. The grid size
// depends only on M, so results are bitwise reproducible across runs and GPU models.
// Rows use 16-byte vector accesses when N and every pointer allow it, scalar otherwise.
// c10's CUDA headers only: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers
// that a bare CUDA toolkit may lack.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../layernorm.h"
#include "../layernorm_math.h"

namespace layernorm_ext {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / kWarpSize;
constexpr int64_t kBackwardMaxBlocks = 512;
constexpr int kFinalizeThreads = 256;

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T, int kVec>
__device__ __forceinline__ Pack<T, kVec> load_pack(const T* p, int64_t i) {
  return reinterpret_cast<const Pack<T, kVec>*>(p)[i];
}

// Element k of pack i of a parameter, or `fill` where the parameter is absent.
template <typename acc_t, typename P, int kVec>
__device__ __forceinline__ Pack<acc_t, kVec> load_param_pack(const P* p, int64_t i, acc_t fill) {
  Pack<acc_t, kVec> out;
  if (p) {
    const auto raw = load_pack<P, kVec>(p, i);
#pragma unroll
    for (int k = 0; k < kVec; ++k) out.v[k] = static_cast<acc_t>(raw.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) out.v[k] = fill;
  }
  return out;
}

template <typename acc_t>
struct SumPair {
  acc_t a, b;
};

template <typename acc_t>
__device__ __forceinline__ math::WelfordState<acc_t> shfl_down(math::WelfordState<acc_t> s,
                                                               int offset) {
  return {__shfl_down_sync(0xffffffffu, s.mean, offset),
          __shfl_down_sync(0xffffffffu, s.m2, offset),
          __shfl_down_sync(0xffffffffu, static_cast<long long>(s.count), offset)};
}

template <typename acc_t>
__device__ __forceinline__ SumPair<acc_t> shfl_down(SumPair<acc_t> s, int offset) {
  return {__shfl_down_sync(0xffffffffu, s.a, offset), __shfl_down_sync(0xffffffffu, s.b, offset)};
}

template <typename acc_t>
__device__ __forceinline__ math::WelfordState<acc_t> combine(const math::WelfordState<acc_t>& x,
                                                             const math::WelfordState<acc_t>& y) {
  return math::welford_combine(x, y);
}

template <typename acc_t>
__device__ __forceinline__ SumPair<acc_t> combine(const SumPair<acc_t>& x, const SumPair<acc_t>& y) {
  return {x.a + y.a, x.b + y.b};
}

// Reduces one value per thread over the block in a fixed tree order and returns the
// result to every thread. `identity` fills the unused slots of the last warp.
// `shared` holds kMaxWarps values; blockDim.x is a multiple of 32, at most kMaxThreads.
template <typename S>
__device__ S block_allreduce(S value, S identity, S* shared) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = combine(value, shfl_down(value, offset));
  }
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < warps ? shared[lane] : identity;
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      value = combine(value, shfl_down(value, offset));
    }
    if (lane == 0) shared[0] = value;
  }
  __syncthreads();
  value = shared[0];
  __syncthreads();  // `shared` may be reused right after return
  return value;
}

template <typename T, typename P, int kVec>
__global__ void forward_kernel(const T* __restrict__ x, const P* __restrict__ w,
                               const P* __restrict__ b, T* __restrict__ y,
                               at::opmath_type<T>* __restrict__ mean_out,
                               at::opmath_type<T>* __restrict__ rstd_out, int64_t M, int64_t N,
                               at::opmath_type<T> eps) {
  using acc_t = at::opmath_type<T>;
  using Welford = math::WelfordState<acc_t>;
  __shared__ Welford shared[kMaxWarps];
  const int64_t packs = N / kVec;  // the host guarantees N % kVec == 0

  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const T* xr = x + row * N;
    T* yr = y + row * N;
    Welford s{acc_t(0), acc_t(0), 0};
    for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
      const auto xp = load_pack<T, kVec>(xr, i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) s = math::welford_update(s, static_cast<acc_t>(xp.v[k]));
    }
    s = block_allreduce(s, Welford{acc_t(0), acc_t(0), 0}, shared);
    const acc_t mean = s.mean;
    const acc_t rstd = math::rstd_from_moments(s, eps);
    if (threadIdx.x == 0) {
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
    for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
      const auto xp = load_pack<T, kVec>(xr, i);
      const auto wp = load_param_pack<acc_t, P, kVec>(w, i, acc_t(1));
      const auto bp = load_param_pack<acc_t, P, kVec>(b, i, acc_t(0));
      Pack<T, kVec> yp;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const acc_t xhat = math::normalize(static_cast<acc_t>(xp.v[k]), mean, rstd);
        yp.v[k] = static_cast<T>(math::affine(xhat, wp.v[k], bp.v[k]));
      }
      reinterpret_cast<Pack<T, kVec>*>(yr)[i] = yp;
    }
  }
}

// partial: [gridDim.x][2][N] fp32 (fp64 for fp64), zero-initialized; block g owns row g.
template <typename T, typename P, int kVec>
__global__ void backward_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                const at::opmath_type<T>* __restrict__ mean_in,
                                const at::opmath_type<T>* __restrict__ rstd_in,
                                const P* __restrict__ w, T* __restrict__ dx,
                                at::opmath_type<T>* __restrict__ partial, int64_t M, int64_t N) {
  using acc_t = at::opmath_type<T>;
  using Sums = SumPair<acc_t>;
  __shared__ Sums shared[kMaxWarps];
  const int64_t packs = N / kVec;
  acc_t* dgamma = partial + static_cast<int64_t>(blockIdx.x) * 2 * N;
  acc_t* dbeta = dgamma + N;

  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const T* dyr = dy + row * N;
    const T* xr = x + row * N;
    T* dxr = dx + row * N;
    const acc_t mean = mean_in[row];
    const acc_t rstd = rstd_in[row];

    // Pass 1: sums of g = dy * w and g * xhat.
    Sums sums{acc_t(0), acc_t(0)};
    for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
      const auto dyp = load_pack<T, kVec>(dyr, i);
      const auto xp = load_pack<T, kVec>(xr, i);
      const auto wp = load_param_pack<acc_t, P, kVec>(w, i, acc_t(1));
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const acc_t g = static_cast<acc_t>(dyp.v[k]) * wp.v[k];
        sums.a += g;
        sums.b += g * math::normalize(static_cast<acc_t>(xp.v[k]), mean, rstd);
      }
    }
    sums = block_allreduce(sums, Sums{acc_t(0), acc_t(0)}, shared);
    const acc_t mean_g = sums.a / static_cast<acc_t>(N);
    const acc_t mean_g_xhat = sums.b / static_cast<acc_t>(N);

    // Pass 2: dx and this block's dgamma/dbeta partials (same columns every row).
    for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
      const auto dyp = load_pack<T, kVec>(dyr, i);
      const auto xp = load_pack<T, kVec>(xr, i);
      const auto wp = load_param_pack<acc_t, P, kVec>(w, i, acc_t(1));
      Pack<T, kVec> dxp;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const acc_t dy_k = static_cast<acc_t>(dyp.v[k]);
        const acc_t xhat = math::normalize(static_cast<acc_t>(xp.v[k]), mean, rstd);
        dxp.v[k] = static_cast<T>(math::input_grad(dy_k * wp.v[k], xhat, rstd, mean_g, mean_g_xhat));
        const int64_t col = i * kVec + k;
        dgamma[col] += dy_k * xhat;
        dbeta[col] += dy_k;
      }
      reinterpret_cast<Pack<T, kVec>*>(dxr)[i] = dxp;
    }
  }
}

// grad_weight[j] / grad_bias[j] = sum over blocks, in block order, of the partials.
template <typename acc_t, typename P>
__global__ void finalize_param_grads_kernel(const acc_t* __restrict__ partial, int64_t blocks,
                                            int64_t N, P* __restrict__ grad_weight,
                                            P* __restrict__ grad_bias) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= N) return;
  acc_t dgamma = 0, dbeta = 0;
  for (int64_t g = 0; g < blocks; ++g) {
    dgamma += partial[g * 2 * N + j];
    dbeta += partial[g * 2 * N + N + j];
  }
  grad_weight[j] = static_cast<P>(dgamma);
  grad_bias[j] = static_cast<P>(dbeta);
}

bool is_aligned(const at::Tensor& t, int64_t bytes) {
  return !t.defined() || reinterpret_cast<uintptr_t>(t.const_data_ptr()) % bytes == 0;
}

// Elements per 16-byte access of T if N and every tensor's base allow it, else 1.
template <typename T, typename P>
int vector_width(int64_t N, std::initializer_list<const at::Tensor*> rows,
                 std::initializer_list<const at::Tensor*> params) {
  constexpr int kVec = 16 / sizeof(T);
  if (N % kVec != 0) return 1;
  for (const at::Tensor* t : rows) {
    if (!is_aligned(*t, 16)) return 1;
  }
  for (const at::Tensor* t : params) {
    if (!is_aligned(*t, kVec * sizeof(P))) return 1;
  }
  return kVec;
}

// Threads per block for rows of `packs` vector accesses: whole warps, at most kMaxThreads.
int threads_for(int64_t packs) {
  const int64_t warps = std::min<int64_t>(kMaxWarps, std::max<int64_t>(1, at::ceil_div<int64_t>(packs, kWarpSize)));
  return static_cast<int>(warps * kWarpSize);
}

template <typename T, typename P, int kVec>
void launch_forward(const ForwardArgs& a) {
  using acc_t = at::opmath_type<T>;
  const int64_t M = a.shape.rows, N = a.shape.cols;
  const int64_t blocks = std::min<int64_t>(M, 1 << 20);
  forward_kernel<T, P, kVec><<<blocks, threads_for(N / kVec), 0, c10::cuda::getCurrentCUDAStream()>>>(
      a.input.const_data_ptr<T>(), a.weight.defined() ? a.weight.const_data_ptr<P>() : nullptr,
      a.bias.defined() ? a.bias.const_data_ptr<P>() : nullptr, a.output.mutable_data_ptr<T>(),
      a.mean.mutable_data_ptr<acc_t>(), a.rstd.mutable_data_ptr<acc_t>(), M, N,
      static_cast<acc_t>(a.eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename P, int kVec>
void launch_backward(const BackwardArgs& a) {
  using acc_t = at::opmath_type<T>;
  const int64_t M = a.shape.rows, N = a.shape.cols;
  const int64_t blocks = std::min<int64_t>(M, kBackwardMaxBlocks);
  at::Tensor partial = at::zeros({blocks, 2, N}, a.input.options().dtype(a.mean.scalar_type()));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (blocks > 0) {
    backward_kernel<T, P, kVec><<<blocks, threads_for(N / kVec), 0, stream>>>(
        a.grad_out.const_data_ptr<T>(), a.input.const_data_ptr<T>(),
        a.mean.const_data_ptr<acc_t>(), a.rstd.const_data_ptr<acc_t>(),
        a.weight.defined() ? a.weight.const_data_ptr<P>() : nullptr,
        a.grad_input.mutable_data_ptr<T>(), partial.mutable_data_ptr<acc_t>(), M, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  finalize_param_grads_kernel<acc_t, P><<<at::ceil_div<int64_t>(N, kFinalizeThreads), kFinalizeThreads, 0, stream>>>(
      partial.const_data_ptr<acc_t>(), blocks, N, a.grad_weight.mutable_data_ptr<P>(),
      a.grad_bias.mutable_data_ptr<P>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor3 forward_cuda(const at::Tensor& input, at::IntArrayRef normalized_shape,
                     const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, double eps) {
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  ForwardArgs a = prepare_forward(input, normalized_shape, weight, bias, eps);
  if (a.shape.rows == 0) return {a.output, a.mean, a.rstd};
  LAYERNORM_DISPATCH_TYPES(input.scalar_type(), a.param_dtype, "layernorm_ext_forward_cuda",
                           [&](auto input_tag, auto param_tag) {
    using scalar_t = typename decltype(input_tag)::type;
    using param_t = typename decltype(param_tag)::type;
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (vector_width<scalar_t, param_t>(a.shape.cols, {&a.input, &a.output},
                                        {&a.weight, &a.bias}) == kVec) {
      launch_forward<scalar_t, param_t, kVec>(a);
    } else {
      launch_forward<scalar_t, param_t, 1>(a);
    }
  });
  return {a.output, a.mean, a.rstd};
}

Tensor3 backward_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                      at::IntArrayRef normalized_shape, const at::Tensor& mean,
                      const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias) {
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  BackwardArgs a = prepare_backward(grad_out, input, normalized_shape, mean, rstd, weight, bias);
  if (a.shape.cols == 0) return {a.grad_input, a.grad_weight, a.grad_bias};
  LAYERNORM_DISPATCH_TYPES(input.scalar_type(), a.param_dtype, "layernorm_ext_backward_cuda",
                           [&](auto input_tag, auto param_tag) {
    using scalar_t = typename decltype(input_tag)::type;
    using param_t = typename decltype(param_tag)::type;
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (vector_width<scalar_t, param_t>(a.shape.cols, {&a.grad_out, &a.input, &a.grad_input},
                                        {&a.weight}) == kVec) {
      launch_backward<scalar_t, param_t, kVec>(a);
    } else {
      launch_backward<scalar_t, param_t, 1>(a);
    }
  });
  return {a.grad_input, a.grad_weight, a.grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(layernorm_ext, CUDA, m) {
  m.impl("forward", &forward_cuda);
  m.impl("backward", &backward_cuda);
}

}  // namespace layernorm_ext
